"""Extracted features cached per image, so that scoring a story again runs no encoder or detector.

A feature is keyed by the extractor's identity (`FEATURES_VERSION`, its kind, the settings that change its
output, and the path, size and modification time of every weight file it read) and the SHA-256 of the image's pixels
(`judge.image_hash`): new weights, another prompt or another image miss the cache, a rescore of the same
shots hits it. Shards live in `<out>/features/`, one safetensors file per story (written atomically once the
story is scored, holding every feature the story used), so ranks scoring different stories never write the
same file and a story scored again replaces its own shard.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from dreamshot.eval.detector import CharacterDetector, crop_boxes
from dreamshot.eval.extractors import Encoder
from dreamshot.eval.judge import image_hash
from dreamshot.utils.io import atomic_path

FEATURES_DIR = "features"
# Part of every extractor's identity: bumped when a change to the code changes an extractor's output (2: CLIP's
# resize sizes the long side as transformers' CLIPImageProcessor does), so old folders' features are not reused.
FEATURES_VERSION = 2


def extractor_identity(kind: str, settings: dict, weights: Iterable[str | Path | None] = ()) -> str:
    """A short digest of what an extractor computes: `FEATURES_VERSION`, `kind`, `settings` and the stat of every
    weight file (every file under a weight folder)."""
    files = []
    for weight in weights:
        if weight is None:
            continue
        root = Path(weight).expanduser().resolve()
        paths = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
        files += [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in paths]
    text = json.dumps([FEATURES_VERSION, kind, settings, files], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class FeatureCache:
    """Every shard of `folder`, and the features used since the last `flush`."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.features: dict[str, torch.Tensor] = {}
        self.used: dict[str, torch.Tensor] = {}
        self.misses = 0
        for shard in sorted(folder.glob("*.safetensors")) if folder.is_dir() else []:
            try:
                self.features.update(load_file(shard))
            except (SafetensorError, OSError):
                continue  # a damaged shard only costs its features being computed again

    def rows(self, identity: str, images: Sequence[Image.Image], compute) -> list[torch.Tensor]:
        """One feature per image: cached ones as they are, the others from `compute(missing images)` (one call,
        rows in order)."""
        keys = [f"{identity}:{image_hash(image)}" for image in images]
        missing = [i for i, key in enumerate(keys) if key not in self.features]
        if missing:
            self.misses += len(missing)
            for i, row in zip(missing, compute([images[i] for i in missing]), strict=True):
                self.features[keys[i]] = row.contiguous()
        self.used.update({key: self.features[key] for key in keys})
        return [self.features[key] for key in keys]

    def encoder(self, encoder: Encoder, identity: str) -> CachedEncoder:
        return CachedEncoder(encoder, identity, self)

    def detector(self, detector: CharacterDetector, identity: str) -> CachedDetector:
        return CachedDetector(detector, identity, self)

    def flush(self, story_id: str) -> None:
        """Write the story's shard when it computed anything new; start the next story."""
        if self.misses:
            name = hashlib.sha256(story_id.encode()).hexdigest()[:16]
            with atomic_path(self.folder / f"{name}.safetensors") as tmp:
                save_file(self.used, str(tmp), metadata={"story": story_id})
        self.used, self.misses = {}, 0


class CachedEncoder:
    """An `Encoder` that reads the cache first: (N, D) features (or (N,) scores) of a list of images."""

    def __init__(self, encoder: Encoder, identity: str, cache: FeatureCache) -> None:
        self.encoder, self.identity, self.cache = encoder, identity, cache

    def __call__(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return torch.stack(self.cache.rows(self.identity, images, self.encoder))


class CachedDetector:
    """A `CharacterDetector` whose detections (boxes and scores, as (n, 5) rows) are read from the cache first."""

    def __init__(self, detector: CharacterDetector, identity: str, cache: FeatureCache) -> None:
        self.detector, self.identity, self.cache = detector, identity, cache

    def detect(self, image: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        (rows,) = self.cache.rows(self.identity, [image], self._compute)
        return rows[:, :4], rows[:, 4]

    def crops(self, image: Image.Image, limit: int | None = None) -> list[Image.Image]:
        return crop_boxes(image, self.detect(image.convert("RGB"))[0], limit)

    def _compute(self, images: Sequence[Image.Image]) -> list[torch.Tensor]:
        return [torch.cat([boxes, scores[:, None]], dim=1) for boxes, scores in map(self.detector.detect, images)]
