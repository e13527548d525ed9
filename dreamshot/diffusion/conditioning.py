"""Training modes and condition dropout (DESIGN §2 "Modes"): how one batch becomes conditions and targets.

- `t2s`: no condition frames; every shot is a target.
- `r2s`: the reference images are clean conditions; every shot is a target.
- `s2s`: the first m shots (1 <= m < N) are clean conditions with their own annotations; the rest are targets.
A batch shares one mode (one sequence layout). Dropout for guidance: a batch may lose its reference frames
(then it is a t2s batch, counted as `drop_refs`), and each sample's target texts may be replaced by the
negative prompt's embedding.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from dreamshot.config.schema import StoryboardConfig
from dreamshot.models.layout import StoryboardLayout

MODES = ("t2s", "r2s", "s2s")


@dataclass(frozen=True)
class BatchPlan:
    mode: str
    # s2s: number of leading shots given as clean conditions.
    given_shots: int
    # r2s batch whose references were dropped (trained as t2s).
    dropped_refs: bool
    # Per sample: target texts replaced by the negative prompt.
    dropped_text: tuple[bool, ...]

    def counts(self) -> dict[str, int]:
        """Per-sample counters for logging the mix a run actually trained on."""
        batch = len(self.dropped_text)
        return {
            f"mode_{self.mode}": batch,
            "drop_refs": batch if self.dropped_refs else 0,
            "drop_text": sum(self.dropped_text),
        }


@dataclass
class StoryboardLatents:
    """Encoded storyboard. refs: (B, C, K, h, w); shots: (B, C, N, h, w); *_text: (B, K|N, L, D).

    Role masks per frame, when the loss or the diagnostic needs them (pixel resolution, R = K roles):
    ref_masks: (B, K, R, H, W) — reference k shows only role k; shot_masks: (B, N, R, H, W).
    """

    refs: torch.Tensor
    shots: torch.Tensor
    ref_text: torch.Tensor
    shot_text: torch.Tensor
    ref_masks: torch.Tensor | None = None
    shot_masks: torch.Tensor | None = None


@dataclass
class ComposedBatch:
    """One DiT input split into clean conditions and noised targets (frames along dim 2 / texts along dim 1)."""

    conditions: torch.Tensor
    targets: torch.Tensor
    condition_text: torch.Tensor
    target_text: torch.Tensor
    layout: StoryboardLayout
    # (B, F, R, H, W) role masks of every frame in sequence order, when the inputs carried masks.
    frame_masks: torch.Tensor | None = None


def sample_plan(cfg: StoryboardConfig, num_shots: int, num_refs: int, batch_size: int, rng: random.Random) -> BatchPlan:
    """Draw a batch's mode and dropout.

    Modes that the batch cannot take fall back: s2s needs N >= 2 shots, r2s needs K >= 1 reference.
    """
    weights = [cfg.modes.t2s, cfg.modes.r2s, cfg.modes.s2s]
    mode = rng.choices(MODES, weights=weights)[0]
    if mode == "s2s" and num_shots < 2:
        mode = "r2s"
    if mode == "r2s" and num_refs == 0:
        mode = "t2s"
    given = rng.randint(1, num_shots - 1) if mode == "s2s" else 0
    dropped_refs = mode == "r2s" and rng.random() < cfg.drop_refs
    dropped_text = tuple(rng.random() < cfg.drop_text for _ in range(batch_size))
    return BatchPlan(mode, given, dropped_refs, dropped_text)


def compose(
    plan: BatchPlan, latents: StoryboardLatents, negative_text: torch.Tensor, layout_cfg: StoryboardConfig
) -> ComposedBatch:
    """Split a batch into conditions and targets following `plan`.

    negative_text: (L, D), the negative prompt's embedding, used for dropped target texts.
    """
    shots, shot_text, shot_masks = latents.shots, latents.shot_text, latents.shot_masks
    with_refs = plan.mode == "r2s" and not plan.dropped_refs
    m = plan.given_shots if plan.mode == "s2s" else 0
    if with_refs:
        conditions, condition_text, condition_masks = latents.refs, latents.ref_text, latents.ref_masks
    else:
        conditions, condition_text = shots[:, :, :m], shot_text[:, :m]
        condition_masks = None if shot_masks is None else shot_masks[:, :m]
    targets, target_text = shots[:, :, m:], shot_text[:, m:]
    dropped = torch.tensor(plan.dropped_text, device=target_text.device).view(-1, 1, 1, 1)
    target_text = torch.where(dropped, negative_text.to(target_text), target_text)
    layout = storyboard_layout(layout_cfg, conditions.shape[2], targets.shape[2])
    frame_masks = None
    if shot_masks is not None:
        frame_masks = layout.assemble(condition_masks, shot_masks[:, m:], dim=1)
    return ComposedBatch(conditions, targets, condition_text, target_text, layout, frame_masks)


def storyboard_layout(cfg: StoryboardConfig, num_conditions: int, num_targets: int) -> StoryboardLayout:
    """The configured position layout for a sequence of `num_conditions` clean and `num_targets` noised frames."""
    return StoryboardLayout(num_conditions, num_targets, cfg.layout, cfg.phase, cfg.neg_offset)
