"""A second LoRA stacked on the run's for sampling (inference.second_lora): read in any format with its own rank
and alpha, scaled per adapter, folded into the weights with ours; one for another model is refused in one line."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from dreamshot.config.schema import Config, ModelConfig
from dreamshot.eval.resume import drawing_fingerprint
from dreamshot.inference.loading import check_sampling, prepare_sampling
from dreamshot.inference.pipeline import StoryboardPipeline, StoryboardRequest
from dreamshot.models.wan.adapter import WanAdapter
from dreamshot.models.wan.lora_formats import CONVERTERS, lora_rank
from dreamshot.utils.errors import WeightsError

SIZE = (32, 48)
SECOND_RANK, SECOND_ALPHA = 4, 2.0
# A step-distilled Wan LoRA adapts the attention and FFN linears of every block; this one only some, at its rank.
MODULES = ("attn1.to_q", "attn1.to_v", "attn2.to_k", "ffn.net.0.proj")


def second_state(model: ModelConfig, seed: int = 3, rank: int = SECOND_RANK, blocks: int | None = None) -> dict:
    """LoRA weights (peft names) for MODULES of every block of a transformer built from `model`."""
    transformer = WanAdapter(model).transformer
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for index in range(blocks or len(transformer.blocks)):
        for name in MODULES:
            linear = transformer.get_submodule(f"blocks.{min(index, len(transformer.blocks) - 1)}.{name}").base_layer
            prefix = f"blocks.{index}.{name}"
            state[f"{prefix}.lora_A.weight"] = 0.2 * torch.randn(rank, linear.in_features, generator=generator)
            state[f"{prefix}.lora_B.weight"] = 0.2 * torch.randn(linear.out_features, rank, generator=generator)
    return state


def write(state: dict, path: Path, fmt: str) -> Path:
    written = CONVERTERS[fmt](state, SECOND_ALPHA)
    save_file(written.tensors, path, written.metadata)
    return path


def config(**inference) -> Config:
    cfg = Config()
    return dataclasses.replace(cfg, inference=dataclasses.replace(cfg.inference, steps=2, **inference))


def draw(adapter, cfg: Config) -> torch.Tensor:
    references = torch.rand(1, 3, *SIZE, generator=torch.Generator().manual_seed(1)) * 2 - 1
    request = StoryboardRequest(["Close-up: <Role 1>.", "Wide."], SIZE, references, ["<Role 1>: a red star"])
    return StoryboardPipeline(adapter, cfg)(request, seed=0, progress=False).latents


def stacked(trained_adapter, cfg: Config):
    adapter = trained_adapter(Config())
    prepare_sampling(adapter, cfg, check_sampling(cfg))
    return adapter


@pytest.mark.parametrize("fmt", ["diffusers", "comfyui"])
def test_a_second_lora_stacks_with_its_rank_alpha_and_weight(fmt, trained_adapter, tmp_path):
    state = second_state(ModelConfig())
    path = write(state, tmp_path / f"second_{fmt}.safetensors", fmt)
    own = draw(stacked(trained_adapter, config(merge_lora=False)), config())
    weight = 0.5
    cfg = config(second_lora=str(path), second_lora_weight=weight, merge_lora=False)
    adapter = stacked(trained_adapter, cfg)
    both = draw(adapter, cfg)
    assert not torch.allclose(both, own)
    # Each adapted linear: base + ours + weight · B·A·alpha/rank of the second, at the file's rank and alpha.
    linear = adapter.transformer.get_submodule("blocks.1.attn2.to_k")
    x = torch.randn(3, linear.in_features, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = linear.base_layer(x) + linear.lora_B["default"](linear.lora_A["default"](x)) * linear.scaling["default"]
        second = x @ state["blocks.1.attn2.to_k.lora_A.weight"].T @ state["blocks.1.attn2.to_k.lora_B.weight"].T
        torch.testing.assert_close(linear(x), ours + weight * SECOND_ALPHA / SECOND_RANK * second)
    assert lora_rank(adapter.lora_state_dict()) == Config().model.lora.rank  # ours is still the run's LoRA

    off = config(second_lora=str(path), second_lora_weight=0.0, merge_lora=False)
    torch.testing.assert_close(draw(stacked(trained_adapter, off), off), own, rtol=0, atol=0)
    merged = config(second_lora=str(path), second_lora_weight=weight)
    torch.testing.assert_close(draw(stacked(trained_adapter, merged), merged), both, rtol=1e-5, atol=1e-5)


def test_a_second_lora_for_another_model_size_is_refused_naming_the_file(tmp_path):
    wider = dataclasses.replace(
        ModelConfig(), transformer=dataclasses.replace(ModelConfig().transformer, attention_head_dim=32)
    )
    path = write(second_state(wider), tmp_path / "wan_other_size.safetensors", "comfyui")
    with pytest.raises(WeightsError, match=r"inference.second_lora=.*wan_other_size.safetensors: .*another model size"):
        check_sampling(config(second_lora=str(path)))


def test_a_second_lora_for_a_deeper_model_is_refused_naming_the_module(tmp_path):
    path = write(second_state(ModelConfig(), blocks=4), tmp_path / "deeper.safetensors", "diffusers")
    with pytest.raises(WeightsError, match=r"deeper.safetensors: LoRA module 'blocks.2.attn1.to_q' is not a linear"):
        check_sampling(config(second_lora=str(path)))


def test_a_second_lora_of_mixed_ranks_is_refused(tmp_path):
    state = second_state(ModelConfig())
    state.update(second_state(ModelConfig(), rank=2))  # the same modules at another rank: one rank per file
    state["blocks.0.attn1.to_q.lora_A.weight"] = torch.zeros(SECOND_RANK, 48)
    state["blocks.0.attn1.to_q.lora_B.weight"] = torch.zeros(48, SECOND_RANK)
    path = tmp_path / "mixed.safetensors"
    save_file({f"transformer.{key}": value for key, value in state.items()}, path)
    with pytest.raises(WeightsError, match=r"inference.second_lora: .*mixed.safetensors: .*one rank"):
        check_sampling(config(second_lora=str(path)))


def test_the_drawing_fingerprint_holds_the_second_lora_content(tmp_path):
    path = write(second_state(ModelConfig()), tmp_path / "second.safetensors", "diffusers")
    first = drawing_fingerprint(config(second_lora=str(path)), None, SIZE, 2, "story file")
    write(second_state(ModelConfig(), seed=4), path, "diffusers")
    assert drawing_fingerprint(config(second_lora=str(path)), None, SIZE, 2, "story file") != first
