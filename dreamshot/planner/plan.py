"""One planned training phase: the workload and everything computed from it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from dreamshot.planner.flops import Flops, training_flops
from dreamshot.planner.memory import Item, activation_memory, state_memory
from dreamshot.planner.shape import ModelShape
from dreamshot.planner.workload import Training, Workload


@dataclass(frozen=True)
class PhasePlan:
    """FLOPs and per-GPU memory of one training phase, activations both with and without checkpointing."""

    label: str
    work: Workload
    training: Training
    flops: Flops
    state: dict[str, Item]
    # Keyed by gradient checkpointing on (True) / off (False); `work.checkpointing` is the configured one.
    activations: dict[bool, dict[str, Item]]

    def total_bytes(self, checkpointing: bool) -> int:
        items = {**self.state, **self.activations[checkpointing]}
        return sum(item.bytes for item in items.values())

    @property
    def step_flops(self) -> int:
        """FLOPs of one micro-batch on one GPU."""
        return self.flops.total * self.work.micro_batch

    @property
    def optimizer_step_flops(self) -> int:
        """FLOPs of one optimiser step over all GPUs and accumulated micro-batches."""
        return self.step_flops * self.training.accumulate * self.training.world_size


def plan_phase(label: str, shape: ModelShape, work: Workload, training: Training, encoders: bool = True) -> PhasePlan:
    return PhasePlan(
        label=label,
        work=work,
        training=training,
        flops=training_flops(shape, work),
        state=state_memory(shape, training, encoders),
        activations={
            on: activation_memory(shape, dataclasses.replace(work, checkpointing=on), training) for on in (True, False)
        },
    )
