"""The learning-rate schedule: a linear warm-up, then constant, linear or cosine decay (`optim.schedule`)."""

from __future__ import annotations

import math


def lr_factor(step: int, warmup_steps: int, total_steps: int, schedule: str, min_ratio: float) -> float:
    """Multiplier of the base learning rate at optimizer step `step` (0-based).

    Warm-up: (step + 1) / warmup_steps for the first warmup_steps steps. Then `constant` stays at 1; `linear` and
    `cosine` go from 1 at the end of the warm-up towards `min_ratio` at `total_steps` (the last step's own value is
    one step short of it).
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "linear":
        return 1.0 - (1.0 - min_ratio) * progress
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
