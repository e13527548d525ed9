"""Peak memory per GPU of one training step: model state (weights, gradients, optimiser) and activations.

Bytes, per GPU. Notation: P parameters, N = world size, b bytes per activation value (2 in bf16), and per
sample T video tokens (F frames of S), F·L text tokens, D = heads·head_dim, d = head_dim, H heads, F_ffn the
FFN width, r the LoRA rank, n_l the number of blocks.

Model state (`state_memory`):
  frozen weights     P × bytes (model.dtype; bf16 under DeepSpeed's bf16 mode), ÷ N under ZeRO-3 only. The
                     VAE's are float32 (build.py) except under ZeRO-3's bf16 mode: ZeRO-2 gives them back their
                     float32 after the engine's cast (`LoraDeepSpeedStrategy.setup`), ZeRO-3 partitions them.
  LoRA weights       P_lora × 4: `apply_lora` keeps them in float32 whatever model.dtype; DeepSpeed's bf16
                     mode casts every parameter of the module to bf16 (its engine does, LoRA included): 2.
                     ÷ N under ZeRO-3.
  LoRA gradients     in the LoRA weights' dtype, ÷ N under ZeRO-2/3 (ZeRO-1 and DDP keep them whole).
  optimiser state    AdamW m and v, fp32. Without ZeRO torch keeps them in the parameters' dtype (float32
                     LoRA), whole, and the fp32 weights are their own master: 8 B/param. Under ZeRO DeepSpeed
                     keeps its own fp32 master partition next to m and v, 12 B/param ÷ N: a copy of the bf16
                     weights in bf16 mode, and a clone even of fp32 weights under ZeRO-1/2; only ZeRO-3 with
                     fp32 weights updates their partitions in place (8 B/param ÷ N).
  LoRA EMA           with optim.ema_decay, `LoraEma`'s float32 average: P_lora × 4, of the module's weights
                     without ZeRO; under ZeRO (1/2/3) of this rank's fragment of the fp32 masters, ÷ N. The
                     checkpoint's whole average is assembled one weight at a time and kept on the host.

Activations (`activation_memory`): what autograd keeps for backward, from the tensors a Wan block saves
(`block_saved_bytes`, checked against a real block in tests/test_planner.py). Without checkpointing every
block's saved tensors live at once; with checkpointing only each block's input (T·D·b) is kept, and one
block's saved tensors are rebuilt at a time during backward. Both add the tensors every block reads (timestep
modulation, text, RoPE), the fused attention backward's scratch (O(T); no T×T matrix anywhere) and the
role-attention capture (|Q|×S per chunk). Ring context parallelism under checkpointing also keeps every block's
attention tensors through the forward (`ring_kept_bytes`).
"""

from __future__ import annotations

import math
from typing import NamedTuple

from dreamshot.planner.shape import ModelShape
from dreamshot.planner.workload import Training, Workload

FP32 = 4
# What a LoRA linear's weight gradient needs that no other op of the block keeps, when the LoRA weights are in
# the activation dtype (peft's cast is then a no-op): its input. Linears reading the same tensor share it; the
# attention outputs (to_out.0) are kept by the attention kernel anyway, and the cross-attention K/V read the
# text embedding, which every block shares.
_LORA_INPUTS = {
    "attn1.to_q": "norm1",
    "attn1.to_k": "norm1",
    "attn1.to_v": "norm1",
    "attn1.to_out.0": None,
    "attn2.to_q": "norm2",
    "attn2.to_k": None,
    "attn2.to_v": None,
    "attn2.to_out.0": None,
    "ffn.net.0.proj": "norm3",
    "ffn.net.2": "gelu",
}


class Item(NamedTuple):
    """One row of the memory breakdown: bytes per GPU and how they were counted."""

    bytes: int
    note: str


