"""The arrangement of one batch's latent frames: which are clean conditions, which are noised targets, where.

A storyboard forward sees K reference frames and M given shots (the clean conditions: references in r2s, the
given shots in s2s, both in r2s_s2s, none in t2s) and N target shots (the shots being drawn). Every shot, given
or drawn, has a story position: its 0-based index in the storyboard. The layout gives each frame its place in the
sequence and its temporal RoPE index (and phase) (DESIGN §2 "Positions", paper Tab. 3):

- `refs_first` (default): references 0..K-1, the shot at story position s at K+s.
- `phase`: as `refs_first`, plus a constant angle φ added to every temporal rotation of reference tokens. The
  paper's Phase-Pos "adds an angular shift to each frequency component", which may include the spatial rotations;
  DESIGN §2 names the temporal ones only, and this follows DESIGN.
- `neg`: shots at their story positions s, references at -K-g..-1-g: shifted back by a gap of g = `neg_offset`
  empty positions before the first shot. With g = 0 this is `refs_first` moved by -K, and RoPE sees only
  differences, so `neg` differs from the baseline only through the gap.
- `last`: shots at their story positions, references after the whole story (P..P+K-1, P = the number of story
  positions), and after the shots in the sequence.

The layouts move the references only. A given shot is a shot: it keeps its story position whichever shots are
kept, so training's s2s (the first m shots given) and a re-roll of shot j (every other shot given) put the same
story position at the same index. Where DESIGN puts s2s's given shots "in the reference slot", that is the
condition slot of the sequence: [references, given shots, targets], or [targets, references, given shots] for
`last`. The sequence order is bookkeeping only: attention sees tokens through their RoPE indices, so permuting
frames permutes the output.

One layout object is built per forward and passed down explicitly; nothing about it is stored on modules.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dreamshot.config.schema import POSITION_MODES


@dataclass(frozen=True)
class StoryboardLayout:
    num_references: int
    # Story positions (0-based) of the noised target shots, in sequence order.
    target_shots: tuple[int, ...]
    # Story positions of the clean given shots, in sequence order (after the references in the condition slot).
    given_shots: tuple[int, ...] = ()
    position_mode: str = "refs_first"
    # `phase`: the angle (radians) added to reference tokens' temporal rotations.
    phase: float = 0.0
    # `neg`: empty positions between the last reference and story position 0.
    neg_offset: float = 0.0

    def __post_init__(self) -> None:
        if self.position_mode not in POSITION_MODES:
            raise ValueError(f"position_mode must be one of {POSITION_MODES}, got {self.position_mode!r}")
        shots = [*self.given_shots, *self.target_shots]
        if self.num_references < 0 or not self.target_shots:
            raise ValueError(f"need num_references >= 0 and at least one target shot, got {self}")
        if min(shots) < 0 or len(set(shots)) != len(shots):
            raise ValueError(f"story positions must be distinct and >= 0, got {self}")

    @classmethod
    def of(cls, num_references: int, num_targets: int, num_given: int = 0, **options) -> StoryboardLayout:
        """The layout of every training mode: the first `num_given` shots given, the next `num_targets` drawn."""
        targets = tuple(range(num_given, num_given + num_targets))
        return cls(num_references, targets, tuple(range(num_given)), **options)

    @property
    def num_conditions(self) -> int:
        return self.num_references + len(self.given_shots)

    @property
    def num_targets(self) -> int:
        return len(self.target_shots)

    @property
    def num_frames(self) -> int:
        return self.num_conditions + self.num_targets

    @property
    def story_length(self) -> int:
        """P: the story positions this storyboard spans (0..P-1)."""
        return max((*self.given_shots, *self.target_shots)) + 1

    @property
    def conditions_last(self) -> bool:
        return self.position_mode == "last"

    def frame_positions(self) -> torch.Tensor:
        """Temporal RoPE index of every frame, in sequence order. Shape (F,), float64 (may be <0 or fractional)."""
        k = self.num_references
        references = torch.arange(k, dtype=torch.float64)
        if self.position_mode == "neg":
            references = references - k - self.neg_offset
        elif self.position_mode == "last":
            references = references + self.story_length
        # refs_first / phase: the references take the first K indices, so the story starts at K.
        start = k if self.position_mode in ("refs_first", "phase") else 0
        given = torch.tensor(self.given_shots, dtype=torch.float64) + start
        targets = torch.tensor(self.target_shots, dtype=torch.float64) + start
        return self.assemble(torch.cat([references, given]), targets, dim=0)

    def frame_phases(self) -> torch.Tensor:
        """Extra temporal rotation angle of every frame, in sequence order. Shape (F,), float64."""
        phases = torch.zeros(self.num_frames, dtype=torch.float64)
        if self.position_mode == "phase":
            start = self.condition_slice().start
            phases[start : start + self.num_references] = self.phase
        return phases

    def condition_slice(self) -> slice:
        start = self.num_targets if self.conditions_last else 0
        return slice(start, start + self.num_conditions)

    def target_slice(self) -> slice:
        start = 0 if self.conditions_last else self.num_conditions
        return slice(start, start + self.num_targets)

    def target_frames(self) -> torch.Tensor:
        """Bool mask over frames in sequence order: True where the frame is a noised target. Shape (F,)."""
        mask = torch.zeros(self.num_frames, dtype=torch.bool)
        mask[self.target_slice()] = True
        return mask

    def assemble(self, conditions: torch.Tensor, targets: torch.Tensor, dim: int = 2) -> torch.Tensor:
        """Concatenate condition and target frames (along `dim`) in sequence order."""
        parts = [targets, conditions] if self.conditions_last else [conditions, targets]
        return torch.cat(parts, dim=dim)

    def split(self, frames: torch.Tensor, dim: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
        """Inverse of `assemble`: (conditions, targets)."""
        cond = frames.narrow(dim, self.condition_slice().start, self.num_conditions)
        target = frames.narrow(dim, self.target_slice().start, self.num_targets)
        return cond, target
