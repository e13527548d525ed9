"""Frozen extractors built from the real classes with tiny random weights: the CSD tower saved in CSD's key
layout, the AES head in the published layout, CLIP from an open_clip checkpoint; strict loading and one-line
errors naming the file, the config key and where the weights are published."""

from __future__ import annotations

import json
from collections import OrderedDict

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file
from torchvision.transforms.v2 import functional as TF
from transformers import SiglipVisionConfig, SiglipVisionModel

from dreamshot.config.schema import AestheticConfig, ClipEncoderConfig, CsdConfig
from dreamshot.eval.extractors import (
    CLIP_MEAN,
    CLIP_STD,
    AestheticHead,
    ColourHistogram,
    load_aesthetic_scorer,
    load_clip_encoder,
    load_csd_encoder,
)
from dreamshot.utils.errors import ConfigError, WeightsError

TINY_ARCH = "dreamshot-test-tiny-vit"
TINY_CLIP = {
    "embed_dim": 12,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 32, "patch_size": 28, "head_width": 16},
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module")
def tiny_arch(tmp_path_factory) -> str:
    """A tiny open_clip architecture registered the way open_clip registers custom model configs."""
    folder = tmp_path_factory.mktemp("open_clip_configs")
    (folder / f"{TINY_ARCH}.json").write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(folder)
    return TINY_ARCH


@pytest.fixture(scope="module")
def image() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (60, 90, 3), dtype=np.uint8))


def _normalize(pixels: torch.Tensor) -> torch.Tensor:
    return TF.normalize(pixels, list(CLIP_MEAN), list(CLIP_STD))


def _unit(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)