def state_memory(shape: ModelShape, training: Training, encoders: bool = True) -> dict[str, Item]:
    """Weights, LoRA gradients and optimiser state per GPU (see the module docstring for the rules).

    `encoders`: count the frozen umT5 and VAE as resident (the trainer encodes every batch); leave them out
    when latents and text embeddings are cached (DESIGN §4).
    """
    n, stage = training.world_size, training.zero_stage
    weight_bytes = 2 if training.deepspeed_half else training.model_bytes
    items = {"DiT weights": _sharded(shape.dit_params * weight_bytes, n, stage >= 3, f"frozen, {_dtype(weight_bytes)}")}
    if encoders and shape.text_encoder_params is not None:
        items["umT5 weights"] = _sharded(
            shape.text_encoder_params * weight_bytes, n, stage >= 3, f"frozen, {_dtype(weight_bytes)}"
        )
    if encoders and shape.vae_params is not None:
        # build.py keeps the VAE in float32; DeepSpeed's bf16 mode casts the whole module, and only under ZeRO-3,
        # which partitions the VAE too, does it stay bf16 (`LoraDeepSpeedStrategy.setup`).
        vae_bytes = 2 if training.deepspeed_half and stage >= 3 else FP32
        items["VAE weights"] = _sharded(shape.vae_params * vae_bytes, n, stage >= 3, f"frozen, {_dtype(vae_bytes)}")
    lora, lora_bytes = shape.lora_params, training.lora_bytes
    items["LoRA weights"] = _sharded(lora * lora_bytes, n, stage >= 3, f"trainable, {_dtype(lora_bytes)}")
    items["LoRA gradients"] = _sharded(lora * lora_bytes, n, stage >= 2, _dtype(lora_bytes))
    # DeepSpeed's ZeRO-3 optimiser updates fp32 partitions in place; ZeRO-1/2 clone them into a master copy.
    master = stage >= 1 and not (stage >= 3 and lora_bytes == FP32)
    states, note = (3, "AdamW m, v + fp32 master") if master else (2, "AdamW m, v, fp32")
    items["optimiser state"] = _sharded(lora * states * FP32, n, stage >= 1, note)
    if training.ema:
        items["LoRA EMA"] = _sharded(lora * FP32, n, stage >= 1, "fp32 average (optim.ema_decay)")
    return items


def block_saved_bytes(shape: ModelShape, work: Workload, training: Training, fused_rms_norm: bool = True) -> int:
    """Bytes one Wan block keeps for backward for one sample (bf16 compute, LoRA per `shape.linears`, its
    dtype per `training`).

    The block (diffusers' WanTransformerBlock with the shot-wise cross-attention) saves, per video token:
      - fp32 inputs of norm1, norm2, norm3 (their `.float()` copies): 3 × 4·D, and mean/rstd: 3 × 2 × 4;
      - qk-RMSNorm inputs of self-attention q, k and cross-attention q: 3 × (R + 4), where R = b·D for the
        fused CUDA kernel (`fused_rms_norm`, it keeps its input) and 4·D for the composite CPU path (which
        keeps an fp32 copy);
      - per-token timesteps: the fp32 (6, D) modulation (kept alive by the gates' views: 24·D) and the two
        fp32 (1 + scale) factors (2 × 4·D) — per frame, not per token: every token of a frame shares its timestep
        and the blocks broadcast the frame's modulation (`storyboard_block_forward`); with a global timestep they
        are per sample;
      - the attention kernels' q, k, v, out (self: 4·b·D) and q, out (cross: 2·b·D), and each one's fp32
        logsumexp (2 × 4·H) — O(T), no T×T matrix;
      - the GELU input (b·F_ffn);
      - what the LoRA branches keep (`lora_saved_bytes`);
    per text token: the cross-attention k-RMSNorm input (R + 4, when to_k carries LoRA), its k and v (2·b·D)
    and what the K/V LoRA branches keep; per block: norm2's affine weights cast to fp32 (2 × 4·D) in a bf16
    model, and the weight casts of the LoRA branches under autocast. Block 0 saves a little less (its input
    needs no gradient); it is counted like the others.
    """
    b, dim, heads, ffn = work.activation_bytes, shape.dim, shape.num_heads, shape.ffn_dim
    rms_norm = (b if fused_rms_norm else FP32) * dim + FP32
    lora_video, lora_text, lora_weights = lora_saved_bytes(shape, work, training)
    modulation = 6 * dim * FP32 + 2 * dim * FP32

    layer_norms = 3 * (FP32 * dim + 2 * FP32)
    attention = 6 * b * dim + 2 * FP32 * heads
    per_token = layer_norms + 3 * rms_norm + attention + b * ffn + lora_video

    text_norm = rms_norm if any(linear.name == "attn2.to_k" and linear.lora for linear in shape.linears) else 0
    per_text_token = text_norm + 2 * b * dim + lora_text
    per_sample = modulation * modulation_groups(work)
    per_block = (2 * FP32 * dim if b < FP32 else 0) + lora_weights
    return work.rank_tokens * per_token + work.rank_text_tokens * per_text_token + per_sample + per_block


