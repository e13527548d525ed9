"""The cost of drawing a storyboard: DiT forwards and FLOPs of reference-free guidance (DESIGN §2 Eq. 9).

Each sampler step predicts three velocities. With condition frames (K references or M given shots) the
pipeline batches v_r and v_c (K+M+N frames each) in one forward and runs v_u (N frames) alone: 2 forwards and 3
branch samples per step. Without (t2s) v_u and v_c share one forward of N frames each: 1 forward, 2 samples.
A branch sample of F frames costs the forward FLOPs of `training_flops` (matmuls only, no RACL, no
checkpointing), so the FLOPs grow with the tokens and, through self-attention, with their square. The VAE and
umT5 passes (once per storyboard) are not counted.

A GPU-hour estimate needs a throughput: `PEAK_TFLOPS` (dense bf16 of an H100 / H200 SXM) times an MFU that the
caller states (`DEFAULT_MFU`, below the 45-49% measured for training steps in benchmarks/RESULTS.md).
"""

from __future__ import annotations

from dataclasses import dataclass

from dreamshot.planner.flops import training_flops
from dreamshot.planner.shape import ModelShape
from dreamshot.planner.workload import Workload

PEAK_TFLOPS = 989.0
DEFAULT_MFU = 0.4


@dataclass(frozen=True)
class DrawingCost:
    """One storyboard's drawing: `forwards` DiT calls, `samples` branch samples, `flops` in all, and `tokens`,
    the video tokens of the largest branch sample (what one forward holds per sample)."""

    forwards: int
    samples: int
    flops: int
    tokens: int

    def __add__(self, other: DrawingCost) -> DrawingCost:
        return DrawingCost(
            self.forwards + other.forwards,
            self.samples + other.samples,
            self.flops + other.flops,
            max(self.tokens, other.tokens),
        )


def drawing_cost(
    shape: ModelShape, conditions: int, targets: int, tokens_per_frame: int, text_len: int, steps: int
) -> DrawingCost:
    """The cost of drawing `targets` shots after `conditions` clean frames, `steps` sampler steps."""

    def forward(frames: int) -> int:
        work = Workload(frames, tokens_per_frame, text_len, target_frames=targets, checkpointing=False)
        return sum(training_flops(shape, work).forward.values())

    if conditions:
        per_step, forwards, samples = 2 * forward(conditions + targets) + forward(targets), 2, 3
    else:
        per_step, forwards, samples = 2 * forward(targets), 1, 2
    return DrawingCost(steps * forwards, steps * samples, steps * per_step, (conditions + targets) * tokens_per_frame)


def gpu_hours(flops: float, mfu: float = DEFAULT_MFU, peak_tflops: float = PEAK_TFLOPS) -> float:
    """Hours of one GPU for `flops` at `mfu` of `peak_tflops`."""
    return flops / (mfu * peak_tflops * 1e12) / 3600
