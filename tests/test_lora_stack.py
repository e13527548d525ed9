"""A second LoRA stacked on the run's for sampling (inference.second_lora): read in any format with its own rank
and alpha, scaled per adapter, folded into the weights with ours; one for another model is refused in one line."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import yaml
from diffusers.loaders import WanLoraLoaderMixin
from safetensors.torch import save_file

from dreamshot.cli import main
from dreamshot.config.load import to_yaml
from dreamshot.config.schema import Config, ModelConfig
from dreamshot.eval.resume import drawing_fingerprint
from dreamshot.inference.loading import check_sampling, prepare_sampling, read_lora, with_lora
from dreamshot.inference.pipeline import StoryboardPipeline, StoryboardRequest
from dreamshot.models.wan.adapter import WanAdapter
from dreamshot.models.wan.build import build_transformer_on_meta
from dreamshot.models.wan.lora_files import read_lora_file
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


# ComfyUI's bias and full-weight deltas beside a step-distilled LoRA (lightx2v's repacks carry both), under the
# original Wan names, and the diffusers parameters they add to.
COMFYUI_DELTAS = {
    "blocks.0.self_attn.q.diff_b": "blocks.0.attn1.to_q.bias",
    "blocks.1.ffn.2.diff_b": "blocks.1.ffn.net.2.bias",
    "blocks.1.norm3.diff": "blocks.1.norm2.weight",
    "blocks.1.norm3.diff_b": "blocks.1.norm2.bias",
    "blocks.0.cross_attn.norm_k.diff": "blocks.0.attn2.norm_k.weight",
    "head.head.diff_b": "proj_out.bias",
    "patch_embedding.diff": "patch_embedding.weight",
}


def deltas_for(parameters: dict[str, torch.Tensor], names, seed: int = 5) -> dict[str, torch.Tensor]:
    """A random delta shaped like each named parameter."""
    generator = torch.Generator().manual_seed(seed)
    return {name: 0.3 * torch.randn(parameters[name].shape, generator=generator) for name in names}


def with_deltas(adapter, deltas: dict[str, torch.Tensor], scale: float):
    """`adapter` with `scale` · delta added by hand to each named base parameter."""
    parameters = dict(adapter.transformer.named_parameters())
    with torch.no_grad():
        for name, delta in deltas.items():
            module, _, attribute = name.rpartition(".")
            key = f"{module}.base_layer.{attribute}" if f"{module}.base_layer.{attribute}" in parameters else name
            parameters[key].add_(scale * delta)
    return adapter


def base_parameters(model: ModelConfig) -> dict[str, torch.Tensor]:
    return dict(build_transformer_on_meta(model).named_parameters())


@pytest.mark.parametrize("merge", [False, True])
def test_a_second_comfyui_lora_adds_its_bias_and_weight_deltas_at_its_weight(merge, trained_adapter, tmp_path):
    written = CONVERTERS["comfyui"](second_state(ModelConfig()), SECOND_ALPHA)  # a public file: no DreamShot metadata
    plain = tmp_path / "plain.safetensors"
    save_file(written.tensors, plain)
    deltas = deltas_for(base_parameters(ModelConfig()), COMFYUI_DELTAS.values())
    extra = {f"diffusion_model.{key}": deltas[parameter] for key, parameter in COMFYUI_DELTAS.items()}
    save_file({**written.tensors, **extra}, tmp_path / "lightx2v.safetensors")
    weight = 0.5
    cfg = config(second_lora=str(tmp_path / "lightx2v.safetensors"), second_lora_weight=weight, merge_lora=merge)
    reference_cfg = config(second_lora=str(plain), second_lora_weight=weight, merge_lora=merge)
    stacked_with_deltas = stacked(trained_adapter, cfg)
    by_hand = with_deltas(stacked(trained_adapter, reference_cfg), deltas, weight)
    expected = by_hand.transformer.state_dict()
    for key, value in stacked_with_deltas.transformer.state_dict().items():
        torch.testing.assert_close(value, expected[key], msg=key)
    torch.testing.assert_close(draw(stacked_with_deltas, cfg), draw(by_hand, reference_cfg))


def test_a_second_diffusers_lora_adds_its_lora_bias_scaled_as_peft_does(trained_adapter, tmp_path):
    state = second_state(ModelConfig())
    modules = ["blocks.0.attn1.to_q", "blocks.1.ffn.net.0.proj"]
    biases = deltas_for(base_parameters(ModelConfig()), [f"{module}.bias" for module in modules])
    config_json = json.dumps({"r": SECOND_RANK, "lora_alpha": SECOND_ALPHA, "lora_bias": True})
    tensors = {f"transformer.{key}": value for key, value in state.items()}
    tensors.update({f"transformer.{key.removesuffix('.bias')}.lora_B.bias": value for key, value in biases.items()})
    path = tmp_path / "biased_diffusers.safetensors"
    save_file(tensors, path, {"lora_adapter_metadata": config_json})
    plain = tmp_path / "plain.safetensors"
    without_biases = {key: value for key, value in tensors.items() if not key.endswith(".lora_B.bias")}
    save_file(
        without_biases, plain, {"lora_adapter_metadata": json.dumps({"r": SECOND_RANK, "lora_alpha": SECOND_ALPHA})}
    )
    weight = 0.5
    cfg = config(second_lora=str(path), second_lora_weight=weight, merge_lora=False)
    reference_cfg = config(second_lora=str(plain), second_lora_weight=weight, merge_lora=False)
    # peft's lora_bias is B's bias: scaled with B·A by weight · alpha / rank.
    by_hand = with_deltas(stacked(trained_adapter, reference_cfg), biases, weight * SECOND_ALPHA / SECOND_RANK)
    expected = by_hand.transformer.state_dict()
    for key, value in stacked(trained_adapter, cfg).transformer.state_dict().items():
        torch.testing.assert_close(value, expected[key], msg=key)


def test_our_reading_of_diff_b_names_the_parameter_diffusers_converter_biases(tmp_path):
    written = CONVERTERS["comfyui"](second_state(ModelConfig()), SECOND_ALPHA)
    tensors = {**written.tensors, "diffusion_model.blocks.1.cross_attn.o.diff_b": torch.zeros(48)}
    save_file(tensors, tmp_path / "biased.safetensors")
    converted = WanLoraLoaderMixin.lora_state_dict(dict(tensors))
    (bias,) = [key for key in converted if key.endswith("lora_B.bias")]
    (delta,) = read_lora_file(tmp_path / "biased.safetensors").deltas.values()
    assert delta.parameter == bias.removeprefix("transformer.").replace(".lora_B.bias", ".bias")


def comfyui_with(tmp_path: Path, name: str, extra: dict[str, torch.Tensor]) -> Path:
    written = CONVERTERS["comfyui"](second_state(ModelConfig()), SECOND_ALPHA)
    save_file({**written.tensors, **extra}, tmp_path / name)
    return tmp_path / name


def test_a_second_lora_delta_of_another_shape_is_one_line_naming_file_and_key(tmp_path, capsys):
    path = comfyui_with(tmp_path, "wide_bias.safetensors", {"diffusion_model.blocks.0.norm3.diff_b": torch.zeros(64)})
    with pytest.raises(
        WeightsError, match=r"wide_bias.safetensors: 'diffusion_model.blocks.0.norm3.diff_b' is \(64,\)"
    ):
        check_sampling(config(second_lora=str(path)))
    story = tmp_path / "story.yaml"
    story.write_text(yaml.safe_dump({"height": SIZE[0], "width": SIZE[1], "shots": [{"annotation": "Wide."}]}))
    (tmp_path / "config.yaml").write_text(to_yaml(Config()))
    argv = ["generate", str(story), "--base", "--config", str(tmp_path / "config.yaml"), "--out", str(tmp_path / "out")]
    argv.append(f"inference.second_lora={path}")
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'diffusion_model.blocks.0.norm3.diff_b' is (64,)" in err
    assert not (tmp_path / "out").exists()


def test_a_second_lora_delta_for_a_parameter_the_model_lacks_is_refused(tmp_path):
    path = comfyui_with(tmp_path, "deeper.safetensors", {"diffusion_model.blocks.5.norm3.diff": torch.zeros(48)})
    with pytest.raises(WeightsError, match=r"deeper.safetensors: 'diffusion_model.blocks.5.norm3.diff' adds to "):
        check_sampling(config(second_lora=str(path)))


def test_the_runs_own_lora_with_deltas_is_refused(tmp_path):
    path = comfyui_with(tmp_path, "own.safetensors", {"diffusion_model.blocks.0.self_attn.q.diff_b": torch.zeros(48)})
    with pytest.raises(WeightsError, match=r"own.safetensors: 'diffusion_model.blocks.0.self_attn.q.diff_b' is a bias"):
        with_lora(Config(), read_lora(path), str(path))
