"""Cost of the Role-Attention Consistency Loss: training-step time and capture memory (DESIGN §2, §5).

One run, side by side on the CPU: a LoRA training step (forward + backward) of a Wan DiT at a 192p-like size —
8 shots + 3 references, 12×21 tokens per latent frame — with
  fm     flow matching only;
  racl   flow matching + RACL, this design (only role query rows, one target shot at a time);
  naive  flow matching + RACL from the full attention matrix (what a capture through attention weights costs).
Times are medians of interleaved repeats in one process. Memory is each step's peak of live tensor bytes,
replayed from the torch profiler's allocation records (one extra profiled step per mode, not timed);
"capture" is that minus the fm step's peak.

    python benchmarks/racl_step.py [--repeats 3] [--layers 2] [--heads 12] [--head-dim 64] [--roles 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

from dreamshot.config.schema import LoraConfig, ModelConfig, TextEncoderConfig, TransformerConfig
from dreamshot.diffusion.racl import build_role_plan, racl_loss
from dreamshot.models.layout import StoryboardLayout
from dreamshot.models.wan.adapter import WanAdapter
from dreamshot.models.wan.role_capture import RoleCapture

REFS, SHOTS, GRID = 3, 8, (12, 21)


def role_masks(roles: int, generator: torch.Generator) -> torch.Tensor:
    """(F, R, S) bool: reference k shows role k; each shot shows each role with probability 0.7 as a box."""
    frames, (h, w) = REFS + SHOTS, GRID
    masks = torch.zeros(frames, roles, h, w, dtype=torch.bool)
    for k in range(roles):
        masks[k, k, 2:10, 6:15] = True
    for f in range(REFS, frames):
        for r in range(roles):
            if torch.rand(1, generator=generator) < 0.7:
                top, left = (
                    torch.randint(0, h - 5, (1,), generator=generator),
                    torch.randint(0, w - 6, (1,), generator=generator),
                )
                masks[f, r, top : top + 5, left : left + 6] = True
    return masks.flatten(-2)


def step(adapter, latents, text, layout, plan, mode: str) -> float:
    """One forward + backward; returns seconds."""
    capture = (
        None
        if mode == "fm"
        else RoleCapture([plan], frozenset(range(len(adapter.transformer.blocks))), naive=mode == "naive")
    )
    adapter.zero_grad(set_to_none=True)
    start = time.perf_counter()
    velocity = adapter.predict_velocity(latents, torch.tensor([500.0]), text, layout, capture)
    loss = velocity[:, :, REFS:].square().mean()
    if capture is not None:
        loss = loss + 0.1 * racl_loss(capture.block_mean()[0], plan.target_masks, plan.present_pairs)
    loss.backward()
    return time.perf_counter() - start


def peak_mib(run) -> float:
    """Peak of live bytes allocated while `run()` executes: the profiler's per-op allocations and frees, in
    order of op start, summed up."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    live = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--roles", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    dim = args.heads * args.head_dim
    cfg = ModelConfig(
        text_len=16,
        transformer=TransformerConfig(
            num_layers=args.layers,
            num_attention_heads=args.heads,
            attention_head_dim=args.head_dim,
            ffn_dim=4 * dim,
            text_dim=32,
            freq_dim=64,
        ),
        text_encoder=TextEncoderConfig(d_model=32, num_layers=1),
        lora=LoraConfig(rank=16),
    )
    adapter = WanAdapter(cfg, capture_blocks=list(range(args.layers)))
    g = torch.Generator().manual_seed(args.seed)
    frames = REFS + SHOTS
    latents = torch.randn(1, 16, frames, 2 * GRID[0], 2 * GRID[1], generator=g)
    text = torch.randn(1, frames, cfg.text_len, 32, generator=g)
    layout = StoryboardLayout.of(REFS, SHOTS)
    plan = build_role_plan(role_masks(args.roles, g), layout.target_frames())

    modes = ("fm", "racl", "naive")
    times: dict[str, list[float]] = {m: [] for m in modes}
    for repeat in range(args.repeats + 1):  # the first round warms up and is not counted
        for mode in modes:
            seconds = step(adapter, latents, text, layout, plan, mode)
            if repeat:
                times[mode].append(seconds)
    memory = {mode: peak_mib(lambda mode=mode: step(adapter, latents, text, layout, plan, mode)) for mode in modes}

    tokens = frames * GRID[0] * GRID[1]
    queries = int((plan.source_weights > 0).any(0).sum())
    print(
        f"{frames} frames × {GRID[0]}×{GRID[1]} tokens = {tokens}, {args.layers} blocks (all captured), "
        f"{args.heads} heads × {args.head_dim}, {args.roles} roles, {plan.source_weights.shape[0]} sources, "
        f"{queries} role query tokens; float32, {torch.get_num_threads()} CPU threads, median of {args.repeats}"
    )
    print(f"{'step':<8}{'fwd+bwd s':>11}{'peak MiB':>11}{'capture MiB':>13}")
    for mode in modes:
        capture = memory[mode] - memory["fm"]
        print(f"{mode:<8}{statistics.median(times[mode]):>11.3f}{memory[mode]:>11.1f}{capture:>13.1f}")
    time_ratio = statistics.median(times["racl"]) / statistics.median(times["fm"])
    memory_ratio = (memory["racl"] - memory["fm"]) / max(memory["naive"] - memory["fm"], 1)
    print(f"racl / fm step time: {time_ratio:.2f}× (goal ≤ 1.3×)")
    print(f"racl / naive capture memory: {memory_ratio:.3f} (goal ≤ 0.1)")


if __name__ == "__main__":
    main()
