"""`dreamshot plan EXPERIMENT [key=value ...] [options]`: parameters, tokens, FLOPs and per-GPU memory of a
training step, computed analytically (nothing is allocated, no GPU needed). With `--eval BENCH`: the cost of
drawing that benchmark with the experiment's model instead, per mode (forwards, FLOPs, GPU-hours at a stated
MFU, and the hours of the most loaded of `--gpus` GPUs)."""

from __future__ import annotations

import argparse
import dataclasses
import math
import tempfile
from pathlib import Path

from dreamshot.commands import add_experiment_arguments
from dreamshot.config.load import load_config
from dreamshot.config.schema import EVAL_BENCHMARKS, Config, ContextParallelConfig, PhaseConfig
from dreamshot.planner.plan import config_training, config_workload, longest_storyboard, plan_phase
from dreamshot.planner.report import render
from dreamshot.planner.sampling import DEFAULT_MFU, PEAK_TFLOPS
from dreamshot.planner.shape import model_shape
from dreamshot.planner.workload import Training, Workload, parse_resolution, tokens_per_frame
from dreamshot.utils.errors import ConfigError

# Storyboards longer than this are not searched for (the longest that fits is reported as at least this).
LONGEST_SEARCHED = 1000


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_experiment_arguments(parser)
    parser.add_argument("--shots", type=int, default=8, help="shots per storyboard (default 8)")
    parser.add_argument("--refs", type=int, default=3, help="reference images per storyboard (default 3)")
    parser.add_argument(
        "--resolution",
        help="HEIGHTxWIDTH, 192p or 480p (default: each curriculum phase's, else data.resolution)",
    )
    parser.add_argument("--phase", type=int, help="plan only this curriculum phase (1-based; default: all)")
    parser.add_argument("--micro-batch", type=int, help="samples per GPU step (default: data.batch_size)")
    parser.add_argument(
        "--zero", type=int, choices=range(4), help="DeepSpeed ZeRO stage (default: from trainer.strategy)"
    )
    parser.add_argument("--gpus", type=int, help="world size (default: trainer.devices x trainer.num_nodes)")
    parser.add_argument(
        "--checkpointing",
        action=argparse.BooleanOptionalAction,
        help="gradient checkpointing of the DiT blocks (default: trainer.gradient_checkpointing)",
    )
    parser.add_argument("--gpu-memory", type=float, help="GiB per GPU (default: trainer.device_memory_gib)")
    parser.add_argument(
        "--racl-queries",
        type=int,
        help="|Q|, query rows of one role-attention capture chunk (default: one frame's tokens)",
    )
    parser.add_argument(
        "--context-parallel",
        type=int,
        help="GPUs that split one storyboard's sequence (default: trainer.context_parallel.degree)",
    )
    parser.add_argument(
        "--link-bandwidth",
        type=float,
        default=200.0,
        help="GB/s one GPU sends at inside its context-parallel group, for the seconds (default 200)",
    )
    parser.add_argument(
        "--encoders",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="count umT5 and the VAE as resident on the GPU (--no-encoders: latents and texts are cached)",
    )
    parser.add_argument("--eval", choices=EVAL_BENCHMARKS, help="plan drawing this benchmark instead of training")
    parser.add_argument("--mfu", type=float, default=DEFAULT_MFU, help=f"--eval: MFU assumed (default {DEFAULT_MFU})")
    parser.add_argument(
        "--gpu-tflops", type=float, default=PEAK_TFLOPS, help=f"--eval: peak TFLOPS of a GPU (default {PEAK_TFLOPS:g})"
    )


def run(args: argparse.Namespace) -> None:
    cfg = load_config(args.experiment, args.overrides)
    if args.gpu_memory is None:  # the memory training windows long storyboards by (context parallelism)
        args.gpu_memory = cfg.trainer.device_memory_gib
    _check_counts(args)
    if args.eval:
        _plan_eval(cfg, args)
        return
    shape = model_shape(cfg.model)
    training = config_training(cfg, args.gpus, args.zero)
    _check_context_parallel(args, training, shape.num_heads, cfg.trainer.context_parallel)
    phases = cfg.phases()
    plans, longest = [], []
    for i in _chosen_phases(phases, args.phase):
        height, width = parse_resolution(args.resolution) if args.resolution else phases[i].resolution
        work = _workload(cfg, args, cfg.racl_weight(i), tokens_per_frame(height, width, "resolution"))
        _check_ring(work, f"{height}x{width}")
        racl = f"RACL (weight {cfg.racl_weight(i):g}) in {work.racl_blocks} blocks" if work.racl_blocks else ""
        label = f"phase {i + 1}/{len(phases)}: {height}x{width}, {racl or 'no RACL'}"
        plans.append(plan_phase(label, shape, work, training, args.encoders))
        longest.append(longest_storyboard(shape, work, training, args.gpu_memory, args.encoders, LONGEST_SEARCHED))
    report = render(_header(cfg, training, plans[0].work), shape, plans, args.gpu_memory, args.link_bandwidth, longest)
    print(report, end="")


