"""Opt-in approximate sampling: one of diffusers' cache hooks (`diffusers.hooks`) on the DiT, for one storyboard.

The hooks replace the `forward` of the modules they cache and keep their state per *cache context* (the name of a
kind of denoiser call). The storyboard forward (`forward.py`) calls every block, and inside it every attention
and FFN module, as a module, so the library's hooks run unchanged inside our block loop and on top of the
per-frame modulation (`uses_frame_modulation` looks through them):
- `first_block` (`FirstBlockCacheConfig`): the first block always runs; while its output's residual changes by less
  than `threshold` (relative mean) since the last full forward, the other blocks are skipped and their cached
  residual is added. Needs at least two blocks.
- `taylorseer` (`TaylorSeerCacheConfig`): the hooked modules run fully every `cache_interval` steps (and for the
  first `disable_cache_before_step`), and in between their outputs are extrapolated by a Taylor series of the
  earlier ones. diffusers' default patterns (`^blocks.*attn`) match no module of Wan's (its attention modules are
  `attn1` / `attn2`), so Wan's self-attention, cross-attention and FFN modules are the default here.
- `mag` (`MagCacheConfig`): skips whole forwards while the accumulated error of the model's calibrated residual
  magnitude ratios stays under `threshold`. The ratios depend on the weights and the schedule: run once with
  `calibrate: true` (it prints them, one list per kind of forward) and pass them as `mag_ratios`. Under context
  parallelism a rank holds a share of the tokens: the calibration is made the whole storyboard's
  (`calibrate_over_group`) and printed by the group's first rank only.

The sampler names its forwards "guided" (the batched pair), "free" (v_u) and "conditional" (v_c alone), so each
keeps its own cached tensors. The hooks are applied for one storyboard and removed after it (`block_cache`):
no cache state outlives the storyboard, and the model samples exactly again without them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import re
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager

import torch
from diffusers.hooks import FirstBlockCacheConfig, MagCacheConfig, TaylorSeerCacheConfig
from diffusers.hooks.mag_cache import _MAG_CACHE_BLOCK_HOOK, MagCacheState

from dreamshot.config.schema import InferenceConfig
from dreamshot.models.wan.build import DTYPES
from dreamshot.models.wan.context_parallel import ContextParallel
from dreamshot.utils.errors import ConfigError

CACHE_CONFIGS = {"first_block": FirstBlockCacheConfig, "taylorseer": TaylorSeerCacheConfig, "mag": MagCacheConfig}
# Options this project sets where diffusers' defaults do not fit Wan (the user's options take precedence).
WAN_DEFAULTS = {"taylorseer": {"cache_identifiers": [r"blocks\.\d+\.(attn1|attn2|ffn)"]}}

# A cache context of the block cache hooks, by the name of a kind of batched forward.
CacheContext = Callable[[str], AbstractContextManager]


def no_cache_context(name: str) -> AbstractContextManager:
    return contextlib.nullcontext()


def cache_config(transformer, settings: InferenceConfig, steps: int):
    """The diffusers config of `inference.cache` from `inference.cache_options`, checked against `transformer`
    (a ConfigError naming the key when the model or the options cannot take it)."""
    kind = settings.cache
    config_class = CACHE_CONFIGS[kind]
    options = {**WAN_DEFAULTS.get(kind, {}), **settings.cache_options}
    fields = {f.name for f in dataclasses.fields(config_class)}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise ConfigError(
            f"inference.cache_options.{unknown[0]}: not an option of diffusers' {config_class.__name__} "
            f"(inference.cache={kind}; options: {', '.join(sorted(fields))})"
        )
    if "taylor_factors_dtype" in options:
        options["taylor_factors_dtype"] = _dtype(options["taylor_factors_dtype"])
    if kind == "mag":
        if options.get("mag_ratios") is None and not options.get("calibrate"):
            raise ConfigError(
                "inference.cache=mag needs inference.cache_options.mag_ratios, one per step: run once with "
                "inference.cache_options.calibrate=true and diffusers prints them"
            )
        recorded = options.setdefault("num_inference_steps", steps)
        if recorded != steps:
            raise ConfigError(f"inference.cache_options.num_inference_steps={recorded}, the sampler runs {steps} steps")
    try:
        config = config_class(**options)
    except (TypeError, ValueError) as e:
        message = " ".join(str(e).split())
        raise ConfigError(
            f"inference.cache_options: diffusers' {config_class.__name__} refuses them: {message}"
        ) from None
    _check_model(transformer, kind, config)
    return config


def _dtype(name) -> object:
    if name not in DTYPES:
        raise ConfigError(
            f"inference.cache_options.taylor_factors_dtype must be one of {', '.join(DTYPES)}, got {name!r}"
        )
    return DTYPES[name]


def _check_model(transformer, kind: str, config) -> None:
    blocks = len(transformer.blocks)
    if kind == "first_block" and blocks < 2:
        raise ConfigError(
            f"inference.cache=first_block needs a DiT of at least 2 blocks (the first decides, the others are "
            f"cached); this one has {blocks} (model.transformer.num_layers)"
        )
    if kind == "taylorseer" and not config.use_lite_mode:
        patterns = [*(config.cache_identifiers or []), *(config.skip_predict_identifiers or [])]
        names = [name for name, _ in transformer.named_modules()]
        if not any(re.fullmatch(pattern, name) for pattern in patterns for name in names):
            raise ConfigError(
                f"inference.cache_options.cache_identifiers {patterns} match no module of the transformer "
                "(Wan's: blocks.N.attn1, blocks.N.attn2, blocks.N.ffn)"
            )


@contextlib.contextmanager
def block_cache(
    transformer, settings: InferenceConfig, steps: int, context_parallel: ContextParallel
) -> Iterator[CacheContext]:
    """Within the block: `settings.cache` applied to `transformer` for a sampling run of `steps` steps, whose
    forwards share each storyboard with `context_parallel`; yields the function that names the cache context of a
    forward. With `cache=none`, nothing is applied."""
    if settings.cache == "none":
        yield no_cache_context
        return
    config = cache_config(transformer, settings, steps)
    transformer.enable_cache(config)
    if isinstance(config, MagCacheConfig) and config.calibrate and context_parallel.degree > 1:
        calibrate_over_group(transformer)
    try:
        yield transformer.cache_context
    finally:
        transformer.disable_cache()


def calibrate_over_group(transformer) -> None:
    """MagCache's calibration (enabled on `transformer`) made the whole storyboard's under context parallelism, and
    printed by the group's first rank only.

    diffusers' tail-block hook takes a step's ratio as the mean over the batch and the tokens of
    |r_t| / (|r_{t-1}| + 1e-8), with r the residual of the blocks and |.| a token's norm over the channels. A rank
    holds `local` tokens of the sequence, the last ones padding: the whole sequence's mean is the group's sum of its
    real tokens' ratios over their count (every token's norm lies on one rank). The hook's ratio and end-of-run
    steps are replaced on this hook instance (diffusers builds the hook, so it cannot be given a subclass); the
    shard is the one the storyboard forward binds to the tail block's attention while the block (and so the hook)
    runs."""
    block = transformer.blocks[-1]
    hook = block._diffusers_hook.get_hook(_MAG_CACHE_BLOCK_HOOK)
    ratio_of_one_process, advance = hook._perform_calibration_step, hook._advance_step

    def ratio_of_the_group(state: MagCacheState, residual: torch.Tensor) -> None:
        if state.previous_residual is None:  # the first step's ratio is a constant
            ratio_of_one_process(state, residual)
            return
        shard = block.attn1.processor.shard
        current, previous = (r.narrow(1, 0, shard.real).float() for r in (residual, state.previous_residual))
        ratios = torch.linalg.vector_norm(current, dim=-1) / (torch.linalg.vector_norm(previous, dim=-1) + 1e-8)
        sums = torch.stack([ratios.double().sum(), ratios.new_tensor(ratios.numel(), dtype=torch.float64)])
        total, count = shard.sum(sums)
        state.calibration_ratios.append((total / count).item())

    def advance_quietly_on_other_ranks(state: MagCacheState) -> None:
        first = block.attn1.processor.shard.cp.rank == 0
        with contextlib.nullcontext() if first else contextlib.redirect_stdout(io.StringIO()):
            advance(state)

    hook._perform_calibration_step = ratio_of_the_group
    hook._advance_step = advance_quietly_on_other_ranks
