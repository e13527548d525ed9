"""Training throughput of the Wan DiT with LoRA on one GPU: tokens/s, MFU and peak memory against the planner.

A randomly initialised Wan (the 1.3B or 14B dimensions of conf/model/*.yaml, the paper's LoRA rank 256 from
experiments/dreamshot.yaml) is built through `WanAdapter` and trained for a few flow-matching steps on a
storyboard at the curriculum's phase-2 size — 480p, 8 shots + 3 references, 11 × 1,560 = 17,160 video tokens —
from random latents and text embeddings (as from the latent cache: the VAE and umT5 are never called, so they are
built one layer deep), in bf16 with gradient checkpointing of the DiT blocks, as `trainer=gpu` trains:
  --zero 2   DeepSpeed ZeRO-2 in one process, with the DeepSpeed config DreamShot trains with (bf16 mode: the
             whole DiT, LoRA included, in bf16; fp32 master weights in the optimiser);
  --zero 0   plain PyTorch: bf16 autocast, LoRA and AdamW in fp32 (what `trainer=ddp` trains with);
  --compile  the DiT blocks compiled (`trainer.compile_blocks`, on in `trainer=gpu`); the warm-up compiles.
Started by torchrun with N processes, the N GPUs share the storyboard as one context-parallel group (Ulysses,
dreamshot/models/wan/context_parallel.py); the first prints. The LoRA gradients are not synchronised over the group
(that all-reduce is the data-parallel cost, the same at every degree for a given number of GPUs).
It prints
  tokens/s   video tokens per second of training (forward + backward + optimiser step);
  MFU        model FLOPs per step (the planner's count, checkpoint recompute excluded; HFU includes it) over the
             step time, against the card's measured bf16 matmul rate (a large matmul timed here);
  memory     torch.cuda.max_memory_allocated() over the steps against the planner's peak for this setup, and
             for ZeRO-2 on --gpus GPUs: the measured peak with the planner's one-GPU model state swapped for its
             sharded one.
Goals: MFU ≥ 40% for 1.3B on an H100; 14B phase 2 within 80 GB per GPU under ZeRO-2 with checkpointing.

    python benchmarks/train_throughput.py --model wan1_3b --compile  # then --model wan14b, and without --compile
    python benchmarks/train_throughput.py --tiny --device cpu        # dry run of the script (tiny Wan, fp32)
    torchrun --nproc-per-node 4 benchmarks/train_throughput.py --zero 0 --shots 30 --refs 4   # context parallel 4
    CHECKS="training training14b" bash benchmarks/gpu_checks.sh     # these rows (figures: RESULTS.md)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import time
from pathlib import Path

import torch

from dreamshot.config.load import load_config
from dreamshot.config.schema import Config, ContextParallelConfig, ModelConfig, TextEncoderConfig, VaeConfig
from dreamshot.diffusion.flow_matching import (
    add_noise,
    dit_timesteps,
    frame_masked_mse,
    sample_timesteps,
    velocity_target,
)
from dreamshot.models.layout import StoryboardLayout
from dreamshot.models.wan.adapter import WanAdapter
from dreamshot.models.wan.context_parallel import launched_group
from dreamshot.planner.plan import PhasePlan, plan_phase
from dreamshot.planner.shape import model_shape
from dreamshot.planner.workload import Training, Workload, parse_resolution, tokens_per_frame
from dreamshot.training.strategy import build_strategy

GIB = 2**30
GOAL_MFU = 0.40
GOAL_BYTES = 80e9
# (size of the square matmul, timed repeats) that measure the card's matmul rate.
MATMUL = {"cuda": (8192, 50), "cpu": (1024, 5)}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="wan1_3b", help="conf/model option: wan1_3b or wan14b")
    parser.add_argument("--tiny", action="store_true", help="the tiny Wan at the smoke size, float32 (dry run)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--zero", type=int, choices=(0, 2), help="DeepSpeed ZeRO stage (default: 2 on CUDA, 0 on CPU)")
    parser.add_argument("--resolution", help="HEIGHTxWIDTH or 480p (default: 480p; 64x112 with --tiny)")
    parser.add_argument("--shots", type=int, default=8)
    parser.add_argument("--refs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3, help="timed steps, after one warm-up step")
    parser.add_argument("--gpus", type=int, default=8, help="world size for the ZeRO-2 memory estimate")
    parser.add_argument("--compile", action="store_true", help="torch.compile the DiT blocks (trainer.compile_blocks)")
    parser.add_argument("--profile", type=Path, help="write the top kernels of one more step to this text file")
    args = parser.parse_args()
    if args.zero is None:
        args.zero = 2 if args.device.startswith("cuda") else 0
    if args.resolution is None:
        args.resolution = "64x112" if args.tiny else "480p"
    return args


def run_config(args: argparse.Namespace) -> Config:
    if args.tiny:
        return load_config("smoke", ["trainer.gradient_checkpointing=true"])
    return load_config("dreamshot", [f"model={args.model}"])


def shallow_encoders(model: ModelConfig) -> ModelConfig:
    """`model` with umT5 and the VAE built one layer deep: a benchmark feeds random latents and text embeddings,
    so they are never called on the timed path, and umT5-XXL's 11 GB stays out of the peak."""
    return dataclasses.replace(
        model,
        text_encoder=dataclasses.replace(TextEncoderConfig(), d_model=model.text_encoder.d_model, num_layers=1),
        vae=dataclasses.replace(VaeConfig(), z_dim=model.vae.z_dim),
    )


