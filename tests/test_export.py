"""LoRA export: diffusers and ComfyUI key formats, loading into diffusers' WanPipeline with the same transformer
output as our adapter (also when diffusers ignores the metadata), the base model recorded in every file, the
end-of-training export callback and `dreamshot export`."""

from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline
from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_wan_lora_to_diffusers
from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dreamshot.cli import main
from dreamshot.config.load import load_config, to_yaml
from dreamshot.inference.loading import read_lora
from dreamshot.models.wan.build import build_components
from dreamshot.models.wan.lora_formats import (
    DIFFUSERS_METADATA_KEY,
    WAN_BLOCK_LINEARS,
    WAN_OUTER_LINEARS,
    scale_up_weights,
    split_key,
    to_comfyui,
    to_diffusers,
)
from dreamshot.training.callbacks import CHECKPOINT_LORA_KEY, EXPORT_FILES, ExportLora, write_lora_files
from dreamshot.training.ema import LoraEma
from dreamshot.utils.errors import ConfigError, WeightsError

RANK, ALPHA = 4, 6.0  # alpha != rank: the scale alpha / rank must survive every format
# Targets outside the blocks too: every linear with an original-Wan name.
OUTER_TARGETS = ["to_q", "ffn.net.2", *WAN_OUTER_LINEARS]


@pytest.fixture(scope="module")
def cfg():
    return load_config("smoke", [f"model.lora.rank={RANK}", f"model.lora.alpha={ALPHA}", "seed=3"])


@pytest.fixture(scope="module")
def adapter(cfg, trained_adapter):
    return trained_adapter(cfg)


@pytest.fixture(scope="module")
def state(adapter):
    return {key: value.clone() for key, value in adapter.lora_state_dict().items()}


@pytest.fixture(scope="module")
def outer_cfg(cfg):
    lora = dataclasses.replace(cfg.model.lora, target_modules=OUTER_TARGETS)
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, lora=lora))


@pytest.fixture(scope="module")
def outer_adapter(outer_cfg, trained_adapter):
    return trained_adapter(outer_cfg)


def _pipeline(cfg) -> WanPipeline:
    """diffusers' WanPipeline around the same frozen tiny parts as the adapter (same seed), no LoRA."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        parts = build_components(cfg.model)
    return WanPipeline(
        tokenizer=parts.tokenizer,
        text_encoder=parts.text_encoder,
        vae=parts.vae,
        transformer=parts.transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(),
    )


def _transformer_inputs(cfg):
    """One video of 3 latent frames and one text: diffusers' own forward, no storyboard specifics."""
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(1, 16, 3, 4, 6, generator=generator)
    text = torch.randn(1, cfg.model.text_len, cfg.model.transformer.text_dim, generator=generator)
    return latents, torch.tensor([500.0]), text


# --- key formats ----------------------------------------------------------------------------------------------


def test_comfyui_keys_are_original_wan_names(state, cfg):
    tensors = to_comfyui(state, ALPHA).tensors
    blocks = range(cfg.model.transformer.num_layers)
    linears = WAN_BLOCK_LINEARS.values()
    suffixes = ("lora_down.weight", "lora_up.weight", "alpha")
    assert set(tensors) == {f"diffusion_model.blocks.{i}.{m}.{s}" for i in blocks for m in linears for s in suffixes}
    assert "diffusion_model.blocks.1.cross_attn.k.lora_down.weight" in tensors
    assert "diffusion_model.blocks.0.ffn.2.lora_up.weight" in tensors
    torch.testing.assert_close(
        tensors["diffusion_model.blocks.0.self_attn.o.lora_down.weight"], state["blocks.0.attn1.to_out.0.lora_A.weight"]
    )
    # alpha / rank is folded into the up weights, so alpha = rank: no client can apply another scale.
    torch.testing.assert_close(
        tensors["diffusion_model.blocks.0.ffn.2.lora_up.weight"],
        state["blocks.0.ffn.net.2.lora_B.weight"] * ALPHA / RANK,
    )
    assert tensors["diffusion_model.blocks.1.ffn.0.alpha"].item() == RANK


def test_comfyui_names_the_linears_outside_the_blocks_as_wan_does(outer_adapter):
    tensors = to_comfyui(outer_adapter.lora_state_dict(), ALPHA).tensors
    assert {"diffusion_model.head.head.lora_down.weight", "diffusion_model.time_projection.1.lora_up.weight"} <= set(
        tensors
    )
    assert "diffusion_model.text_embedding.2.lora_down.weight" in tensors
    # diffusers' converter rejects an alpha beside these: the scale is in the up weights alone.
    assert not any(key.endswith(".alpha") and "blocks." not in key for key in tensors)


