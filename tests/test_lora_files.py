"""Reading LoRA files: every format DreamShot writes and the ones users bring (diffusers' `save_lora_weights`, a
peft adapter folder, ComfyUI- and musubi-tuner-style Wan LoRAs) load with their own rank, alpha and modules, give
the transformer output of the LoRA they were made from, and start a training run (`model.lora.init_from`)."""

from __future__ import annotations

import json
import math

import peft
import pytest
import torch
from diffusers import WanPipeline
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file

from dreamshot.cli import main
from dreamshot.config.load import load_config, to_yaml
from dreamshot.inference.loading import load_model, read_lora, with_lora
from dreamshot.models.wan.adapter import WanAdapter
from dreamshot.models.wan.build import build_components
from dreamshot.models.wan.lora_formats import split_key, wan_module_name
from dreamshot.training.callbacks import EXPORT_FILES, write_lora_files
from dreamshot.training.module import DreamShotModule
from dreamshot.utils.errors import ConfigError, WeightsError

# A rank-8 alpha-32 LoRA (scale 4) on a few modules, one outside the blocks: none of it is the config's default.
RANK, ALPHA = 8, 32.0
TARGETS = ["to_q", "to_v", "ffn.net.0.proj", "proj_out"]
FAST = ["logger=csv", "data.toy.groups=4", "data.val_groups=1", "data.toy.max_shots=3", "data.toy.max_roles=2"]


@pytest.fixture(scope="module")
def trained_cfg():
    """The config the LoRA was trained with."""
    return load_config("smoke", [f"model.lora.rank={RANK}", f"model.lora.alpha={ALPHA}", "seed=3", *_targets()])


def _targets(targets=TARGETS) -> list[str]:
    return [f"model.lora.target_modules=[{','.join(targets)}]"]


@pytest.fixture(scope="module")
def plain_cfg():
    """A config that says nothing about the LoRA (rank, alpha and targets at their defaults), same backbone."""
    return load_config("smoke", ["seed=3"])


@pytest.fixture(scope="module")
def trained(trained_cfg, trained_adapter):
    return trained_adapter(trained_cfg)


@pytest.fixture(scope="module")
def state(trained):
    return {key: value.clone() for key, value in trained.lora_state_dict().items()}


@torch.no_grad()
def _output(transformer) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(1, 16, 2, 4, 6, generator=generator)
    text = torch.randn(1, 32, transformer.config.text_dim, generator=generator)
    return transformer(latents, torch.tensor([500.0]), text, return_dict=False)[0]


# --- files as other tools write them (test data, written by the tools themselves where they can) --------------


def _peft_transformer(cfg, state, **lora_kwargs):
    """A bare tiny transformer of `cfg` with a peft adapter holding `state`."""
    transformer = build_components(cfg.model).transformer
    config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, **lora_kwargs)
    transformer.add_adapter(config)
    set_peft_model_state_dict(transformer, state)
    return transformer


def _diffusers_file(cfg, state, folder):
    """What diffusers' Wan training scripts save: `WanPipeline.save_lora_weights` with the adapter's config."""
    transformer = _peft_transformer(cfg, state)
    metadata = transformer.peft_config["default"].to_dict()
    WanPipeline.save_lora_weights(
        folder,
        transformer_lora_layers=get_peft_model_state_dict(transformer),
        transformer_lora_adapter_metadata=metadata,
    )
    return folder / "pytorch_lora_weights.safetensors"


def _peft_folder(cfg, state, folder, **lora_kwargs):
    """`PeftModel.save_pretrained`: adapter_config.json + adapter_model.safetensors (`base_model.model.` names)."""
    model = peft.get_peft_model(
        build_components(cfg.model).transformer,
        peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, **lora_kwargs),
    )
    result = set_peft_model_state_dict(model, {"base_model.model." + key: value for key, value in state.items()})
    assert not result.unexpected_keys
    model.save_pretrained(folder)
    return folder


def _kohya_file(state, path, name, down="lora_down", up="lora_up", alphas=None):
    """A kohya-style Wan LoRA under original Wan names `name(module)`, with a `.alpha` per module."""
    tensors = {}
    for key, value in state.items():
        module, part = split_key(key)
        tensors[f"{name(module)}.{down if part == 'A' else up}.weight"] = value
        tensors[f"{name(module)}.alpha"] = torch.tensor((alphas or {}).get(module, ALPHA))
    save_file(tensors, path)
    return path


