"""LoRA weights of the Wan DiT in the key formats other tools load (pure key conversion; no files, no model).

- `peft`: DreamShot's own (`lora.safetensors`), the names `WanAdapter.lora_state_dict` gives — diffusers'
  module names with peft's suffixes, e.g. `blocks.0.attn1.to_q.lora_A.weight` — as trained, alpha in the metadata.
- `diffusers`: the same names under `transformer.`, as `WanPipeline.save_lora_weights` writes them and
  `WanPipeline.load_lora_weights` reads them; the peft `LoraConfig` (rank, alpha, target modules) travels in the
  safetensors metadata key `lora_adapter_metadata` (JSON, keys prefixed `transformer.`).
- `comfyui`: the original Wan module names that ComfyUI's Wan model (and Wan's own code) uses,
  `diffusion_model.blocks.N.self_attn.q` / `cross_attn.k` / `ffn.0`, `diffusion_model.head.head`, with
  kohya-style `lora_down` (= A) and `lora_up` (= B) weights and a scalar `.alpha` per block linear. ComfyUI loads
  any module under its original name and scales it by alpha / rank (1 without `.alpha`); diffusers reads the
  file through its converter for non-diffusers Wan LoRAs, which maps the block linears and the linears of
  `WAN_OUTER_LINEARS` back but rejects an `.alpha` beside the latter, so those carry none.

Both exports for other tools hold alpha / rank folded into the up weights and record alpha = rank: a client
that ignores `lora_adapter_metadata` (diffusers 0.33 does) or `.alpha` applies the same update B·A·alpha/rank.
A factor other than 1 is folded in float32 (a 16-bit LoRA, such as another tool's bf16 file, is written float32
then), so the product is exact.
Every file records the training rank and alpha and the factor folded into its up weights, so DreamShot reads any
of them back as trained (`lora_files.py`), and the base model: its config name, transformer shape and the folder
name of its weights (`METADATA_*`).
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict
from pathlib import Path
from typing import NamedTuple

import torch

from dreamshot.config.schema import ModelConfig
from dreamshot.utils.errors import WeightsError

FORMATS = ("peft", "diffusers", "comfyui")
DIFFUSERS_PREFIX = "transformer."
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"
COMFYUI_PREFIX = "diffusion_model."
# DreamShot's own safetensors metadata, in every file it writes.
METADATA_RANK = "dreamshot.rank"
METADATA_ALPHA = "dreamshot.alpha"  # the alpha the LoRA was trained with
METADATA_UP_SCALE = "dreamshot.up_scale"  # the factor the file's up (B) weights were multiplied by
METADATA_BASE_MODEL = "dreamshot.base_model"  # model.name
METADATA_TRANSFORMER = "dreamshot.transformer"  # model.transformer, JSON
METADATA_PRETRAINED = "dreamshot.pretrained"  # the folder name of model.pretrained_path ("" for random weights)
# A linear of a Wan block: diffusers' name -> the original Wan name (ComfyUI's).
WAN_BLOCK_LINEARS = {
    "attn1.to_q": "self_attn.q",
    "attn1.to_k": "self_attn.k",
    "attn1.to_v": "self_attn.v",
    "attn1.to_out.0": "self_attn.o",
    "attn2.to_q": "cross_attn.q",
    "attn2.to_k": "cross_attn.k",
    "attn2.to_v": "cross_attn.v",
    "attn2.to_out.0": "cross_attn.o",
    "ffn.net.0.proj": "ffn.0",
    "ffn.net.2": "ffn.2",
}
# The linears outside the blocks that have an original Wan name diffusers' converter maps back.
WAN_OUTER_LINEARS = {
    "proj_out": "head.head",
    "condition_embedder.time_proj": "time_projection.1",
    "condition_embedder.time_embedder.linear_1": "time_embedding.0",
    "condition_embedder.time_embedder.linear_2": "time_embedding.2",
    "condition_embedder.text_embedder.linear_1": "text_embedding.0",
    "condition_embedder.text_embedder.linear_2": "text_embedding.2",
}
# peft's A (down projection, (r, in)) and B (up projection, (out, r)) -> kohya's names.
KOHYA_NAMES = {"A": "lora_down", "B": "lora_up"}
_PEFT_KEY = re.compile(r"(?P<module>.+)\.lora_(?P<part>[AB])\.weight")
_BLOCK_MODULE = re.compile(r"blocks\.(?P<index>\d+)\.(?P<linear>.+)")


class LoraFile(NamedTuple):
    """Tensors and safetensors metadata of one LoRA file."""

    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]


def to_peft(state: dict[str, torch.Tensor], alpha: float) -> LoraFile:
    """DreamShot's own format: the names and weights unchanged, rank and alpha in the metadata."""
    return LoraFile(dict(state), {"format": "peft", **_record(state, alpha, up_scale=1.0)})


