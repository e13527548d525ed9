"""Peak memory per GPU of one training step: model state (weights, gradients, optimiser) and activations.

Bytes, per GPU. Notation: P parameters, N = world size, b bytes per activation value (2 in bf16), and per
sample T video tokens (F frames of S), F·L text tokens, D = heads·head_dim, d = head_dim, H heads, F_ffn the
FFN width, r the LoRA rank, n_l the number of blocks.

Model state (`state_memory`):
  frozen weights     P × bytes (model.dtype; bf16 under DeepSpeed's bf16 mode), ÷ N under ZeRO-3 only.
  LoRA weights       P_lora × the same bytes, ÷ N under ZeRO-3.
  LoRA gradients     in the parameter dtype, ÷ N under ZeRO-2/3 (ZeRO-1 and DDP keep them whole).
  optimiser state    AdamW m and v: under ZeRO (any stage) fp32 with an fp32 master copy (12 B/param),
                     ÷ N; without ZeRO torch keeps m and v in the parameter dtype, whole, and the parameters
                     are their own master.

Activations (`activation_memory`): what autograd keeps for backward, from the tensors a Wan block saves
(`block_saved_bytes`, checked against a real block in tests/test_planner.py). Without checkpointing every
block's saved tensors live at once; with checkpointing only each block's input (T·D·b) is kept, and one
block's saved tensors are rebuilt at a time during backward. Both add the tensors every block reads (timestep
modulation, text, RoPE), the fused attention backward's scratch (O(T); no T×T matrix anywhere) and the
role-attention capture (|Q|×S per chunk).
"""

from __future__ import annotations

from typing import NamedTuple

from dreamshot.planner.shape import ModelShape
from dreamshot.planner.workload import Training, Workload

FP32 = 4
# What a LoRA linear's weight gradient needs that no other op of the block keeps: its input. Linears reading
# the same tensor share it; the attention outputs (to_out.0) are kept by the attention kernel anyway, and the
# cross-attention K/V read the text embedding, which every block shares.
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
    deepspeed_half = stage >= 1 and training.half_precision
    weight_bytes = 2 if deepspeed_half else training.model_bytes
    items = {"DiT weights": _sharded(shape.dit_params * weight_bytes, n, stage >= 3, f"frozen, {_dtype(weight_bytes)}")}
    if encoders and shape.text_encoder_params is not None:
        items["umT5 weights"] = _sharded(
            shape.text_encoder_params * weight_bytes, n, stage >= 3, f"frozen, {_dtype(weight_bytes)}"
        )
    if encoders and shape.vae_params is not None:
        # build.py keeps the VAE in float32; DeepSpeed's bf16 mode casts the whole module.
        vae_bytes = 2 if deepspeed_half else FP32
        items["VAE weights"] = _sharded(shape.vae_params * vae_bytes, n, stage >= 3, f"frozen, {_dtype(vae_bytes)}")
    lora = shape.lora_params
    items["LoRA weights"] = _sharded(lora * weight_bytes, n, stage >= 3, f"trainable, {_dtype(weight_bytes)}")
    items["LoRA gradients"] = _sharded(lora * weight_bytes, n, stage >= 2, _dtype(weight_bytes))
    if stage >= 1:
        # DeepSpeed's ZeRO optimisers always keep an fp32 master partition next to m and v.
        items["optimiser state"] = _sharded(lora * 3 * FP32, n, True, "AdamW m, v + fp32 master")
    else:
        items["optimiser state"] = _sharded(lora * 2 * weight_bytes, n, False, f"AdamW m, v, {_dtype(weight_bytes)}")
    return items


