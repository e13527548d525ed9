"""The arrangement of one batch's latent frames: which are clean conditions, which are noised targets, where.

A storyboard forward sees K condition frames (reference images in r2s, the given shots in s2s, none in t2s)
and N target frames (the shots being generated). The layout says in which order they stand in the sequence
and which temporal RoPE index (and phase) each frame gets (DESIGN §2 "Positions", paper Tab. 3):

- `refs_first` (default): conditions 0..K-1, targets K..K+N-1, conditions first in the sequence.
- `phase`: as `refs_first`, plus a constant angle φ added to every temporal rotation of condition tokens.
- `neg`: targets 0..N-1, conditions -K-offset..-1-offset (conditions first in the sequence).
- `last`: targets first in the sequence (0..N-1), conditions after them (N..N+K-1).

One layout object is built per forward and passed down explicitly; nothing about it is stored on modules.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dreamshot.config.schema import POSITION_MODES


@dataclass(frozen=True)
class StoryboardLayout:
    num_conditions: int
    num_targets: int
    position_mode: str = "refs_first"
    # `phase`: the angle (radians) added to condition tokens' temporal rotations.
    phase: float = 0.0
    # `neg`: conditions are shifted back by this many extra positions.
    neg_offset: float = 0.0

    def __post_init__(self) -> None:
        if self.position_mode not in POSITION_MODES:
            raise ValueError(f"position_mode must be one of {POSITION_MODES}, got {self.position_mode!r}")
        if self.num_conditions < 0 or self.num_targets < 1:
            raise ValueError(f"need num_conditions >= 0 and num_targets >= 1, got {self}")

    @property
    def num_frames(self) -> int:
        return self.num_conditions + self.num_targets

    @property
    def conditions_last(self) -> bool:
        return self.position_mode == "last"

    def frame_positions(self) -> torch.Tensor:
        """Temporal RoPE index of every frame, in sequence order. Shape (F,), float64 (may be <0 or fractional)."""
        k, n = self.num_conditions, self.num_targets
        conditions = torch.arange(k, dtype=torch.float64)
        targets = torch.arange(n, dtype=torch.float64)
        if self.position_mode in ("refs_first", "phase"):
            return torch.cat([conditions, targets + k])
        if self.position_mode == "neg":
            return torch.cat([conditions - k - self.neg_offset, targets])
        return torch.cat([targets, conditions + n])

    def frame_phases(self) -> torch.Tensor:
        """Extra temporal rotation angle of every frame, in sequence order. Shape (F,), float64."""
        phases = torch.zeros(self.num_frames, dtype=torch.float64)
        if self.position_mode == "phase":
            phases[self.condition_slice()] = self.phase
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
