"""Storyboard groups as tensors: shots, references, their texts and role masks (DESIGN §2 notation).

Geometry:
- shots (and their masks) are resized to COVER the target (H, W), keeping their aspect, then centre-cropped;
- references (and their masks) are resized to FIT inside (H, W), keeping their aspect, and centred on a white
  canvas (masks on 0): the letterbox of DESIGN §2 "references are resized and padded".
Images are resampled bicubically (anti-aliased when shrinking), masks with nearest neighbour through the
same geometry, so a mask stays on its role's pixels.

A storyboard with more shots than `max_shots` is cut to a window of `max_shots` consecutive shots. In training
the window start is drawn from a generator seeded with (seed, index, epoch); the epoch travels with the index
(`dataset[(index, epoch)]`, a `SampleKey`), so DataLoader workers, persistent or not, need no shared state. In
evaluation the window is the first `max_shots` shots.

With a `LatentCache` (data.cache_dir) a sample carries the cached VAE latents and umT5 embeddings of its
window instead of the shot and reference images, which are then never decoded; masks are still read.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from dreamshot.data.bucketing import SampleKey, aspect_bucket
from dreamshot.data.manifest import MASK_MODES, StoryboardRecord
from dreamshot.utils.errors import DataError
from dreamshot.utils.images import open_oriented, oriented_size, to_rgb

if TYPE_CHECKING:
    from dreamshot.data.cache import LatentCache

Resolution = tuple[int, int]
# (shots after windowing, references, (H, W)): samples sharing a key can be stacked into one batch.
BucketKey = tuple[int, int, Resolution]
WHITE = (255, 255, 255)


class StoryboardDataset(Dataset):
    """Map-style dataset over validated manifest records.

    Args:
        records: the storyboard groups (from `load_manifest`).
        resolution: (H, W) for every record, or one (H, W) per record (aspect buckets).
        max_shots: longest shot window returned.
        seed: seeds the training window choice.
        train: random windows (True) or the first window (False).
        cache: serve cached latents and embeddings instead of images (it must hold every record's).
    """

    def __init__(
        self,
        records: Sequence[StoryboardRecord],
        resolution: Resolution | Sequence[Resolution],
        max_shots: int,
        seed: int = 0,
        train: bool = True,
        cache: LatentCache | None = None,
    ) -> None:
        if max_shots < 1:
            raise ValueError(f"max_shots must be >= 1, got {max_shots}")
        self.records = list(records)
        self.resolutions = _per_record(resolution, len(self.records))
        self.max_shots, self.seed, self.train, self.cache = max_shots, seed, train, cache

    def __len__(self) -> int:
        return len(self.records)

    def with_cache(self, cache: LatentCache | None) -> StoryboardDataset:
        """The same samples, with the latents of `cache` instead of images (None: with images)."""
        return StoryboardDataset(self.records, self.resolutions, self.max_shots, self.seed, self.train, cache)

    def num_shots(self, index: int) -> int:
        return min(len(self.records[index].shots), self.max_shots)

    def bucket_keys(self) -> list[BucketKey]:
        """The batching key of every record: (shots after windowing, references, (H, W))."""
        return [
            (self.num_shots(i), len(record.references), self.resolutions[i]) for i, record in enumerate(self.records)
        ]

    def window(self, index: int, epoch: int = 0) -> range:
        """Indices of the shots returned for record `index` in `epoch`."""
        starts = window_starts(len(self.records[index].shots), self.max_shots)
        start = 0
        if self.train and len(starts) > 1:
            start = int(np.random.default_rng([self.seed, index, epoch]).integers(len(starts)))
        return range(start, start + self.num_shots(index))

    def __getitem__(self, key: int | tuple[int, int] | SampleKey) -> dict:
        """`dataset[index]` (epoch 0), `dataset[(index, epoch)]` or `dataset[SampleKey(...)]`. With N shots,
        K references at (H, W):

        id, source: str; shots (N, 3, H, W) float32 in [-1, 1]; shot_texts: N str;
        refs (K, 3, H, W) float32 in [-1, 1]; ref_texts: K str; ref_masks (K, H, W) float32 in {0, 1};
        shot_masks (N, K, H, W) float32 in {0, 1}: role k (reference order) in shot n, zeros where absent;
        repeat: bool, step_samples: int | None, as the key gives them (for the batch).
        With a cache, `latents` (see `LatentCache.load`) replaces shots and refs.
        """
        key = key if isinstance(key, SampleKey) else SampleKey(*key) if isinstance(key, tuple) else SampleKey(key)
        index, epoch = key.index, key.epoch
        record, size = self.records[index], self.resolutions[index]
        window = self.window(index, epoch)
        sample = {
            "id": record.id,
            "source": record.source,
            "shot_texts": [record.shots[n].annotation for n in window],
            "ref_texts": [ref.prompt for ref in record.references],
            "ref_masks": _stack(
                [_load_reference_mask(record, k, size) for k in range(len(record.references))], (0, *size)
            ),
            "shot_masks": torch.stack([_load_shot_masks(record, n, size) for n in window]),
            "repeat": key.repeat,
            "step_samples": key.step_samples,
        }
        if self.cache is not None:
            sample["latents"] = self.cache.load(record.id, size, window)
        else:
            sample["shots"], sample["refs"] = load_images(record, size, window)
        return sample


def window_starts(total_shots: int, max_shots: int) -> range:
    """Every start of a window of min(total, max_shots) consecutive shots: one unless the group is longer."""
    return range(max(total_shots - max_shots, 0) + 1)


def record_resolutions(
    records: Sequence[StoryboardRecord], target: Resolution, aspect_buckets: bool
) -> list[Resolution]:
    """The (H, W) of every record at training resolution `target`: `target`, or the aspect bucket of the
    record's first shot (read from the image header, without decoding)."""
    if not aspect_buckets:
        return [target] * len(records)
    return [aspect_bucket(*_image_height_width(r.shots[0].image), target) for r in records]


def load_images(
    record: StoryboardRecord, size: Resolution, window: Sequence[int] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The shots of `window` (default: all) covering `size` and the letterboxed references:
    (N, 3, H, W), (K, 3, H, W) float32 in [-1, 1]."""
    window = range(len(record.shots)) if window is None else window
    shots = torch.stack([_load_shot_image(record, n, size) for n in window])
    refs = [_load_reference_image(record, k, size) for k in range(len(record.references))]
    return shots, _stack(refs, (0, 3, *size))


def _load_shot_image(record: StoryboardRecord, n: int, size: Resolution) -> torch.Tensor:
    """Shot n covering `size`: (3, H, W)."""
    where = f"record {record.id!r}: shots[{n}].image"
    return _rgb_tensor(cover(_load_rgb(record.shots[n].image, where), size, Image.BICUBIC))


def _load_shot_masks(record: StoryboardRecord, n: int, size: Resolution) -> torch.Tensor:
    """Role masks of shot n covering `size`: (K, H, W) in reference order, zeros for absent roles."""
    shot, where = record.shots[n], f"record {record.id!r}: shots[{n}]"
    masks = [
        _mask_tensor(cover(_load_mask(shot.masks[ref.role], f"{where}.masks.{ref.role}"), size, Image.NEAREST))
        if ref.role in shot.masks
        else torch.zeros(size)
        for ref in record.references
    ]
    return _stack(masks, (0, *size))


def _load_reference_image(record: StoryboardRecord, k: int, size: Resolution) -> torch.Tensor:
    """Reference k letterboxed into `size`: (3, H, W)."""
    where = f"record {record.id!r}: references[{k}].image"
    return _rgb_tensor(letterbox(_load_rgb(record.references[k].image, where), size, Image.BICUBIC, WHITE))


def _load_reference_mask(record: StoryboardRecord, k: int, size: Resolution) -> torch.Tensor:
    """The mask of reference k, letterboxed like its image: (H, W)."""
    where = f"record {record.id!r}: references[{k}].mask"
    return _mask_tensor(letterbox(_load_mask(record.references[k].mask, where), size, Image.NEAREST, 0))


def _per_record(resolution: Resolution | Sequence[Resolution], count: int) -> list[Resolution]:
    if len(resolution) == 2 and all(isinstance(side, int) for side in resolution):
        return [(int(resolution[0]), int(resolution[1]))] * count
    if len(resolution) != count:
        raise ValueError(f"got {len(resolution)} resolutions for {count} records")
    return [(int(h), int(w)) for h, w in resolution]


# --- geometry ----------------------------------------------------------------------------------------------


def cover(image: Image.Image, size: Resolution, resample: int) -> Image.Image:
    """Resize `image` to cover `size` (H, W) keeping its aspect, then centre-crop to exactly `size`."""
    height, width = size
    scale = max(height / image.height, width / image.width)
    crop_w, crop_h = width / scale, height / scale
    left, top = (image.width - crop_w) / 2, (image.height - crop_h) / 2
    return image.resize((width, height), resample, box=(left, top, left + crop_w, top + crop_h))


def letterbox(image: Image.Image, size: Resolution, resample: int, fill: int | tuple[int, ...]) -> Image.Image:
    """Resize `image` to fit inside `size` (H, W) keeping its aspect, centred on a canvas of colour `fill`."""
    height, width = size
    scale = min(height / image.height, width / image.width)
    inner_w = max(1, round(image.width * scale))
    inner_h = max(1, round(image.height * scale))
    canvas = Image.new(image.mode, (width, height), fill)
    canvas.paste(image.resize((inner_w, inner_h), resample), ((width - inner_w) // 2, (height - inner_h) // 2))
    return canvas


# --- decoding ----------------------------------------------------------------------------------------------


def _load_rgb(path: Path, where: str) -> Image.Image:
    return to_rgb(_decode(path, where))


def _load_mask(path: Path, where: str) -> Image.Image:
    """A mask as mode L with values 0 / 255 (mode 1 masks are converted)."""
    mask = _decode(path, where)
    if mask.mode not in MASK_MODES:
        raise DataError(f"{where}: mask {path} has mode {mask.mode} (expected L or 1)")
    mask = mask.convert("L")
    values = np.asarray(mask)
    if not ((values == 0) | (values == 255)).all():
        raise DataError(f"{where}: mask {path} has values other than 0 and 255")
    return mask


def _decode(path: Path, where: str) -> Image.Image:
    try:
        return open_oriented(path)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"{where}: cannot decode {path} ({' '.join(str(e).split())})") from None


def _rgb_tensor(image: Image.Image) -> torch.Tensor:
    """(3, H, W) float32 in [-1, 1]."""
    pixels = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))


def _mask_tensor(mask: Image.Image) -> torch.Tensor:
    """(H, W) float32 in {0, 1}."""
    return torch.from_numpy((np.asarray(mask) > 127).astype(np.float32))


def _stack(tensors: list[torch.Tensor], empty_shape: tuple[int, ...]) -> torch.Tensor:
    return torch.stack(tensors) if tensors else torch.zeros(empty_shape)


def _image_height_width(path: Path) -> tuple[int, int]:
    with Image.open(path) as image:
        width, height = oriented_size(image)
    return height, width