def test_diffusers_converter_maps_comfyui_back_to_our_weights(state):
    # The converter scales some tensors in place: give it copies.
    comfyui = {key: value.clone() for key, value in to_comfyui(state, ALPHA).tensors.items()}
    converted = _convert_non_diffusers_wan_lora_to_diffusers(comfyui)
    assert set(converted) == {"transformer." + key for key in state}
    # diffusers folds alpha / rank into A and B (loading them at scale 1): the weight update B·A is what matters.
    for key in state:
        module, part = split_key(key)
        if part == "A":
            ours = (ALPHA / RANK) * state[f"{module}.lora_B.weight"] @ state[key]
            theirs = converted[f"transformer.{module}.lora_B.weight"] @ converted[f"transformer.{key}"]
            torch.testing.assert_close(theirs, ours)


def test_diffusers_keys_and_adapter_metadata(state):
    exported = to_diffusers(state, ALPHA)
    assert set(exported.tensors) == {"transformer." + key for key in state}
    config = json.loads(exported.metadata[DIFFUSERS_METADATA_KEY])
    assert config["transformer.r"] == RANK and config["transformer.lora_alpha"] == RANK
    assert "blocks.1.ffn.net.0.proj" in config["transformer.target_modules"]
    folded = scale_up_weights(state, ALPHA / RANK)
    assert all(torch.equal(exported.tensors["transformer." + key], value) for key, value in folded.items())
    assert exported.metadata["dreamshot.alpha"] == str(ALPHA) and exported.metadata["dreamshot.rank"] == str(RANK)


def test_modules_without_a_wan_name_or_bad_keys_are_weights_errors():
    with pytest.raises(WeightsError, match="'patch_embedding' has no ComfyUI"):
        to_comfyui({"patch_embedding.lora_A.weight": torch.zeros(2, 3)}, ALPHA)
    with pytest.raises(WeightsError, match="is not a peft LoRA weight"):
        to_comfyui({"blocks.0.attn1.to_q.weight": torch.zeros(2, 3)}, ALPHA)


def test_every_file_records_the_base_model(cfg, state, tmp_path):
    pretrained = dataclasses.replace(cfg.model, pretrained_path=str(tmp_path / "Wan2.1-T2V-1.3B-Diffusers"))
    for path in write_lora_files(state, tmp_path, pretrained, {}):
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata()
        assert metadata["dreamshot.base_model"] == "tiny", path.name
        assert json.loads(metadata["dreamshot.transformer"]) == dataclasses.asdict(cfg.model.transformer)
        assert metadata["dreamshot.pretrained"] == "Wan2.1-T2V-1.3B-Diffusers"


# --- loading into diffusers' WanPipeline --------------------------------------------------------------------


def _without_scale_records(path):
    """The file as a client that ignores diffusers' metadata and ComfyUI's `.alpha` sees it (diffusers 0.33)."""
    tensors = {key: value for key, value in load_file(path).items() if not key.endswith(".alpha")}
    save_file(tensors, path, metadata={"format": "pt"})


@pytest.mark.parametrize("old_client", [False, True], ids=["", "no-metadata"])
@pytest.mark.parametrize("targets", ["blocks", "outer"])
@pytest.mark.parametrize("fmt", ["diffusers", "comfyui"])
@torch.no_grad()
def test_wan_pipeline_with_exported_lora_matches_our_transformer(request, fmt, targets, old_client, tmp_path):
    cfg = request.getfixturevalue("cfg" if targets == "blocks" else "outer_cfg")
    adapter = request.getfixturevalue("adapter" if targets == "blocks" else "outer_adapter")
    (path,) = write_lora_files(adapter.lora_state_dict(), tmp_path, cfg.model, {}, [fmt])
    if old_client:
        _without_scale_records(path)
    pipe = _pipeline(cfg)
    inputs = _transformer_inputs(cfg)
    bare = pipe.transformer(*inputs, return_dict=False)[0]
    pipe.load_lora_weights(str(path))
    theirs = pipe.transformer(*inputs, return_dict=False)[0]
    # Our transformer, LoRA included, through diffusers' own forward (one text: shot-wise = plain cross-attention).
    ours = adapter.transformer(*inputs, return_dict=False)[0]
    assert (ours - bare).abs().max() > 1e-2, "the LoRA must change the output for this test to mean anything"
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)