def to_diffusers(state: dict[str, torch.Tensor], alpha: float) -> LoraFile:
    """diffusers' WanPipeline format: `transformer.<peft name>`, alpha / rank folded in, the LoraConfig in the
    metadata."""
    rank, up_scale = lora_rank(state), alpha / lora_rank(state)
    config = {
        "r": rank,
        "lora_alpha": rank,
        # The exact module names: the adapter lands on the same linears whatever patterns trained it.
        "target_modules": sorted(lora_modules(state)),
    }
    metadata = {DIFFUSERS_METADATA_KEY: json.dumps({DIFFUSERS_PREFIX + k: v for k, v in config.items()})}
    tensors = {DIFFUSERS_PREFIX + key: value for key, value in folded(state, up_scale).items()}
    return LoraFile(tensors, {"format": "pt", **metadata, **_record(state, alpha, up_scale)})


def to_comfyui(state: dict[str, torch.Tensor], alpha: float) -> LoraFile:
    """ComfyUI / original-Wan format: `diffusion_model.<wan name>.lora_down|lora_up.weight`, alpha / rank folded in,
    `.alpha` = rank on the block linears."""
    rank, up_scale = lora_rank(state), alpha / lora_rank(state)
    tensors: dict[str, torch.Tensor] = {}
    for key, value in folded(state, up_scale).items():
        module, part = split_key(key)
        name = COMFYUI_PREFIX + wan_module_name(module)
        tensors[f"{name}.{KOHYA_NAMES[part]}.weight"] = value
        if module not in WAN_OUTER_LINEARS:
            tensors[f"{name}.alpha"] = torch.tensor(float(rank))
    return LoraFile(tensors, {"format": "pt", **_record(state, alpha, up_scale)})


CONVERTERS = {"peft": to_peft, "diffusers": to_diffusers, "comfyui": to_comfyui}


def base_model_record(cfg: ModelConfig) -> dict[str, str]:
    """The metadata naming the base model a LoRA was trained on."""
    return {
        METADATA_BASE_MODEL: cfg.name,
        METADATA_TRANSFORMER: json.dumps(asdict(cfg.transformer), sort_keys=True),
        METADATA_PRETRAINED: Path(cfg.pretrained_path).name if cfg.pretrained_path else "",
    }


def _record(state: dict[str, torch.Tensor], alpha: float, up_scale: float) -> dict[str, str]:
    return {METADATA_RANK: str(lora_rank(state)), METADATA_ALPHA: str(float(alpha)), METADATA_UP_SCALE: str(up_scale)}


def folded(state: dict[str, torch.Tensor], up_scale: float) -> dict[str, torch.Tensor]:
    """`state` with `up_scale` folded into its up weights, in float32 when a 16-bit state is scaled: a bf16 product
    would be rounded (by up to 2^-9), so no client would apply B·A·alpha/rank as trained and DreamShot could not
    divide the factor out again exactly."""
    if up_scale != 1:
        state = {key: value.float() if value.element_size() < 4 else value for key, value in state.items()}
    return scale_up_weights(state, up_scale)


def scale_up_weights(state: dict[str, torch.Tensor], factor: float) -> dict[str, torch.Tensor]:
    """`state` with every up (B) weight multiplied by `factor` (the update B·A scales with it); A unchanged."""
    if factor == 1:
        return dict(state)
    return {key: value * factor if split_key(key)[1] == "B" else value for key, value in state.items()}


def split_key(key: str) -> tuple[str, str]:
    """`blocks.0.attn1.to_q.lora_A.weight` -> ("blocks.0.attn1.to_q", "A")."""
    match = _PEFT_KEY.fullmatch(key)
    if match is None:
        raise WeightsError(f"LoRA key {key!r} is not a peft LoRA weight (<module>.lora_A|lora_B.weight)")
    return match["module"], match["part"]


def lora_modules(state: dict[str, torch.Tensor]) -> set[str]:
    """The modules that carry LoRA weights, by diffusers name."""
    return {split_key(key)[0] for key in state}


def lora_rank(state: dict[str, torch.Tensor]) -> int:
    """The rank shared by every adapter (rows of each A)."""
    ranks = {value.shape[0] for key, value in state.items() if split_key(key)[1] == "A"}
    if len(ranks) != 1:
        raise WeightsError(f"LoRA weights must share one rank, found ranks {sorted(ranks)}")
    return ranks.pop()


def wan_module_name(module: str) -> str:
    """diffusers' `blocks.3.attn2.to_k` -> original Wan's `blocks.3.cross_attn.k`; `proj_out` -> `head.head`."""
    name = _original_name(module)
    if name is None:
        raise WeightsError(
            f"LoRA module {module!r} has no ComfyUI / original-Wan name (the comfyui format covers the "
            f"block linears {', '.join(WAN_BLOCK_LINEARS)} and {', '.join(WAN_OUTER_LINEARS)})"
        )
    return name


def unwritable_modules(fmt: str, modules: set[str]) -> list[str]:
    """The modules a LoRA file in `fmt` cannot hold, sorted: peft and diffusers hold any module peft wraps,
    comfyui those with an original-Wan name."""
    if fmt != "comfyui":
        return []
    return sorted(module for module in modules if _original_name(module) is None)


def _original_name(module: str) -> str | None:
    if module in WAN_OUTER_LINEARS:
        return WAN_OUTER_LINEARS[module]
    match = _BLOCK_MODULE.fullmatch(module)
    if match is None or match["linear"] not in WAN_BLOCK_LINEARS:
        return None
    return f"blocks.{match['index']}.{WAN_BLOCK_LINEARS[match['linear']]}"