def _comfyui_lora_a_names(module):
    """`diffusion_model.blocks.0.self_attn.q`, as ComfyUI-side trainers write it with peft's lora_A / lora_B."""
    return "diffusion_model." + wan_module_name(module)


def _musubi_names(module):
    """musubi-tuner's names: `lora_unet_` + the original Wan module name with `_` for `.`."""
    return "lora_unet_" + wan_module_name(module).replace(".", "_")


# --- every format loads as the LoRA it was made from ------------------------------------------------------------


SOURCES = [
    "dreamshot-peft",
    "dreamshot-diffusers",
    "dreamshot-comfyui",
    "diffusers-save_lora_weights",
    "diffusers-folder",
    "peft-folder",
    "comfyui-lora_A",
]


def _source(kind, trained_cfg, state, tmp_path):
    if kind.startswith("dreamshot-"):
        fmt = kind.removeprefix("dreamshot-")
        (path,) = write_lora_files(state, tmp_path, trained_cfg.model, {}, [fmt])
        return path
    if kind == "diffusers-save_lora_weights":
        return _diffusers_file(trained_cfg, state, tmp_path / "pipe")
    if kind == "diffusers-folder":
        return _diffusers_file(trained_cfg, state, tmp_path / "pipe").parent
    if kind == "peft-folder":
        return _peft_folder(trained_cfg, state, tmp_path / "adapter")
    # With an `.alpha` beside `head.head` too, which diffusers' own converter rejects.
    return _kohya_file(state, tmp_path / "comfy.safetensors", _comfyui_lora_a_names, "lora_A", "lora_B")


@pytest.mark.parametrize("kind", SOURCES)
def test_every_format_loads_with_its_rank_alpha_and_targets(kind, trained_cfg, plain_cfg, trained, state, tmp_path):
    path = _source(kind, trained_cfg, state, tmp_path)
    cfg, adapter = load_model(plain_cfg, path)
    lora = cfg.model.lora
    assert (lora.rank, lora.alpha) == (RANK, ALPHA)
    assert set(lora.target_modules) == {split_key(key)[0] for key in state}  # the file's modules, by name
    assert set(adapter.lora_state_dict()) == set(state)
    reference = _output(trained.transformer)
    assert (reference - _output(WanAdapter.seeded(plain_cfg.model, plain_cfg.seed).transformer)).abs().max() > 1e-2
    torch.testing.assert_close(_output(adapter.transformer), reference, rtol=1e-5, atol=1e-5)


def test_a_musubi_tuner_lora_loads_as_the_lora_it_was_made_from(plain_cfg, trained_adapter, tmp_path):
    """musubi-tuner trains every linear of the blocks (and nothing outside them): diffusers' converter needs all."""
    blocks_cfg = load_config("smoke", [f"model.lora.rank={RANK}", f"model.lora.alpha={ALPHA}", "seed=3"])
    reference = trained_adapter(blocks_cfg)
    path = _kohya_file(reference.lora_state_dict(), tmp_path / "musubi.safetensors", _musubi_names)
    assert "lora_unet_blocks_0_self_attn_q.lora_down.weight" in load_file(path)
    cfg, adapter = load_model(plain_cfg, path)
    assert (cfg.model.lora.rank, cfg.model.lora.alpha) == (RANK, ALPHA)
    assert cfg.model.lora.target_modules == plain_cfg.model.lora.target_modules  # the patterns select the same
    torch.testing.assert_close(_output(adapter.transformer), _output(reference.transformer), rtol=1e-5, atol=1e-5)


def test_generate_with_our_exports_draws_what_the_peft_file_draws(trained_cfg, state, tmp_path):
    """Today's `--lora lora_diffusers.safetensors` fails with "missing keys": every export draws the same shots."""
    paths = write_lora_files(state, tmp_path, trained_cfg.model, {})
    outputs = [_output(load_model(trained_cfg, path)[1].transformer) for path in paths]
    for path, output in zip(paths[1:], outputs[1:], strict=True):
        torch.testing.assert_close(output, outputs[0], rtol=1e-5, atol=1e-5, msg=path.name)


def test_comfyui_modules_with_different_alphas_are_folded_to_one_scale(trained_cfg, plain_cfg, state, tmp_path):
    halved = {"blocks.0.attn1.to_q": ALPHA / 2}
    path = _kohya_file(state, tmp_path / "mixed.safetensors", _comfyui_lora_a_names, alphas=halved)
    cfg, adapter = load_model(plain_cfg, path)
    assert cfg.model.lora.alpha == RANK  # scale 1: each module's own scale is in its up weight
    loaded = adapter.lora_state_dict()
    for module, alpha in (("blocks.0.attn1.to_q", ALPHA / 2), ("blocks.1.attn1.to_q", ALPHA)):
        torch.testing.assert_close(loaded[f"{module}.lora_B.weight"], state[f"{module}.lora_B.weight"] * alpha / RANK)


