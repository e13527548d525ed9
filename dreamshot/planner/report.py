"""The plan as a readable table: parameters, then per phase tokens, FLOPs and memory, then the caveats."""

from __future__ import annotations

from dreamshot.planner.memory import Item
from dreamshot.planner.plan import PhasePlan
from dreamshot.planner.shape import ModelShape

MIB, GIB = 2**20, 2**30

ASSUMPTIONS = """\
Assumptions
  FLOPs: matmuls only (2 per multiply-add); embeddings, head, norms and element-wise ops are left out (~1-2%).
    Frozen weights: backward forms only activation gradients (2x forward in all; none for the text K/V);
    LoRA: weight + activation gradients (3x forward in all); fused attention backward recomputes QK^T (2.5x).
    Checkpointing adds one recompute of every block's forward.
  Context parallelism (degree N): each GPU holds ceil(T/N) tokens (the sequence padded to a multiple of N), its
    frames' texts and its share of the RACL rows; counts are one GPU's. The full-sequence patch embedding and
    RoPE made before the blocks are split at once and not counted.
  Activations: bf16 compute; each block keeps the tensors listed in planner/memory.py:block_saved_bytes
    (fused CUDA RMSNorm); attention runs in a fused kernel, so no T x T matrix is ever stored.
    LoRA branch: peft casts each adapter's input to the adapter's dtype on its own, so with float32 LoRA in a
    bf16 model every adapter keeps its own fp32 copy of its input (a bf16 one, plus bf16 weight casts, under
    autocast); LoRA in the activation dtype (DeepSpeed bf16 mode, fp32 model) shares the block's tensors.
  RACL: a capture chunk is |Q| source-role query rows against one target shot's S keys, in fp32; |Q| defaults
    to one frame's tokens (--racl-queries). Captured blocks: racl.blocks, in phases with a RACL weight > 0.
  LoRA state: apply_lora keeps the weights in fp32, so gradients and AdamW m, v are fp32 and, without ZeRO,
    the weights are their own master (16 B/param). DeepSpeed's bf16 mode (ZeRO + 16-bit precision) casts every
    parameter, LoRA's included, to bf16 and keeps its own fp32 master next to m, v (2 + 2 + 12 B/param);
    ZeRO-1/2 clone a master even of fp32 weights, ZeRO-3 updates fp32 partitions in place. 16-bit precision
    without DeepSpeed is bf16-mixed (autocast): the config refuses 16-true / bf16-true there.
    DeepSpeed's fp32 gradient partition made at the optimiser step is not counted. optim.ema_decay adds an fp32
    average of the LoRA (4 B/param): whole without ZeRO, each GPU its fragment of the masters under ZeRO (/N).
  Frames: the largest sample (all shots + all references); t2s samples have no reference frames.
  Text: every frame carries model.text_len tokens, its zero padding included. A smaller text_len cuts the
    cross-attention cost but is not free with pretrained weights: Wan attends to its padding (it does not mask
    it), so the outputs change with text_len; Wan2.1 was trained with 512, which model=wan1_3b / wan14b keep."""

CANNOT_KNOW = """\
What this cannot know
  - allocator fragmentation and the caching allocator's reserve above live tensors (often 5-20%);
  - NCCL communication buffers;
  - DeepSpeed bucket sizes (reduce / all-gather buckets, ZeRO-3 prefetch and gathered weights), DDP buckets;
  - the CUDA context and library handles (~0.5-1 GB per GPU);
  - kernel workspaces (cuBLAS, cuDNN, FlashAttention);
  - dataloader pinned host memory and worker processes (host side);
  - the transient peak of VAE / umT5 encoding before the DiT forward (none with cached latents)."""


def render(
    header: str,
    shape: ModelShape,
    phases: list[PhasePlan],
    gpu_memory_gib: float,
    link_gbps: float = 200.0,
    longest: list[int] | None = None,
) -> str:
    """The full report: header, parameters, one section per phase, assumptions and caveats.

    `link_gbps`: GB/s a GPU sends at, for the context-parallel traffic; `longest`: per phase, the most shots that
    fit `gpu_memory_gib` with the phase's references (printed when given)."""
    sections = [header, parameters_table(shape)]
    for i, plan in enumerate(phases):
        sections += [f"== {plan.label} ==", tokens_table(plan), flops_table(plan), memory_table(plan, gpu_memory_gib)]
        if plan.communication:
            sections.append(communication_table(plan, link_gbps))
        if longest is not None:
            sections.append(longest_line(plan, longest[i], gpu_memory_gib))
    return "\n\n".join([*sections, ASSUMPTIONS, CANNOT_KNOW]) + "\n"


def communication_table(plan: PhasePlan, link_gbps: float) -> str:
    """What one GPU sends per micro-batch for context parallelism, and how long that takes at `link_gbps`."""
    lines = [f"{f'Context parallel {plan.work.context_parallel}: sent per GPU step':<44}{'GiB':>11}{'seconds':>11}"]
    for name, sent in {**plan.communication, "total": sum(plan.communication.values())}.items():
        lines.append(f"  {name:<42}{sent / GIB:>11.3f}{sent / (link_gbps * 1e9):>11.3f}")
    lines.append(f"  at {link_gbps:g} GB/s per GPU, none of it overlapped with compute")
    return "\n".join(lines)


