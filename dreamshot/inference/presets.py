"""`dreamshot generate --preset NAME`: a sampler setting measured in benchmarks/sampling.py, as config overrides.

A preset's overrides apply after the run's config (or `--config`) and before the command line's, so
`--preset fast inference.steps=30` is the fast setting at 30 steps. `generation.json` records the preset and the
`inference` settings it resolved to.

- `exact`: the exact sampler, whatever the run's config sets for the opt-in approximations: guidance on every
  step, no cache hook. (Its exact savings — the text keys and values once per storyboard, the LoRA folded into the
  weights — are on by default and leave the output unchanged.)
- `fast`: the fastest opt-in setting of the benchmark that works with any LoRA (a few-step schedule needs a
  step-distilled second LoRA, so it is not a preset): guidance on the first half of the steps and diffusers'
  FirstBlockCache at threshold 0.1. Speed-up and drift: benchmarks/RESULTS.md "Sampling".
"""

from __future__ import annotations

from dreamshot.utils.errors import ConfigError

PRESETS = {
    "exact": ["inference.cache=none", "inference.cache_options={}", "inference.guidance_fraction=1.0"],
    "fast": [
        "inference.cache=first_block",
        "inference.cache_options={threshold: 0.1}",
        "inference.guidance_fraction=0.5",
    ],
}


def preset_overrides(name: str) -> list[str]:
    """The config overrides of preset `name` (ConfigError naming `--preset` for an unknown one)."""
    if name not in PRESETS:
        raise ConfigError(f"--preset: unknown preset {name!r} (presets: {', '.join(PRESETS)})")
    return list(PRESETS[name])