def build_adapter(cfg: Config, device: torch.device, compiled: bool = False) -> WanAdapter:
    """The adapter initialised directly on `device` (on the CPU the 14B DiT takes minutes of init)."""
    with device:
        adapter = WanAdapter.seeded(
            shallow_encoders(cfg.model), cfg.seed, gradient_checkpointing=True, compiled=compiled
        )
    return adapter.train()


def synthetic_storyboard(cfg: Config, args, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Random clean latents of the references and shots, and every frame's text embedding."""
    height, width = parse_resolution(args.resolution)
    channels, frames = cfg.model.transformer.in_channels, args.refs + args.shots
    generator = torch.Generator(device).manual_seed(0)

    def randn(*shape):
        return torch.randn(shape, generator=generator, device=device, dtype=dtype)

    return {
        "conditions": randn(1, channels, args.refs, height // 8, width // 8),
        "targets": randn(1, channels, args.shots, height // 8, width // 8),
        "text": randn(1, frames, cfg.model.text_len, cfg.model.transformer.text_dim),
    }


def flow_matching_loss(adapter: WanAdapter, data: dict, layout: StoryboardLayout, shift: float) -> torch.Tensor:
    """L_FM of one storyboard, as DreamShotModule computes it (clean references at timestep 0)."""
    targets = data["targets"]
    t = sample_timesteps(1, shift, device=targets.device)
    noise = torch.randn_like(targets)
    sequence = layout.assemble(data["conditions"], add_noise(targets, noise, t))
    timesteps = dit_timesteps(t, layout.target_frames(), True)
    prediction = adapter.predict_velocity(sequence, timesteps, data["text"], layout)
    target = layout.assemble(data["conditions"], velocity_target(targets, noise))
    return frame_masked_mse(prediction, target, layout.target_frames().to(targets.device))


class Stepper:
    """One optimiser step of the LoRA: plain AdamW (optionally under bf16 autocast) or a DeepSpeed engine."""

    def __init__(self, cfg: Config, adapter: WanAdapter, zero: int, autocast: bool) -> None:
        self.adapter, self.autocast = adapter, autocast
        device = adapter.transformer.device
        optimizer = torch.optim.AdamW(adapter.trainable_parameters(), lr=cfg.optim.lr)
        self.engine = _deepspeed_engine(cfg, adapter, optimizer, zero) if zero else None
        self.optimizer = optimizer
        self.context = (
            (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if autocast else contextlib.nullcontext
        )

    def step(self, loss_fn) -> float:
        with self.context():
            loss = loss_fn()
        if self.engine is not None:
            self.engine.backward(loss)
            self.engine.step()
        else:
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())


def _deepspeed_engine(cfg: Config, adapter: WanAdapter, optimizer: torch.optim.Optimizer, zero: int):
    """A one-process DeepSpeed engine around the DiT with DreamShot's ZeRO config (see training/strategy.py)."""
    import deepspeed

    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29531", "RANK": "0", "WORLD_SIZE": "1"}.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("LOCAL_RANK", "0")
    deepspeed.init_distributed()
    trainer = dataclasses.replace(cfg.trainer, strategy=f"deepspeed_stage_{zero}")
    config = dict(build_strategy(trainer, micro_batch=1).config)
    config.update(bf16={"enabled": True}, gradient_accumulation_steps=1, gradient_clipping=cfg.optim.grad_clip)
    engine, *_ = deepspeed.initialize(model=adapter.transformer, optimizer=optimizer, config=config)
    return engine


def matmul_rate(device: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of a large square matmul in `dtype` on `device` (the card's practical peak)."""
    size, repeats = MATMUL[device.type]
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    seconds = timed(lambda: [a @ b for _ in range(repeats)], device)
    return 2 * size**3 * repeats / seconds


def timed(fn, device: torch.device) -> float:
    """Wall seconds of fn(), the device drained before and after (a CPU-GPU sync point)."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def planned(
    cfg: Config, args, data: dict, zero: int, world_size: int, half: bool, context_parallel: int = 1
) -> PhasePlan:
    """The planner's phase for this step (L_FM only, checkpointing on, encoders not resident)."""
    height, width = (8 * side for side in data["targets"].shape[-2:])
    work = Workload(
        frames=args.refs + args.shots,
        tokens_per_frame=tokens_per_frame(height, width, "--resolution"),
        text_len=cfg.model.text_len,
        target_frames=args.shots,
        checkpointing=True,
        activation_bytes=2 if half else 4,
        context_parallel=context_parallel,
    )
    training = Training(
        world_size=world_size,
        zero_stage=zero,
        model_bytes=2 if cfg.model.dtype == "bfloat16" else 4,
        half_precision=half,
    )
    return plan_phase(f"{height}x{width}", model_shape(cfg.model, count_encoders=False), work, training, False)


def report(cfg: Config, args, plan: PhasePlan, seconds: float, peak_rate: float, peak_bytes: int | None) -> None:
    work, flops = plan.work, plan.flops
    model_flops = sum(flops.forward.values()) + sum(flops.backward.values())
    mfu, hfu = model_flops / seconds / peak_rate, flops.total / seconds / peak_rate
    shape = model_shape(cfg.model, count_encoders=False)
    mode = ("DeepSpeed ZeRO-2 (1 process)" if args.zero else "no ZeRO") + (", compiled blocks" if args.compile else "")
    print(
        f"{cfg.model.name}: {shape.dit_params:,} DiT parameters, LoRA rank {shape.lora_rank} "
        f"({shape.lora_params:,} trainable); {plan.label}, {args.shots} shots + {args.refs} references"
    )
    print(
        f"  {work.tokens:,} video + {work.text_tokens:,} text tokens, gradient checkpointing, {mode}, "
        f"{'bf16' if work.activation_bytes == 2 else 'fp32'}, {args.device}"
    )
    print(f"matmul peak (measured)    {peak_rate / 1e12:10.1f} TFLOP/s")
    print(f"step time                 {seconds:10.3f} s (mean of {args.steps} after warm-up)")
    print(f"tokens/s                  {work.tokens / seconds:10,.0f}")
    gpu_seconds = seconds * work.context_parallel / work.tokens * 1e3
    print(f"GPU-seconds per 1k tokens {gpu_seconds:10.4f} (context parallel {work.context_parallel})")
    recompute = sum(flops.recompute.values())
    print(f"model FLOPs per step      {model_flops:10.3e} FLOP (+ {recompute:.3e} recomputed)")
    goal = f" (goal ≥ {GOAL_MFU:.0%} for 1.3B on an H100)" if cfg.model.name == "wan1_3b" else ""
    print(f"MFU                       {mfu:10.1%}{goal}; HFU {hfu:.1%}")
    predicted = plan.total_bytes(True)
    if peak_bytes is None:
        print(f"peak memory               not measured on {args.device}; planned {predicted / GIB:.4f} GiB")
        return
    print(
        f"peak memory               {peak_bytes / GIB:10.2f} GiB measured, {predicted / GIB:.2f} GiB planned "
        f"({peak_bytes / predicted - 1:+.1%})"
    )


def zero2_estimate(cfg: Config, args, data: dict, measured: int, one_gpu: PhasePlan) -> None:
    """Per-GPU memory of ZeRO-2 on --gpus GPUs: the measured peak with the planned model state re-sharded."""
    sharded = planned(cfg, args, data, zero=2, world_size=args.gpus, half=True)
    state = sum(item.bytes for item in sharded.state.values()) - sum(item.bytes for item in one_gpu.state.values())
    estimate = measured + state
    verdict = "within" if estimate <= GOAL_BYTES else "OVER"
    print(
        f"ZeRO-2 on {args.gpus} GPUs {estimate / GIB:17.2f} GiB per GPU (measured peak, planned sharded state): "
        f"{verdict} 80 GB"
    )


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    degree = int(os.environ.get("WORLD_SIZE", "1"))
    if device.type == "cuda" and degree > 1:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    with launched_group(ContextParallelConfig(degree=degree), device, "WORLD_SIZE") as group:
        measure(args, device, group)


def measure(args, device: torch.device, group) -> None:
    cfg = run_config(args)
    # bf16 on GPUs, for bf16 models, and wherever DeepSpeed's bf16 mode runs; the tiny dry run on the CPU is float32.
    half = device.type == "cuda" or args.zero > 0 or cfg.model.dtype == "bfloat16"
    compute_dtype = torch.bfloat16 if half else torch.float32
    torch.manual_seed(cfg.seed)

    adapter = build_adapter(cfg, device, args.compile)
    adapter.context_parallel = group
    stepper = Stepper(cfg, adapter, args.zero, autocast=half and not args.zero)
    data = synthetic_storyboard(cfg, args, device, compute_dtype)
    layout = StoryboardLayout.of(args.refs, args.shots)

    def loss():
        return flow_matching_loss(adapter, data, layout, cfg.diffusion.shift)

    for _ in range(2 if args.compile else 1):  # warm-up: kernels, allocator, DeepSpeed buffers, compilation
        stepper.step(loss)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = timed(lambda: [stepper.step(loss) for _ in range(args.steps)], device) / args.steps
    peak_bytes = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None

    plan = planned(cfg, args, data, args.zero, group.degree, half, group.degree)
    if args.profile:  # on every rank: a context-parallel step waits for the whole group's all-to-alls
        profile_step(lambda: stepper.step(loss), device, args.profile if group.rank == 0 else None)
    if group.rank != 0:
        return
    report(cfg, args, plan, seconds, matmul_rate(device, compute_dtype), peak_bytes)
    if peak_bytes is not None and args.zero == 2:
        zero2_estimate(cfg, args, data, peak_bytes, plan)
    if args.profile:
        print(f"profile of one step       {args.profile}")


def profile_step(step, device: torch.device, path: Path | None, rows: int = 30, shapes: bool = False):
    """Where one call of `step()` spends its time, by operator (self time on the device first), optionally split by
    input shapes (which matmul is which): what to fix when a step is slow. Written as a text table to `path` (None:
    not written, on the ranks of a group that only step along); returns the profile, for summaries of its events."""
    from torch.profiler import ProfilerActivity, profile

    on_gpu = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    with profile(activities=activities, record_shapes=shapes) as prof:
        step()
        synchronize(device)
    if path is None:
        return prof
    sort_by = "self_cuda_time_total" if on_gpu else "self_cpu_time_total"
    table = prof.key_averages(group_by_input_shape=shapes).table(
        sort_by=sort_by, row_limit=rows, max_name_column_width=70, max_shapes_column_width=90
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(table)
    return prof


if __name__ == "__main__":
    main()