def modulation_groups(work: Workload) -> int:
    """How many timestep modulations a sample carries: one per frame with per-token timesteps (a frame's tokens
    share its timestep), one with a global timestep. Under context parallelism one GPU's: one per run of
    gcd(S, its tokens) tokens (`SequenceShard.timesteps`)."""
    if not work.per_token_timestep:
        return 1
    if work.context_parallel == 1:
        return work.frames
    return work.rank_tokens // math.gcd(work.tokens_per_frame, work.rank_tokens)


def lora_saved_bytes(shape: ModelShape, work: Workload, training: Training) -> tuple[int, int, int]:
    """What the LoRA branches of one block keep for backward: bytes per video token, per text token, per block.

    peft's `lora.Linear` casts its input to the adapter's dtype before A (each adapter on its own). When the
    cast is a no-op (LoRA weights in the activation dtype: a float32 model, or DeepSpeed's bf16 mode), A's
    weight gradient keeps the block's own tensor, shared by the linears that read it (`_LORA_INPUTS`), and
    B's keeps A's output (b·r). Otherwise (`apply_lora`'s float32 LoRA in a bf16 model) every adapter keeps
    its own copy of its input and its A output, c·(in + r), with c the dtype its matmuls run in: 4, or 2
    under autocast, which also casts the weights afresh for every matmul (no weight cache) and keeps those a
    gradient flows through: B's, and A's where the input needs a gradient (b·r·(in + out) per video adapter,
    b·r·out per text adapter, per block). LoRA dropout is taken as 0 (peft's identity; a real dropout would
    add its mask and output per adapter).
    """
    b, rank = work.activation_bytes, shape.lora_rank
    lora = [linear for linear in shape.linears if linear.lora]
    text_adapters = sum(linear.text for linear in lora)
    if training.lora_bytes == b:
        shared = {_LORA_INPUTS[linear.name]: linear.in_features for linear in lora}
        shared.pop(None, None)
        return b * (sum(shared.values()) + (len(lora) - text_adapters) * rank), b * text_adapters * rank, 0
    compute = 2 if training.autocast else training.lora_bytes
    video = sum(compute * (linear.in_features + rank) for linear in lora if not linear.text)
    text = sum(compute * (linear.in_features + rank) for linear in lora if linear.text)
    casts = sum(linear.out_features + (0 if linear.text else linear.in_features) for linear in lora)
    return video, text, compute * rank * casts if training.autocast else 0


