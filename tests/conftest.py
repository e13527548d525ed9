"""Shared fixtures: the tiny Wan built from the real classes, once per test session (read-only: tests that
change a model build their own)."""

from __future__ import annotations

import pytest
import torch

from dreamshot.config.schema import ModelConfig
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
