"""Training modes and condition dropout (DESIGN §2 "Modes"): how one batch becomes conditions and targets.

- `t2s`: no condition frames; every shot is a target.
- `r2s`: the reference images are clean conditions; every shot is a target.
- `s2s`: the first m shots (1 <= m < N) are clean conditions with their own annotations; the rest are targets.
- `r2s_s2s`: the references and the first m shots are clean conditions; the rest are targets. DESIGN names three
  modes; this fourth one is what a story with references and previous shots, or a re-roll of an r2s storyboard
  (`dreamshot generate --regenerate`), asks of the model at inference, so it is trained with its own probability
  rather than left to a model that only ever saw references or shots, never both.
A batch shares one mode (one sequence layout). Every shot keeps its story position in the layout, given or drawn.

Dropout for guidance (Eq. 9), per batch unless said otherwise:
- `drop_joint`: every condition frame AND every shot text go (negative prompt): the batch trains v_u, the
  branch Eq. 9 weights by −(ω1 − 1). Without it v_u would only be trained by the t2s batches whose texts happen to
  be dropped (a few percent of the samples), far below the ~10% of usual classifier-free guidance training.
- `drop_refs`: the references go and the shot texts stay (an r2s batch trains as t2s, r2s_s2s as s2s).
- `drop_text`, per sample: the target texts become the negative prompt's embedding (v_r when conditions remain).

Inference asks only for condition sets that training produced: `check_trained` refuses the others.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from dreamshot.config.schema import StoryboardConfig
from dreamshot.models.layout import StoryboardLayout
from dreamshot.utils.errors import ConfigError

MODES = ("t2s", "r2s", "s2s", "r2s_s2s")
# Modes whose conditions include the references / the first m shots.
REFERENCE_MODES = ("r2s", "r2s_s2s")
SHOT_MODES = ("s2s", "r2s_s2s")
# What a mode becomes without its references, and without its given shots.
WITHOUT_REFERENCES = {"r2s": "t2s", "r2s_s2s": "s2s"}
WITHOUT_GIVEN_SHOTS = {"s2s": "r2s", "r2s_s2s": "r2s"}
_CONDITIONS = {
    "t2s": "no condition frames",
    "r2s": "references alone",
    "s2s": "given shots alone",
    "r2s_s2s": "references and given shots together",
}


@dataclass(frozen=True)
class BatchPlan:
    mode: str
    # s2s / r2s_s2s: number of leading shots given as clean conditions.
    given_shots: int
    # The batch's references were dropped (r2s trained as t2s, r2s_s2s as s2s).
    dropped_refs: bool
    # Per sample: target texts replaced by the negative prompt.
    dropped_text: tuple[bool, ...]
    # Joint drop: no condition frame and every target text negative (the v_u branch of Eq. 9).
    dropped_all: bool = False

    def counts(self) -> dict[str, int]:
        """Per-sample counters for logging the mix a run actually trained on. The drops are disjoint: a jointly
        dropped batch counts under `drop_joint` only."""
        batch = len(self.dropped_text)
        return {
            f"mode_{self.mode}": batch,
            "drop_refs": batch if self.dropped_refs else 0,
            "drop_text": 0 if self.dropped_all else sum(self.dropped_text),
            "drop_joint": batch if self.dropped_all else 0,
        }

    @property
    def keeps_references(self) -> bool:
        return self.mode in REFERENCE_MODES and not (self.dropped_refs or self.dropped_all)


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


def feasible_mode(mode: str, num_shots: int, num_refs: int) -> str:
    """`mode`, or what it falls back to when the storyboard cannot take it: given shots need N >= 2 shots,
    references need K >= 1."""
    if mode in SHOT_MODES and num_shots < 2:
        mode = WITHOUT_GIVEN_SHOTS[mode]
    if mode in REFERENCE_MODES and num_refs == 0:
        mode = WITHOUT_REFERENCES[mode]
    return mode


def sample_plan(cfg: StoryboardConfig, num_shots: int, num_refs: int, batch_size: int, rng: random.Random) -> BatchPlan:
    """Draw a batch's mode and dropout (see the module docstring)."""
    mode = rng.choices(MODES, weights=[getattr(cfg.modes, name) for name in MODES])[0]
    mode = feasible_mode(mode, num_shots, num_refs)
    given = rng.randint(1, num_shots - 1) if mode in SHOT_MODES else 0
    if rng.random() < cfg.drop_joint:
        return BatchPlan(mode, given, False, (True,) * batch_size, dropped_all=True)
    dropped_refs = mode in REFERENCE_MODES and rng.random() < cfg.drop_refs
    dropped_text = tuple(rng.random() < cfg.drop_text for _ in range(batch_size))
    return BatchPlan(mode, given, dropped_refs, dropped_text)


def compose(
    plan: BatchPlan, latents: StoryboardLatents, negative_text: torch.Tensor, layout_cfg: StoryboardConfig
) -> ComposedBatch:
    """Split a batch into conditions and targets following `plan`.

    negative_text: (L, D), the negative prompt's embedding, used for dropped target texts.
    """
    shots, shot_text, shot_masks = latents.shots, latents.shot_text, latents.shot_masks
    num_shots, m = shots.shape[2], plan.given_shots
    num_refs = latents.refs.shape[2] if plan.keeps_references else 0
    given = 0 if plan.dropped_all else m
    conditions = torch.cat([latents.refs[:, :, :num_refs], shots[:, :, :given]], dim=2)
    condition_text = torch.cat([latents.ref_text[:, :num_refs], shot_text[:, :given]], dim=1)
    targets, target_text = shots[:, :, m:], shot_text[:, m:]
    dropped = torch.tensor(plan.dropped_text, device=target_text.device).view(-1, 1, 1, 1)
    target_text = torch.where(dropped, negative_text.to(target_text), target_text)
    layout = storyboard_layout(layout_cfg, num_refs, range(m, num_shots), range(given))
    frame_masks = None
    if shot_masks is not None:
        condition_masks = torch.cat([latents.ref_masks[:, :num_refs], shot_masks[:, :given]], dim=1)
        frame_masks = layout.assemble(condition_masks, shot_masks[:, m:], dim=1)
    return ComposedBatch(conditions, targets, condition_text, target_text, layout, frame_masks)


def storyboard_layout(
    cfg: StoryboardConfig, num_references: int, target_shots: Sequence[int], given_shots: Sequence[int] = ()
) -> StoryboardLayout:
    """The configured position layout for `num_references` references, the given shots and the target shots
    (each at its story position)."""
    return StoryboardLayout(
        num_references, tuple(target_shots), tuple(given_shots), cfg.layout, cfg.phase, cfg.neg_offset
    )


def trained_modes(cfg: StoryboardConfig) -> set[str]:
    """The condition sets (modes) a run with this mix trains with the shot texts: every mode drawn with a
    probability > 0, and what dropping the references turns them into."""
    drawn = {mode for mode in MODES if getattr(cfg.modes, mode) > 0}
    if cfg.drop_refs > 0:
        drawn |= {WITHOUT_REFERENCES[mode] for mode in drawn & set(REFERENCE_MODES)}
    return drawn


def check_trained(cfg: StoryboardConfig, mode: str) -> None:
    """Raise ConfigError (one line, naming the key) when the run's mix never trained the condition set of `mode`."""
    if mode not in trained_modes(cfg):
        raise ConfigError(
            f"storyboard.modes.{mode} is {getattr(cfg.modes, mode)}: this run never trained {_CONDITIONS[mode]}, "
            f"which this request conditions on; train with storyboard.modes.{mode} > 0 or change the request"
        )
