"""Building the Wan parts: tiny random init, the full configs on the meta device, loading local weights."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import AutoTokenizer

from dreamshot.config.load import load_config
from dreamshot.config.schema import ModelConfig, TransformerConfig
from dreamshot.models.wan.build import build_components, build_transformer_on_meta
from dreamshot.models.wan.text import encode_texts
from dreamshot.models.wan.tokenizer import build_tiny_tokenizer
from dreamshot.utils.errors import ConfigError, WeightsError


def _parameter_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_tiny_components_match_config_and_are_frozen(tiny_model_cfg, tiny_components):
    t = tiny_components.transformer.config
    assert (t.num_layers, t.num_attention_heads, t.attention_head_dim) == (2, 2, 24)
    assert t.in_channels == t.out_channels == tiny_model_cfg.vae.z_dim
    assert tiny_components.text_encoder.config.d_model == t.text_dim
    assert tiny_components.vae.spatial_compression_ratio == 8
    for module in (tiny_components.transformer, tiny_components.vae, tiny_components.text_encoder):
        assert not module.training
        assert not any(p.requires_grad for p in module.parameters())


def test_bfloat16_keeps_vae_float32():
    torch.manual_seed(0)
    parts = build_components(ModelConfig(dtype="bfloat16"))
    assert parts.transformer.dtype == parts.text_encoder.dtype == torch.bfloat16
    assert parts.vae.dtype == torch.float32


@pytest.mark.parametrize(
    ("option", "count"),
    # What diffusers' WanTransformer3DModel builds for the published Wan2.1 configs (1.3B and 14B).
    [("wan1_3b", 1_418_996_800), ("wan14b", 14_288_491_584)],
)
def test_full_size_transformer_on_meta(option, count):
    cfg = load_config(overrides=[f"model={option}"]).model
    transformer = build_transformer_on_meta(cfg)
    assert next(transformer.parameters()).device.type == "meta"
    assert _parameter_count(transformer) == count
    assert round(count / 1e9, 2) == {"wan1_3b": 1.42, "wan14b": 14.29}[option]


def test_text_dim_must_match_text_encoder():
    cfg = ModelConfig(transformer=TransformerConfig(text_dim=64))
    with pytest.raises(ConfigError, match="model.transformer.text_dim"):
        build_components(cfg)


def test_in_channels_must_match_vae():
    cfg = ModelConfig(transformer=TransformerConfig(in_channels=8))
    with pytest.raises(ConfigError, match="model.vae.z_dim"):
        build_transformer_on_meta(cfg)


def _save_tiny(parts, root) -> None:
    for name in ("transformer", "vae", "text_encoder", "tokenizer"):
        getattr(parts, name).save_pretrained(root / name)


def test_pretrained_round_trip_gives_identical_outputs(tiny_model_cfg, tiny_components, tmp_path):
    _save_tiny(tiny_components, tmp_path)
    loaded = build_components(dataclasses.replace(tiny_model_cfg, pretrained_path=str(tmp_path)))

    texts = [["a red circle walks", "ünïcode"], ["", "a blue square"]]
    original, reloaded = (
        encode_texts(parts.text_encoder, parts.tokenizer, texts, tiny_model_cfg.text_len)
        for parts in (tiny_components, loaded)
    )
    assert torch.equal(original, reloaded)

    torch.manual_seed(1)
    latents = torch.randn(1, 16, 2, 4, 4)
    text = torch.randn(1, 8, tiny_model_cfg.transformer.text_dim)
    timestep = torch.tensor([500])
    with torch.no_grad():
        a = tiny_components.transformer(latents, timestep, text, return_dict=False)[0]
        b = loaded.transformer(latents, timestep, text, return_dict=False)[0]
        assert torch.equal(a, b)
        assert torch.equal(tiny_components.vae.decode(latents).sample, loaded.vae.decode(latents).sample)
    assert not any(p.requires_grad for p in loaded.transformer.parameters())


def test_missing_subfolder_is_a_weights_error(tiny_model_cfg, tiny_components, tmp_path):
    _save_tiny(tiny_components, tmp_path)
    (tmp_path / "vae" / "config.json").unlink()
    cfg = dataclasses.replace(tiny_model_cfg, pretrained_path=str(tmp_path))
    with pytest.raises(WeightsError, match=r"vae.*model\.pretrained_path"):
        build_components(cfg)
    cfg = dataclasses.replace(tiny_model_cfg, pretrained_path=str(tmp_path / "nowhere"))
    with pytest.raises(WeightsError, match=r"nowhere/transformer: folder not found \(model\.pretrained_path"):
        build_components(cfg)


def test_tiny_tokenizer_is_byte_level_and_round_trips(tmp_path):
    tokenizer = build_tiny_tokenizer(384)
    # "A" is byte 65, "é" the two bytes 0xC3 0xA9; every text ends with </s> = 1.
    assert tokenizer("Aé").input_ids == [3 + 65, 3 + 0xC3, 3 + 0xA9, 1]
    assert tokenizer.decode(tokenizer("Aé ü").input_ids, skip_special_tokens=True) == "Aé ü"
    padded = tokenizer(["abcdef", "x"], padding="max_length", max_length=4, truncation=True)
    assert padded.input_ids == [[3 + 97, 3 + 98, 3 + 99, 1], [3 + 120, 1, 0, 0]]
    assert padded.attention_mask[1] == [1, 1, 0, 0]
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    assert reloaded("storyboard ✓").input_ids == tokenizer("storyboard ✓").input_ids
    assert build_tiny_tokenizer(384)("same").input_ids == tokenizer("same").input_ids
    with pytest.raises(ValueError, match="259"):
        build_tiny_tokenizer(258)


def _encode(parts, texts, text_len=32):
    return encode_texts(parts.text_encoder, parts.tokenizer, texts, text_len)


def test_texts_are_encoded_separately_with_zero_padding(tiny_components):
    emb = _encode(tiny_components, [["ab", "a blue square", ""], ["x", "y", "z"]])
    assert emb.shape == (2, 3, 32, 32)
    # "ab" is 3 tokens with its </s>: rows from 3 on are exactly zero, the real ones are not.
    assert torch.count_nonzero(emb[0, 0, 3:]) == 0
    assert emb[0, 0, :3].abs().sum(-1).min() > 0
    # The empty text still has its </s>.
    assert torch.count_nonzero(emb[0, 2, 1:]) == 0 and emb[0, 2, 0].abs().sum() > 0


def test_a_text_embedding_ignores_its_batch_neighbours(tiny_components):
    alone = _encode(tiny_components, [["hello"]])
    crowded = _encode(tiny_components, [["a much longer neighbour text", "hello"], ["other", "texts"]])
    assert torch.allclose(crowded[0, 1], alone[0, 0], atol=1e-6)


def test_long_texts_are_truncated_to_text_len(tiny_components):
    emb = _encode(tiny_components, [["x" * 100]], text_len=16)
    assert emb.shape == (1, 1, 16, 32)
    assert emb[0, 0].abs().sum(-1).min() > 0
    # Truncation keeps the closing </s>: 15 bytes of text, then </s>.
    assert torch.allclose(emb, _encode(tiny_components, [["x" * 15]], text_len=16), atol=1e-6)


def test_rows_of_texts_must_have_equal_length(tiny_components):
    with pytest.raises(ValueError, match="same number of texts"):
        _encode(tiny_components, [["a", "b"], ["c"]])