def test_rslora_scale_is_kept(trained_cfg, state, tmp_path):
    lora = read_lora(_peft_folder(trained_cfg, state, tmp_path / "rslora", use_rslora=True))
    assert lora.alpha == pytest.approx(ALPHA * math.sqrt(RANK))  # alpha / sqrt(r) == alpha·sqrt(r) / r


def test_a_checkpoint_brings_the_alpha_it_was_trained_with(trained_cfg, plain_cfg, state, tmp_path):
    module_state = {"adapter.transformer." + k.replace(".weight", ".default.weight"): v for k, v in state.items()}
    ckpt = tmp_path / "last.ckpt"
    torch.save({"state_dict": module_state, "hyper_parameters": {"config": to_yaml(trained_cfg)}}, ckpt)
    cfg, _ = load_model(plain_cfg, ckpt)
    assert (cfg.model.lora.rank, cfg.model.lora.alpha) == (RANK, ALPHA)


# --- disagreements and what cannot load: one line each --------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.lora.rank=4", "the LoRA has rank 8, model.lora.rank=4"),
        ("model.lora.alpha=16", "the LoRA has alpha 32, model.lora.alpha=16"),
        ("model.lora.target_modules=[to_q,to_v,ffn.net.0.proj]", "the LoRA holds weights for 'proj_out', which"),
        ("model.lora.target_modules=[to_q,to_k,to_v,ffn.net.0.proj,proj_out]", "selects 'blocks.0.attn1.to_k'"),
        ("model.transformer.num_layers=3", "trained on the tiny transformer with num_layers=2"),
    ],
)
def test_an_explicit_config_value_that_disagrees_is_one_line(override, message, trained_cfg, state, tmp_path, capsys):
    (path,) = write_lora_files(state, tmp_path, trained_cfg.model, {}, ["diffusers"])
    argv = ["export", str(path), "--config", str(_config_file(tmp_path, override)), "--out", str(tmp_path / "out")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and str(path) in err


def test_a_longer_rope_table_is_no_disagreement(trained_cfg, state, tmp_path):
    (path,) = write_lora_files(state, tmp_path, trained_cfg.model, {}, ["peft"])
    cfg, _ = load_model(load_config("smoke", ["seed=3", "model.transformer.rope_max_seq_len=2048"]), path)
    assert cfg.model.lora.rank == RANK


def _config_file(tmp_path, override):
    path = tmp_path / "config.yaml"
    path.write_text(to_yaml(load_config("smoke", ["seed=3", override])))
    return path


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            {"diffusion_model.blocks.0.self_attn.q.dora_scale": torch.zeros(48)},
            "'diffusion_model.blocks.0.self_attn.q.dora_scale' is not a LoRA weight",
        ),
        ({"lora_unet_blocks_0_self_attn_q.diff_b": torch.zeros(48)}, "is not a LoRA weight"),
    ],
)
def test_what_is_not_plain_lora_is_refused_in_one_line(extra, message, state, tmp_path):
    path = _kohya_file(state, tmp_path / "odd.safetensors", _comfyui_lora_a_names)
    save_file({**load_file(path), **extra}, path)
    with pytest.raises(WeightsError, match=message):
        read_lora(path)


