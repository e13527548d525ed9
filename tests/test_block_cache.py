"""diffusers' cache hooks (inference.cache) through the storyboard forward: they skip work, run inside our block
loop on the per-frame modulation, keep one state per kind of forward, and leave nothing behind."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from dreamshot.config.schema import Config
from dreamshot.inference.loading import check_sampling
from dreamshot.inference.pipeline import StoryboardPipeline, StoryboardRequest
from dreamshot.models.wan.block_cache import cache_config
from dreamshot.models.wan.forward import storyboard_block_forward, uses_frame_modulation
from dreamshot.utils.errors import ConfigError

SIZE = (32, 48)


def config(cache: str = "none", options: dict | None = None, steps: int = 6, **inference) -> Config:
    cfg = Config()
    settings = dataclasses.replace(cfg.inference, steps=steps, cache=cache, cache_options=options or {}, **inference)
    return dataclasses.replace(cfg, inference=settings)


@pytest.fixture(scope="module")
def adapter(trained_adapter):
    return trained_adapter(Config())


def request() -> StoryboardRequest:
    references = torch.rand(2, 3, *SIZE, generator=torch.Generator().manual_seed(1)) * 2 - 1
    return StoryboardRequest(["Close-up: <Role 1>.", "Wide: <Role 2>."], SIZE, references, ["<Role 1>", "<Role 2>"])


def draw(adapter, cfg: Config) -> tuple[torch.Tensor, int]:
    """Final latents and the blocks' FFN evaluations (what a cache skips) of one r2s storyboard."""
    calls = []
    handles = [
        block.ffn.net[2].register_forward_hook(lambda *_: calls.append(1)) for block in adapter.transformer.blocks
    ]
    try:
        result = StoryboardPipeline(adapter, cfg)(request(), seed=0, progress=False)
    finally:
        for handle in handles:
            handle.remove()
    return result.latents, len(calls)


@pytest.fixture(scope="module")
def exact(adapter):
    return draw(adapter, config())


def assert_nothing_left(transformer) -> None:
    assert not transformer.is_cache_enabled
    assert uses_frame_modulation(transformer)
    assert all(block.forward.func is storyboard_block_forward for block in transformer.blocks)
    for module in transformer.modules():
        assert not getattr(getattr(module, "_diffusers_hook", None), "hooks", {}), module


def test_first_block_cache_that_never_skips_is_the_exact_sampler(adapter, exact):
    latents, evaluations = draw(adapter, config("first_block", {"threshold": 0.0}))
    assert evaluations == exact[1] == 6 * 2 * 2  # 6 steps × 2 forwards (the guided pair, v_u) × 2 blocks
    torch.testing.assert_close(latents, exact[0], rtol=0, atol=0)


def test_first_block_cache_skips_the_other_blocks_and_leaves_nothing_behind(adapter, exact):
    latents, evaluations = draw(adapter, config("first_block", {"threshold": 1e9}))
    # Each forward kind (the guided pair, v_u) runs fully once; after that only the first block.
    assert evaluations == 2 * 2 + 5 * 2
    assert not torch.allclose(latents, exact[0])
    assert_nothing_left(adapter.transformer)
    torch.testing.assert_close(draw(adapter, config())[0], exact[0], rtol=0, atol=0)


def test_taylorseer_predicts_wans_attention_and_ffn_between_full_steps(adapter, exact):
    options = {"cache_interval": 2, "disable_cache_before_step": 2, "taylor_factors_dtype": "float32"}
    latents, evaluations = draw(adapter, config("taylorseer", options))
    # Full forwards at steps 0, 1 (warm-up), 3, 5; steps 2 and 4 predicted: 4 of 6 steps × 2 forwards × 2 blocks.
    assert evaluations == 4 * 2 * 2
    assert 0 < float((latents - exact[0]).norm() / exact[0].norm()) < 0.5
    assert_nothing_left(adapter.transformer)


def test_magcache_runs_with_calibrated_ratios(adapter, exact, capsys):
    draw(adapter, config("mag", {"calibrate": True}))
    assert "MagCache" in capsys.readouterr().out  # diffusers prints the ratios to pass as mag_ratios
    options = {"mag_ratios": [1.0] * 6, "threshold": 1.0, "retention_ratio": 0.0, "max_skip_steps": 1}
    latents, evaluations = draw(adapter, config("mag", options))
    assert evaluations < exact[1]
    assert_nothing_left(adapter.transformer)


def test_each_kind_of_forward_keeps_its_own_cache_state(adapter):
    """guidance_fraction switches from the guided pair and v_u to v_c alone: the new forward kind (another batch
    size) starts with a full forward of its own instead of reusing the guided pair's cached residuals."""
    latents, evaluations = draw(adapter, config("first_block", {"threshold": 1e9}, guidance_fraction=0.5))
    assert evaluations == (2 * 2 + 2 * 2) + (2 + 2 * 1)
    assert torch.isfinite(latents).all()


@pytest.mark.parametrize(
    ("cache", "options", "layers", "message"),
    [
        ("first_block", {"treshold": 0.1}, 2, "inference.cache_options.treshold: not an option of diffusers'"),
        ("first_block", {}, 1, "inference.cache=first_block needs a DiT of at least 2 blocks"),
        ("taylorseer", {"cache_identifiers": ["^blocks.*attn"]}, 2, "match no module of the transformer"),
        ("taylorseer", {"taylor_factors_dtype": "float64"}, 2, "taylor_factors_dtype must be one of"),
        ("mag", {}, 2, "inference.cache=mag needs inference.cache_options.mag_ratios"),
        ("mag", {"mag_ratios": "many"}, 2, "inference.cache_options: diffusers' MagCacheConfig refuses them"),
        ("mag", {"mag_ratios": [1.0] * 6, "num_inference_steps": 9}, 2, "num_inference_steps=9, the sampler runs 6"),
    ],
)
def test_a_cache_config_the_model_cannot_take_is_a_config_error(cache, options, layers, message):
    cfg = config(cache, options)
    cfg.model.transformer.num_layers = layers
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_sampling(cfg)


def test_the_pipeline_checks_the_cache_config_too(adapter):
    cfg = config("first_block", {"treshold": 0.1})
    with pytest.raises(ConfigError, match="inference.cache_options.treshold"):
        StoryboardPipeline(adapter, cfg)(request(), progress=False)
    assert_nothing_left(adapter.transformer)
    assert isinstance(cache_config(adapter.transformer, config("first_block").inference, 6).threshold, float)
