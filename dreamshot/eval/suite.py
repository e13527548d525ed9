"""Build every metric `cfg.eval.metrics` asks for that a benchmark can have, and say why the others are missing.

A metric whose weights are not configured (its config key unset) is reported as missing with the key to set,
never as zero; a key that is set must name an existing file (else a WeightsError). `toy_proxy` is the
weight-free identity / style proxy of the toy benchmark (colour histograms on role-mask crops), reported
under its own names, never as CIDS or CSD; other benchmarks skip it (it does not apply, so it is not missing).
With a `FeatureCache` every extractor (encoders and the detector) reads it before computing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from dreamshot.config.schema import DetectorConfig, EvalConfig
from dreamshot.eval.benchmarks.types import FACE_TAG, Benchmark
from dreamshot.eval.crops import DetectorCrops, MaskCrops
from dreamshot.eval.detector import CharacterDetector, load_detector
from dreamshot.eval.extractors import (
    ColourHistogram,
    Encoder,
    load_aesthetic_scorer,
    load_clip_encoder,
    load_csd_encoder,
)
from dreamshot.eval.faces import face_models, load_face_encoder, published_ensemble
from dreamshot.eval.feature_cache import CachedDetector, FeatureCache, extractor_identity
from dreamshot.eval.identity import CharacterMatcher
from dreamshot.eval.judge import build_judge
from dreamshot.eval.story_metrics import (
    AestheticMetric,
    AlignmentMetric,
    IdentityMetric,
    ScoredStory,
    StoryMetric,
    StorySample,
    StyleMetric,
)
from dreamshot.utils.errors import ConfigError

log = logging.getLogger(__name__)

JUDGE_CACHE = "judge_cache.jsonl"
# Value names of each metric group, in report order.
VALUE_NAMES = {
    "cids": ("cids_cross", "cids_self"),
    "csd": ("csd_cross", "csd_self"),
    "aes": ("aes",),
    "alignment": (
        "alignment_scene",
        "alignment_camera",
        "alignment_character_action",
        "alignment_single_character_action",
        "alignment",
    ),
    "toy_proxy": ("toy_identity_cross", "toy_identity_self", "toy_style_cross", "toy_style_self"),
}


@dataclass
class MetricSuite:
    """The metrics of one evaluation, and the value names that are missing at build time (name -> reason);
    `missing_values()` adds those of metrics that failed during the run, and those no story has."""

    metrics: dict[str, StoryMetric] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)
    # The extractors' torch models, for `to`.
    models: list[nn.Module] = field(default_factory=list)

    def to(self, device: torch.device) -> None:
        """Move the extractors to `device` (ONNX face models stay on CPU)."""
        for model in self.models:
            model.to(device)

    def update(self, sample: StorySample) -> None:
        for metric in self.metrics.values():
            metric.update(sample)

    def compute(self) -> dict[str, float]:
        return {k: float(v) for metric in self.metrics.values() for k, v in metric.compute().items()}

    def missing_values(self) -> dict[str, str]:
        failed = {name: m.failure for m in self.metrics.values() if m.failure is not None for name in m.names}
        computed = self.compute()
        # A value every story left out (a failure says why instead, when there is one).
        absent = {name: m.why_absent for m in self.metrics.values() for name in m.names if name not in computed}
        return {**self.missing, **absent, **failed}

    def per_story(self) -> dict[str, dict[str, float]]:
        stories: dict[str, dict[str, float]] = {}
        for metric in self.metrics.values():
            for story, values in metric.per_story.items():
                stories.setdefault(story, {}).update(values)
        return stories

    def reset(self) -> None:
        for metric in self.metrics.values():
            metric.reset()

    def scored(self) -> dict[str, dict]:
        """What this process scored, as plain data for the other ranks: per metric, its story values and its
        failure."""
        return {name: {"stories": m.per_story, "failure": m.failure} for name, m in self.metrics.items()}

    def merge(self, parts: list[dict[str, dict]], stories: list[str]) -> None:
        """Start again from every rank's `scored()`, recording the story values in the order of `stories` (the
        benchmark's: a one-process run's order); a metric that failed on any rank fails."""
        self.reset()
        for name, metric in self.metrics.items():
            failure = next((part[name]["failure"] for part in parts if part[name]["failure"]), None)
            if failure is not None:
                metric.failure = failure
            values = {story: v for part in parts for story, v in part[name]["stories"].items()}
            for story in stories:
                if story in values:
                    metric.update(ScoredStory(story, values[story]))


def crop_mode(cfg: EvalConfig, bench: Benchmark) -> str:
    """detector | masks: `eval.crops`, with `auto` choosing masks on the toy benchmark only.

    A benchmark's role masks outline its characters in its own (true) shots; a drawn shot places them where the
    model chose, so outside the toy world (whose weight-free numbers need them) `auto` detects, as the paper's
    protocol (ViStoryBench) does. `masks` stays available, e.g. to score a benchmark's own shots."""
    if cfg.crops == "masks":
        story = next((s for s in bench.stories if not s.has_masks()), None)
        if story is not None:
            raise ConfigError(f"eval.crops=masks, but story {story.id!r} of {bench.name} lacks role masks")
    if cfg.crops == "auto":
        return "masks" if bench.name == "toy" else "detector"
    return cfg.crops


