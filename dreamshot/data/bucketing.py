"""Batching storyboards: samples stack only if they share (shot count, reference count, resolution).

`BucketBatchSampler` draws every batch from one bucket of equal keys, shuffles reproducibly per epoch and
shards batches across data-parallel replicas itself (so Lightning must not inject a DistributedSampler:
`Trainer(use_distributed_sampler=False)`). `aspect_bucket` picks a bucket resolution for an image's aspect.
A loader asks its dataset for `SampleKey`s: besides the storyboard and its data pass they carry what the batch
tells its step (`StoryboardBatch.repeat`, `StoryboardBatch.step_samples`).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import Sampler

from dreamshot.diffusion.conditioning import StoryboardLatents


@dataclass
class StoryboardBatch:
    """A batch of B storyboards with N shots and K references each, at (H, W).

    From a latent cache (data.cache_dir) the batch carries `latents` and no images (shots, refs None).
    Not frozen: Lightning moves dataclass batches to the device by rebuilding their tensor fields.
    """

    ids: list[str]
    sources: list[str]
    shots: torch.Tensor | None  # (B, N, 3, H, W) in [-1, 1]
    shot_texts: list[list[str]]  # B lists of N annotations
    refs: torch.Tensor | None  # (B, K, 3, H, W) in [-1, 1]
    ref_texts: list[list[str]]  # B lists of K role prompts
    ref_masks: torch.Tensor  # (B, K, H, W) in {0, 1}
    shot_masks: torch.Tensor  # (B, N, K, H, W) in {0, 1}: role k in shot n
    # The cached latents and embeddings of the shots and references (masks unset).
    latents: StoryboardLatents | None = None
    # A batch served again so that every rank runs as many batches: validation gives it no weight.
    repeat: bool = False
    # Storyboards in the micro-batches of every data-parallel replica that make up this batch's optimizer step:
    # the batch's share of the step's gradient is batch_size / step_samples. None: unknown (a batch built by hand).
    step_samples: int | None = None

    @property
    def batch_size(self) -> int:
        return self.shot_masks.shape[0]

    @property
    def num_shots(self) -> int:
        return self.shot_masks.shape[1]

    @property
    def num_refs(self) -> int:
        return self.shot_masks.shape[2]


def collate_storyboards(samples: Sequence[dict]) -> StoryboardBatch:
    """Stack `StoryboardDataset` samples (with images, or with cached `latents`); raises ValueError if their
    N, K or (H, W) differ."""
    if not samples:
        raise ValueError("cannot collate an empty list of storyboards")
    first = samples[0]
    for sample in samples[1:]:
        # (N, K, H, W): every dimension a batch must share.
        if sample["shot_masks"].shape != first["shot_masks"].shape:
            raise ValueError(
                f"cannot batch {first['id']!r} with {sample['id']!r}: shot masks of shape "
                f"{tuple(first['shot_masks'].shape)} and {tuple(sample['shot_masks'].shape)} (use BucketBatchSampler)"
            )
    images = "latents" not in first
    return StoryboardBatch(
        ids=[s["id"] for s in samples],
        sources=[s["source"] for s in samples],
        shots=_stack(samples, "shots") if images else None,
        shot_texts=[list(s["shot_texts"]) for s in samples],
        refs=_stack(samples, "refs") if images else None,
        ref_texts=[list(s["ref_texts"]) for s in samples],
        ref_masks=_stack(samples, "ref_masks"),
        shot_masks=_stack(samples, "shot_masks"),
        latents=None if images else _stack_latents([s["latents"] for s in samples]),
        repeat=first.get("repeat", False),
        step_samples=first.get("step_samples"),
    )


def _stack(samples: Sequence[dict], name: str) -> torch.Tensor:
    return torch.stack([s[name] for s in samples])


def _stack_latents(cached: Sequence[dict[str, torch.Tensor]]) -> StoryboardLatents:
    """Samples' cached refs, shots, ref_text, shot_text -> one `StoryboardLatents` with a batch dimension."""
    return StoryboardLatents(**{name: _stack(cached, name) for name in cached[0]})


class SampleKey(NamedTuple):
    """What a loader asks `StoryboardDataset` for: storyboard `index` in data pass `epoch`, and the facts of its batch
    that the collated `StoryboardBatch` carries (`repeat`, `step_samples`)."""

    index: int
    epoch: int = 0
    repeat: bool = False
    step_samples: int | None = None


class BucketBatchSampler(Sampler[list[int]]):
    """Batches of dataset indices whose bucket keys are equal.

    Every epoch (`set_epoch`) the indices inside each bucket and then the order of all batches are shuffled
    with a generator seeded by (seed, epoch). The batch list is padded by repeating its first batches to a
    multiple of `num_replicas`; rank r takes batches r, r + num_replicas, ... so all ranks run the same
    number of steps (`replica_batches` tells the repeats apart). `drop_last` drops each bucket's incomplete last
    batch.
    """

    def __init__(
        self,
        bucket_keys: Sequence[Hashable],
        batch_size: int,
        shuffle: bool,
        seed: int,
        num_replicas: int = 1,
        rank: int = 0,
        drop_last: bool = False,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"need 0 <= rank < num_replicas, got rank {rank} of {num_replicas}")
        self.buckets: dict[Hashable, list[int]] = {}
        for index, key in enumerate(bucket_keys):
            self.buckets.setdefault(key, []).append(index)
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.num_replicas, self.rank, self.drop_last = num_replicas, rank, drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[list[int]]:
        return iter([batch for batch, _ in self.replica_batches()[self.rank]])

    def replica_batches(self) -> list[list[tuple[list[int], bool]]]:
        """Every replica's (batch, repeat) pairs of this epoch, the same on every rank; `repeat`: the batch pads the
        list to a multiple of `num_replicas` and was served already."""
        batches = [(batch, False) for batch in self._batches()]
        if batches:
            batches += [(batches[i % len(batches)][0], True) for i in range(-len(batches) % self.num_replicas)]
        return [batches[rank :: self.num_replicas] for rank in range(self.num_replicas)]

    def __len__(self) -> int:
        rounding = math.floor if self.drop_last else math.ceil
        total = sum(rounding(len(indices) / self.batch_size) for indices in self.buckets.values())
        return math.ceil(total / self.num_replicas)

    def _batches(self) -> list[list[int]]:
        """All replicas' batches of this epoch, before padding; the same list on every rank."""
        rng = np.random.default_rng([self.seed, self.epoch])
        batches = []
        for indices in self.buckets.values():
            order = [int(i) for i in rng.permutation(indices)] if self.shuffle else indices
            for start in range(0, len(order), self.batch_size):
                batch = order[start : start + self.batch_size]
                if len(batch) == self.batch_size or not self.drop_last:
                    batches.append(batch)
        if self.shuffle:
            batches = [batches[int(i)] for i in rng.permutation(len(batches))]
        return batches


def aspect_bucket(height: int, width: int, target: tuple[int, int], multiple: int = 16) -> tuple[int, int]:
    """The bucket (h, w) for an image of `height` x `width`: among sizes with sides that are multiples of
    `multiple` and area close to target H*W, the one whose aspect ratio is closest (in log) to the image's.

    Ties go to the area closest to the target's, then to the shorter height.
    """
    area = target[0] * target[1]
    aspect = math.log(width / height)
    candidates = []
    for h in range(multiple, area // multiple + 1, multiple):
        w = max(multiple, round(area / h / multiple) * multiple)
        candidates.append((abs(math.log(w / h) - aspect), abs(h * w - area), h, w))
    _, _, h, w = min(candidates)
    return h, w