def activation_memory(shape: ModelShape, work: Workload, training: Training) -> dict[str, Item]:
    """Activation bytes per GPU for a micro-batch, with or without checkpointing as `work` says."""
    b, mb, layers = work.activation_bytes, work.micro_batch, shape.num_layers
    block = block_saved_bytes(shape, work, training)
    tokens = "T" if work.context_parallel == 1 else f"T/{work.context_parallel}"
    if work.checkpointing:
        items = {
            "block inputs": Item(layers * work.rank_tokens * shape.dim * b * mb, f"{layers} checkpoints of {tokens}×D"),
            "one block recomputed": Item(block * mb, "its saved tensors, during backward"),
        }
        if work.context_parallel > 1 and work.context_parallel_attention == "ring":
            items["ring attention kept"] = Item(
                layers * ring_kept_bytes(shape, work) * mb, f"{layers} blocks' q, k, v, two outputs of {tokens}, LSE"
            )
    else:
        items = {"saved tensors": Item(layers * block * mb, f"{layers} blocks")}
    items["shared block inputs"] = Item(shared_bytes(shape, work), "timestep modulation, text, RoPE")
    # FlashAttention-style backward: dQ, dK, dV and an fp32 dQ accumulator for one attention at a time.
    items["attention backward"] = Item(
        (3 * b + FP32) * work.rank_tokens * shape.dim * mb, f"fused kernel: dQ, dK, dV + fp32 dQ accum, O({tokens})"
    )
    if work.racl_blocks:
        items["RACL capture"] = Item(
            racl_bytes(shape, work), f"|Q| = {work.rank_racl_queries} rows × S per chunk, fp32"
        )
        if work.context_parallel > 1:
            # A captured block scores its rows against every rank's keys, gathered while it runs.
            items["RACL gathered keys"] = Item(work.tokens * shape.dim * b * mb, "all T keys, while a block captures")
    return items


def ring_kept_bytes(shape: ModelShape, work: Workload) -> int:
    """What one block's ring attention keeps through a checkpointed forward (its saved tensors bypass the
    checkpoint, dreamshot/models/wan/context_parallel.py): this GPU's query, key, value and output, diffusers'
    merged output (b·D each per token) and the merged log-sum-exp (fp32 per head and token)."""
    return work.rank_tokens * (5 * work.activation_bytes * shape.dim + FP32 * shape.num_heads)


def shared_bytes(shape: ModelShape, work: Workload) -> int:
    """Tensors every block reads, kept once: the timestep embedding and its (6, D) projection (per frame or
    per sample, b each), the raw and projected text (F·L × (text_dim + D) × b), RoPE cos and sin (fp32, 2·4·d
    per token, shared by the micro-batch)."""
    b = work.activation_bytes
    timestep = 7 * shape.dim * b * modulation_groups(work)
    text = work.rank_text_tokens * (shape.text_dim + shape.dim) * b
    rope = 2 * FP32 * shape.head_dim * work.rank_tokens
    return (timestep + text) * work.micro_batch + rope


def racl_bytes(shape: ModelShape, work: Workload) -> int:
    """The role-attention capture (DESIGN §2 "Memory of the role-attention capture"), formed in float32.

    The |Q| source-token query rows are cast to fp32 once per captured block (|Q|·D·4). One chunk scores them
    against one target shot's S keys, cast to fp32 (S·D·4): fp32 logits and their fp32 softmax, live one chunk at
    a time: |Q|·S·8 + S·D·4. For backward every chunk keeps its softmax and its fp32 keys, (|Q|·S + S·D)·4 per
    target shot, and the block keeps its fp32 query rows — of all captured blocks without checkpointing, of the
    one block being recomputed with it. Under context parallelism |Q| is one GPU's share of the rows.
    `racl.absent_negative` adds one log-sum-exp chunk per reference frame
    (not counted: off by default).
    """
    queries, dim, per_frame = work.rank_racl_queries, shape.dim, work.tokens_per_frame
    kept_blocks = (1 if work.checkpointing else work.racl_blocks) * work.micro_batch
    live = queries * per_frame * 2 * FP32 + per_frame * dim * FP32
    kept_chunks = (queries * per_frame + per_frame * dim) * FP32 * work.target_frames
    return live + (kept_chunks + queries * dim * FP32) * kept_blocks


def _sharded(total: int, world_size: int, sharded: bool, note: str) -> Item:
    if not sharded or world_size == 1:
        return Item(total, f"{note}, replicated" if world_size > 1 else note)
    return Item(-(-total // world_size), f"{note}, sharded /{world_size}")


def _dtype(nbytes: int) -> str:
    return {2: "bf16", 4: "fp32"}[nbytes]
