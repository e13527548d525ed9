"""Guidance of the velocity prediction at sampling time (DESIGN §2 "Reference-free CFG", Eq. 9). Pure functions.

Three predictions per step, all shaped like the target latents:
- `v_u`: no condition frames, negative prompt on the shots;
- `v_r`: condition frames (references, given shots), negative prompt on the shots;
- `v_c`: condition frames and the shot prompts.
"""

from __future__ import annotations

import torch


def classifier_free_guidance(v_uncond: torch.Tensor, v_cond: torch.Tensor, omega: float) -> torch.Tensor:
    """Ordinary CFG: v_uncond + ω·(v_cond − v_uncond). Any shape (both the same)."""
    return v_uncond + omega * (v_cond - v_uncond)


def reference_free_guidance(
    v_u: torch.Tensor, v_r: torch.Tensor, v_c: torch.Tensor, omega1: float = 4.0, omega2: float = 5.0
) -> torch.Tensor:
    """Eq. 9: v = v_u + ω1·(v_r − v_u) + ω2·(v_c − v_r).

    ω1 scales how far the condition frames pull away from the unconditioned model, ω2 how far the shot prompts
    pull on top of them. Any shape (all three the same).
    """
    return v_u + omega1 * (v_r - v_u) + omega2 * (v_c - v_r)


def guided_velocity(
    v_u: torch.Tensor,
    v_c: torch.Tensor,
    v_r: torch.Tensor | None = None,
    omega1: float = 4.0,
    omega2: float = 5.0,
) -> torch.Tensor:
    """The sampler's guided velocity: Eq. 9, or ordinary CFG with ω2 when there are no condition frames.

    In t2s (`v_r` is None) the "with references" branch is the same forward as `v_u`, so Eq. 9 with
    v_r = v_u collapses to `classifier_free_guidance(v_u, v_c, ω2)`; ω1 has no effect there.
    """
    if v_r is None:
        return classifier_free_guidance(v_u, v_c, omega2)
    return reference_free_guidance(v_u, v_r, v_c, omega1, omega2)
