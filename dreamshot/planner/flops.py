"""FLOPs of one training step of the DiT: matmuls only, 2 FLOPs per multiply-add, per sample.

Notation (one sample): T video tokens in F frames of S tokens, L text tokens per frame, D = heads·head_dim,
r the LoRA rank, n the tokens a linear reads (F·L for the cross-attention K/V, T otherwise).

Under context parallelism of degree N every count is one GPU's share of the sample: its ⌈T/N⌉ tokens (and its
frames' texts) through the linears, its queries against all T keys in self-attention (Ulysses: all T × T for
H/N heads, the same product), its own role rows in the RACL capture.

Forward, per block:
  frozen linear in→out               2·n·in·out
  self-attention QKᵀ and P·V         2·T²·D each -> 4·T²·D (joint over all frames)
  shot-wise cross-attention          each frame's S queries against its own L keys: 4·T·L·D
  LoRA on a linear                   2·n·r·(in + out)
  RACL capture (captured blocks)     2·|Q|·S·D per target shot (the q·kᵀ rows of one chunk)
Backward:
  frozen linear      only the activation gradient dX = dY·Wᵀ (1× forward, no weight gradient), so the
                     frozen path costs 2× its forward in all; none for the cross-attention K/V, whose input
                     (the text embedding) needs no gradient.
  LoRA               weight gradients of A and B (1×) + the gradient through B and A (1×): 2× forward, 3× in
                     all (the trainable path); on text tokens the gradient into the text is skipped:
                     forward + 2·n·r·out.
  attention scores   fused kernels (FlashAttention) recompute QKᵀ, then form dV, dP, dQ, dK: 5 matmuls
                     against the forward's 2 -> 2.5× forward. No T×T matrix is stored.
  RACL               the logits' gradient into q and k: 2× forward.
Gradient checkpointing recomputes every block's forward (capture included) once during backward.

The LoRA dtype changes no count (its casts are element-wise), only the speed: float32 LoRA matmuls run in fp32
(TF32 at best) unless autocast runs them in bf16.

Not counted (together ~1% at full size): the patch embedding, time and text embedders, output head, norms,
softmax and element-wise ops; the frozen VAE and umT5, which run without gradients.
"""

from __future__ import annotations

from dataclasses import dataclass

from dreamshot.planner.shape import Linear, ModelShape
from dreamshot.planner.workload import Workload

SELF_PROJECTIONS = "self-attention projections"
SELF_SCORES = "self-attention scores (T²)"
CROSS_PROJECTIONS = "cross-attention projections"
CROSS_SCORES = "cross-attention scores (per frame S×L)"
FFN = "FFN"
LORA = "LoRA adapters"
RACL = "RACL capture"
COMPONENTS = (SELF_PROJECTIONS, SELF_SCORES, CROSS_PROJECTIONS, CROSS_SCORES, FFN, LORA, RACL)
# Which component a block linear's frozen weight belongs to, by the first part of its name.
_LINEAR_GROUPS = {"attn1": SELF_PROJECTIONS, "attn2": CROSS_PROJECTIONS, "ffn": FFN}


@dataclass(frozen=True)
class Flops:
    """FLOPs of one sample by component, summed over all blocks."""

    forward: dict[str, int]
    backward: dict[str, int]
    recompute: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.forward.values()) + sum(self.backward.values()) + sum(self.recompute.values())


def training_flops(shape: ModelShape, work: Workload) -> Flops:
    """Forward, backward and checkpoint-recompute FLOPs of one sample (multiply by the micro-batch per step)."""
    forward = dict.fromkeys(COMPONENTS, 0)
    backward = dict.fromkeys(COMPONENTS, 0)
    for linear in shape.linears:
        group = _LINEAR_GROUPS[linear.name.split(".")[0]]
        tokens = work.rank_text_tokens if linear.text else work.rank_tokens
        frozen = 2 * tokens * linear.in_features * linear.out_features
        forward[group] += frozen
        backward[group] += 0 if linear.text else frozen
        if linear.lora:
            forward[LORA] += lora_forward(linear, tokens, shape.lora_rank)
            backward[LORA] += lora_backward(linear, tokens, shape.lora_rank)
    forward[SELF_SCORES] = 4 * work.tokens * work.rank_tokens * shape.dim
    forward[CROSS_SCORES] = 4 * work.rank_tokens * work.text_len * shape.dim
    for scores in (SELF_SCORES, CROSS_SCORES):
        backward[scores] = 5 * forward[scores] // 2
    forward = {name: value * shape.num_layers for name, value in forward.items()}
    backward = {name: value * shape.num_layers for name, value in backward.items()}
    forward[RACL] = racl_forward(shape, work)
    backward[RACL] = 2 * forward[RACL]
    recompute = forward if work.checkpointing else dict.fromkeys(COMPONENTS, 0)
    return Flops(forward, backward, dict(recompute))


def lora_forward(linear: Linear, tokens: int, rank: int) -> int:
    """x·Aᵀ then ·Bᵀ: 2·n·r·(in + out)."""
    return 2 * tokens * rank * (linear.in_features + linear.out_features)


def lora_backward(linear: Linear, tokens: int, rank: int) -> int:
    """dA, dB and the gradient through B (into A's output); the gradient through A into the input only
    where the input needs one (video tokens, not text)."""
    through_a = 0 if linear.text else 2 * tokens * rank * linear.in_features
    return lora_forward(linear, tokens, rank) + 2 * tokens * rank * linear.out_features + through_a


def racl_forward(shape: ModelShape, work: Workload) -> int:
    """2·|Q|·S·D logits per target shot and captured block."""
    per_chunk = 2 * work.rank_racl_queries * work.tokens_per_frame * shape.dim
    return per_chunk * work.target_frames * work.racl_blocks
