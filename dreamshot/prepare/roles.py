"""Stage 6, role extraction and story annotation (appendix A.1): storyboard records for the manifest.

Per group: the segmenter finds character regions in every shot; regions of different shots that look
alike are one role (the paper merges the duplicates with a VLM; here by colour similarity), at most
`roles.max_roles` roles, the ones seen in most shots. A role's reference is its largest region, cropped
from its shot (the paper adds views from other scenes and generated ones, which need video models). The
annotator writes the shot annotations, role prompts and style. Both are interfaces: every record gets
masks and text, and `provenance` says whether each came from a model or is an offline placeholder.

Unit: groups.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import cv2
import numpy as np
from scipy.ndimage import binary_fill_holes

from dreamshot.data.toyworld import role_tag
from dreamshot.prepare.config import PrepareConfig, RolesConfig
from dreamshot.prepare.files import load_rgb, save_png
from dreamshot.prepare.stage import StageResult, VideoJob

UNIT = "groups"


class Segmenter(Protocol):
    """Finds the characters of a shot. `placeholder` is True for a heuristic standing in for a model."""

    name: str
    placeholder: bool

    def segment(self, image: np.ndarray) -> list[np.ndarray]:
        """Instance masks (H, W) bool of the characters in an RGB (H, W, 3) uint8 image."""
        ...


@dataclass
class Annotation:
    """A group's text: one annotation per shot, one prompt per role, and the style."""

    shots: list[str]
    roles: list[str]
    style: str


class Annotator(Protocol):
    """Writes a group's text. `placeholder` is True for template text standing in for a model."""

    name: str
    placeholder: bool

    def annotate(
        self, shots: list[np.ndarray], shot_roles: list[list[int]], references: list[np.ndarray]
    ) -> Annotation:
        """`shots`: RGB images; `shot_roles`: per shot, the role indices visible (role k is `<Role k+1>`);
        `references`: per role, its reference crop."""
        ...


@dataclass
class Role:
    """A role of a group: its colour feature and its region (mask) in each shot it appears in."""

    feature: np.ndarray
    masks: dict[int, np.ndarray]


def run(job: VideoJob, inputs: dict, cfg: PrepareConfig, backends) -> StageResult:
    records = [
        build_record(job, number, group, cfg.roles, backends)
        for number, group in enumerate(inputs["grouping"]["groups"])
    ]
    provenance = {
        "masks": _provenance(backends.segmenter),
        "text": _provenance(backends.annotator),
    }
    return StageResult({"records": records, "provenance": provenance}, kept=len(records), files=_written(records))


def _written(records: list[dict]) -> list[str]:
    """The masks and references of `records` (the shot images are stage 3's)."""
    files = [path for record in records for ref in record["references"] for path in (ref["image"], ref["mask"])]
    return files + [path for record in records for shot in record["shots"] for path in shot["masks"].values()]


def build_record(job: VideoJob, number: int, group: list[dict], cfg: RolesConfig, backends) -> dict:
    """One manifest record (JSON, paths relative to the output folder) for a group of keyframes."""
    group_id = f"{job.id}-g{number:03d}"
    images = [load_rgb(job.out_dir / keyframe["image"]) for keyframe in group]
    roles = match_roles([_regions(backends.segmenter, image, cfg) for image in images], cfg)
    references = [_reference(images, role) for role in roles]
    shot_roles = [[k for k, role in enumerate(roles) if n in role.masks] for n in range(len(images))]
    text = backends.annotator.annotate(images, shot_roles, [crop for crop, _ in references])

    def save(array: np.ndarray, name: str) -> str:
        path = job.output("groups", group_id, name)
        save_png(array, path)
        return path.relative_to(job.out_dir).as_posix()

    record_refs = [
        {
            "role": f"role{k + 1}",
            "image": save(crop, f"ref_role{k + 1}.png"),
            "prompt": text.roles[k],
            "mask": save(mask, f"ref_role{k + 1}_mask.png"),
        }
        for k, (crop, mask) in enumerate(references)
    ]
    shots = [
        {
            "image": keyframe["image"],
            "annotation": text.shots[n],
            "masks": {
                f"role{k + 1}": save(roles[k].masks[n], f"shot{n + 1:02d}_role{k + 1}.png") for k in shot_roles[n]
            },
        }
        for n, keyframe in enumerate(group)
    ]
    return {"id": group_id, "source": cfg.source, "style": text.style, "references": record_refs, "shots": shots}


