"""Stage 5, scene-wise grouping (appendix A.1, Fig. 10): keyframes into storyboard groups.

A judge sees the keyframes a few at a time (a window of `grouping.window`, consecutive windows sharing
`grouping.overlap`) and labels them: keyframes with one label form one coherent sequence of one scene,
None fits no sequence. The windows are merged through their shared keyframes: two keyframes judged together
in one or more windows are linked when more of those windows put them in one group than apart, groups are
the linked sets (so a group crosses window borders through the overlap), and a keyframe that most of its
windows left out is dropped. Groups keep temporal order; groups shorter than `grouping.min_shots` are
dropped and longer than `grouping.max_shots` split into equal consecutive parts (`split_group`: never
under `grouping.min_shots`).

Unit: keyframes (kept = keyframes in a group).
"""

from __future__ import annotations

import math
from typing import Protocol

import cv2
import numpy as np

from dreamshot.prepare.config import GroupingConfig, PrepareConfig
from dreamshot.prepare.files import load_rgb
from dreamshot.prepare.stage import StageResult, VideoJob

UNIT = "keyframes"


class GroupJudge(Protocol):
    """Decides which keyframes of a window belong to one storyboard group."""

    def group(self, images: list[np.ndarray]) -> list[int | None]:
        """Per RGB (H, W, 3) uint8 image, in temporal order: a group label (equal labels = one group) or
        None for a keyframe that fits no coherent sequence."""
        ...


def run(job: VideoJob, inputs: dict, cfg: PrepareConfig, backends) -> StageResult:
    keyframes = inputs["quality"]["keyframes"]
    images = [load_rgb(job.out_dir / kf["image"]) for kf in keyframes]
    spans = windows(len(images), cfg.grouping.window, cfg.grouping.overlap)
    labels = [backends.judge.group([images[i] for i in span]) for span in spans]
    groups, outliers = merge_windows(len(images), spans, labels)
    kept, too_short = [], 0
    for members in groups:
        parts = split_group(members, cfg.grouping) if len(members) >= cfg.grouping.min_shots else []
        kept.extend(parts)
        too_short += len(members) - sum(map(len, parts))
    data = {"groups": [[keyframes[i] for i in members] for members in kept]}
    dropped = {"fits no sequence": len(outliers), f"group under {cfg.grouping.min_shots} shots": too_short}
    return StageResult(data, kept=sum(map(len, kept)), dropped={k: n for k, n in dropped.items() if n})


def windows(count: int, size: int, overlap: int) -> list[range]:
    """Consecutive windows of `size` keyframes, each sharing `overlap` with the next; the last one ends at
    `count` (it may share more)."""
    if count <= size:
        return [range(count)] if count else []
    step = size - overlap
    starts = list(range(0, count - size, step)) + [count - size]
    return [range(start, start + size) for start in starts]


def merge_windows(count: int, spans: list[range], labels: list[list[int | None]]) -> tuple[list[list[int]], list[int]]:
    """Groups (sorted lists of keyframe indices, ordered by first member) and the outliers, from the
    judge's labels of each window (see the module docstring)."""
    together = np.zeros((count, count), dtype=np.int64)
    apart = np.zeros((count, count), dtype=np.int64)
    left_out = np.zeros(count, dtype=np.int64)
    seen = np.zeros(count, dtype=np.int64)
    for span, window_labels in zip(spans, labels, strict=True):
        members = np.array(list(span))
        tags = np.array([-1 if label is None else label for label in window_labels])
        seen[members] += 1
        left_out[members[tags < 0]] += 1
        judged = members[tags >= 0]
        same = tags[tags >= 0][:, None] == tags[tags >= 0][None, :]
        together[np.ix_(judged, judged)] += same
        apart[np.ix_(judged, judged)] += ~same
    outliers = [i for i in range(count) if 2 * left_out[i] > seen[i]]
    parent = list(range(count))
    for i, j in zip(*np.nonzero(np.triu(together > apart, k=1)), strict=True):
        parent[_root(parent, int(i))] = _root(parent, int(j))
    groups: dict[int, list[int]] = {}
    for i in range(count):
        if i not in outliers:
            groups.setdefault(_root(parent, i), []).append(i)
    return sorted(groups.values()), outliers


def split_group(members: list[int], cfg: GroupingConfig) -> list[list[int]]:
    """A group cut into the fewest consecutive parts of at most `max_shots`, of near-equal sizes, none under
    `min_shots`. When near-equal parts would be under `min_shots` (`max_shots` < 2 * `min_shots` - 1 and a
    group just over `max_shots`), parts of `max_shots` are kept and the rest, under `min_shots`, is left out."""
    parts = math.ceil(len(members) / cfg.max_shots)
    if len(members) // parts >= cfg.min_shots:  # the smallest of near-equal parts
        return [[int(i) for i in part] for part in np.array_split(members, parts)]
    whole = len(members) // cfg.max_shots
    return [members[k * cfg.max_shots : (k + 1) * cfg.max_shots] for k in range(whole)]


def _root(parent: list[int], i: int) -> int:
    while parent[i] != i:
        parent[i] = parent[parent[i]]
        i = parent[i]
    return i


class FeatureJudge:
    """`GroupJudge` offline: colour-layout similarity. A keyframe joins the most similar group of the window
    (similarity to its closest member) when that is >= `threshold`, else starts a new one; none is left out.

    The feature is a colour histogram (16 levels per RGB channel) of the top, middle and bottom thirds of
    the frame, and the similarity the mean histogram intersection of the thirds, in [0, 1]: a scene's
    palette (sky, floor, walls, light) fills each third the same way from shot to shot while framing changes.
    """

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold

    def group(self, images: list[np.ndarray]) -> list[int | None]:
        features = [colour_layout(image) for image in images]
        labels: list[int | None] = []
        for i, feature in enumerate(features):
            sims = [similarity(feature, features[j]) for j in range(i)]
            best = int(np.argmax(sims)) if sims else -1
            labels.append(labels[best] if best >= 0 and sims[best] >= self.threshold else i)
        return labels


def colour_layout(image: np.ndarray, levels: int = 16, bands: int = 3) -> np.ndarray:
    """Per horizontal band, the normalised joint RGB histogram: (bands, levels**3) float."""
    small = cv2.resize(image, (48, 27), interpolation=cv2.INTER_AREA)
    q = small.astype(np.int64) * levels // 256
    code = (q[..., 0] * levels + q[..., 1]) * levels + q[..., 2]
    return np.stack(
        [np.bincount(rows.ravel(), minlength=levels**3) / rows.size for rows in np.array_split(code, bands)]
    )


def similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Mean histogram intersection of two `colour_layout` features, in [0, 1]."""
    return float(np.minimum(a, b).sum(axis=1).mean())
