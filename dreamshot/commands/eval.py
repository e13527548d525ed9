"""`dreamshot eval BENCH [key=value ...] (--run DIR | --lora FILE | --base | --outputs DIR) [--mode M] [--out DIR]`.

BENCH is toy, dreamshot_test or vistorybench (their data paths and every metric's weights are `eval.*` config
keys, best kept in conf/local.yaml; see docs/evaluation.md). With a model (--run, --lora, --base) the
storyboards are drawn first; with --outputs an existing folder in ViStoryBench's layout (`<story id>/shot_01.png`
…) is scored. Writes results.json and results.csv into --out, logs a W&B table when the logger is W&B, and prints
the results beside the paper's published rows for the benchmark and mode. A metric whose weights are not set is
reported as missing.

Run it again with the same --out and only what is missing is drawn and scored again (cached features, judge
answers); `--redraw` draws again a folder drawn with another config (else refused). Under
`torchrun --nproc-per-node N -m dreamshot.cli eval ...` the stories are shared by the N processes
(docs/evaluation.md "Several GPUs").
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from dreamshot.commands import add_override_arguments
from dreamshot.config.load import load_config
from dreamshot.config.schema import EVAL_BENCHMARKS, EVAL_MODES, Config
from dreamshot.eval.runner import evaluate
from dreamshot.eval.sharding import Ranks
from dreamshot.inference.loading import (
    add_weight_arguments,
    check_sampling,
    check_steps,
    load_model,
    read_lora,
    weights_and_config,
)
from dreamshot.inference.pipeline import StoryboardPipeline
from dreamshot.training.callbacks import LORA_FILE
from dreamshot.utils.devices import pick_device
from dreamshot.utils.errors import DataError
from dreamshot.utils.io import check_output_dir


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("benchmark", choices=EVAL_BENCHMARKS, help="benchmark to score")
    add_override_arguments(parser)
    source = add_weight_arguments(parser)
    source.add_argument("--outputs", type=Path, help="score this folder of shots instead of drawing them")
    parser.add_argument("--mode", choices=EVAL_MODES, help="r2s, t2s or s2s (default: eval.mode)")
    parser.add_argument(
        "--out", type=Path, help="results folder (default: outputs/eval/<run or weights>-<benchmark>-<mode>)"
    )
    parser.add_argument("--label", help="name of this run's row in the table (default: the weights' name)")
    parser.add_argument("--device", default=None, help="torch device (default: eval.device, else cuda when available)")
    parser.add_argument(
        "--redraw", action="store_true", help="draw again the stories of an --out folder drawn with another config"
    )


def run(args: argparse.Namespace) -> None:
    if args.outputs and not args.outputs.is_dir():
        raise DataError(f"--outputs {args.outputs}: not a folder of shots")
    overrides = [*args.overrides, f"eval.benchmark={args.benchmark}"]
    if args.mode:
        overrides.append(f"eval.mode={args.mode}")
    weights, cfg = (None, load_config(args.config, overrides)) if args.outputs else weights_and_config(args, overrides)
    device = pick_device(args.device, "--device") if args.device else pick_device(cfg.eval.device, "eval.device")
    out = args.out or Path("outputs") / "eval" / f"{scored_name(args, cfg)}-{cfg.eval.benchmark}-{cfg.eval.mode}"
    check_output_dir(out, "--out")
    label = args.label or _label(args)
    ranks = Ranks.from_environment(device.type)
    device = ranks.device(device)
    try:
        if args.outputs:
            evaluate(cfg, out, device, label, outputs=args.outputs, ranks=ranks)
            return

        # The LoRA is read (and checked) now, before anything is written; the model is built only by a rank with a
        # story left to draw.
        lora = read_lora(weights) if weights is not None else None
        check_steps(
            cfg.inference, cfg.eval.steps or cfg.inference.steps, "eval.steps" if cfg.eval.steps else "inference.steps"
        )
        second = check_sampling(cfg)

        def load_pipeline() -> StoryboardPipeline:
            model_cfg, adapter = load_model(cfg, weights, device, lora, second)
            return StoryboardPipeline(adapter, model_cfg)

        evaluate(cfg, out, device, label, load_pipeline, weights=weights, ranks=ranks, redraw=args.redraw)
    finally:
        ranks.close()


def scored_name(args: argparse.Namespace, cfg: Config) -> str:
    """What is scored, for the default results folder: the run's name (`toy_racl_ablation-with_racl`), with a
    checkpoint's or LoRA file's stem when it is not the run's own `lora` (`demo-step000100`), `base`, or the
    folder of outputs — so scoring a second checkpoint does not overwrite the first's results."""
    if args.outputs:
        return _folder_name(args.outputs)
    if args.base:
        return "base"
    run = cfg.name.replace("/", "-")
    stem = Path(args.lora).stem if args.lora else Path(LORA_FILE).stem
    return run if stem == Path(LORA_FILE).stem else f"{run}-{stem}"


def _folder_name(folder: Path) -> str:
    """The name of `folder`, `.` and `..` normalised away (a symbolic link keeps its own name)."""
    return Path(os.path.abspath(folder)).name


def _label(args: argparse.Namespace) -> str:
    if args.outputs:
        return _folder_name(args.outputs)
    if args.run:
        return f"ours ({args.run.name})"
    return f"ours ({args.lora.stem})" if args.lora else "ours (base)"