def _apply_as_comfyui(path, transformer) -> None:
    """Patch `transformer` with the LoRA file at `path` as ComfyUI does (read from comfy/lora.py and
    comfy/weight_adapter/lora.py; ComfyUI cannot be installed here without its whole app): the model's keys are the
    original Wan parameter names under `diffusion_model.` (diffusers' own Wan checkpoint converter gives their
    diffusers names here), a LoRA named `diffusion_model.<module>` patches `<module>.weight` by
    (alpha / rank, 1 without `.alpha`) · lora_up @ lora_down, and a key no rule loads is left out with a warning."""
    tensors = load_file(path)
    parameters = dict(transformer.named_parameters())
    loaded = set()
    for up_key in [key for key in tensors if key.endswith(".lora_up.weight")]:
        module = up_key.removesuffix(".lora_up.weight")
        up, down, alpha = tensors[up_key], tensors[f"{module}.lora_down.weight"], tensors.get(f"{module}.alpha")
        scale = 1.0 if alpha is None else alpha.item() / down.shape[0]
        original = module.removeprefix("diffusion_model.") + ".weight"
        (name,) = convert_wan_transformer_to_diffusers({original: up})
        parameters[name].data += scale * up.float() @ down.float()
        loaded |= {up_key, f"{module}.lora_down.weight", f"{module}.alpha"}
    assert not set(tensors) - loaded, "ComfyUI would warn 'lora key not loaded' and drop these"


@pytest.mark.parametrize("targets", ["blocks", "outer"])
@torch.no_grad()
def test_comfyui_applies_the_exported_lora_as_our_transformer_does(request, targets, tmp_path):
    cfg = request.getfixturevalue("cfg" if targets == "blocks" else "outer_cfg")
    adapter = request.getfixturevalue("adapter" if targets == "blocks" else "outer_adapter")
    (path,) = write_lora_files(adapter.lora_state_dict(), tmp_path, cfg.model, {}, ["comfyui"])
    transformer = _pipeline(cfg).transformer
    inputs = _transformer_inputs(cfg)
    bare = transformer(*inputs, return_dict=False)[0]
    _apply_as_comfyui(path, transformer)
    ours = adapter.transformer(*inputs, return_dict=False)[0]
    assert (ours - bare).abs().max() > 1e-2
    torch.testing.assert_close(transformer(*inputs, return_dict=False)[0], ours, atol=1e-5, rtol=1e-5)


# --- the end-of-training callback -----------------------------------------------------------------------------


@pytest.mark.parametrize("rank", [0, 1])
def test_export_callback_writes_every_format_on_rank_zero_only(cfg, adapter, state, rank, tmp_path):
    trainer = SimpleNamespace(strategy=None, is_global_zero=rank == 0, global_step=7)
    ExportLora(tmp_path).on_train_end(trainer, SimpleNamespace(adapter=adapter, cfg=cfg))
    if rank:
        assert not list(tmp_path.iterdir())
        return
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(EXPORT_FILES.values())
    peft = load_file(tmp_path / EXPORT_FILES["peft"])
    assert all(torch.equal(peft[key], value) for key, value in state.items())
    assert load_file(tmp_path / EXPORT_FILES["comfyui"]).keys() == to_comfyui(state, ALPHA).tensors.keys()


# --- dreamshot export -----------------------------------------------------------------------------------------


@pytest.fixture
def run_dir(cfg, state, tmp_path):
    """A run folder (config.yaml, the LoRA in every format), a Lightning checkpoint and a DeepSpeed checkpoint
    folder."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(to_yaml(cfg))
    write_lora_files(state, run, cfg.model, {})
    checkpoints = run / "checkpoints"
    checkpoints.mkdir()
    torch.save({"state_dict": _module_state(state)}, checkpoints / "step000004.ckpt")
    deepspeed = checkpoints / "last.ckpt" / "checkpoint"
    deepspeed.mkdir(parents=True)
    torch.save({"module": {}, CHECKPOINT_LORA_KEY: state}, deepspeed / "zero_pp_rank_0_mp_rank_00_model_states.pt")
    return run


def _module_state(lora):
    """LoRA weights under the names of DreamShotModule's parameters, as a checkpoint holds them."""
    return {"adapter.transformer." + k.replace(".weight", ".default.weight"): v for k, v in lora.items()}


