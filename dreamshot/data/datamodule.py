"""The LightningDataModule: resolves and validates the manifest, splits it, and builds bucketed loaders.

The manifest is `data.manifest`, or the toy world written into `<output_dir>/toyworld`. `prepare_data`, which
Lightning runs on one process per node before `setup`, writes the toy world and checks the manifest's files;
`setup` (every rank) checks the records only. Storyboards longer than `data.max_shots` are cut to windows of that
many shots, or, under context parallelism, of the most shots the planner fits on a device (`shot_window`).
The last `data.val_groups`
groups are held out for validation; `data.sources` then filters the training groups. Batches come from
`BucketBatchSampler`, which shards across ranks itself: the Trainer needs `use_distributed_sampler=False`.
The training loader's state (the batches trained in the current epoch) goes into Lightning's checkpoints, so
a run resumed mid-epoch trains on the same batches as one that was never interrupted.

With curriculum `phases`, every Lightning epoch is one phase (DESIGN §2 "Curriculum"): its loader serves
exactly the phase's steps × `accumulate` batches (as many shuffled passes over the data as that takes) at
the phase's resolution, and the Trainer reloads the loaders at every epoch. Without phases an epoch is one pass,
its first batches repeated up to a whole number of optimizer steps (`accumulate` batches each).

With `data.cache_dir`, `setup` opens the latent cache (`dreamshot cache`), refuses one built with another model,
seed, manifest or `max_shots`, and requires it to hold every group at every phase's resolution; the loaders'
batches then carry the cached latents and embeddings instead of images.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning as L
from torch.utils.data import DataLoader

from dreamshot.config.schema import DataConfig, ModelConfig, PhaseConfig
from dreamshot.data.bucketing import BucketBatchSampler, SampleKey, StoryboardBatch, collate_storyboards
from dreamshot.data.cache import LatentCache, cache_entries, cache_fingerprint
from dreamshot.data.dataset import Resolution, StoryboardDataset, record_resolutions
from dreamshot.data.manifest import StoryboardRecord, load_manifest, manifest_digest
from dreamshot.data.toyworld import ensure_toyworld
from dreamshot.utils.errors import ConfigError

# The datamodule's checkpoint state: the SHA-256 of the manifest trained on.
MANIFEST_SHA256 = "manifest_sha256"
# Data-pass ids of phase p are p * PASS_STRIDE + q: distinct shuffles and shot windows in every pass.
PASS_STRIDE = 100_000
# Stop signals a data worker leaves to the training process (`StoryboardLoader`).
WORKER_IGNORED_SIGNALS = {signal.SIGTERM, signal.SIGINT}


class StoryboardDataModule(L.LightningDataModule):
    def __init__(
        self,
        cfg: DataConfig,
        output_dir: str | Path,
        seed: int,
        phases: Sequence[PhaseConfig] = (),
        accumulate: int = 1,
        model: ModelConfig | None = None,
        shot_window: Callable[[int, int], int] | None = None,
    ) -> None:
        """`model`: the run's model config, which a latent cache (`data.cache_dir`) must have been built with;
        needed only with a cache. `shot_window(references, longest)`: the shots a storyboard with that many
        references may keep, given the manifest's longest (`planner.plan.shot_window`: under context parallelism
        the most that fit the device); None: `data.max_shots`."""
        super().__init__()
        self.cfg, self.output_dir, self.seed = cfg, Path(output_dir), seed
        self.phases, self.accumulate, self.model = list(phases), accumulate, model
        self.shot_window = shot_window
        # Shots per training window: data.max_shots, or shot_window's, set in setup once the manifest is read.
        self.max_shots = cfg.max_shots
        self.cache: LatentCache | None = None
        self.train_records: list[StoryboardRecord] = []
        self.val_records: list[StoryboardRecord] = []
        # The datasets at the current phase's resolution (rebuilt when the phase changes). They give images, for
        # inspection and previews; the loaders read the cache instead when there is one.
        self.train_set: StoryboardDataset | None = None
        self.val_set: StoryboardDataset | None = None
        self._resolution: tuple[int, int] | None = None
        self._prepared = False
        # Saved in checkpoints (as the training loader's state), so a resumed run continues its epoch.
        self.progress = EpochProgress()
        self.manifest_sha256: str | None = None

    def manifest_path(self) -> Path:
        """`data.manifest`, or the toy world's manifest (generated if absent or stale)."""
        if self.cfg.manifest is not None:
            return Path(self.cfg.manifest)
        return ensure_toyworld(self.cfg.toy, self.output_dir / "toyworld")

    def prepare_data(self) -> None:
        # The file checks read every image and mask: done here, once per node, not in every rank's `setup`,
        # and once per process (train() runs it before writing anything, Lightning calls it again).
        if not self._prepared:
            load_manifest(self.manifest_path(), check_files=True)
            self._prepared = True

    def setup(self, stage: str | None = None) -> None:
        if self.train_records:
            return
        manifest = self.manifest_path()
        self.manifest_sha256 = manifest_digest(manifest)
        records = load_manifest(manifest, check_files=False)
        self.max_shots = self.window(records)
        val_groups = self.cfg.val_groups
        if val_groups >= len(records):
            raise ConfigError(f"data.val_groups={val_groups} leaves no training groups: {manifest} has {len(records)}")
        train = records[: len(records) - val_groups]
        if self.cfg.sources is not None:
            train = [r for r in train if r.source in self.cfg.sources]
            if not train:
                raise ConfigError(f"data.sources={list(self.cfg.sources)} keeps no training group of {manifest}")
        self.train_records, self.val_records = train, records[len(records) - val_groups :]
        self.cache = self._open_cache(manifest)
        self._use_resolution(self.resolution())

    def state_dict(self) -> dict[str, str]:
        # In every checkpoint: a resumed run refuses a manifest that changed since (`training/resume.py`).
        return {MANIFEST_SHA256: self.manifest_sha256} if self.manifest_sha256 else {}

    def window(self, records: Sequence[StoryboardRecord]) -> int:
        """Shots per window over all of `records` (every split, as the latent cache holds them)."""
        if self.shot_window is None or not records:
            return self.cfg.max_shots
        return self.shot_window(max(len(r.references) for r in records), max(len(r.shots) for r in records))

    def phase_index(self) -> int:
        """The curriculum phase of the trainer's current epoch (0 without a trainer or phases)."""
        if not self.phases or self.trainer is None:
            return 0
        return min(self.trainer.current_epoch, len(self.phases) - 1)

    def resolution(self) -> tuple[int, int]:
        size = self.phases[self.phase_index()].resolution if self.phases else self.cfg.resolution
        return (size[0], size[1])

    def resolutions(self) -> list[Resolution]:
        """The training resolution of every phase."""
        sizes = [phase.resolution for phase in self.phases] if self.phases else [self.cfg.resolution]
        return [(size[0], size[1]) for size in sizes]

    def cache_entries(self, records: Sequence[StoryboardRecord]) -> list[tuple[StoryboardRecord, Resolution]]:
        """Every (record, (H, W)) that training at the phases' resolutions reads from a latent cache."""
        sizes = [record_resolutions(records, target, self.cfg.aspect_buckets) for target in self.resolutions()]
        return cache_entries(records, sizes)

    def train_dataloader(self) -> DataLoader:
        self._use_resolution(self.resolution())
        length = self.phases[self.phase_index()].steps * self.accumulate if self.phases else None
        return self._loader(self.train_set, shuffle=True, progress=self.progress, length=length)

    def val_dataloader(self) -> DataLoader:
        self._use_resolution(self.resolution())
        return self._loader(self.val_set, shuffle=False)

    def _use_resolution(self, resolution: tuple[int, int]) -> None:
        if resolution != self._resolution:
            self.train_set = self._dataset(self.train_records, train=True, target=resolution)
            self.val_set = self._dataset(self.val_records, train=False, target=resolution)
            self._resolution = resolution

    def on_before_batch_transfer(self, batch: StoryboardBatch, dataloader_idx: int) -> StoryboardBatch:
        # Counted here, not in the loader: Lightning fetches a batch ahead of the one being trained.
        if self.trainer is not None and self.trainer.training:
            self.progress.consumed += 1
        return batch

    def _dataset(self, records: list[StoryboardRecord], train: bool, target: tuple[int, int]) -> StoryboardDataset:
        resolution = record_resolutions(records, target, self.cfg.aspect_buckets)
        return StoryboardDataset(records, resolution, self.max_shots, self.seed, train)

    def _open_cache(self, manifest: Path) -> LatentCache | None:
        """The latent cache of `data.cache_dir` (None without one), checked against this run."""
        if self.cfg.cache_dir is None:
            return None
        if self.model is None:
            raise ValueError("with data.cache_dir, StoryboardDataModule needs the run's model config (model=...)")
        fingerprint = cache_fingerprint(self.model, self.seed, self.max_shots, manifest)
        cache = LatentCache(self.cfg.cache_dir, fingerprint)
        cache.require([(record.id, size) for record, size in self.cache_entries(self.train_records + self.val_records)])
        return cache

    def _loader(
        self,
        dataset: StoryboardDataset | None,
        shuffle: bool,
        progress: EpochProgress | None = None,
        length: int | None = None,
    ) -> DataLoader:
        """The training loader (resumable: with `progress`) or an evaluation loader (without).
        `length`: batches per epoch (a phase), else one pass over the data."""
        if dataset is None:
            raise RuntimeError("StoryboardDataModule.setup() must run before its dataloaders are built")
        # Data-parallel replicas: the ranks of a context-parallel group share one (strategy.py).
        sharding = self.trainer.distributed_sampler_kwargs if self.trainer else None
        replicas, rank = (sharding["num_replicas"], sharding["rank"]) if sharding else (1, 0)
        sampler = BucketBatchSampler(dataset.bucket_keys(), self.cfg.batch_size, shuffle, self.seed, replicas, rank)
        workers = self.cfg.num_workers
        loader_class = StoryboardLoader if progress is None else ResumableLoader
        return loader_class(
            dataset.with_cache(self.cache),
            batch_sampler=EpochBatches(
                sampler, self._trainer_epoch, progress or EpochProgress(), length, self.accumulate if progress else 1
            ),
            collate_fn=collate_storyboards,
            num_workers=workers,
            persistent_workers=workers > 0,
        )

    def _trainer_epoch(self) -> int | None:
        return None if self.trainer is None else self.trainer.current_epoch