def longest_line(plan: PhasePlan, shots: int, gpu_memory_gib: float) -> str:
    refs = plan.work.frames - plan.work.target_frames
    setup = f"{plan.training.world_size} GPU(s), context parallel {plan.work.context_parallel}"
    if shots == 0:
        return f"Longest storyboard in {gpu_memory_gib:g} GiB ({setup}): none, not even 1 shot + {refs} references"
    return f"Longest storyboard in {gpu_memory_gib:g} GiB ({setup}): {shots} shots + {refs} references"


def parameters_table(shape: ModelShape) -> str:
    rows = [
        ("DiT (frozen)", shape.dit_params),
        (f"LoRA rank {shape.lora_rank} (trainable)", shape.lora_params),
        ("umT5 encoder (frozen)", shape.text_encoder_params),
        ("VAE (frozen)", shape.vae_params),
    ]
    lines = ["Parameters"]
    for name, count in rows:
        shown = "not counted" if count is None else f"{count:>17,}  ({_short_count(count)})"
        lines.append(f"  {name:<32}{shown}")
    return "\n".join(lines)


def tokens_table(plan: PhasePlan) -> str:
    work = plan.work
    return "\n".join(
        [
            "Tokens per sample",
            f"  {'frames':<32}{work.frames:>9,}  ({work.target_frames} shots + {work.frames - work.target_frames} "
            "references, one latent frame each)",
            f"  {'video tokens':<32}{work.tokens:>9,}  ({work.frames} frames x {work.tokens_per_frame:,} per frame)",
            f"  {'text tokens':<32}{work.text_tokens:>9,}  ({work.frames} frames x {work.text_len}, each frame "
            "attends to its own)",
            *(
                [
                    f"  {'video tokens per GPU':<32}{work.rank_tokens:>9,}  (context parallel {work.context_parallel}, "
                    f"padded by {work.rank_tokens * work.context_parallel - work.tokens})"
                ]
                if work.context_parallel > 1
                else []
            ),
        ]
    )


def flops_table(plan: PhasePlan) -> str:
    flops, degree = plan.flops, plan.work.context_parallel
    unit, scale = flop_unit(flops.total)
    # Under context parallelism every count is one GPU's share of the sample (flops.py).
    what = "per sample" if degree == 1 else f"per GPU, 1/{degree} of a sample"
    lines = [f"FLOPs {what} ({unit})".ljust(44) + f"{'forward':>11}{'backward':>11}{'recompute':>11}"]
    for name in flops.forward:
        values = (flops.forward[name], flops.backward[name], flops.recompute[name])
        lines.append(f"  {name:<42}" + "".join(f"{v / scale:>11.3f}" for v in values))
    sums = (sum(flops.forward.values()), sum(flops.backward.values()), sum(flops.recompute.values()))
    lines.append(f"  {'total':<42}" + "".join(f"{v / scale:>11.3f}" for v in sums))
    step_unit, step_scale = flop_unit(plan.optimizer_step_flops)
    training = plan.training
    lines += [
        f"  {'forward + backward + recompute':<42}{flops.total / scale:>11.3f} {unit} {what}",
        f"  {f'per GPU step (micro-batch {plan.work.micro_batch})':<42}"
        f"{plan.step_flops / step_scale:>11.3f} {step_unit}",
        f"  {f'per optimiser step ({training.world_size} GPU(s), accumulate {training.accumulate})':<42}"
        f"{plan.optimizer_step_flops / step_scale:>11.3f} {step_unit}",
    ]
    return "\n".join(lines)


def memory_table(plan: PhasePlan, gpu_memory_gib: float) -> str:
    configured = plan.work.checkpointing
    columns = {True: "checkpointing", False: "no checkpointing"}
    unit, scale = ("GiB", GIB) if plan.total_bytes(False) >= GIB else ("MiB", MIB)
    heading = "".join(f"{columns[on] + (' *' if on == configured else ''):>19}" for on in (True, False))
    lines = [f"{f'Memory per GPU ({unit})':<34}{heading}   note"]
    rows: dict[str, dict[bool, Item]] = {}
    for on in (True, False):
        for name, item in {**plan.state, **plan.activations[on]}.items():
            rows.setdefault(name, {})[on] = item
    for name, cells in rows.items():
        shown = "".join(f"{cells[on].bytes / scale:>19.3f}" if on in cells else f"{'-':>19}" for on in (True, False))
        lines.append(f"  {name:<32}{shown}   {next(iter(cells.values())).note}")
    totals = {on: plan.total_bytes(on) for on in (True, False)}
    headroom = {on: gpu_memory_gib * GIB - totals[on] for on in (True, False)}
    lines.append(f"  {'total':<32}" + "".join(f"{totals[on] / scale:>19.3f}" for on in (True, False)))
    lines.append(
        f"  {f'headroom on {gpu_memory_gib:g} GiB':<32}"
        + "".join(f"{headroom[on] / scale:>19.3f}" for on in (True, False))
    )
    verdict = "fits" if headroom[configured] >= 0 else "does NOT fit"
    lines.append(
        f"  * configured: {columns[configured]}; it {verdict} in {gpu_memory_gib:g} GiB before the caveats below"
    )
    return "\n".join(lines)


def _short_count(count: int) -> str:
    for suffix, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if count >= scale:
            return f"{count / scale:.2f} {suffix}"
    return str(count)


def flop_unit(value: int) -> tuple[str, float]:
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if value >= scale:
            return unit, scale
    return "FLOP", 1.0
