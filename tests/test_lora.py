"""LoRA on the Wan DiT: only adapter weights train, their count, state dict round trip, bad targets."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from dreamshot.config.load import load_config
from dreamshot.config.schema import LoraConfig, ModelConfig
from dreamshot.models.wan.build import build_components, build_transformer_on_meta
from dreamshot.models.wan.lora import (
    apply_lora,
    load_lora_state_dict,
    lora_state_dict,
    trainable_parameter_count,
)
from dreamshot.utils.errors import ConfigError, WeightsError


def _lora_transformer(cfg: ModelConfig, seed: int = 0):
    torch.manual_seed(seed)
    transformer = build_components(cfg).transformer
    apply_lora(transformer, cfg.lora)
    return transformer


def _targeted_linears(transformer, patterns: list[str]) -> list[nn.Linear]:
    """The base linears that peft wrapped (`base_layer`) and whose names the patterns match."""
    return [
        module.base_layer
        for name, module in transformer.named_modules()
        if hasattr(module, "base_layer") and any(name == p or name.endswith("." + p) for p in patterns)
    ]


def _expected_count(transformer, cfg: LoraConfig) -> int:
    linears = _targeted_linears(transformer, cfg.target_modules)
    return sum(cfg.rank * (linear.in_features + linear.out_features) for linear in linears)


def _forward(transformer) -> torch.Tensor:
    generator = torch.Generator().manual_seed(7)
    latents = torch.randn(1, 16, 2, 4, 4, generator=generator)
    text = torch.randn(1, 8, transformer.config.text_dim, generator=generator)
    with torch.no_grad():
        return transformer(latents, torch.tensor([400]), text, return_dict=False)[0]


def test_only_lora_parameters_train_and_count_is_rank_times_in_plus_out():
    cfg = ModelConfig(lora=LoraConfig(rank=4))
    transformer = _lora_transformer(cfg)
    trainable = [name for name, p in transformer.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in name or ".lora_B." in name for name in trainable)
    # 2 blocks x (attn1 + attn2: q, k, v, out) + 2 FFN linears.
    assert len(_targeted_linears(transformer, cfg.lora.target_modules)) == 2 * (8 + 2)
    assert trainable_parameter_count(transformer) == _expected_count(transformer, cfg.lora)


def test_rank_256_on_the_1_3b_transformer_adds_the_expected_count():
    cfg = load_config(overrides=["model=wan1_3b", "model.lora.rank=256"]).model
    transformer = build_transformer_on_meta(cfg)
    apply_lora(transformer, cfg.lora)
    count = trainable_parameter_count(transformer)
    assert count == _expected_count(transformer, cfg.lora) == 349_962_240


def test_fresh_adapter_leaves_the_output_unchanged():
    cfg = ModelConfig()
    torch.manual_seed(0)
    base = _forward(build_components(cfg).transformer)
    assert torch.equal(_forward(_lora_transformer(cfg)), base)


def test_state_dict_round_trip_into_a_fresh_lora_model():
    cfg = ModelConfig()
    trained = _lora_transformer(cfg)
    with torch.no_grad():
        for p in trained.parameters():
            if p.requires_grad:
                p.normal_(std=0.1)
    state = {key: value.clone() for key, value in lora_state_dict(trained).items()}
    assert all(".lora_A.weight" in key or ".lora_B.weight" in key for key in state)
    assert len(state) == 2 * len(_targeted_linears(trained, cfg.lora.target_modules))

    fresh = _lora_transformer(cfg)
    assert not torch.equal(_forward(fresh), _forward(trained))
    load_lora_state_dict(fresh, state)
    assert torch.equal(_forward(fresh), _forward(trained))
    assert all(p.requires_grad for name, p in fresh.named_parameters() if ".lora_" in name)


def test_loading_is_strict():
    cfg = ModelConfig()
    transformer = _lora_transformer(cfg)
    state = dict(lora_state_dict(transformer))
    first = next(iter(state))
    with pytest.raises(WeightsError, match=f"missing key '{first}'"):
        load_lora_state_dict(transformer, {k: v for k, v in state.items() if k != first})
    with pytest.raises(WeightsError, match="unexpected key 'blocks.9.attn1.to_q.lora_A.weight'"):
        load_lora_state_dict(transformer, {**state, "blocks.9.attn1.to_q.lora_A.weight": state[first]})
    with pytest.raises(WeightsError, match="model.lora.rank"):
        load_lora_state_dict(transformer, {**state, first: torch.zeros(3, 3)})


def test_a_target_that_matches_nothing_is_a_config_error():
    cfg = dataclasses.replace(ModelConfig(), lora=LoraConfig(target_modules=["to_q", "to_qq"]))
    torch.manual_seed(0)
    transformer = build_components(cfg).transformer
    with pytest.raises(ConfigError, match=r"model\.lora\.target_modules.*'to_qq'"):
        apply_lora(transformer, cfg.lora)


def test_a_target_that_is_no_layer_a_lora_adapts_is_a_config_error():
    cfg = dataclasses.replace(ModelConfig(), lora=LoraConfig(target_modules=["to_q", "norm2"]))
    torch.manual_seed(0)
    transformer = build_components(cfg).transformer
    with pytest.raises(
        ConfigError, match=r"model\.lora\.target_modules: 'norm2' selects 'blocks\.0\.norm2', a FP32LayerNorm"
    ):
        apply_lora(transformer, cfg.lora)
