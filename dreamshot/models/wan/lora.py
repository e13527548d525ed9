"""LoRA on the Wan DiT with peft: the only trainable parameters of a DreamShot model.

Target patterns follow peft's rule for a list of names: a module matches when its qualified name equals the
pattern or ends with "." + pattern ("to_q" hits `blocks.3.attn1.to_q` and `blocks.3.attn2.to_q`).
State dicts use peft's key names (adapter name removed), e.g. `blocks.0.attn1.to_q.lora_A.weight`.
"""

from __future__ import annotations

import peft
import torch
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from torch import nn

from dreamshot.config.schema import LoraConfig
from dreamshot.utils.errors import ConfigError, WeightsError


def apply_lora(transformer, cfg: LoraConfig) -> None:
    """Freeze every base parameter of `transformer`; inject a fresh LoRA adapter (B = 0: output unchanged).

    The LoRA weights are kept in float32 whatever the base dtype: AdamW then updates full-precision weights
    (peft casts activations to the adapter's dtype and the result back).
    """
    names = [name for name, _ in transformer.named_modules()]
    for pattern in cfg.target_modules:
        if not any(name == pattern or name.endswith("." + pattern) for name in names):
            raise ConfigError(f"model.lora.target_modules: pattern {pattern!r} matches no module of the transformer")
    transformer.requires_grad_(False)
    transformer.add_adapter(
        peft.LoraConfig(
            r=cfg.rank,
            lora_alpha=cfg.alpha,
            lora_dropout=cfg.dropout,
            target_modules=list(cfg.target_modules),
            init_lora_weights=True,
        )
    )
    for parameter in transformer.parameters():
        if parameter.requires_grad:
            parameter.data = parameter.data.float()


def lora_state_dict(transformer) -> dict[str, torch.Tensor]:
    """The LoRA weights only, under peft's key names (the live tensors: callers clone what they keep)."""
    return get_peft_model_state_dict(transformer)


def load_lora_state_dict(transformer, state: dict[str, torch.Tensor]) -> None:
    """Load LoRA weights saved by `lora_state_dict` into a transformer with the same adapter (strict)."""
    expected = lora_state_dict(transformer)
    missing = [key for key in expected if key not in state]
    if missing:
        raise WeightsError(f"LoRA state dict: missing key {missing[0]!r} ({len(missing)} missing)")
    unexpected = [key for key in state if key not in expected]
    if unexpected:
        raise WeightsError(f"LoRA state dict: unexpected key {unexpected[0]!r} ({len(unexpected)} unexpected)")
    for key, value in state.items():
        if value.shape != expected[key].shape:
            raise WeightsError(
                f"LoRA state dict: {key!r} has shape {tuple(value.shape)}, the model expects "
                f"{tuple(expected[key].shape)} (is model.lora.rank the one it was trained with?)"
            )
    set_peft_model_state_dict(transformer, state)


def trainable_parameter_count(module: nn.Module) -> int:
    """Number of parameter entries that require grad."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
