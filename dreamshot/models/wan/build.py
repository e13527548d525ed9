"""Build the Wan2.1 parts — DiT, VAE, umT5 and its tokenizer — tiny from config dims or from local weights.

With `model.pretrained_path` unset every part is randomly initialised from the real diffusers /
transformers classes (the caller seeds torch first), with the byte-level tokenizer of `tokenizer.py`.
Otherwise the parts load from a local diffusers-format Wan2.1 directory
(`transformer/`, `vae/`, `text_encoder/`, `tokenizer/`), never from the Hub.

Dtypes: the DiT and umT5 are held in `model.dtype`; the VAE is built in float32, as in diffusers' Wan
examples, because its decoder loses visible quality in bfloat16 and it is small next to the DiT. Sampling, the
latent cache (`dreamshot cache`), DDP and ZeRO-2 training keep it so: DeepSpeed's bf16 mode casts every parameter
of the trained module to bf16, the VAE's included, and ZeRO-2 (`trainer=gpu`) gives the VAE its float32 weights
back (`LoraDeepSpeedStrategy.setup`). ZeRO-3 (`trainer=zero3`) partitions the VAE with every other weight, so a
ZeRO-3 run without `data.cache_dir` encodes its shots and references with a bf16 VAE (the planner counts it so).
Everything comes back frozen and in eval mode; LoRA (`lora.py`) adds the only trainable parameters.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKLWan, WanTransformer3DModel
from transformers import AutoTokenizer, PreTrainedTokenizerBase, UMT5Config, UMT5EncoderModel

from dreamshot.config.schema import ModelConfig, check_model_dims
from dreamshot.models.wan.tokenizer import build_tiny_tokenizer
from dreamshot.utils.errors import WeightsError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
SUBFOLDERS = ("transformer", "vae", "text_encoder", "tokenizer")


@dataclass
class WanComponents:
    """The four parts of a Wan2.1 text-to-video model."""

    transformer: WanTransformer3DModel
    vae: AutoencoderKLWan
    text_encoder: UMT5EncoderModel
    tokenizer: PreTrainedTokenizerBase


def build_components(cfg: ModelConfig) -> WanComponents:
    """All parts, frozen, in eval mode (random init when `cfg.pretrained_path` is None). Random parts are created
    on the current default device: under `with torch.device("cuda")` a full-size DiT is initialised on the GPU,
    seconds instead of minutes of CPU init; under `torch.device("meta")` nothing is allocated."""
    parts = _random_components(cfg) if cfg.pretrained_path is None else _load_components(cfg)
    for module in (parts.transformer, parts.vae, parts.text_encoder):
        module.requires_grad_(False).eval()
    return parts


def build_transformer_on_meta(cfg: ModelConfig) -> WanTransformer3DModel:
    """The DiT of `cfg` on the meta device: shapes and parameter counts without allocating memory."""
    check_model_dims(cfg)
    with torch.device("meta"):
        return build_transformer(cfg)


def _random_components(cfg: ModelConfig) -> WanComponents:
    check_model_dims(cfg)
    dtype = DTYPES[cfg.dtype]
    te = cfg.text_encoder
    umt5 = UMT5Config(
        vocab_size=te.vocab_size,
        d_model=te.d_model,
        d_kv=te.d_kv,
        d_ff=te.d_ff,
        num_layers=te.num_layers,
        num_heads=te.num_heads,
        feed_forward_proj="gated-gelu",
    )
    # The DiT and umT5 are created in their dtype (a full-size DiT never exists in float32, and diffusers warns on
    # `.to(dtype)`), in the order DiT, VAE, umT5 that fixes which random weights a seed gives each part.
    with _default_dtype(dtype):
        transformer = build_transformer(cfg)
    vae = AutoencoderKLWan(
        base_dim=cfg.vae.base_dim,
        z_dim=cfg.vae.z_dim,
        dim_mult=[1, 2, 4, 4],
        num_res_blocks=cfg.vae.num_res_blocks,
        attn_scales=[],
        temperal_downsample=[False, True, True],
        # A random VAE has no latent statistics: identity normalisation keeps its latents as they are.
        latents_mean=[0.0] * cfg.vae.z_dim,
        latents_std=[1.0] * cfg.vae.z_dim,
    )
    with _default_dtype(dtype):
        text_encoder = UMT5EncoderModel(umt5)
    return WanComponents(transformer, vae, text_encoder, build_tiny_tokenizer(te.vocab_size))


@contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_transformer(cfg: ModelConfig) -> WanTransformer3DModel:
    """The DiT of `cfg`, randomly initialised (the caller seeds torch)."""
    t = cfg.transformer
    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=t.num_attention_heads,
        attention_head_dim=t.attention_head_dim,
        in_channels=t.in_channels,
        out_channels=t.in_channels,
        text_dim=t.text_dim,
        freq_dim=t.freq_dim,
        ffn_dim=t.ffn_dim,
        num_layers=t.num_layers,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=t.rope_max_seq_len,
    )


def _load_components(cfg: ModelConfig) -> WanComponents:
    root = Path(cfg.pretrained_path)
    dtype = DTYPES[cfg.dtype]
    return WanComponents(
        transformer=_load(WanTransformer3DModel, root / "transformer", dtype=dtype),
        vae=_load(AutoencoderKLWan, root / "vae", dtype=torch.float32),
        text_encoder=_load(UMT5EncoderModel, root / "text_encoder", dtype=dtype),
        tokenizer=_load(AutoTokenizer, root / "tokenizer"),
    )


def _load(cls, folder: Path, **kwargs):
    """`cls.from_pretrained(folder)` from local files only; a missing folder or file is a WeightsError."""
    if not folder.is_dir():
        raise WeightsError(
            f"{folder}: folder not found (model.pretrained_path must be a diffusers-format Wan2.1 "
            f"directory with {', '.join(SUBFOLDERS)})"
        )
    try:
        return cls.from_pretrained(folder, local_files_only=True, **kwargs)
    except (OSError, ValueError) as e:
        raise WeightsError(f"{folder}: cannot load ({str(e).splitlines()[0]}) (model.pretrained_path)") from None
