"""The Lightning strategy of a run, built from `trainer.strategy` (DESIGN §2 "Curriculum": DeepSpeed ZeRO-2 by
default on GPUs, ZeRO-3 available; DDP for GPUs or CPUs).

- `deepspeed_stage_2` / `deepspeed_stage_3`: DeepSpeed ZeRO with the frozen parameters left out of checkpoints
  (only the LoRA weights and their optimiser state are saved, never the 14B backbone). ZeRO-2 shards the LoRA
  gradients and AdamW state over the GPUs; ZeRO-3 also shards every weight, frozen ones included. DeepSpeed's
  bf16 mode casts the whole module to bf16 and keeps fp32 master weights in its optimiser; under ZeRO-2 the frozen
  VAE gets its float32 weights back (`LoraDeepSpeedStrategy.setup`), as sampling and the latent cache encode. The
  batch reaches the training step as stored (`BatchAsStoredPrecision`), as under DDP.
- `ddp`: one process per device, started by re-running the command (`torchrun` and SLURM start them
  themselves); `ddp_spawn` starts them from the running process instead (multiprocessing's `spawn`, for a run
  called from Python; Lightning refuses it in a Jupyter notebook).
- `auto`: Lightning's choice (one device: no strategy).
The names and the rules they must obey (DeepSpeed needs CUDA GPUs) are checked when the config loads
(`config/schema.py`).

The DDP and DeepSpeed strategies host the context-parallel groups (`trainer.context_parallel`): once they have
started the processes they build the (dp, ring, ulysses) `DeviceMesh` of `models/wan/context_parallel.py`, the
module hands its group to the adapter, and the data sampler and the per-step randomness follow the data-parallel
rank (`distributed_sampler_kwargs`, as Lightning's own mesh strategies report it), so the ranks of a group train on
the same storyboard. Gradients are still averaged over every rank, which is what context parallelism needs (see
its module docstring). The mesh's groups get the strategy's `timeout`, as Lightning's own group has it.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.plugins.precision import DeepSpeedPrecision
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, Strategy
from torch import nn

from dreamshot.config.schema import ContextParallelConfig, TrainerConfig
from dreamshot.models.wan.context_parallel import ContextParallel, build_mesh
from dreamshot.planner.workload import zero_stage
from dreamshot.utils.io import PARTIAL_SUFFIX, backup_folder, commit_folder, partial_folder

# Elements per DeepSpeed reduce / all-gather bucket (Lightning's default is 2e8). With overlap_comm DeepSpeed keeps
# about 4.5× both buckets in flight: 5e7 bf16 elements cost ~0.9 GB per GPU instead of ~3.6 GB, and the LoRA
# gradients of the 14B model (1.2e9 at rank 256) still go out in ~25 collectives.
DEEPSPEED_BUCKET_ELEMENTS = 50_000_000
DDP_START_METHODS = {"ddp": "popen", "ddp_spawn": "spawn"}


def build_strategy(trainer: TrainerConfig, micro_batch: int) -> Strategy | str:
    """The strategy object for `L.Trainer(strategy=...)` (the string "auto" when Lightning chooses).

    `micro_batch`: samples per device and step (data.batch_size), which DeepSpeed wants in its config.
    """
    stage = zero_stage(trainer.strategy)
    if stage:
        strategy = LoraDeepSpeedStrategy(
            trainer.context_parallel,
            stage=stage,
            # Lightning's connector takes a strategy's own precision plugin over the one it builds from `precision=`.
            precision_plugin=BatchAsStoredPrecision(trainer.precision),
            exclude_frozen_parameters=True,
            allgather_bucket_size=DEEPSPEED_BUCKET_ELEMENTS,
            reduce_bucket_size=DEEPSPEED_BUCKET_ELEMENTS,
            overlap_comm=True,
            contiguous_gradients=True,
            logging_level=logging.WARNING,
        )
        # Given here, Lightning does not read it off the training loader's batch sampler (ours has no batch_size).
        strategy.config["train_micro_batch_size_per_gpu"] = micro_batch
        return strategy
    if trainer.strategy in DDP_START_METHODS:
        return ContextParallelDDPStrategy(
            trainer.context_parallel,
            start_method=DDP_START_METHODS[trainer.strategy],
            # Every LoRA weight is used in every step (all modes run every block), so DDP need not search the
            # graph for unused ones.
            find_unused_parameters=False,
            # Gradients live in DDP's buckets instead of a second copy.
            gradient_as_bucket_view=True,
            # The frozen encoders' buffers are constants, equal on every rank: no broadcast before each forward.
            forward_sync_buffers=False,
        )
    return trainer.strategy


class HostsContextParallel:
    """Mixin for a DDP-family strategy: the context-parallel groups of `config`, built once the processes run."""

    def __init__(self, config: ContextParallelConfig, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.context_parallel_config = config
        self.context_parallel = ContextParallel()

    def setup_distributed(self) -> None:
        super().setup_distributed()
        config = self.context_parallel_config
        if config.degree > 1:
            # With the strategy's timeout (DDP's and DeepSpeed's `timeout`): the groups' default would be NCCL's.
            mesh = build_mesh(self.world_size, config.degree, config.attention, self.root_device.type, self._timeout)
            self.context_parallel = ContextParallel.from_mesh(
                mesh, config.attention, self.root_device, "trainer.context_parallel"
            )

    @property
    def distributed_sampler_kwargs(self) -> dict[str, int]:
        """The data-parallel replicas and this rank's: a context-parallel group is one replica."""
        degree = self.context_parallel_config.degree
        return {"num_replicas": self.world_size // degree, "rank": self.global_rank // degree}


class ContextParallelDDPStrategy(HostsContextParallel, DDPStrategy):
    """Lightning's DDP, hosting the context-parallel groups."""


class BatchAsStoredPrecision(DeepSpeedPrecision):
    """DeepSpeed's precision plugin, leaving the batch as the data loader made it.

    Lightning's casts every floating tensor of a batch to the precision's dtype (bf16) before each step, to
    feed the module that DeepSpeed's bf16 mode has cast whole and runs without autocast. Here that rounds the data the
    loss is formed from: the cached float32 latents z_0 of z_t and of the target ε − z_0, and the pixels before the
    float32 VAE (ZeRO-2) encodes them. So the batch stays as stored, as under DDP's bf16-mixed, and only what enters
    the DiT is cast to its dtype, at its door (`WanAdapter.predict_velocity`).
    """

    def convert_input(self, data: Any) -> Any:
        return data


class LoraDeepSpeedStrategy(HostsContextParallel, DeepSpeedStrategy):
    """DeepSpeed whose checkpoints hold the trainable (LoRA) weights of the module and nothing frozen, written whole
    or not at all, hosting the context-parallel groups.

    `exclude_frozen_parameters` drops the frozen weights that `named_parameters()` lists, but a frozen weight
    that is a tied alias of another slips through (umT5's `encoder.embed_tokens` is its `shared` embedding:
    2 GB at full size), so the module's state dict is cut to its trainable weights, as DreamShotModule cuts
    Lightning's own checkpoints.

    DeepSpeed writes a checkpoint as a folder, each rank its own shards, in place: a run killed mid-save would
    leave `last.ckpt` with new model states beside old optimiser states. So every rank writes into the same
    temporary sibling (`partial_folder`, named after the target so the ranks agree), and once all have finished
    (a barrier) global rank 0 renames it into place (`commit_folder`: the old folder to `backup_folder`, the new
    one to its name, the backup removed). A crash leaves the old checkpoint or the new one: a leftover partial
    folder is never read and the next save removes it; killed between the two renames, the checkpoint exists only
    as its backup, which readers take instead (`intact_checkpoint`) until the next save replaces both. The renames
    need every rank to see one filesystem: one node, or a shared one that all nodes write their ranks' shards to,
    as before. `last_saved_step`: the step of the last checkpoint put in place (None before the first).
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.last_saved_step: int | None = None

    def setup(self, trainer: L.Trainer) -> None:
        self.lightning_module.register_state_dict_post_hook(keep_trainable_weights)
        # DeepSpeed's bf16 mode casts every weight to bf16 as it builds the engine (`_configure_distributed_model`),
        # the frozen VAE's included: ZeRO-2 gives the VAE its own float32 weights back, so a run without a latent
        # cache encodes as sampling and `dreamshot cache` do. ZeRO-3 partitions every weight into its own buffers,
        # frozen ones included: there the VAE stays bf16 (the planner counts it so).
        kept = nullcontext() if self.zero_stage_3 else weights_kept(self.lightning_module.adapter.vae)
        with kept:
            super().setup(trainer)

    def save_checkpoint(self, checkpoint: dict, filepath, storage_options: Any | None = None) -> None:
        final = Path(self.broadcast(str(filepath)))  # rank 0's path, as Lightning's save takes it
        written = partial_folder(final)
        if self.is_global_zero:
            remove_partial_folders(final.parent)
        # No rank writes into a partial folder before rank 0 has removed it.
        self.barrier("LoraDeepSpeedStrategy.save_checkpoint.clean")
        super().save_checkpoint(checkpoint, written, storage_options)
        # Only once every rank's shards are written is the folder whole.
        self.barrier("LoraDeepSpeedStrategy.save_checkpoint.written")
        if self.is_global_zero:
            commit_folder(written, final)
        self.last_saved_step = checkpoint.get("global_step")


@contextmanager
def weights_kept(module: nn.Module) -> Iterator[None]:
    """`module`'s weights after the block are its weights before it, moved to the device they ended on: a cast
    inside is undone without the rounding a cast back would keep. For frozen weights that nothing else holds
    (ZeRO-2 flattens and shards only the weights its optimiser trains)."""
    weights = [parameter.data for parameter in module.parameters()]
    yield
    for parameter, weight in zip(module.parameters(), weights, strict=True):
        parameter.data = weight.to(parameter.device)


def intact_checkpoint(path: Path) -> Path:
    """`path`, or its backup when the save replacing it was killed between its two renames (`commit_folder`)."""
    backup = backup_folder(path)
    return backup if not path.exists() and backup.is_dir() else path


def remove_partial_folders(folder: Path) -> None:
    """Delete the partial checkpoint folders that killed saves left in `folder`."""
    for stale in folder.glob(f".*{PARTIAL_SUFFIX}"):
        if stale.is_dir():
            shutil.rmtree(stale)


def keep_trainable_weights(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """`state_dict` post-hook: drop every entry of `module` that is not a trainable parameter."""
    trainable = {prefix + name for name, parameter in module.named_parameters() if parameter.requires_grad}
    for key in [key for key in state_dict if key.startswith(prefix) and key not in trainable]:
        del state_dict[key]
