"""Fast sampling on the tiny Wan: what no step changes is computed once per storyboard and the output stays the
step-by-step one; guidance on part of the steps; compiled blocks for sampling; the few-step schedule."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

import dreamshot.models.wan.adapter as adapter_module
from dreamshot.config.load import load_config
from dreamshot.config.schema import Config
from dreamshot.inference.loading import build_adapter, prepare_sampling
from dreamshot.inference.pipeline import StoryboardPipeline, StoryboardRequest, build_scheduler
from dreamshot.inference.presets import preset_overrides
from dreamshot.utils.errors import ConfigError

SIZE = (32, 48)
SHOTS = ["Close-up: <Role 1> on the left.", "Wide shot: <Role 2> in the centre."]


def images(count: int, seed: int) -> torch.Tensor:
    return torch.rand(count, 3, *SIZE, generator=torch.Generator().manual_seed(seed)) * 2 - 1


REQUESTS = {
    "t2s": lambda: StoryboardRequest(SHOTS, SIZE),
    "r2s": lambda: StoryboardRequest(SHOTS, SIZE, images(2, 1), ["<Role 1>: a red star", "<Role 2>: a circle"]),
    "r2s_s2s": lambda: StoryboardRequest(
        SHOTS, SIZE, images(1, 1), ["<Role 1>: a red star"], images(2, 2), ["Wide: first.", "Close-up: second."]
    ),
}


def config(steps: int = 3, **inference) -> Config:
    cfg = Config()
    return dataclasses.replace(cfg, inference=dataclasses.replace(cfg.inference, steps=steps, **inference))


@pytest.fixture(scope="module")
def adapter(trained_adapter):
    """The tiny Wan with nonzero LoRA weights (unmerged: the pipeline tests here do not fold them in)."""
    return trained_adapter(Config())


def draw(adapter, cfg: Config, mode: str = "r2s", seed: int = 0) -> torch.Tensor:
    return StoryboardPipeline(adapter, cfg)(REQUESTS[mode](), seed=seed, progress=False).latents


def count_calls(module: torch.nn.Module, counts: list, non_empty: bool = False):
    def hook(module, inputs, output):
        if not non_empty or inputs[0].shape[1] > 0:
            counts.append(inputs[0].shape)

    return module.register_forward_hook(hook)


@pytest.mark.parametrize("mode", list(REQUESTS))
def test_text_keys_and_values_computed_once_give_the_per_forward_result(adapter, mode):
    once = draw(adapter, config(cache_text=True), mode)
    per_forward = draw(adapter, config(cache_text=False), mode)
    torch.testing.assert_close(once, per_forward, rtol=1e-6, atol=1e-6)


def test_the_text_is_projected_once_per_storyboard_for_its_distinct_texts(adapter):
    """r2s, 2 references + 2 shots, 3 steps of two forwards: each block projects the 5 distinct texts (references,
    shots, negative prompt) once, not the 2·4 + 2 frame texts of every forward."""
    transformer = adapter.transformer
    keys, embedded = [], []
    handles = [count_calls(block.attn2.to_k, keys) for block in transformer.blocks]
    handles.append(count_calls(transformer.condition_embedder.text_embedder, embedded, non_empty=True))
    try:
        draw(adapter, config(steps=3))
    finally:
        for handle in handles:
            handle.remove()
    text_len = adapter.cfg.text_len
    assert [shape[:2] for shape in keys] == [(1, 5 * text_len)] * len(transformer.blocks)
    assert [shape[:2] for shape in embedded] == [(1, 5 * text_len)]


def test_the_rope_is_built_once_per_layout(adapter, monkeypatch):
    built = []
    original = adapter_module.storyboard_rotary_emb

    def record(layout, *args, **kwargs):
        built.append(layout.num_conditions)
        return original(layout, *args, **kwargs)

    monkeypatch.setattr(adapter_module, "storyboard_rotary_emb", record)
    draw(adapter, config(steps=4))
    assert built == [2, 0]  # the layout with the references (v_r, v_c), the one without (v_u)


def test_a_merged_lora_draws_what_the_lora_branches_draw(trained_adapter):
    cfg = Config()
    branches = draw(trained_adapter(cfg), config(merge_lora=False))
    merged = trained_adapter(cfg)
    state = {key: value.clone() for key, value in merged.lora_state_dict().items()}
    prepare_sampling(merged, config())
    # Folded into the base weights: no LoRA branch runs, the LoRA weights themselves are unchanged.
    assert all(module.merged for name, module in merged.transformer.named_modules() if hasattr(module, "merged"))
    assert all(torch.equal(value, state[key]) for key, value in merged.lora_state_dict().items())
    torch.testing.assert_close(draw(merged, config()), branches, rtol=1e-5, atol=1e-5)


def test_the_run_lora_weight_scales_its_update(trained_adapter):
    cfg = Config()
    bare = draw(build_adapter(cfg), config())
    full = draw(trained_adapter(cfg), config())
    off = trained_adapter(cfg)
    prepare_sampling(off, config(lora_weight=0.0, merge_lora=False))
    torch.testing.assert_close(draw(off, config()), bare, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(full, bare)


def test_guidance_on_part_of_the_steps_runs_v_c_alone_after_it(adapter, monkeypatch):
    calls = []
    original = adapter.predict_velocity

    def record(latents, timesteps, text, layout, **kwargs):
        calls.append((latents.shape[0], layout.num_conditions, text.frames.tolist()))
        return original(latents, timesteps, text, layout, **kwargs)

    monkeypatch.setattr(adapter, "predict_velocity", record)
    draw(adapter, config(steps=4, guidance_fraction=0.5))
    guided = [(2, 2, [[0, 1, 4, 4], [0, 1, 2, 3]]), (1, 0, [[4, 4]])]
    conditional = [(1, 2, [[0, 1, 2, 3]])]
    assert calls == guided * 2 + conditional * 2


def test_no_guidance_is_eq9_with_unit_weights(adapter):
    """Eq. 9 with ω1 = ω2 = 1 is v_c: guidance_fraction=0 runs only that forward and draws the same."""
    unguided = draw(adapter, config(guidance_fraction=0.0))
    unit = draw(adapter, config(omega1=1.0, omega2=1.0))
    torch.testing.assert_close(unguided, unit, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(unguided, draw(adapter, config()))


@pytest.mark.parametrize(
    ("inference", "message"),
    [
        ({"guidance_fraction": 1.5}, "inference.guidance_fraction must be in [0, 1]"),
        ({"cache": "teacache"}, "inference.cache must be one of"),
        ({"cache_options": {"threshold": 0.1}}, "inference.cache_options ['threshold'] set, but inference.cache=none"),
        ({"cache": "mag", "guidance_fraction": 0.5}, "inference.cache=mag counts steps per kind of forward"),
        ({"cache": "first_block", "degree": 2}, "inference.cache=first_block decides per rank from its tokens"),
    ],
)
def test_sampler_settings_that_cannot_be_are_config_errors(inference, message):
    cfg = config(**{key: value for key, value in inference.items() if key != "degree"})
    cfg.inference.context_parallel.degree = inference.get("degree", 1)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        cfg.validate()


def test_compiled_sampling_builds_compiled_blocks():
    adapter = build_adapter(config(compile=True))
    assert all(block._compiled_call_impl is not None for block in adapter.transformer.blocks)
    assert all(block._compiled_call_impl is None for block in build_adapter(config()).transformer.blocks)


@pytest.mark.slow
def test_compiled_sampling_draws_what_eager_sampling_draws(trained_adapter):
    cfg = config(compile=True)
    compiled = trained_adapter(cfg)
    prepare_sampling(compiled, cfg)
    eager = trained_adapter(cfg)
    prepare_sampling(eager, config())
    torch.testing.assert_close(draw(compiled, cfg), draw(eager, config()), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["unipc", "euler"])
def test_four_steps_at_shift_5_are_the_step_distilled_schedule(name):
    """The few-step schedule of a step-distilled Wan LoRA (lightx2v's: timesteps 1000, 750, 500, 250 before the
    shift of 5) is inference.steps=4, inference.shift=5 with either scheduler: no key of its own."""
    scheduler = build_scheduler(name, 5.0)
    scheduler.set_timesteps(4)
    unshifted = np.array([1.0, 0.75, 0.5, 0.25])
    np.testing.assert_allclose(scheduler.sigmas[:-1].numpy(), 5 * unshifted / (1 + 4 * unshifted), atol=1e-3)
    assert scheduler.sigmas[-1] == 0


@pytest.mark.parametrize("steps", [4, 50])
def test_euler_steps_through_the_sigmas_of_wans_unipc_and_tells_the_dit_each(steps):
    unipc, euler = build_scheduler("unipc", 3.0), build_scheduler("euler", 3.0)
    unipc.set_timesteps(steps)
    euler.set_timesteps(steps)
    torch.testing.assert_close(euler.sigmas, unipc.sigmas.float(), rtol=0, atol=1e-5)
    torch.testing.assert_close(euler.timesteps, euler.sigmas[:-1] * 1000)


@pytest.mark.parametrize(
    ("preset", "cache", "options"),
    [("exact", "none", {}), ("fast", "first_block", {"threshold": 0.1})],
)
def test_a_preset_replaces_the_cache_options_of_the_run(preset, cache, options, tmp_path):
    # A run's config with another cache hook's options: the preset's setting holds whatever the run set.
    run_config = tmp_path / "config.yaml"
    run_config.write_text("inference:\n  cache: taylorseer\n  cache_options: {cache_interval: 5}\n")
    inference = load_config(run_config, preset_overrides(preset)).inference
    assert (inference.cache, inference.cache_options) == (cache, options)
