"""LoRA weights of the Wan DiT in the key formats other tools load (pure key conversion; no files, no model).

- `peft`: DreamShot's own (`lora.safetensors`), the names `WanAdapter.lora_state_dict` gives — diffusers'
  module names with peft's suffixes, e.g. `blocks.0.attn1.to_q.lora_A.weight`. The scale alpha / rank comes
  from the run's config.
- `diffusers`: the same names under `transformer.`, as `WanPipeline.save_lora_weights` writes them and
  `WanPipeline.load_lora_weights` reads them. Rank, alpha and target modules travel in the safetensors metadata
  key `lora_adapter_metadata` (JSON, keys prefixed `transformer.`), which diffusers turns back into the peft
  `LoraConfig`, so alpha ≠ rank loads with the right scale.
- `comfyui`: the original Wan module names that ComfyUI's Wan model (and Wan's own code) uses,
  `diffusion_model.blocks.N.self_attn.q` / `cross_attn.k` / `ffn.0`, with kohya-style `lora_down` (= A) and
  `lora_up` (= B) weights and a scalar `.alpha` per module. ComfyUI's LoRA loader accepts these names for Wan
  and scales every module by alpha / rank (rank: the rows of `lora_down`); diffusers reads the same file
  through its converter for non-diffusers Wan LoRAs, which folds alpha / rank into the weights.
  Only the linears inside the blocks have an original-Wan name here (the default LoRA targets).
"""

from __future__ import annotations

import json
import re
from typing import NamedTuple

import torch

from dreamshot.utils.errors import WeightsError

FORMATS = ("peft", "diffusers", "comfyui")
DIFFUSERS_PREFIX = "transformer."
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"
COMFYUI_PREFIX = "diffusion_model."
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
# peft's A (down projection, (r, in)) and B (up projection, (out, r)) -> kohya's names.
KOHYA_NAMES = {"A": "lora_down", "B": "lora_up"}
_PEFT_KEY = re.compile(r"(?P<module>.+)\.lora_(?P<part>[AB])\.weight")
_BLOCK_MODULE = re.compile(r"blocks\.(?P<index>\d+)\.(?P<linear>.+)")


class LoraFile(NamedTuple):
    """Tensors and safetensors metadata of one LoRA file."""

    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]


def to_peft(state: dict[str, torch.Tensor], alpha: float) -> LoraFile:
    """DreamShot's own format: the names unchanged, rank and alpha in the metadata."""
    return LoraFile(dict(state), {"format": "peft", "rank": str(lora_rank(state)), "alpha": str(alpha)})


def to_diffusers(state: dict[str, torch.Tensor], alpha: float) -> LoraFile:
    """diffusers' WanPipeline format: `transformer.<peft name>`, the LoraConfig in the metadata."""
    config = {
        "r": lora_rank(state),
        "lora_alpha": alpha,
        # The exact module names: the adapter lands on the same linears whatever patterns trained it.
        "target_modules": sorted(lora_modules(state)),
    }
    metadata = {DIFFUSERS_METADATA_KEY: json.dumps({DIFFUSERS_PREFIX + k: v for k, v in config.items()})}
    return LoraFile({DIFFUSERS_PREFIX + key: value for key, value in state.items()}, {"format": "pt", **metadata})


def to_comfyui(state: dict[str, torch.Tensor], alpha: float) -> LoraFile:
    """ComfyUI / original-Wan format: `diffusion_model.blocks.N.<wan linear>.lora_down|lora_up.weight` + `.alpha`."""
    tensors: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        module, part = split_key(key)
        name = COMFYUI_PREFIX + wan_module_name(module)
        tensors[f"{name}.{KOHYA_NAMES[part]}.weight"] = value
        tensors[f"{name}.alpha"] = torch.tensor(float(alpha))
    return LoraFile(tensors, {"format": "pt"})


CONVERTERS = {"peft": to_peft, "diffusers": to_diffusers, "comfyui": to_comfyui}


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
        raise WeightsError(f"LoRA weights must share one rank to be exported, found ranks {sorted(ranks)}")
    return ranks.pop()


def wan_module_name(module: str) -> str:
    """diffusers' `blocks.3.attn2.to_k` -> original Wan's `blocks.3.cross_attn.k`."""
    match = _BLOCK_MODULE.fullmatch(module)
    if match is None or match["linear"] not in WAN_BLOCK_LINEARS:
        raise WeightsError(
            f"LoRA module {module!r} has no ComfyUI / original-Wan name (the comfyui format covers the "
            f"block linears {', '.join(WAN_BLOCK_LINEARS)})"
        )
    return f"blocks.{match['index']}.{WAN_BLOCK_LINEARS[match['linear']]}"