def _assert_same_tensors(path, expected):
    tensors = load_file(path)
    assert tensors.keys() == expected.keys(), path.name
    for key, value in expected.items():
        torch.testing.assert_close(tensors[key], value, rtol=1e-6, atol=0)


@pytest.mark.parametrize(
    "source",
    [
        ".",
        "lora.safetensors",
        "lora_diffusers.safetensors",
        "lora_comfyui.safetensors",
        "checkpoints/step000004.ckpt",
        "checkpoints/last.ckpt",
    ],
)
def test_export_command_writes_the_formats_from_any_source(run_dir, state, source, tmp_path, capsys):
    out = tmp_path / "exported"
    assert main(["export", str(run_dir / source), "--out", str(out), "--format", "comfyui,diffusers"]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted([EXPORT_FILES["comfyui"], EXPORT_FILES["diffusers"]])
    assert str(out / EXPORT_FILES["comfyui"]) in capsys.readouterr().out
    # The same files whatever the source's format: no `transformer.transformer.` from a diffusers input.
    _assert_same_tensors(out / EXPORT_FILES["comfyui"], to_comfyui(state, ALPHA).tensors)
    _assert_same_tensors(out / EXPORT_FILES["diffusers"], to_diffusers(state, ALPHA).tensors)


def test_export_takes_alpha_from_the_file_not_the_config(cfg, state, tmp_path):
    """A rank-4 alpha-6 LoRA exported with a config left at the defaults (rank 8, alpha 8) keeps its scale 1.5."""
    lone = tmp_path / "lone"
    lone.mkdir()
    (lora,) = write_lora_files(state, lone, cfg.model, {}, ["peft"])
    out = tmp_path / "out"
    assert main(["export", str(lora), "--config", "smoke", "--out", str(out), "--format", "comfyui"]) == 0
    _assert_same_tensors(out / EXPORT_FILES["comfyui"], to_comfyui(state, ALPHA).tensors)
    with safe_open(out / EXPORT_FILES["comfyui"], framework="pt") as f:
        assert f.metadata()["dreamshot.alpha"] == str(ALPHA)


def test_an_explicit_config_value_that_disagrees_with_the_file_is_one_line(cfg, run_dir, tmp_path, capsys):
    other = tmp_path / "alpha16.yaml"
    other.write_text(
        to_yaml(
            dataclasses.replace(
                cfg, model=dataclasses.replace(cfg.model, lora=dataclasses.replace(cfg.model.lora, alpha=16.0))
            )
        )
    )
    source = run_dir / EXPORT_FILES["diffusers"]
    assert main(["export", str(source), "--config", str(other), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"{source}: the LoRA has alpha 6, model.lora.alpha=16" in err
    assert not (tmp_path / "out").exists()


def test_export_refuses_a_module_a_format_cannot_hold_before_writing(cfg, tmp_path):
    state = {
        "patch_embedding.lora_A.weight": torch.zeros(RANK, 16, 1, 2, 2),
        "patch_embedding.lora_B.weight": torch.zeros(48, RANK, 1, 1, 1),
    }
    with pytest.raises(ConfigError, match="the comfyui export cannot hold a LoRA on 'patch_embedding'"):
        write_lora_files(state, tmp_path, cfg.model, {})
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("source", "extra", "message"),
    [
        ("run", ["--format", "onnx"], "--format: 'onnx' must list formats among"),
        ("missing", [], "missing: not found"),
        ("empty_ds", [], "not a DeepSpeed checkpoint folder"),
        ("alone.safetensors", [], "no config.yaml beside it"),
    ],
)
def test_export_command_errors_are_one_line(run_dir, state, source, extra, message, tmp_path, capsys):
    (run_dir / "empty_ds").mkdir()
    lone = tmp_path / "alone.safetensors"
    save_file(state, lone)
    path = lone if source == "alone.safetensors" else run_dir / source if source != "run" else run_dir
    assert main(["export", str(path), "--out", str(tmp_path / "out"), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("fmt", ["diffusers", "comfyui"])
def test_a_bf16_lora_is_folded_exactly_and_reads_back_as_trained(cfg, state, fmt, tmp_path):
    """A bf16 LoRA (another tool's file, given to `dreamshot export`): alpha / rank folded into it in bf16 would be
    rounded."""
    bf16 = {key: value.to(torch.bfloat16) for key, value in state.items()}
    (path,) = write_lora_files(bf16, tmp_path, cfg.model, {}, [fmt])
    exported = to_diffusers(bf16, ALPHA) if fmt == "diffusers" else to_comfyui(bf16, ALPHA)
    assert exported.tensors.keys() == load_file(path).keys()
    exact = to_diffusers({key: value.double() for key, value in bf16.items()}, ALPHA).tensors
    if fmt == "diffusers":  # the update every client applies is the trained one, to float32's precision
        for key, value in load_file(path).items():
            torch.testing.assert_close(value.double(), exact[key], rtol=2**-24, atol=0)
    back = read_lora(path)
    assert all(torch.equal(back.state[key].to(torch.bfloat16), value) for key, value in bf16.items())


@pytest.mark.parametrize("kind", ["lightning", "deepspeed"])
def test_a_checkpoint_of_an_ema_run_exports_the_average_as_the_run_files_hold_it(cfg, state, kind, tmp_path):
    """With optim.ema_decay the run's lora.safetensors holds the average; its checkpoints keep the trained weights
    beside the average (the callback's state): an export of last.ckpt must be the run's LoRA, not the raw weights."""
    raw = {key: value + 1.0 for key, value in state.items()}
    callbacks = {LoraEma(0.5).state_key: LoraEma(0.5).state_dict() | {"average": _module_state(state)}}
    if kind == "lightning":
        source = tmp_path / "last.ckpt"
        torch.save({"state_dict": _module_state(raw), "callbacks": callbacks}, source)
    else:
        source = tmp_path / "last_ds.ckpt"
        (source / "checkpoint").mkdir(parents=True)
        checkpoint = {"module": {}, CHECKPOINT_LORA_KEY: raw, "callbacks": callbacks}
        torch.save(checkpoint, source / "checkpoint" / "mp_rank_00_model_states.pt")
    (tmp_path / "config.yaml").write_text(to_yaml(cfg))
    out = tmp_path / "out"
    assert main(["export", str(source), "--out", str(out), "--format", "comfyui"]) == 0
    _assert_same_tensors(out / EXPORT_FILES["comfyui"], to_comfyui(state, ALPHA).tensors)


def test_a_lora_of_another_model_size_is_refused_before_writing(run_dir, state, tmp_path, capsys):
    """The export records the config's base model in every file: a LoRA whose shapes do not fit it is no LoRA of it
    (the clients would fail with a size mismatch)."""
    narrow = {k: v[:, :40].contiguous() if k.endswith("lora_A.weight") else v for k, v in state.items()}
    source = run_dir / "narrow.safetensors"
    save_file(narrow, source, metadata={"format": "peft", "alpha": str(ALPHA)})
    assert main(["export", str(source), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{source}: blocks.0.attn1.to_k.lora_A is (4, 40)" in err
    assert not (tmp_path / "out").exists()


def test_export_replaces_no_file_without_overwrite(run_dir, state, tmp_path, capsys):
    """Exporting a step checkpoint into its run folder would silently replace the run's final LoRA files."""
    final = load_file(run_dir / EXPORT_FILES["comfyui"])
    step = {key: value + 1.0 for key, value in state.items()}
    torch.save({"state_dict": _module_state(step)}, run_dir / "checkpoints" / "step000004.ckpt")
    argv = ["export", str(run_dir / "checkpoints" / "step000004.ckpt"), "--out", str(run_dir)]
    assert main([*argv, "--format", "diffusers,comfyui"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"--out {run_dir}: lora_diffusers.safetensors exists; pass --overwrite" in err
    _assert_same_tensors(run_dir / EXPORT_FILES["comfyui"], final)
    assert main([*argv, "--format", "comfyui", "--overwrite"]) == 0
    _assert_same_tensors(run_dir / EXPORT_FILES["comfyui"], to_comfyui(step, ALPHA).tensors)


def test_a_run_folder_without_lora_files_exports_its_deepspeed_last_checkpoint(run_dir, state, tmp_path):
    """A DeepSpeed run stopped before its end has no LoRA files, and its last.ckpt is a folder."""
    for name in EXPORT_FILES.values():
        (run_dir / name).unlink()
    out = tmp_path / "out"
    assert main(["export", str(run_dir), "--out", str(out), "--format", "comfyui"]) == 0
    _assert_same_tensors(out / EXPORT_FILES["comfyui"], to_comfyui(state, ALPHA).tensors)