def build_suite(
    cfg: EvalConfig, bench: Benchmark, work_dir: Path, device: torch.device, cache: FeatureCache | None = None
) -> MetricSuite:
    """Load the extractors and build the metrics (weights on `device`, `MetricSuite.to` moves them; ONNX face
    models on CPU)."""
    suite = MetricSuite()

    def place(model: nn.Module) -> nn.Module:
        suite.models.append(model)
        return model.to(device)

    wanted = list(dict.fromkeys(cfg.metrics))
    cached = _Cached(cache)
    with tqdm(total=len(wanted), desc="loading metrics", leave=False, disable=None) as bar:
        with_matcher = {"cids", "alignment"} & set(wanted)
        matcher, why_not = _identity_matcher(cfg, bench, place, cached) if with_matcher else (None, "")
        for name in wanted:
            bar.set_postfix_str(name)
            reason = _add_metric(suite, name, cfg, bench, work_dir, place, matcher, why_not, cached)
            if reason:
                suite.missing.update({value: reason for value in VALUE_NAMES[name] if value not in _names(suite)})
            bar.update()
    return suite


def _add_metric(
    suite: MetricSuite,
    name: str,
    cfg: EvalConfig,
    bench: Benchmark,
    work_dir: Path,
    place: Callable[[nn.Module], nn.Module],
    matcher: CharacterMatcher | None,
    why_not: str,
    cached: _Cached,
) -> str | None:
    """Add metric group `name` to `suite`; returns why it (or part of it) is missing, else None."""
    if name == "cids":
        if matcher is None:
            return why_not
        suite.metrics[name] = IdentityMetric(matcher)
    elif name == "csd":
        if cfg.csd.weights is None:
            return "eval.csd.weights is not set"
        encoder = place(load_csd_encoder(cfg.csd))
        suite.metrics[name] = StyleMetric(cached(encoder, "csd", {"arch": cfg.csd.arch}, [cfg.csd.weights]))
    elif name == "aes":
        if cfg.aes.siglip is None or cfg.aes.head is None:
            return "eval.aes.siglip and eval.aes.head must both be set"
        scorer = place(load_aesthetic_scorer(cfg.aes))
        suite.metrics[name] = AestheticMetric(cached(scorer, "aes", {}, [cfg.aes.siglip, cfg.aes.head]))
    elif name == "alignment":
        if cfg.judge.endpoint is None:
            return "eval.judge.endpoint is not set"
        suite.metrics[name] = AlignmentMetric(build_judge(cfg.judge, work_dir / JUDGE_CACHE), matcher)
        return None if matcher is not None else f"single-character action needs character crops: {why_not}"
    elif name == "toy_proxy" and bench.name == "toy":
        histogram = ColourHistogram()
        histogram = cached(histogram, "colour_histogram", {"bins": histogram.bins})
        proxy = CharacterMatcher(MaskCrops(), {"general": histogram})
        suite.metrics["toy_identity"] = IdentityMetric(proxy, prefix="toy_identity")
        suite.metrics["toy_style"] = StyleMetric(histogram, prefix="toy_style")
    return None


def _identity_matcher(
    cfg: EvalConfig, bench: Benchmark, place: Callable[[nn.Module], nn.Module], cached: _Cached
) -> tuple[CharacterMatcher | None, str]:
    """The CIDS matcher, or None and the config key(s) to set."""
    tags = {c.tag for c in bench.characters()}
    mode = crop_mode(cfg, bench)
    unset = []
    if mode == "detector" and cfg.detector.weights is None:
        unset.append("eval.detector.weights")
    if tags - {FACE_TAG} and cfg.clip.weights is None:
        unset.append("eval.clip.weights")
    if FACE_TAG in tags and (cfg.face.detector is None or not face_models(cfg.face)):
        unset.append("eval.face.detector and eval.face.recognizers / adaface / facenet")
    if unset:
        return None, f"{', '.join(unset)} not set"
    encoders = {}
    if tags - {FACE_TAG}:
        clip = place(load_clip_encoder(cfg.clip))
        encoders["general"] = cached(clip, "clip", {"arch": cfg.clip.arch}, [cfg.clip.weights])
    if FACE_TAG in tags:
        face = cfg.face
        weights = [face.detector, *face.recognizers, face.adaface, face.facenet]
        encoders["face"] = cached(load_face_encoder(face), "face", {"det_size": face.det_size}, weights)
        if not published_ensemble(cfg.face):
            _warn_face_ensemble(cfg, bench)
    if mode == "masks":
        return CharacterMatcher(MaskCrops(), encoders), ""
    detector = cached.detector(place(load_detector(cfg.detector)), cfg.detector)
    return CharacterMatcher(DetectorCrops(detector), encoders), ""


def _warn_face_ensemble(cfg: EvalConfig, bench: Benchmark) -> None:
    stories = [s.id for s in bench.stories if any(c.tag == FACE_TAG for c in s.characters.values())]
    log.warning(
        "CIDS of %d %s stories with realistic_human characters uses the face model(s) %s; every published CIDS "
        "averages ArcFace, AdaFace IR-101 and FaceNet (set eval.face.recognizers, eval.face.adaface and "
        "eval.face.facenet: docs/evaluation.md)",
        len(stories),
        bench.name,
        " + ".join(face_models(cfg.face)),
    )


class _Cached:
    """Wraps an encoder with the feature cache (when there is one) under its identity."""

    def __init__(self, cache: FeatureCache | None) -> None:
        self.cache = cache

    def __call__(self, encoder: Encoder, kind: str, settings: dict, weights: list | None = None) -> Encoder:
        if self.cache is None:
            return encoder
        return self.cache.encoder(encoder, extractor_identity(kind, settings, weights or []))

    def detector(self, detector: CharacterDetector, cfg: DetectorConfig) -> CharacterDetector | CachedDetector:
        if self.cache is None:
            return detector
        settings = {"prompt": cfg.prompt, "box": cfg.box_threshold, "text": cfg.text_threshold}
        return self.cache.detector(detector, extractor_identity("detector", settings, [cfg.weights]))


def _names(suite: MetricSuite) -> set[str]:
    return {name for metric in suite.metrics.values() for name in metric.names}
