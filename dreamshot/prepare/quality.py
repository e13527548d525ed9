"""Stage 4, quality filters (appendix A.1) on every keyframe of a video.

In order, a keyframe is dropped when it is blurry (variance of the Laplacian below `quality.min_sharpness`,
measured in stage 3 at the analysis width), contentless (grey-level spread below `quality.min_contrast`:
black, faded or flat frames), scored below `quality.min_aesthetic` by the aesthetic backend, or flagged by
the overlay (watermark / subtitle) backend. The first failing test is its reason. Both model backends are
interfaces below; `dreamshot.prepare.backends` builds them from the config.

Unit: keyframes.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from dreamshot.prepare.config import PrepareConfig
from dreamshot.prepare.files import load_rgb
from dreamshot.prepare.stage import StageResult, VideoJob, count

UNIT = "keyframes"


class AestheticScorer(Protocol):
    """Scores images for visual quality on the 1-10 scale of Aesthetic Predictor v2.5."""

    def score(self, images: list[np.ndarray]) -> list[float]:
        """One score per RGB (H, W, 3) uint8 image."""
        ...


class OverlayDetector(Protocol):
    """Finds burnt-in overlays (watermarks, logos, subtitles) in the keyframes of one video."""

    def detect(self, images: list[np.ndarray]) -> list[str | None]:
        """Per RGB (H, W, 3) uint8 image, the overlay found ("watermark", "subtitles", ...) or None.
        All keyframes of a video come in one call: a static logo shows as what they have in common."""
        ...


def run(job: VideoJob, inputs: dict, cfg: PrepareConfig, backends) -> StageResult:
    keyframes = [dict(kf) for kf in inputs["keyframes"]["keyframes"]]  # copies: scores are added to them
    reasons: list[str | None] = [_basic_reason(kf, cfg) for kf in keyframes]
    if backends.aesthetic is not None or backends.overlay is not None:
        reasons = _model_reasons(job, keyframes, reasons, cfg, backends)
    kept = [kf for kf, reason in zip(keyframes, reasons, strict=True) if reason is None]
    return StageResult({"keyframes": kept}, kept=len(kept), dropped=count([r for r in reasons if r]))


def _basic_reason(keyframe: dict, cfg: PrepareConfig) -> str | None:
    if keyframe["sharpness"] < cfg.quality.min_sharpness:
        return "blurry"
    if keyframe["contrast"] < cfg.quality.min_contrast:
        return "contentless"
    return None


def _model_reasons(job: VideoJob, keyframes: list[dict], reasons: list, cfg: PrepareConfig, backends) -> list:
    """`reasons` completed by the aesthetic and overlay backends, for the keyframes still without one."""
    alive = [i for i, reason in enumerate(reasons) if reason is None]
    images = [load_rgb(job.out_dir / keyframes[i]["image"]) for i in alive]
    reasons = list(reasons)
    if backends.aesthetic is not None and images:
        for i, score in zip(alive, backends.aesthetic.score(images), strict=True):
            keyframes[i]["aesthetic"] = float(score)
            if score < cfg.quality.min_aesthetic:
                reasons[i] = "low aesthetic score"
    if backends.overlay is not None and images:
        for i, overlay in zip(alive, backends.overlay.detect(images), strict=True):
            reasons[i] = reasons[i] or overlay
    return reasons
