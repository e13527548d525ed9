"""Read a LoRA file of the Wan DiT, in any format DreamShot writes or users bring, as one `LoraWeights`: peft
names (diffusers' module names, `blocks.0.attn1.to_q.lora_A.weight`), the alpha it is applied with, the metadata.

- DreamShot's `lora.safetensors` (bare peft names): alpha from `dreamshot.alpha` (older files: `alpha`); bare
  peft names that record no alpha: alpha = rank, as diffusers applies such a file.
- diffusers (`transformer.` names, or bare names with `lora_adapter_metadata`): `WanPipeline.save_lora_weights`,
  `lora_diffusers.safetensors`, `save_lora_adapter`, as a file or the folder holding its
  `pytorch_lora_weights.safetensors`. Rank and alpha from `lora_adapter_metadata`, read as a peft `LoraConfig`;
  without it alpha = rank, as diffusers applies such a file.
- A peft adapter folder (`save_pretrained`: `adapter_config.json`), read with peft's `PeftConfig.from_pretrained`
  and `load_peft_weights`.
- ComfyUI / original Wan (`diffusion_model.blocks.0.self_attn.q.lora_down.weight` or `.lora_A.weight`;
  `lora_comfyui.safetensors`) and musubi-tuner / kohya (`lora_unet_blocks_0_self_attn_q.lora_down.weight`): the
  names converted by diffusers' own converters for Wan (`WanLoraLoaderMixin.lora_state_dict`), alpha from the
  `.alpha` tensors (none: alpha = rank, as ComfyUI applies it).

diffusers' converters fold alpha / rank into the weights; here the `.alpha` tensors are read first and the
converters given none (musubi's: alpha = rank, which folds nothing), so the LoRA keeps its alpha. Modules with
different alphas are folded to one scale (alpha = rank). A file that DreamShot wrote records the factor it
folded into its up weights (`dreamshot.up_scale`), which is divided out again: every export reads back as trained.
Besides LoRA weights, a file may carry deltas added to base parameters as they are (ComfyUI applies them so:
parameter += strength · delta): ComfyUI's `<module>.diff` (the module's weight) and `.diff_b` (its bias), named
by diffusers' own Wan checkpoint converter, and diffusers' `<module>.lora_B.bias` (peft's `lora_bias`: a bias
delta scaled by alpha / rank like B·A). They are read into `LoraWeights.deltas`; only a second, stacked LoRA
applies them (`lora.add_weight_deltas`). DoRA, LoHa / LoKr and musubi-tuner deltas are refused.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import peft
import torch
from diffusers.loaders import WanLoraLoaderMixin
from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers
from peft.utils import load_peft_weights
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from dreamshot.models.wan.lora_formats import (
    COMFYUI_PREFIX,
    DIFFUSERS_METADATA_KEY,
    DIFFUSERS_PREFIX,
    METADATA_ALPHA,
    METADATA_UP_SCALE,
    lora_modules,
    lora_rank,
    scale_up_weights,
)
from dreamshot.utils.errors import WeightsError

KOHYA_PREFIX = "lora_unet_"
PEFT_CONFIG = "adapter_config.json"
DIFFUSERS_WEIGHTS = "pytorch_lora_weights.safetensors"
# What PeftModel.save_pretrained puts before the module names.
PEFT_MODEL_PREFIX = "base_model.model."
PEFT_SUFFIXES = (".lora_A.weight", ".lora_B.weight")
# kohya-style files name A / B either way: down suffix -> up suffix.
KOHYA_PAIRS = {".lora_down.weight": ".lora_up.weight", ".lora_A.weight": ".lora_B.weight"}
# ComfyUI's delta suffixes -> the parameter of the module they add to.
COMFYUI_DELTAS = {".diff": "weight", ".diff_b": "bias"}
# peft's `lora_bias`: the bias of B, which diffusers' converter also makes of `.diff_b`.
PEFT_BIAS = ".lora_B.bias"


class WeightDelta(NamedTuple):
    """A tensor added to a base parameter (diffusers' name, e.g. `blocks.0.attn1.to_q.bias`), times the LoRA's
    scale."""

    parameter: str
    tensor: torch.Tensor


@dataclass(frozen=True)
class LoraWeights:
    """LoRA weights under peft names, applied as B·A·alpha/rank. alpha None: a checkpoint without a readable config
    (a file that records none has alpha = rank, as diffusers applies it).
    `deltas`: the file's full-weight and bias deltas by its own key (see the module docstring)."""

    state: dict[str, torch.Tensor]
    alpha: float | None
    metadata: dict[str, str] = field(default_factory=dict)
    deltas: dict[str, WeightDelta] = field(default_factory=dict)

    @property
    def rank(self) -> int:
        return lora_rank(self.state)

    @property
    def modules(self) -> set[str]:
        return lora_modules(self.state)


def read_lora_file(path: Path) -> LoraWeights:
    """A LoRA `.safetensors` file, a peft adapter folder or a folder holding diffusers' LoRA file."""
    if path.is_dir():
        if (path / PEFT_CONFIG).is_file():
            return _read_peft_folder(path)
        if (path / DIFFUSERS_WEIGHTS).is_file():
            return read_lora_file(path / DIFFUSERS_WEIGHTS)
        raise WeightsError(f"{path}: not a LoRA folder (no {PEFT_CONFIG} or {DIFFUSERS_WEIGHTS})")
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
        tensors = load_file(path)
    except (SafetensorError, OSError) as e:
        raise WeightsError(f"{path}: not a readable safetensors file ({e})") from None
    return _from_safetensors(tensors, metadata, str(path))


def _from_safetensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str], source: str) -> LoraWeights:
    """The LoRA of one file's tensors and safetensors metadata, whatever its format (see the module docstring)."""
    if any(key.startswith((COMFYUI_PREFIX, KOHYA_PREFIX)) for key in tensors):
        deltas = _comfyui_deltas(tensors)
        state, alpha = _from_kohya({k: v for k, v in tensors.items() if k not in deltas}, source)
    else:
        state, biases = _split_biases(
            {key.removeprefix(DIFFUSERS_PREFIX).removeprefix(PEFT_MODEL_PREFIX): v for key, v in tensors.items()}
        )
        _check_lora_keys(state, source)
        _checked(LoraWeights(state, None), source)  # one rank, the file named, before the alpha is read with it
        alpha = _recorded_alpha(metadata, state)
        deltas = _bias_deltas(biases, state, alpha)
    if METADATA_UP_SCALE in metadata:  # written by DreamShot (no deltas): undo what it folded in
        state = scale_up_weights(state, 1 / float(metadata[METADATA_UP_SCALE]))
        alpha = float(metadata[METADATA_ALPHA])
    return _checked(LoraWeights(state, alpha, dict(metadata), deltas), source)