def _plan_eval(cfg: Config, args: argparse.Namespace) -> None:
    from dreamshot.eval.benchmarks import load_benchmark  # imported here: a training plan needs none of it
    from dreamshot.eval.cost import benchmark_plan

    if not 0 < args.mfu <= 1 or args.gpu_tflops <= 0:
        raise ConfigError(f"--mfu must be in (0, 1] and --gpu-tflops > 0, got {args.mfu} and {args.gpu_tflops}")
    ev = dataclasses.replace(cfg.eval, benchmark=args.eval)
    size = parse_resolution(args.resolution) if args.resolution else tuple(cfg.data.resolution)
    steps = ev.steps or cfg.inference.steps
    with tempfile.TemporaryDirectory() as work:  # the toy benchmark is written, then forgotten
        bench = load_benchmark(ev, Path(work))
        print(benchmark_plan(cfg, bench, size, steps, args.gpus or 1, args.mfu, args.gpu_tflops), end="")


def _workload(cfg: Config, args: argparse.Namespace, racl_weight: float, per_frame: int) -> Workload:
    return config_workload(
        cfg,
        args.shots,
        args.refs,
        per_frame,
        racl_weight,
        micro_batch=args.micro_batch,
        checkpointing=args.checkpointing,
        racl_queries=args.racl_queries,
        context_parallel=args.context_parallel,
    )


def _check_context_parallel(
    args: argparse.Namespace, training: Training, heads: int, configured: ContextParallelConfig
) -> None:
    """The degree planned (--context-parallel, else the config's, which --gpus may no longer suit)."""
    if not math.isfinite(args.link_bandwidth) or args.link_bandwidth <= 0:
        raise ConfigError(f"--link-bandwidth must be a finite number > 0, got {args.link_bandwidth}")
    degree = configured.degree if args.context_parallel is None else args.context_parallel
    source = (
        f"trainer.context_parallel.degree={degree}" if args.context_parallel is None else f"--context-parallel {degree}"
    )
    if degree < 1 or training.world_size % degree:
        raise ConfigError(f"{source} must be >= 1 and divide the {training.world_size} GPU(s)")
    if configured.attention == "ulysses" and heads % degree:
        raise ConfigError(f"{source} does not divide the model's {heads} attention heads (ulysses)")


def _check_ring(work: Workload, resolution: str) -> None:
    """Ring attention cannot pad (models/wan/context_parallel.py): the trainer refuses what this would plan."""
    degree, per_frame = work.context_parallel, work.tokens_per_frame
    if degree > 1 and work.context_parallel_attention == "ring" and per_frame % degree:
        raise ConfigError(
            f"context parallel {degree} with trainer.context_parallel.attention=ring cannot pad: {degree} must divide "
            f"the {per_frame} tokens per frame of {resolution}; use attention=ulysses"
        )


def _check_counts(args: argparse.Namespace) -> None:
    minimum = {"shots": 1, "refs": 0, "micro_batch": 1, "gpus": 1, "racl_queries": 0}
    for key, least in minimum.items():
        value = getattr(args, key)
        if value is not None and value < least:
            raise ConfigError(f"--{key.replace('_', '-')} must be >= {least}, got {value}")
    if not math.isfinite(args.gpu_memory) or args.gpu_memory <= 0:
        raise ConfigError(f"--gpu-memory must be a finite number > 0, got {args.gpu_memory}")


def _chosen_phases(phases: list[PhaseConfig], phase: int | None) -> list[int]:
    if phase is None:
        return list(range(len(phases)))
    if not 1 <= phase <= len(phases):
        raise ConfigError(f"--phase {phase}: the config has {len(phases)} phase(s) (1..{len(phases)})")
    return [phase - 1]


def _header(cfg: Config, training: Training, work: Workload) -> str:
    lora = cfg.model.lora
    zero = f"DeepSpeed ZeRO-{training.zero_stage}" if training.zero_stage else "no ZeRO (DDP)"
    return "\n".join(
        [
            f"dreamshot plan: {cfg.name}, model {cfg.model.name} ({cfg.model.dtype}), "
            f"LoRA rank {lora.rank} on {', '.join(lora.target_modules)}",
            f"  {training.world_size} GPU(s), {zero}, context parallel {work.context_parallel}, "
            f"precision {cfg.trainer.precision}, micro-batch {work.micro_batch}, accumulate {training.accumulate}, "
            f"gradient checkpointing {'on' if work.checkpointing else 'off'}, "
            f"{cfg.diffusion.timestep_mode} timesteps, text_len {work.text_len}",
        ]
    )
