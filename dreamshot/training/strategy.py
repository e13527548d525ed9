"""The Lightning strategy of a run, built from `trainer.strategy` (DESIGN §2 "Curriculum": DeepSpeed ZeRO-2 by
default on GPUs, ZeRO-3 available; DDP for GPUs or CPUs).

- `deepspeed_stage_2` / `deepspeed_stage_3`: DeepSpeed ZeRO with the frozen parameters left out of checkpoints
  (only the LoRA weights and their optimiser state are saved, never the 14B backbone). ZeRO-2 shards the LoRA
  gradients and AdamW state over the GPUs; ZeRO-3 also shards every weight, frozen ones included. DeepSpeed's
  bf16 mode casts the whole module to bf16 and keeps fp32 master weights in its optimiser.
- `ddp`: one process per device, started by re-running the command (`torchrun` and SLURM start them
  themselves); `ddp_spawn` forks them from the running process instead (notebooks).
- `auto`: Lightning's choice (one device: no strategy).
The names and the rules they must obey (DeepSpeed needs CUDA GPUs) are checked when the config loads
(`config/schema.py`).
"""

from __future__ import annotations

import logging

from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, Strategy

from dreamshot.config.schema import TrainerConfig
from dreamshot.planner.workload import zero_stage

# Elements per DeepSpeed reduce / all-gather bucket (Lightning's default is 2e8). With overlap_comm DeepSpeed keeps
# several buckets in flight (about 4.5× one bucket): 5e7 bf16 elements is ~0.45 GB per GPU instead of ~1.8 GB,
# still large enough that the LoRA gradients of a 14B model (1.2e9 at rank 256) go out in ~25 collectives.
DEEPSPEED_BUCKET_ELEMENTS = 50_000_000
DDP_START_METHODS = {"ddp": "popen", "ddp_spawn": "spawn"}


def build_strategy(trainer: TrainerConfig) -> Strategy | str:
    """The strategy object for `L.Trainer(strategy=...)` (the string "auto" when Lightning chooses)."""
    stage = zero_stage(trainer.strategy)
    if stage:
        return DeepSpeedStrategy(
            stage=stage,
            exclude_frozen_parameters=True,
            allgather_bucket_size=DEEPSPEED_BUCKET_ELEMENTS,
            reduce_bucket_size=DEEPSPEED_BUCKET_ELEMENTS,
            overlap_comm=True,
            contiguous_gradients=True,
            logging_level=logging.WARNING,
        )
    if trainer.strategy in DDP_START_METHODS:
        return DDPStrategy(
            start_method=DDP_START_METHODS[trainer.strategy],
            # Every LoRA weight is used in every step (all modes run every block), so DDP need not search the
            # graph for unused ones.
            find_unused_parameters=False,
            # Gradients live in DDP's buckets instead of a second copy.
            gradient_as_bucket_view=True,
            # The frozen encoders' buffers are constants, equal on every rank: no broadcast before each forward.
            broadcast_buffers=False,
        )
    return trainer.strategy
