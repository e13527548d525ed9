"""The model-backed parts of `dreamshot prepare`, built once from the config before any video is touched
(a backend that cannot be built fails the run at once, not after hours of shot detection)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from dreamshot.config.schema import AestheticConfig
from dreamshot.prepare.config import PrepareConfig
from dreamshot.prepare.grouping import FeatureJudge, GroupJudge
from dreamshot.prepare.overlay import CornerLogoDetector
from dreamshot.prepare.quality import AestheticScorer, OverlayDetector
from dreamshot.prepare.roles import Annotator, BorderColourSegmenter, PlaceholderAnnotator, Segmenter
from dreamshot.utils.errors import WeightsError


@dataclass
class Backends:
    """One instance of each interface (None: that filter is off)."""

    aesthetic: AestheticScorer | None
    overlay: OverlayDetector | None
    judge: GroupJudge
    segmenter: Segmenter
    annotator: Annotator


class EvalAesthetic:
    """`AestheticScorer` over the evaluation's Aesthetic Predictor v2.5 (dreamshot.eval.extractors)."""

    def __init__(self, siglip: str | None, head: str | None) -> None:
        from dreamshot.eval.extractors import load_aesthetic_scorer  # imported here: it pulls in the towers

        for key, value in (("quality.aesthetic_siglip", siglip), ("quality.aesthetic_head", head)):
            if value is None:
                raise WeightsError(f"{key} is not set: quality.aesthetic 'aesthetic_v25' needs local weights")
        self.model = load_aesthetic_scorer(AestheticConfig(siglip=siglip, head=head))

    def score(self, images: list[np.ndarray]) -> list[float]:
        return self.model([Image.fromarray(image) for image in images]).tolist()


def build_backends(cfg: PrepareConfig) -> Backends:
    """The backends named in `cfg` (offline ones by default)."""
    aesthetic = None
    if cfg.quality.aesthetic == "aesthetic_v25":
        aesthetic = EvalAesthetic(cfg.quality.aesthetic_siglip, cfg.quality.aesthetic_head)
    overlay = CornerLogoDetector() if cfg.quality.overlay == "corner_logo" else None
    judge: GroupJudge = FeatureJudge(cfg.grouping.similarity)
    annotator: Annotator = PlaceholderAnnotator()
    if "vlm" in (cfg.grouping.judge, cfg.roles.annotator):
        from dreamshot.prepare import vlm  # imported here: only the vlm backends need the judge client

        client = vlm.build_client(cfg.vlm, "grouping.judge" if cfg.grouping.judge == "vlm" else "roles.annotator")
        if cfg.grouping.judge == "vlm":
            judge = vlm.VlmJudge(client)
        if cfg.roles.annotator == "vlm":
            annotator = vlm.VlmAnnotator(client)
    return Backends(aesthetic, overlay, judge, BorderColourSegmenter(), annotator)
