"""`dreamshot toyworld`: write the procedural toy storyboard set (images, masks, manifest.jsonl)."""

from __future__ import annotations

import argparse

from dreamshot.config.schema import ToyWorldConfig
from dreamshot.data.manifest import load_manifest
from dreamshot.data.toyworld import generate_toyworld, toyworld_bytes
from dreamshot.utils.io import check_output_dir


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = ToyWorldConfig()
    parser.add_argument("--out", required=True, help="output folder (manifest.jsonl and one folder per group)")
    parser.add_argument("--groups", type=int, default=defaults.groups, help="number of storyboard groups")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="group i depends only on (seed, i)")
    parser.add_argument("--height", type=int, default=defaults.image_size[0], help="shot height in pixels")
    parser.add_argument("--width", type=int, default=defaults.image_size[1], help="shot width in pixels")
    parser.add_argument("--min-shots", type=int, default=defaults.min_shots, help="fewest shots per group")
    parser.add_argument("--max-shots", type=int, default=defaults.max_shots, help="most shots per group")
    parser.add_argument("--max-roles", type=int, default=defaults.max_roles, help="most roles per group")
    parser.add_argument(
        "--real-share", type=float, default=defaults.real_share, help="share of groups labelled real (noisy images)"
    )


def run(args: argparse.Namespace) -> None:
    need = toyworld_bytes(args.groups, (args.height, args.width), args.max_shots, args.max_roles)
    check_output_dir(args.out, "--out", need, "the toy world's images")
    manifest = generate_toyworld(
        args.out,
        groups=args.groups,
        seed=args.seed,
        image_size=(args.height, args.width),
        min_shots=args.min_shots,
        max_shots=args.max_shots,
        max_roles=args.max_roles,
        real_share=args.real_share,
    )
    # Read back through the validating loader: the counts printed are those a training run will see.
    records = load_manifest(manifest)
    shots = sum(len(r.shots) for r in records)
    refs = sum(len(r.references) for r in records)
    print(manifest)
    real = sum(r.source == "real" for r in records)
    print(f"{len(records)} groups ({real} real, {len(records) - real} synthetic), {shots} shots, {refs} references")