def _comfyui_deltas(tensors: dict[str, torch.Tensor]) -> dict[str, WeightDelta]:
    """ComfyUI's `diffusion_model.<wan module>.diff|diff_b` tensors, renamed by diffusers' Wan checkpoint
    converter to the parameters they add to."""
    deltas = {}
    for key, tensor in tensors.items():
        suffix = next((s for s in COMFYUI_DELTAS if key.endswith(s)), None)
        if key.startswith(COMFYUI_PREFIX) and suffix is not None:
            original = f"{key.removeprefix(COMFYUI_PREFIX).removesuffix(suffix)}.{COMFYUI_DELTAS[suffix]}"
            (parameter,) = convert_wan_transformer_to_diffusers({original: tensor})
            deltas[key] = WeightDelta(parameter, tensor)
    return deltas


def _split_biases(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(the LoRA weights, peft's B biases) of peft-named tensors."""
    biases = {key: value for key, value in state.items() if key.endswith(PEFT_BIAS)}
    return {key: value for key, value in state.items() if key not in biases}, biases


def _bias_deltas(
    biases: dict[str, torch.Tensor], state: dict[str, torch.Tensor], alpha: float
) -> dict[str, WeightDelta]:
    """peft's B biases as deltas of the modules' biases: peft scales them by alpha / rank with B·A."""
    scale = alpha / lora_rank(state)
    return {key: WeightDelta(key.removesuffix(PEFT_BIAS) + ".bias", bias * scale) for key, bias in biases.items()}


def _checked(weights: LoraWeights, source: str) -> LoraWeights:
    """`weights`, once every module is known to hold an A and a B of one shared rank."""
    if not weights.modules:
        raise WeightsError(f"{source}: holds no LoRA weights")
    for module in weights.modules:
        for part in ("A", "B"):
            if f"{module}.lora_{part}.weight" not in weights.state:
                raise WeightsError(f"{source}: LoRA module {module!r} has no lora_{part} weight")
    try:
        lora_rank(weights.state)
    except WeightsError as e:
        raise WeightsError(f"{source}: {e}") from None
    return weights


def _recorded_alpha(metadata: dict[str, str], state: dict[str, torch.Tensor]) -> float:
    if DIFFUSERS_METADATA_KEY in metadata:
        config = json.loads(metadata[DIFFUSERS_METADATA_KEY])
        kwargs = {key.removeprefix(DIFFUSERS_PREFIX): value for key, value in config.items()}
        return _peft_alpha(peft.LoraConfig.from_peft_type(**kwargs), state, DIFFUSERS_METADATA_KEY)
    if metadata.get("format") == "peft" and "alpha" in metadata:  # DreamShot's files before `dreamshot.alpha`
        return float(metadata["alpha"])
    # diffusers builds a LoraConfig with alpha = rank when a file records none (`get_peft_kwargs`): scale 1.
    return float(lora_rank(state))


def _peft_alpha(config: peft.PeftConfig, state: dict[str, torch.Tensor], where: str) -> float:
    """The alpha of a peft `LoraConfig` as plain LoRA applies it (B·A·alpha/rank)."""
    if not isinstance(config, peft.LoraConfig):
        raise WeightsError(f"{where}: a {config.peft_type} adapter, not LoRA")
    unsupported = [name for name in ("use_dora", "rank_pattern", "alpha_pattern") if getattr(config, name)]
    if unsupported:
        raise WeightsError(f"{where}: {unsupported[0]} is set; DreamShot loads plain LoRA with one rank and alpha")
    if config.r != lora_rank(state):
        raise WeightsError(f"{where}: r={config.r}, the weights have rank {lora_rank(state)}")
    # rsLoRA scales by alpha / sqrt(r): the same as alpha·sqrt(r) / r.
    return config.lora_alpha * math.sqrt(config.r) if config.use_rslora else float(config.lora_alpha)


def _read_peft_folder(folder: Path) -> LoraWeights:
    try:
        config = peft.PeftConfig.from_pretrained(str(folder))
        tensors = load_peft_weights(str(folder), device="cpu")
    except (OSError, ValueError, TypeError) as e:
        raise WeightsError(f"{folder}: not a readable peft adapter folder ({str(e).splitlines()[0]})") from None
    state, biases = _split_biases({key.removeprefix(PEFT_MODEL_PREFIX): value for key, value in tensors.items()})
    _check_lora_keys(state, str(folder))
    alpha = _peft_alpha(config, state, str(folder / PEFT_CONFIG))
    return _checked(LoraWeights(state, alpha, deltas=_bias_deltas(biases, state, alpha)), str(folder))


def _from_kohya(tensors: dict[str, torch.Tensor], source: str) -> tuple[dict[str, torch.Tensor], float]:
    """ComfyUI / musubi weights -> (peft state, alpha), names converted by diffusers."""
    weights = {key: value for key, value in tensors.items() if not key.endswith(".alpha")}
    _check_lora_keys(weights, source, (*KOHYA_PAIRS, *KOHYA_PAIRS.values()))
    downs = {  # module -> (its down key, its up key)
        key.removesuffix(down): (key, key.removesuffix(down) + up)
        for key in weights
        for down, up in KOHYA_PAIRS.items()
        if key.endswith(down)
    }
    missing = next((up for _, up in downs.values() if up not in weights), None)
    if missing is not None:
        raise WeightsError(f"{source}: no {missing!r} for its down weight")
    unpaired = sorted(set(weights) - {key for pair in downs.values() for key in pair})
    if unpaired:
        raise WeightsError(f"{source}: no down weight for {unpaired[0]!r}")
    ranks = {module: weights[down].shape[0] for module, (down, _) in downs.items()}
    alphas = {module: float(tensors.get(module + ".alpha", ranks[module])) for module in downs}
    alpha = next(iter(alphas.values()))
    if len(set(alphas.values())) > 1:  # one alpha per file here: fold each module's scale into its up weight
        for module, (_, up) in downs.items():
            weights[up] = weights[up] * (alphas[module] / ranks[module])
        alpha = float(next(iter(ranks.values())))
    if any(key.startswith(KOHYA_PREFIX) for key in weights):  # musubi's converter needs an alpha per module
        weights.update({module + ".alpha": torch.tensor(float(rank)) for module, rank in ranks.items()})
    try:
        converted = WanLoraLoaderMixin.lora_state_dict(weights)
    except (ValueError, KeyError, IndexError) as e:
        raise WeightsError(
            f"{source}: diffusers' Wan LoRA converter cannot read it ({type(e).__name__}: {str(e)[:200]})"
        ) from None
    return {key.removeprefix(DIFFUSERS_PREFIX): value for key, value in converted.items()}, alpha


def _check_lora_keys(state: dict[str, torch.Tensor], source: str, suffixes: tuple[str, ...] = PEFT_SUFFIXES) -> None:
    for key in state:
        if not key.endswith(suffixes):
            raise WeightsError(
                f"{source}: {key!r} is not a LoRA weight ({' / '.join(s.lstrip('.') for s in suffixes)}; DreamShot "
                "loads no DoRA or LoHa/LoKr, and bias or full-weight deltas only under ComfyUI or diffusers names)"
            )