def match_roles(regions: list[list[tuple[np.ndarray, np.ndarray]]], cfg: RolesConfig) -> list[Role]:
    """Roles from the (mask, feature) regions of each shot: a region joins the most similar role not yet
    seen in its shot when the similarity is >= `role_similarity`, else starts a role. Returns the
    `max_roles` roles seen in most shots, in order of first appearance."""
    roles: list[Role] = []
    for shot, shot_regions in enumerate(regions):
        for mask, feature in shot_regions:
            free = [k for k, role in enumerate(roles) if shot not in role.masks]
            sims = [_intersection(feature, roles[k].feature) for k in free]
            if sims and max(sims) >= cfg.role_similarity:
                roles[free[int(np.argmax(sims))]].masks[shot] = mask
            else:
                roles.append(Role(feature, {shot: mask}))
    order = sorted(range(len(roles)), key=lambda k: (-len(roles[k].masks), k))[: cfg.max_roles]
    return [roles[k] for k in sorted(order)]


def _regions(segmenter: Segmenter, image: np.ndarray, cfg: RolesConfig) -> list[tuple[np.ndarray, np.ndarray]]:
    """The segmenter's masks large enough to be roles, each with its colour feature."""
    minimum = cfg.min_role_area * image.shape[0] * image.shape[1]
    return [(mask, colour_feature(image, mask)) for mask in segmenter.segment(image) if mask.sum() >= minimum]


def colour_feature(image: np.ndarray, mask: np.ndarray, levels: int = 8) -> np.ndarray:
    """Normalised joint RGB histogram (levels**3,) of the pixels under `mask`."""
    q = image[mask].astype(np.int64) * levels // 256
    codes = (q[:, 0] * levels + q[:, 1]) * levels + q[:, 2]
    return np.bincount(codes, minlength=levels**3) / max(len(codes), 1)


def _intersection(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.minimum(a, b).sum())


def _reference(images: list[np.ndarray], role: Role, margin: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """The role's largest region cut out of its shot with a margin: (crop (h, w, 3), mask (h, w) bool)."""
    shot = max(role.masks, key=lambda n: int(role.masks[n].sum()))
    mask = role.masks[shot]
    ys, xs = np.nonzero(mask)
    pad_y, pad_x = round(margin * (np.ptp(ys) + 1)), round(margin * (np.ptp(xs) + 1))
    top, bottom = max(ys.min() - pad_y, 0), min(ys.max() + 1 + pad_y, mask.shape[0])
    left, right = max(xs.min() - pad_x, 0), min(xs.max() + 1 + pad_x, mask.shape[1])
    return np.ascontiguousarray(images[shot][top:bottom, left:right]), np.ascontiguousarray(
        mask[top:bottom, left:right]
    )


def _provenance(backend) -> str:
    return f"{'placeholder' if backend.placeholder else 'model'}:{backend.name}"


class BorderColourSegmenter:
    """`Segmenter` offline (a placeholder for an instance segmentation model): pixels whose colour differs
    from their row's border pixels (the background at that height) by more than `tolerance` on some channel
    are foreground; its connected parts, holes filled, are the instances. Right for the toy world's flat
    scenes, a rough guess on filmed footage."""

    name = "border_colour"
    placeholder = True

    def __init__(self, tolerance: int = 24, border: int = 4) -> None:
        self.tolerance, self.border = tolerance, border

    def segment(self, image: np.ndarray) -> list[np.ndarray]:
        edge = np.concatenate([image[:, : self.border], image[:, -self.border :]], axis=1)
        background = np.median(edge, axis=1)  # (H, 3): one colour per row
        differs = np.abs(image.astype(np.int16) - background[:, None, :].astype(np.int16)).max(axis=2) > self.tolerance
        # Opening removes compression speckle and one-pixel seams between touching regions.
        differs = cv2.morphologyEx(differs.astype(np.uint8), cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
        count, labels = cv2.connectedComponents(differs, connectivity=8)
        return [binary_fill_holes(labels == k) for k in range(1, count)]


class PlaceholderAnnotator:
    """`Annotator` offline: template text naming the visible roles (a stand-in for a VLM's annotation)."""

    name = "placeholder"
    placeholder = True

    def annotate(
        self, shots: list[np.ndarray], shot_roles: list[list[int]], references: list[np.ndarray]
    ) -> Annotation:
        texts = [
            f"Shot {n + 1}: {', '.join(role_tag(k) for k in roles)}." if roles else f"Shot {n + 1}."
            for n, roles in enumerate(shot_roles)
        ]
        prompts = [f"{role_tag(k)}: a character" for k in range(len(references))]
        return Annotation(texts, prompts, "unannotated")
