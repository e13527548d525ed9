"""`dreamshot generate --preset NAME`: a sampler setting measured in benchmarks/sampling.py, as config overrides.

A preset's overrides apply after the run's config (or `--config`) and before the command line's, so
`--preset fast inference.steps=30` is the fast setting at 30 steps. A command line that picks the cache hook itself
(`--preset fast inference.cache=none`) drops the preset's cache options, which are options of the preset's hook.
`generation.json` records the preset's overrides that applied and the `inference` settings they resolved to.

- `exact`: the exact sampler, whatever the run's config sets for the opt-in approximations: guidance on every
  step, no cache hook. (Its exact savings — the text keys and values once per storyboard, the LoRA folded into the
  weights — are on by default and leave the output unchanged.)
- `fast`: the fastest opt-in setting of the benchmark that works with any LoRA (a few-step schedule needs a
  step-distilled second LoRA, so it is not a preset): guidance on the first half of the steps and diffusers'
  FirstBlockCache at threshold 0.1. Speed-up and drift: benchmarks/RESULTS.md "Sampling".
"""

from __future__ import annotations

from collections.abc import Sequence

from dreamshot.utils.errors import ConfigError

CACHE_KEY, CACHE_OPTIONS_KEY = "inference.cache", "inference.cache_options"

PRESETS = {
    "exact": ["inference.cache=none", "inference.cache_options={}", "inference.guidance_fraction=1.0"],
    "fast": [
        "inference.cache=first_block",
        "inference.cache_options={threshold: 0.1}",
        "inference.guidance_fraction=0.5",
    ],
}


def preset_overrides(name: str, command_line: Sequence[str] = ()) -> list[str]:
    """The config overrides of preset `name` (ConfigError naming `--preset` for an unknown one) that apply before
    the `command_line` overrides: all of them, less the cache options when the command line sets the cache hook."""
    if name not in PRESETS:
        raise ConfigError(f"--preset: unknown preset {name!r} (presets: {', '.join(PRESETS)})")
    if CACHE_KEY not in {_key(item) for item in command_line}:
        return list(PRESETS[name])
    return [item for item in PRESETS[name] if _key(item) != CACHE_OPTIONS_KEY]


def _key(override: str) -> str:
    return override.split("=", 1)[0]