def block_saved_bytes(shape: ModelShape, work: Workload, fused_rms_norm: bool = True) -> int:
    """Bytes one Wan block keeps for backward for one sample (bf16 compute, LoRA per `shape.linears`).

    The block (diffusers' WanTransformerBlock with the shot-wise cross-attention) saves, per video token:
      - fp32 inputs of norm1, norm2, norm3 (their `.float()` copies): 3 × 4·D, and mean/rstd: 3 × 2 × 4;
      - qk-RMSNorm inputs of self-attention q, k and cross-attention q: 3 × (R + 4), where R = b·D for the
        fused CUDA kernel (`fused_rms_norm`, it keeps its input) and 4·D for the composite CPU path (which
        keeps an fp32 copy);
      - per-token timesteps: the fp32 (6, D) modulation (kept alive by the gates' views: 24·D) and the two
        fp32 (1 + scale) factors (2 × 4·D); with a global timestep these are per sample, not per token;
      - the attention kernels' q, k, v, out (self: 4·b·D) and q, out (cross: 2·b·D), and each one's fp32
        logsumexp (2 × 4·H) — O(T), no T×T matrix;
      - the GELU input (b·F_ffn);
      - the inputs LoRA weight gradients need and nothing else keeps (`_LORA_INPUTS`: the norm1/2/3 outputs,
        b·D each, the GELU output, b·F_ffn) and every LoRA A output (b·r per LoRA linear);
    per text token: the cross-attention k-RMSNorm input (R + 4, when to_k carries LoRA), its k and v
    (2·b·D) and the A outputs of the K/V LoRAs (b·r each); per block: norm2's affine weights cast to fp32
    (2 × 4·D) in a bf16 model. Block 0 saves a little less (its input needs no gradient); it is counted
    like the others.
    """
    b, dim, heads, ffn, rank = work.activation_bytes, shape.dim, shape.num_heads, shape.ffn_dim, shape.lora_rank
    rms_norm = (b if fused_rms_norm else FP32) * dim + FP32
    lora = [linear for linear in shape.linears if linear.lora]
    video_adapters = sum(not linear.text for linear in lora)
    lora_sources = {_LORA_INPUTS[linear.name] for linear in lora} - {None}
    modulation = 6 * dim * FP32 + 2 * dim * FP32

    layer_norms = 3 * (FP32 * dim + 2 * FP32)
    attention = 6 * b * dim + 2 * FP32 * heads
    lora_video = sum(b * (ffn if source == "gelu" else dim) for source in lora_sources) + video_adapters * b * rank
    per_token = layer_norms + 3 * rms_norm + attention + b * ffn + lora_video
    if work.per_token_timestep:
        per_token += modulation

    text_norm = rms_norm if any(linear.name == "attn2.to_k" for linear in lora) else 0
    per_text_token = text_norm + 2 * b * dim + (len(lora) - video_adapters) * b * rank
    per_sample = 0 if work.per_token_timestep else modulation
    per_block = 2 * FP32 * dim if b < FP32 else 0
    return work.tokens * per_token + work.text_tokens * per_text_token + per_sample + per_block


def activation_memory(shape: ModelShape, work: Workload) -> dict[str, Item]:
    """Activation bytes per GPU for a micro-batch, with or without checkpointing as `work` says."""
    b, mb, layers = work.activation_bytes, work.micro_batch, shape.num_layers
    block = block_saved_bytes(shape, work)
    if work.checkpointing:
        items = {
            "block inputs": Item(layers * work.tokens * shape.dim * b * mb, f"{layers} checkpoints of T×D"),
            "one block recomputed": Item(block * mb, "its saved tensors, during backward"),
        }
    else:
        items = {"saved tensors": Item(layers * block * mb, f"{layers} blocks")}
    items["shared block inputs"] = Item(shared_bytes(shape, work), "timestep modulation, text, RoPE")
    # FlashAttention-style backward: dQ, dK, dV and an fp32 dQ accumulator for one attention at a time.
    items["attention backward"] = Item(
        (3 * b + FP32) * work.tokens * shape.dim * mb, "fused kernel: dQ, dK, dV + fp32 dQ accum, O(T)"
    )
    if work.racl_blocks:
        items["RACL capture"] = Item(racl_bytes(work), f"|Q| = {work.racl_queries} rows × S per chunk")
    return items


def shared_bytes(shape: ModelShape, work: Workload) -> int:
    """Tensors every block reads, kept once: the timestep embedding and its (6, D) projection (per token or
    per sample, b each), the raw and projected text (F·L × (text_dim + D) × b), RoPE cos and sin (fp32, 2·4·d
    per token, shared by the micro-batch)."""
    b = work.activation_bytes
    timestep = 7 * shape.dim * b * (work.tokens if work.per_token_timestep else 1)
    text = work.text_tokens * (shape.text_dim + shape.dim) * b
    rope = 2 * FP32 * shape.head_dim * work.tokens
    return (timestep + text) * work.micro_batch + rope


def racl_bytes(work: Workload) -> int:
    """The role-attention capture (DESIGN §2 "Memory of the role-attention capture").

    One chunk is the |Q| source-token rows scored against one target shot's S keys: logits (b), their fp32
    copy and the fp32 softmax, live one chunk at a time: |Q|·S·(b + 8). The softmax of every chunk is kept for
    backward: |Q|·S·4 per target shot and captured block — of all captured blocks without checkpointing, of
    the one block being recomputed with it.
    """
    chunk = work.racl_queries * work.tokens_per_frame
    kept_blocks = 1 if work.checkpointing else work.racl_blocks
    kept = chunk * FP32 * work.target_frames * kept_blocks * work.micro_batch
    return chunk * (work.activation_bytes + 2 * FP32) + kept


def _sharded(total: int, world_size: int, sharded: bool, note: str) -> Item:
    if not sharded or world_size == 1:
        return Item(total, f"{note}, replicated" if world_size > 1 else note)
    return Item(-(-total // world_size), f"{note}, sharded /{world_size}")


def _dtype(nbytes: int) -> str:
    return {2: "bf16", 4: "fp32"}[nbytes]
