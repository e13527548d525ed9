"""Shared fixtures: the tiny Wan built from the real classes, once per test session (read-only: tests that
change a model build their own)."""

from __future__ import annotations

import pytest
import torch

from dreamshot.config.schema import Config, ModelConfig
from dreamshot.models.wan.adapter import WanAdapter
from dreamshot.models.wan.build import WanComponents, build_components, build_transformer


@pytest.fixture(scope="session")
def tiny_model_cfg() -> ModelConfig:
    return ModelConfig()


@pytest.fixture(scope="session")
def tiny_components(tiny_model_cfg: ModelConfig) -> WanComponents:
    torch.manual_seed(0)
    return build_components(tiny_model_cfg)


@pytest.fixture()
def tiny_transformer(tiny_model_cfg: ModelConfig):
    """A fresh tiny DiT of the real diffusers class (seed 0, eval mode): tests may change it."""
    torch.manual_seed(0)
    return build_transformer(tiny_model_cfg).eval()


@pytest.fixture(scope="session")
def trained_adapter():
    """`trained_adapter(cfg)`: the adapter of `cfg` (eval mode) with random, trained-like LoRA weights (seed 0)."""

    def build(cfg: Config) -> WanAdapter:
        adapter = WanAdapter.seeded(cfg.model, cfg.seed).eval()
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for parameter in adapter.trainable_parameters():
                parameter.copy_(0.1 * torch.randn(parameter.shape, generator=generator))
        return adapter

    return build


@pytest.fixture()
def no_local_config(tmp_path, monkeypatch):
    """An empty machine config in place of this machine's conf/local.yaml (its weights and data paths aside)."""
    local = tmp_path / "empty_local.yaml"
    local.write_text("")
    monkeypatch.setenv("DREAMSHOT_LOCAL_CONFIG", str(local))


@pytest.fixture()
def bce_refused_in_autocast(monkeypatch):
    """binary_cross_entropy refused under autocast, as CUDA's autocast refuses it ("unsafe to autocast"); CPU's
    allows it, so without this a CPU test could not see a loss that would crash a bf16-mixed run on a GPU."""
    bce = torch.nn.functional.binary_cross_entropy

    def refused_in_autocast(*args, **kwargs):
        if torch.is_autocast_enabled("cpu"):
            raise RuntimeError("torch.nn.functional.binary_cross_entropy is unsafe to autocast")
        return bce(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "binary_cross_entropy", refused_in_autocast)
