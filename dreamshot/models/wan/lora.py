"""LoRA on the Wan DiT with peft: the only trainable parameters of a DreamShot model.

Target patterns follow peft's rule for a list of names: a module matches when its qualified name equals the
pattern or ends with "." + pattern ("to_q" hits `blocks.3.attn1.to_q` and `blocks.3.attn2.to_q`).
State dicts use peft's key names (adapter name removed), e.g. `blocks.0.attn1.to_q.lora_A.weight`.
A LoRA read from a file (`lora_files.py`) brings its own rank, alpha and modules: `lora_config_for` turns them
into the `model.lora` that holds it. For sampling, a second LoRA (e.g. a step-distilled Wan LoRA) can stand beside
it as a second peft adapter with its own rank, alpha and modules (`stack_lora`), each adapter with its own scale
(`set_lora_scales`); diffusers' `fuse_lora` then folds the active adapters into the base weights. The second
LoRA's full-weight and bias deltas (ComfyUI's `.diff` / `.diff_b`) are added to the base parameters at its scale
(`add_weight_deltas`), as ComfyUI applies them; the run's own LoRA is LoRA weights only.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from collections.abc import Iterable

import peft
import torch
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from torch import nn

from dreamshot.config.schema import LoraConfig, ModelConfig
from dreamshot.models.wan.build import build_transformer_on_meta
from dreamshot.models.wan.lora_files import LoraWeights
from dreamshot.models.wan.lora_formats import METADATA_BASE_MODEL, METADATA_TRANSFORMER
from dreamshot.utils.errors import ConfigError, WeightsError

# The layers peft's LoRA wraps (a module of another kind is a peft ValueError).
ADAPTABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding)
# peft's name of the adapter `apply_lora` injects (the run's own LoRA), and of the one `stack_lora` adds.
OWN_ADAPTER = "default"
SECOND_ADAPTER = "second"


def apply_lora(transformer, cfg: LoraConfig) -> None:
    """Freeze every base parameter of `transformer`; inject a fresh LoRA adapter (B = 0: output unchanged).

    The LoRA weights are kept in float32 whatever the base dtype: AdamW then updates full-precision weights
    (peft casts activations to the adapter's dtype and the result back).
    """
    modules = dict(transformer.named_modules())
    for pattern in cfg.target_modules:
        selected = sorted(matching_modules([pattern], modules))
        if not selected:
            raise ConfigError(f"model.lora.target_modules: pattern {pattern!r} matches no module of the transformer")
        other = first_unadaptable(modules, selected)
        if other is not None:
            raise ConfigError(
                f"model.lora.target_modules: {pattern!r} selects {other!r}, a {type(modules[other]).__name__}; "
                "a LoRA adapts linears and convolutions"
            )
    transformer.requires_grad_(False)
    transformer.add_adapter(
        peft.LoraConfig(
            r=cfg.rank,
            lora_alpha=cfg.alpha,
            lora_dropout=cfg.dropout,
            target_modules=list(cfg.target_modules),
            init_lora_weights=True,
        )
    )
    for parameter in transformer.parameters():
        if parameter.requires_grad:
            parameter.data = parameter.data.float()


def first_unadaptable(modules: dict[str, nn.Module], names: Iterable[str]) -> str | None:
    """The first of `names` whose module is no layer a LoRA adapts (`ADAPTABLE`), or None."""
    return next((name for name in names if not isinstance(modules[name], ADAPTABLE)), None)


def matching_modules(patterns: Iterable[str], names: Iterable[str]) -> set[str]:
    """The names that a list of peft target patterns selects (peft's rule, see the module docstring)."""
    patterns = list(patterns)
    return {name for name in names if any(name == p or name.endswith("." + p) for p in patterns)}


def lora_config_for(cfg: ModelConfig, weights: LoraWeights, source: str) -> LoraConfig:
    """The `model.lora` that holds `weights` on the transformer of `cfg`: rank, alpha and target modules as the
    file records them (alpha: the config's for a checkpoint whose config is not readable).

    A value of `cfg.lora` other than its schema default must agree with the file (a ConfigError naming both);
    one left at the default is taken from the file, since a config cannot tell a default from the same value
    typed out. Targets agree when the config's patterns select exactly the file's modules; the patterns are
    kept then, else the file's module names become the targets.
    """
    _check_base_model(cfg, weights, source)
    if weights.deltas:
        key = sorted(weights.deltas)[0]
        raise WeightsError(
            f"{source}: {key!r} is a bias or full-weight delta; DreamShot applies those only in a second LoRA "
            "(inference.second_lora), its own LoRA holds LoRA weights only"
        )
    modules = dict(build_transformer_on_meta(cfg).named_modules())
    names = list(modules)
    foreign = sorted(weights.modules - set(names))
    if foreign:
        raise WeightsError(f"{source}: LoRA module {foreign[0]!r} is not a module of the {cfg.name} transformer")
    other = first_unadaptable(modules, sorted(weights.modules))
    if other is not None:
        raise WeightsError(
            f"{source}: LoRA module {other!r} is a {type(modules[other]).__name__} of the {cfg.name} transformer, "
            "not a linear or convolution a LoRA adapts"
        )
    lora, default = cfg.lora, LoraConfig()
    rank = weights.rank
    alpha = lora.alpha if weights.alpha is None else weights.alpha
    for key, value, recorded in (("rank", lora.rank, rank), ("alpha", lora.alpha, alpha)):
        if value not in (getattr(default, key), recorded):
            raise ConfigError(f"{source}: the LoRA has {key} {recorded:g}, model.lora.{key}={value:g}")
    targets = list(lora.target_modules)
    selected = matching_modules(targets, names)
    if selected != weights.modules:
        if targets != default.target_modules:
            module = sorted(selected ^ weights.modules)[0]
            if module in weights.modules:
                raise ConfigError(
                    f"{source}: the LoRA holds weights for {module!r}, which "
                    f"model.lora.target_modules={targets} does not select"
                )
            raise ConfigError(
                f"{source}: model.lora.target_modules={targets} selects {module!r}, which the LoRA holds no weights for"
            )
        targets = sorted(weights.modules)
    return dataclasses.replace(lora, rank=rank, alpha=alpha, target_modules=targets)


def _check_base_model(cfg: ModelConfig, weights: LoraWeights, source: str) -> None:
    """A file DreamShot wrote records the transformer it was trained on: the config must build the same shape."""
    if METADATA_TRANSFORMER not in weights.metadata:
        return
    recorded = json.loads(weights.metadata[METADATA_TRANSFORMER])
    ours = dataclasses.asdict(cfg.transformer)
    for key, value in recorded.items():
        # The RoPE table's length shapes no weight: a longer one at inference is fine.
        if key in ours and key != "rope_max_seq_len" and ours[key] != value:
            base = weights.metadata.get(METADATA_BASE_MODEL, "?")
            raise WeightsError(
                f"{source}: trained on the {base} transformer with {key}={value}; "
                f"model.transformer.{key}={ours[key]} (model {cfg.name})"
            )


def check_lora_fits(transformer, cfg: ModelConfig, weights: LoraWeights, source: str) -> None:
    """WeightsError naming `source` unless every module of `weights` is a linear of `transformer` (built from `cfg`)
    with the in and out features of the LoRA's A (r, in) and B (out, r): a LoRA of another model size is refused
    here, before any weight is loaded."""
    _check_base_model(cfg, weights, source)
    modules = dict(transformer.named_modules())
    for name in sorted(weights.modules):
        module = getattr(modules.get(name), "base_layer", modules.get(name))
        if not isinstance(module, nn.Linear):
            blocks = len(transformer.blocks)
            raise WeightsError(
                f"{source}: LoRA module {name!r} is not a linear of the {cfg.name} transformer ({blocks} blocks): "
                "a LoRA for another model?"
            )
        down, up = weights.state[f"{name}.lora_A.weight"], weights.state[f"{name}.lora_B.weight"]
        expected = {"lora_A": (weights.rank, module.in_features), "lora_B": (module.out_features, weights.rank)}
        for part, tensor in (("lora_A", down), ("lora_B", up)):
            if tuple(tensor.shape) != expected[part]:
                raise WeightsError(
                    f"{source}: {name}.{part} is {tuple(tensor.shape)}, the {cfg.name} transformer's {name} needs "
                    f"{expected[part]}: a LoRA for another model size, or A and B of different ranks"
                )
    for key, delta in sorted(weights.deltas.items()):
        parameter = _base_parameter(transformer, delta.parameter)
        if parameter is None:
            raise WeightsError(
                f"{source}: {key!r} adds to {delta.parameter!r}, not a parameter of the {cfg.name} transformer"
            )
        if parameter.shape != delta.tensor.shape:
            raise WeightsError(
                f"{source}: {key!r} is {tuple(delta.tensor.shape)}, the {cfg.name} transformer's {delta.parameter} is "
                f"{tuple(parameter.shape)}: a LoRA for another model size?"
            )


def _base_parameter(transformer, name: str) -> nn.Parameter | None:
    """The parameter `name` (diffusers' name) of `transformer`, under a peft-wrapped module's base layer."""
    path, _, attribute = name.rpartition(".")
    try:
        module = transformer.get_submodule(path)
    except AttributeError:
        return None
    parameter = getattr(getattr(module, "base_layer", module), attribute, None)
    return parameter if isinstance(parameter, nn.Parameter) else None


def add_weight_deltas(transformer, weights: LoraWeights, scale: float) -> None:
    """parameter += scale · delta for each delta of `weights` (checked by `check_lora_fits`): exact, the sum taken in
    float32 and rounded to the parameter's dtype once."""
    with torch.no_grad():
        for delta in weights.deltas.values():
            parameter = _base_parameter(transformer, delta.parameter)
            added = parameter.float() + scale * delta.tensor.to(parameter.device, torch.float32)
            parameter.copy_(added.to(parameter.dtype))


def stack_lora(transformer, cfg: ModelConfig, weights: LoraWeights, source: str) -> None:
    """Add `weights` as the adapter `SECOND_ADAPTER` beside the run's own, with the file's rank, alpha (a checkpoint
    without a readable config: alpha = rank) and modules; frozen, float32 like `apply_lora`'s.
    Both adapters are active at scale 1 afterwards."""
    check_lora_fits(transformer, cfg, weights, source)
    config = peft.LoraConfig(
        r=weights.rank,
        lora_alpha=weights.rank if weights.alpha is None else weights.alpha,
        target_modules=sorted(weights.modules),
    )
    with warnings.catch_warnings():  # peft warns that the model now holds several adapters: that is the point
        warnings.simplefilter("ignore", UserWarning)
        transformer.add_adapter(config, adapter_name=SECOND_ADAPTER)
    set_peft_model_state_dict(transformer, weights.state, adapter_name=SECOND_ADAPTER)
    for name, parameter in transformer.named_parameters():
        if f".{SECOND_ADAPTER}." in name:
            parameter.requires_grad_(False)
            parameter.data = parameter.data.float()
    set_lora_scales(transformer, {OWN_ADAPTER: 1.0, SECOND_ADAPTER: 1.0})


def set_lora_scales(transformer, scales: dict[str, float]) -> None:
    """Activate the adapters named in `scales`, each scaling its update B·A·alpha/rank by its value."""
    transformer.set_adapters(list(scales), list(scales.values()))


def lora_state_dict(transformer, weights: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The LoRA weights only, under peft's key names (the live tensors: callers clone what they keep); taken from
    `weights` (under the transformer's parameter names) instead of the transformer when given."""
    return get_peft_model_state_dict(transformer, state_dict=weights)


def load_lora_state_dict(transformer, state: dict[str, torch.Tensor]) -> None:
    """Load LoRA weights saved by `lora_state_dict` into a transformer with the same adapter (strict)."""
    expected = lora_state_dict(transformer)
    missing = [key for key in expected if key not in state]
    if missing:
        raise WeightsError(f"LoRA state dict: missing key {missing[0]!r} ({len(missing)} missing)")
    unexpected = [key for key in state if key not in expected]
    if unexpected:
        raise WeightsError(f"LoRA state dict: unexpected key {unexpected[0]!r} ({len(unexpected)} unexpected)")
    for key, value in state.items():
        if value.shape != expected[key].shape:
            raise WeightsError(
                f"LoRA state dict: {key!r} has shape {tuple(value.shape)}, the model expects "
                f"{tuple(expected[key].shape)} (is model.lora.rank the one it was trained with?)"
            )
    set_peft_model_state_dict(transformer, state)


def trainable_parameter_count(module: nn.Module) -> int:
    """Number of parameter entries that require grad."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