@pytest.mark.parametrize(
    ("tensors", "message"),
    [
        ({"diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.zeros(48, 4)}, "no down weight for"),
        ({"lora_unet_blocks_0_self_attn_q.lora_up.weight": torch.zeros(48, 4)}, "no down weight for"),
        ({}, "holds no LoRA weights"),
    ],
)
def test_a_file_without_down_weights_is_one_line(tensors, message, tmp_path):
    path = tmp_path / "ups.safetensors"
    save_file(tensors, path)
    with pytest.raises(WeightsError, match=f"ups.safetensors: {message}"):
        read_lora(path)


@pytest.mark.parametrize("module", ["blocks.0.norm2", "blocks.0.attn1"])
def test_a_lora_on_a_module_no_lora_adapts_is_refused_naming_the_file(module, trained_cfg, tmp_path):
    path = tmp_path / "odd.safetensors"
    save_file({f"{module}.lora_A.weight": torch.zeros(4, 48), f"{module}.lora_B.weight": torch.zeros(48, 4)}, path)
    with pytest.raises(WeightsError, match=f"odd.safetensors: LoRA module {module!r} is a .*, not a linear"):
        load_model(trained_cfg, path)


def test_a_dora_adapter_is_refused(trained_cfg, state, tmp_path):
    folder = tmp_path / "dora"
    model = peft.get_peft_model(
        build_components(trained_cfg.model).transformer,
        peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, use_dora=True),
    )
    model.save_pretrained(folder)
    with pytest.raises(WeightsError, match="is not a LoRA weight|use_dora"):
        read_lora(folder)


# --- fine-tuning from a LoRA: model.lora.init_from ------------------------------------------------------------


def test_training_starts_from_init_from_with_its_rank_and_alpha(trained_cfg, state, tmp_path):
    (path,) = write_lora_files(state, tmp_path, trained_cfg.model, {}, ["comfyui"])
    module = DreamShotModule(load_config("smoke", [*FAST, "seed=3", f"model.lora.init_from={path}"]))
    lora = module.cfg.model.lora
    assert (lora.rank, lora.alpha, set(lora.target_modules)) == (RANK, ALPHA, {split_key(k)[0] for k in state})
    loaded = module.adapter.lora_state_dict()
    assert loaded.keys() == state.keys()
    for key, value in state.items():
        torch.testing.assert_close(loaded[key], value, rtol=1e-6, atol=0)
    # The checkpoint's config is the resolved one, so a resumed or exported run agrees with its weights.
    assert f"rank: {RANK}" in module.hparams["config"]


def test_init_from_disagreeing_with_the_run_is_a_config_error(trained_cfg, state, tmp_path):
    (path,) = write_lora_files(state, tmp_path, trained_cfg.model, {}, ["peft"])
    cfg = load_config("smoke", [*FAST, "seed=3", f"model.lora.init_from={path}", "model.lora.rank=16"])
    with pytest.raises(ConfigError, match=rf"model.lora.init_from={path}: the LoRA has rank 8, model.lora.rank=16"):
        DreamShotModule(cfg)


def test_a_target_a_format_cannot_hold_stops_training_before_it_starts(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "smoke", *FAST, f"output_dir={out}", "model.lora.target_modules=[to_q,patch_embedding]"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "model.lora.target_modules: the comfyui export cannot hold a LoRA on 'patch_embedding'" in err
    assert not (out / "checkpoints").exists() and not (out / "config.yaml").exists()


def test_a_run_from_init_from_records_the_lora_it_trained(trained_cfg, state, tmp_path):
    from dreamshot.training.train import train

    (path,) = write_lora_files(state, tmp_path, trained_cfg.model, {}, ["diffusers"])
    overrides = [
        *FAST,
        "seed=3",
        f"model.lora.init_from={path}",
        f"output_dir={tmp_path / 'run'}",
        "trainer.checkpoint_every_n_steps=1",
        "trainer.val_check_interval=1",
    ]
    out = train(load_config("smoke", [*overrides, "trainer.max_steps=1"]))
    saved = load_config(out / "config.yaml")
    assert (saved.model.lora.rank, saved.model.lora.alpha) == (RANK, ALPHA)
    assert sorted(p.name for p in out.glob("lora*.safetensors")) == sorted(EXPORT_FILES.values())
    assert json.loads((out / "summary.json").read_text())["steps"] == 1
    # The same command line resumes it: the checkpoint's config is compared with the resolved LoRA settings,
    # not with the defaults the command line leaves them at.
    train(load_config("smoke", [*overrides, "trainer.max_steps=2", "trainer.ckpt_path=last"]))
    assert json.loads((out / "summary.json").read_text())["steps"] == 2


def test_a_bare_peft_file_without_alpha_has_alpha_rank_as_diffusers_applies_it(tmp_path):
    path = tmp_path / "bare.safetensors"
    module = "blocks.0.attn1.to_q"
    save_file({f"{module}.lora_A.weight": torch.ones(4, 48), f"{module}.lora_B.weight": torch.ones(48, 4)}, path)
    lora = read_lora(path)  # peft names, no metadata
    assert lora.alpha == 4
    # As the run's LoRA, with a config that says nothing about its alpha (8), as a second LoRA alike: scale 1.
    cfg = load_config("smoke", ["seed=3"])
    assert (cfg.model.lora.alpha, with_lora(cfg, lora, str(path)).model.lora.alpha) == (8, 4)
