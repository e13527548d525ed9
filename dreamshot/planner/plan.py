"""One planned training phase: the workload and everything computed from it; the workload and the parallel
setup a config trains with; the longest storyboard that fits a device."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from dreamshot.config.schema import Config
from dreamshot.planner.communication import context_parallel_bytes
from dreamshot.planner.flops import Flops, training_flops
from dreamshot.planner.memory import Item, activation_memory, state_memory
from dreamshot.planner.shape import ModelShape, model_shape
from dreamshot.planner.workload import Training, Workload, tokens_per_frame, zero_stage

GIB = 2**30


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
    # Bytes one GPU sends per micro-batch for context parallelism, by collective ({} without it).
    communication: dict[str, int] = dataclasses.field(default_factory=dict)

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


def plan_phase(
    label: str,
    shape: ModelShape,
    work: Workload,
    training: Training,
    encoders: bool = True,
) -> PhasePlan:
    return PhasePlan(
        label=label,
        work=work,
        training=training,
        flops=training_flops(shape, work),
        state=state_memory(shape, training, encoders),
        activations={
            on: activation_memory(shape, dataclasses.replace(work, checkpointing=on), training) for on in (True, False)
        },
        communication=context_parallel_bytes(shape, work, work.context_parallel_attention),
    )


def config_workload(cfg: Config, shots: int, refs: int, per_frame: int, racl_weight: float, **overrides) -> Workload:
    """One sample of `shots` shots and `refs` references at `per_frame` tokens per frame, as `cfg` trains it
    (`overrides`: Workload fields to set instead, e.g. micro_batch, checkpointing, context_parallel)."""
    work = Workload(
        frames=shots + refs,
        tokens_per_frame=per_frame,
        text_len=cfg.model.text_len,
        target_frames=shots,
        micro_batch=cfg.data.batch_size,
        checkpointing=cfg.trainer.gradient_checkpointing,
        per_token_timestep=cfg.diffusion.timestep_mode == "per_token",
        activation_bytes=2 if cfg.model.dtype == "bfloat16" or "16" in cfg.trainer.precision else 4,
        racl_blocks=len(cfg.racl_blocks()) if racl_weight > 0 else 0,
        racl_queries=per_frame,
        context_parallel=cfg.trainer.context_parallel.degree,
        context_parallel_attention=cfg.trainer.context_parallel.attention,
    )
    return dataclasses.replace(work, **{key: value for key, value in overrides.items() if value is not None})


def config_training(cfg: Config, world_size: int | None = None, zero: int | None = None) -> Training:
    """How `cfg` spreads a step over its devices (`world_size`, `zero`: instead of the config's)."""
    return Training(
        world_size=world_size or cfg.trainer.devices * cfg.trainer.num_nodes,
        zero_stage=zero_stage(cfg.trainer.strategy) if zero is None else zero,
        accumulate=cfg.trainer.accumulate_grad_batches,
        model_bytes=2 if cfg.model.dtype == "bfloat16" else 4,
        half_precision="16" in cfg.trainer.precision,
        ema=bool(cfg.optim.ema_decay),  # as train.py adds LoraEma
    )


def longest_storyboard(
    shape: ModelShape, work: Workload, training: Training, memory_gib: float, encoders: bool, limit: int
) -> int:
    """The most shots (at most `limit`) that fit in `memory_gib` per GPU with `work`'s references (0: none)."""
    refs = work.frames - work.target_frames

    def fits(shots: int) -> bool:
        plan = plan_phase(
            "", shape, dataclasses.replace(work, frames=shots + refs, target_frames=shots), training, encoders
        )
        return plan.total_bytes(work.checkpointing) <= memory_gib * GIB

    low, high = 0, limit  # fits(low) holds (0 shots: nothing to fit), the answer is in [low, high]
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if fits(middle) else (low, middle - 1)
    return low


def shot_window(cfg: Config, refs: int, longest: int) -> int:
    """Shots per training storyboard: `data.max_shots`; with context parallelism the most shots, up to the
    data's `longest`, that fit `trainer.device_memory_gib` with `refs` references in every phase, as the planner
    predicts (at least 1)."""
    if cfg.trainer.context_parallel.degree == 1:
        return cfg.data.max_shots
    shape, training = model_shape(cfg.model, count_encoders=cfg.data.cache_dir is None), config_training(cfg)
    window = longest
    for i, phase in enumerate(cfg.phases()):
        per_frame = tokens_per_frame(*phase.resolution, "resolution")
        work = config_workload(cfg, 1, refs, per_frame, cfg.racl_weight(i))
        encoders = cfg.data.cache_dir is None
        window = min(
            window, longest_storyboard(shape, work, training, cfg.trainer.device_memory_gib, encoders, longest)
        )
    return max(window, 1)
