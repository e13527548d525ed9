"""`dreamshot toyworld`: write the procedural toy storyboard set (images, masks, manifest.jsonl)."""

from __future__ import annotations

import argparse

from dreamshot.config.schema import ToyWorldConfig
from dreamshot.config.values import TOY_WORLD_RULES
from dreamshot.data.manifest import load_manifest
from dreamshot.data.toyworld import generate_toyworld, toyworld_bytes
from dreamshot.utils.arguments import ruled, seed_value
from dreamshot.utils.io import check_output_dir


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults, rules = ToyWorldConfig(), TOY_WORLD_RULES
    parser.add_argument("--out", required=True, help="output folder (manifest.jsonl and one folder per group)")
    parser.add_argument(
        "--groups", type=ruled(rules["groups"]), default=defaults.groups, help="storyboard groups (default %(default)s)"
    )
    parser.add_argument(
        "--seed", type=seed_value, default=defaults.seed, help="group i depends only on (seed, i) (default %(default)s)"
    )
    side = ruled(rules["image_size[]"])
    parser.add_argument(
        "--height", type=side, default=defaults.image_size[0], help="shot height in pixels (default %(default)s)"
    )
    parser.add_argument(
        "--width", type=side, default=defaults.image_size[1], help="shot width in pixels (default %(default)s)"
    )
    shots = ruled(rules["min_shots"])
    parser.add_argument(
        "--min-shots", type=shots, default=defaults.min_shots, help="fewest shots per group (default %(default)s)"
    )
    parser.add_argument(
        "--max-shots", type=shots, default=defaults.max_shots, help="most shots per group (default %(default)s)"
    )
    parser.add_argument(
        "--max-roles",
        type=ruled(rules["max_roles"]),
        default=defaults.max_roles,
        help="most roles per group (default %(default)s)",
    )
    parser.add_argument(
        "--real-share",
        type=ruled(rules["real_share"], float),
        default=defaults.real_share,
        help="share of groups labelled real (noisy images; default %(default)s)",
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