@dataclass
class EpochProgress:
    """How many training batches of `epoch` reached the training step."""

    epoch: int = 0
    consumed: int = 0


class EpochBatches:
    """Batch sampler of a loader: the batches of `sampler`, each index keyed with the epoch, `[SampleKey]`.

    The epoch travels with the indices because DataLoader workers hold their own copy of the dataset. It is
    the trainer's epoch when `trainer_epoch()` gives one (Lightning creates a resumed run's first iterator
    before it calls `set_epoch`, but after restoring its epoch), else the sampler's own. The batches that
    `progress` counts as trained in this epoch are skipped, so a run resumed mid-epoch continues the epoch.
    With `length`, an epoch is that many batches drawn from consecutive passes (ids epoch·PASS_STRIDE + q),
    each pass shuffled on its own; the dataset sees the pass id as its epoch. Without, an epoch is one pass, its
    first batches repeated up to a multiple of `multiple` (the micro-batches of an optimizer step): Lightning
    would end the pass with a short step whose loss it still divides by the full accumulation.
    A key also says whether its batch is a repeat (padding, of the sampler's or of this class) and how many
    storyboards the `multiple` consecutive batches of every replica hold together (the step's `step_samples`):
    a bucket's last batch is smaller than the others, and it must weigh less in its step.
    """

    def __init__(
        self,
        sampler: BucketBatchSampler,
        trainer_epoch: Callable[[], int | None],
        progress: EpochProgress,
        length: int | None = None,
        multiple: int = 1,
    ) -> None:
        self.sampler, self.trainer_epoch, self.progress, self.length = sampler, trainer_epoch, progress, length
        self.multiple = multiple
        if length is not None and len(sampler) == 0:
            raise ValueError("cannot draw batches from an empty dataset")

    def __len__(self) -> int:
        # The whole epoch, also when resuming: Lightning counts the batches it trained before.
        return -(-len(self.sampler) // self.multiple) * self.multiple if self.length is None else self.length

    def __iter__(self) -> Iterator[list[SampleKey]]:
        epoch = self.trainer_epoch()
        if epoch is None:
            epoch = self.sampler.epoch
        if self.progress.epoch != epoch:
            self.progress.epoch, self.progress.consumed = epoch, 0
        return iter(self._epoch_batches(epoch)[self.progress.consumed :])

    def _epoch_batches(self, epoch: int) -> list[list[SampleKey]]:
        """This rank's batches of `epoch`, keyed."""
        shares, step = self._replica_epochs(epoch), self.multiple
        # Every replica's share is equally long (the sampler pads them), so steps line up across replicas.
        step_samples = [
            sum(len(batch) for share in shares for batch, _, _ in share[start : start + step])
            for start in range(0, len(shares[0]), step)
        ]
        return [
            [SampleKey(index, pass_id, repeat, step_samples[n // step]) for index in batch]
            for n, (batch, pass_id, repeat) in enumerate(shares[self.sampler.rank])
        ]

    def _replica_epochs(self, epoch: int) -> list[list[tuple[list[int], int, bool]]]:
        """Every replica's (batch, pass id, repeat) of `epoch`."""
        if self.length is None:
            shares = self._pass(epoch)
            padding = -len(shares[0]) % self.multiple
            return [share + [(*share[i % len(share)][:2], True) for i in range(padding)] for share in shares]
        shares = [[] for _ in range(self.sampler.num_replicas)]
        while len(shares[0]) < self.length:
            batches = self._pass(epoch * PASS_STRIDE + len(shares[0]) // len(self.sampler))
            for share, passed in zip(shares, batches, strict=True):
                share += passed
        return [share[: self.length] for share in shares]

    def _pass(self, pass_id: int) -> list[list[tuple[list[int], int, bool]]]:
        self.sampler.set_epoch(pass_id)
        return [[(batch, pass_id, repeat) for batch, repeat in share] for share in self.sampler.replica_batches()]


class StoryboardLoader(DataLoader):
    """A DataLoader whose workers outlive SIGTERM and SIGINT. A scheduler sends SIGTERM to every process of a job
    (SLURM signals the whole job step), and a terminal's Ctrl-C sends SIGINT to its whole foreground group; the
    training process, which finishes its step and saves first (`SaveOnInterrupt`), ends its workers itself. A
    worker stopped by the signal would end the run with a DataLoader error instead ("worker exited unexpectedly"
    once the batches it had queued are used, or at once in a validation pass). A worker inherits the signal mask
    of the process that starts it: both are blocked while workers start, so one that comes before a worker has set
    it aside (torch's own worker handler would die of it) waits and is ignored."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, worker_init_fn=_ignore_stop_signals, **kwargs)

    def __iter__(self) -> Iterator:
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, WORKER_IGNORED_SIGNALS)
        try:
            return super().__iter__()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def _ignore_stop_signals(worker_id: int) -> None:
    for signum in WORKER_IGNORED_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, WORKER_IGNORED_SIGNALS)


class ResumableLoader(StoryboardLoader):
    """A DataLoader over `EpochBatches` whose state is their `EpochProgress`: Lightning stores the state of a
    training loader in checkpoints and restores it before the resumed run's first iteration."""

    def state_dict(self) -> dict[str, int]:
        return asdict(self.batch_sampler.progress)

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.batch_sampler.progress.epoch = state_dict["epoch"]
        self.batch_sampler.progress.consumed = state_dict["consumed"]
