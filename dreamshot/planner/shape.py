"""What the planner needs to know about a Wan DiT, read from the real model built on the meta device.

Parameter counts are exact (no formula): the DiT, VAE and umT5 are built by `build_components` on the meta
device (no memory allocated) and LoRA is injected by `apply_lora`, as in training. The linears of one block
(their shapes, which carry LoRA, which read text tokens) drive the FLOP and activation models.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from dreamshot.config.schema import ModelConfig
from dreamshot.models.wan.build import build_components
from dreamshot.models.wan.lora import apply_lora, trainable_parameter_count

# The cross-attention's key and value projections read the text tokens (F·L per sample), every other linear
# of a block reads the video tokens (T per sample).
TEXT_LINEARS = ("attn2.to_k", "attn2.to_v")


@dataclass(frozen=True)
class Linear:
    """One linear layer of a DiT block (name relative to the block, e.g. "attn1.to_q")."""

    name: str
    in_features: int
    out_features: int
    # Reads the text tokens (cross-attention K/V) rather than the video tokens.
    text: bool
    # Carries a LoRA adapter of rank `ModelShape.lora_rank`.
    lora: bool


@dataclass(frozen=True)
class ModelShape:
    """Dimensions and exact parameter counts of a Wan DiT with LoRA (and of its frozen encoders)."""

    num_layers: int
    dim: int
    num_heads: int
    ffn_dim: int
    text_dim: int
    lora_rank: int
    # The linears of one block (all blocks are identical).
    linears: tuple[Linear, ...]
    # Frozen DiT parameters (LoRA excluded) and trainable LoRA parameters.
    dit_params: int
    lora_params: int
    # None when the encoders were not counted.
    text_encoder_params: int | None = None
    vae_params: int | None = None

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads


def model_shape(cfg: ModelConfig, count_encoders: bool = True) -> ModelShape:
    """The shape of `cfg`'s DiT with `cfg.lora` applied, counted on the meta device.

    Dimensions come from the config, never from `cfg.pretrained_path` (they must agree with the weights).
    With `count_encoders` the umT5 encoder and the VAE are built on meta too (about a second at full size).
    """
    random_init = dataclasses.replace(cfg, pretrained_path=None)
    # Every module, LoRA's A/B included, is created on meta: nothing is allocated or initialised.
    with torch.device("meta"):
        parts = build_components(random_init)
        transformer = parts.transformer
        dit_params = _count(transformer)
        apply_lora(transformer, cfg.lora)
    t = cfg.transformer
    return ModelShape(
        num_layers=t.num_layers,
        dim=t.num_attention_heads * t.attention_head_dim,
        num_heads=t.num_attention_heads,
        ffn_dim=t.ffn_dim,
        text_dim=t.text_dim,
        lora_rank=cfg.lora.rank,
        linears=block_linears(transformer.blocks[0]),
        dit_params=dit_params,
        lora_params=trainable_parameter_count(transformer),
        text_encoder_params=_count(parts.text_encoder) if count_encoders else None,
        vae_params=_count(parts.vae) if count_encoders else None,
    )


def block_linears(block: nn.Module) -> tuple[Linear, ...]:
    """The base linears of a block, in module order; a peft LoRA wrapper counts as its base layer."""
    wrappers = {name for name, module in block.named_modules() if hasattr(module, "base_layer")}
    linears = []
    for name, module in block.named_modules():
        if name in wrappers:
            base, lora = module.base_layer, True
        elif isinstance(module, nn.Linear) and not any(name.startswith(w + ".") for w in wrappers):
            base, lora = module, False
        else:
            continue
        linears.append(Linear(name, base.in_features, base.out_features, name in TEXT_LINEARS, lora))
    return tuple(linears)


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