def test_csd_checkpoint_in_csd_key_layout_loads_strictly_and_matches_direct_computation(tiny_arch, image, tmp_path):
    torch.manual_seed(0)
    visual = open_clip.create_model(tiny_arch, pretrained=None).visual.eval()
    width = visual.ln_post.weight.shape[0]
    w_style, w_content = torch.randn(width, 12), torch.randn(width, 12)
    # CSD's checkpoint: OpenAI CLIP's visual tower without `proj` under `backbone.`, the two heads, saved from
    # DataParallel (`module.` prefix) inside `model_state_dict`.
    state = {f"backbone.{k}": v for k, v in visual.state_dict().items() if k != "proj"}
    state.update(last_layer_style=w_style, last_layer_content=w_content)
    path = tmp_path / "csd.pth"
    torch.save({"model_state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, path)

    encoder = load_csd_encoder(CsdConfig(arch=tiny_arch, weights=str(path)))
    got = encoder([image])

    # Direct: square squash to 224 (bicubic on the [0, 1] tensor), CLIP normalisation, ln_post(CLS) @ W_style.
    pixels = _normalize(TF.resize(_unit(image), [224, 224], TF.InterpolationMode.BICUBIC, antialias=True))
    visual.proj = None
    with torch.no_grad():
        expected = F.normalize(visual(pixels[None]) @ w_style, dim=-1)
    assert got.shape == (1, 12)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_csd_checkpoint_missing_a_key_is_a_one_line_error(tiny_arch, tmp_path):
    visual = open_clip.create_model(tiny_arch, pretrained=None).visual
    state = {f"backbone.{k}": v for k, v in visual.state_dict().items() if k not in ("proj", "ln_post.bias")}
    state["last_layer_style"] = torch.zeros(32, 12)
    path = tmp_path / "csd.pth"
    torch.save(state, path)
    with pytest.raises(WeightsError) as err:
        load_csd_encoder(CsdConfig(arch=tiny_arch, weights=str(path)))
    message = str(err.value)
    assert "ln_post.bias" in message and "eval.csd.weights" in message and str(path) in message
    assert "\n" not in message


def test_missing_weight_file_names_file_key_and_where_published(tmp_path):
    path = tmp_path / "nowhere" / "csd_vit-large.pth"
    with pytest.raises(WeightsError) as err:
        load_csd_encoder(CsdConfig(weights=str(path)))
    message = str(err.value)
    assert str(path) in message and "eval.csd.weights" in message and "learn2phoenix/CSD" in message
    with pytest.raises(ConfigError, match="eval.clip.arch"):
        load_clip_encoder(ClipEncoderConfig(arch="no-such-arch", weights=str(_touch(tmp_path / "clip.bin"))))


def _touch(path):
    path.write_bytes(b"")
    return path


def test_clip_encoder_reads_the_visual_tower_of_an_open_clip_checkpoint(tiny_arch, image, tmp_path):
    torch.manual_seed(1)
    model = open_clip.create_model(tiny_arch, pretrained=None).eval()
    path = tmp_path / "open_clip_model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))

    got = load_clip_encoder(ClipEncoderConfig(arch=tiny_arch, weights=str(path)))([image, image.rotate(90)])

    # Direct: shortest side to 224 (bicubic), centre crop 224, CLIP normalisation, projected CLS, unit norm.
    resized = image.resize((336, 224), Image.BICUBIC).crop((56, 0, 280, 224))
    with torch.no_grad():
        expected = F.normalize(model.visual(_normalize(_unit(resized))[None]), dim=-1)
    assert got.shape == (2, 12)
    torch.testing.assert_close(got[:1], expected, rtol=1e-4, atol=1e-5)
    assert torch.allclose(got.norm(dim=-1), torch.ones(2))


def test_aesthetic_head_in_published_layout_loads_and_matches_direct_computation(image, tmp_path):
    torch.manual_seed(2)
    config = SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=378, patch_size=14
    )
    siglip = SiglipVisionModel(config).eval()
    siglip.save_pretrained(tmp_path / "siglip")
    head = AestheticHead(32)
    keys = {f"scoring_head.{i}.{p}" for i in (0, 2, 4, 6, 8) for p in ("weight", "bias")}
    assert set(head.state_dict()) == keys  # the published file's layout
    state = OrderedDict((k, torch.randn_like(v)) for k, v in head.state_dict().items())
    torch.save(state, tmp_path / "aesthetic_predictor_v2_5.pth")

    cfg = AestheticConfig(siglip=str(tmp_path / "siglip"), head=str(tmp_path / "aesthetic_predictor_v2_5.pth"))
    got = load_aesthetic_scorer(cfg)([image])

    # Direct: Resize((378, 378)) bilinear, ToTensor (no normalisation), unit pooler output, the five linears.
    pixels = _unit(image.resize((378, 378), Image.BILINEAR))[None]
    with torch.no_grad():
        hidden = F.normalize(siglip(pixel_values=pixels).pooler_output, dim=-1)
        for i in (0, 2, 4, 6, 8):
            hidden = F.linear(hidden, state[f"scoring_head.{i}.weight"], state[f"scoring_head.{i}.bias"])
    assert got.shape == (1,)
    torch.testing.assert_close(got, hidden[:, 0], rtol=1e-4, atol=1e-5)


def test_aesthetic_siglip_folder_must_exist(tmp_path):
    head = _touch(tmp_path / "head.pth")
    with pytest.raises(WeightsError, match=r"eval\.aes\.siglip.*siglip-so400m"):
        load_aesthetic_scorer(AestheticConfig(siglip=str(tmp_path / "absent"), head=str(head)))


def test_colour_histogram_is_a_unit_descriptor_of_colour():
    red, blue = Image.new("RGB", (8, 8), (250, 10, 10)), Image.new("RGB", (8, 8), (10, 10, 250))
    half = Image.new("RGB", (8, 8), (250, 10, 10))
    half.paste((10, 10, 250), (0, 0, 8, 4))
    features = ColourHistogram()([red, blue, half])
    assert torch.allclose(features.norm(dim=-1), torch.ones(3))
    similarity = features @ features.T
    assert similarity[0, 1] == 0 and similarity[0, 2] == pytest.approx(0.5**0.5)


@pytest.mark.parametrize(
    ("size", "resized"), [((640, 720), (224, 252)), ((222, 333), (224, 336)), ((333, 111), (672, 224))]
)
def test_clip_preprocessing_sizes_the_long_side_as_the_published_processor(size, resized):
    # ViStoryBench's CIDS runs transformers' CLIPImageProcessor (4.41, its pinned version; checked side by side):
    # the long side becomes int(224 * long / short), which `long * (224 / short)` misses by one pixel for these
    # sizes, shifting the centre crop.
    from dreamshot.eval.extractors import ClipImageEncoder

    rng = np.random.default_rng(size[0])
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    left, top = (resized[0] - 224) // 2, (resized[1] - 224) // 2
    published = _normalize(_unit(image.resize(resized, Image.BICUBIC).crop((left, top, left + 224, top + 224))))
    torch.testing.assert_close(ClipImageEncoder(torch.nn.Identity()).preprocess(image), published, rtol=0, atol=0)


def test_features_of_an_older_extractor_code_are_computed_again(image, tmp_path, monkeypatch):
    # The cache key names the weights and settings, not the code: a fix to an extractor's preprocessing (CLIP's
    # resize) bumps FEATURES_VERSION so that a rescore in an old results folder does not reuse its features.
    from dreamshot.eval import feature_cache

    calls = []

    def encode(images):
        calls.append(len(images))
        return torch.ones(len(images), 2)

    def encoded_once_more() -> bool:
        cache = feature_cache.FeatureCache(tmp_path)
        before = len(calls)
        cache.encoder(encode, feature_cache.extractor_identity("clip", {"arch": "x"}))([image])
        cache.flush("story")
        return len(calls) > before

    assert encoded_once_more() and not encoded_once_more()
    monkeypatch.setattr(feature_cache, "FEATURES_VERSION", feature_cache.FEATURES_VERSION + 1)
    assert encoded_once_more()
