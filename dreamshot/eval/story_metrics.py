"""torchmetrics `Metric`s over stories: each `update` scores one story's generated shots with the extractors
and the pure functions of `metrics`; `compute` is the plain mean over the stories seen (EVAL.md "Common").

The per-story values are kept in `per_story` (story id -> values) for the results files. Processes are merged
by their per-story values, not by syncing states: a story scored elsewhere is given to `update` as a
`ScoredStory`, in benchmark order, so a merged run sums exactly as one process does (`compute` never syncs).
"""

from __future__ import annotations

import logging
import math
from abc import abstractmethod
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from PIL import Image
from torchmetrics import Metric

from dreamshot.eval.benchmarks.types import BenchStory
from dreamshot.eval.extractors import AestheticScorer, Encoder
from dreamshot.eval.identity import CharacterMatcher, StoryMatches
from dreamshot.eval.judge import Judge, JudgeUnavailable, Question
from dreamshot.eval.metrics import (
    ALIGNMENT_DIMENSIONS,
    alignment_score,
    character_identity,
    mean,
    rounded_mean,
    story_identity,
    style_cross,
    style_self,
)
from dreamshot.eval.reading import open_as_published

log = logging.getLogger(__name__)


class StorySample:
    """One story and its generated shots (1-based shot index -> RGB image), as every metric sees them.

    Character matching is shared: the first metric that asks a matcher for this story computes it.
    """

    def __init__(self, story: BenchStory, shots: Mapping[int, Image.Image]) -> None:
        self.story = story
        self.shots = dict(sorted(shots.items()))
        self._matches: dict[int, StoryMatches] = {}

    def matches(self, matcher: CharacterMatcher) -> StoryMatches:
        if id(matcher) not in self._matches:
            self._matches[id(matcher)] = matcher.match(self.story, self.shots)
        return self._matches[id(matcher)]


@dataclass(frozen=True)
class ScoredStory:
    """A story's values as `StoryMetric.score` gave them (on another rank): recorded, not scored again."""

    story: str
    values: dict[str, float]


class StoryMetric(Metric):
    """Mean over stories of the values `score(sample)` returns (a value a story lacks is left out of its mean).

    `failure` says why the metric has no values at all for this run (set by `score`; it outlives `reset`);
    `why_absent` why a value no story has is missing from `compute` (not a failure: every story left it out).
    """

    full_state_update = False
    higher_is_better = True
    failure: str | None = None
    why_absent = "no story has a value"

    def __init__(self, names: tuple[str, ...]) -> None:
        super().__init__(sync_on_compute=False)
        self.names = names
        self.add_state("total", default=torch.zeros(len(names), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.zeros(len(names), dtype=torch.float64), dist_reduce_fx="sum")
        self.per_story: dict[str, dict[str, float]] = {}

    @abstractmethod
    def score(self, sample: StorySample) -> dict[str, float]:
        """One story's values, by name."""

    def update(self, sample: StorySample | ScoredStory) -> None:
        if isinstance(sample, ScoredStory):
            story, values = sample.story, sample.values
        else:
            story, values = sample.story.id, finite_values(sample.story.id, self.score(sample))
        if self.failure is not None:
            self.per_story = {}
            return
        self.per_story[story] = values
        for i, name in enumerate(self.names):
            if name in values:
                self.total[i] += values[name]
                self.count[i] += 1

    def compute(self) -> dict[str, torch.Tensor]:
        if self.failure is not None:
            return {}
        return {name: self.total[i] / self.count[i] for i, name in enumerate(self.names) if self.count[i] > 0}

    def reset(self) -> None:
        super().reset()
        self.per_story = {}


def finite_values(story: str, values: dict[str, float]) -> dict[str, float]:
    """`values` without the NaN / infinite ones (an extractor's degenerate output), each named in a warning: a story
    without a value is left out of its mean (and counted out in the results), never averaged in as NaN."""
    bad = {name: value for name, value in values.items() if not math.isfinite(value)}
    if bad:
        log.warning("story %s: %s, left out of the mean", story, ", ".join(f"{k} is {v}" for k, v in bad.items()))
    return {name: value for name, value in values.items() if name not in bad}


class IdentityMetric(StoryMetric):
    """CIDS (`prefix` "cids"; "toy_identity" for the toy proxy): `<prefix>_cross` and `<prefix>_self`, the
    story means over ALL its characters (one never found scores 0 and stays in the mean; `scored_characters`:
    one listed only in unscored shots, an s2s story's given ones, is not among them). A story with a
    character whose references give no feature has no value (ViStoryBench's CIDS fails on it)."""

    why_absent = "every story has a character whose references give no feature (see the warnings)"

    def __init__(self, matcher: CharacterMatcher, prefix: str = "cids") -> None:
        super().__init__((f"{prefix}_cross", f"{prefix}_self"))
        self.matcher = matcher

    def score(self, sample: StorySample) -> dict[str, float]:
        found = sample.matches(self.matcher)
        if found.unusable:
            return {}
        scores = []
        for key in scored_characters(sample):
            matched = [m.feature for m in found.matches[key]]
            features = torch.stack(matched) if matched else torch.zeros(0, 0)
            scores.append(character_identity(features, found.references[key]))
        story = story_identity(scores)
        return dict(zip(self.names, (story.cross, story.self), strict=True))


def scored_characters(sample: StorySample) -> list[str]:
    """The story's characters a CIDS mean is over: all of them (one listed in no shot too, as in ViStoryBench),
    except those listed only in shots that are not scored (an s2s story's given shots): the drawn shots were never
    asked to show them, so their 0 would measure the story's split, not the model."""
    story = sample.story
    listed = {key for shot in story.shots for key in shot.characters}
    in_scored = {key for shot in story.shots if shot.index in sample.shots for key in shot.characters}
    return [key for key in story.characters if key in in_scored or key not in listed]


class StyleMetric(StoryMetric):
    """CSD (`prefix` "csd"; "toy_style" for the toy proxy). Self: mean cosine over all pairs of the story's
    shots. Cross: per shot, the mean cosine to the first reference image of each character listed in it (a shot
    with none listed uses the story's first character with images), then the mean over shots; 0.0 for a story
    without reference images."""

    def __init__(self, encoder: Encoder, prefix: str = "csd") -> None:
        super().__init__((f"{prefix}_cross", f"{prefix}_self"))
        self.encoder = encoder

    def score(self, sample: StorySample) -> dict[str, float]:
        story = sample.story
        shots = self.encoder(list(sample.shots.values()))
        # A story without reference images (no characters) has cross 0.0, in the mean, as ViStoryBench's CSD.
        values = {self.names[0]: 0.0, self.names[1]: style_self(shots)}
        with_images = [c for c in story.characters.values() if c.images]
        if with_images:
            firsts = self.encoder(
                [open_as_published(c.images[0], f"story {story.id}: character {c.key!r}") for c in with_images]
            )
            row = {c.key: firsts[i] for i, c in enumerate(with_images)}
            listed = {shot.index: [k for k in shot.characters if k in row] for shot in story.shots}
            references = [
                torch.stack([row[k] for k in listed[index]]) if listed[index] else firsts[:1] for index in sample.shots
            ]
            values[self.names[0]] = style_cross(shots, references)
        return values


class AestheticMetric(StoryMetric):
    """AES: Aesthetic Predictor v2.5, the mean over a story's shots."""

    def __init__(self, scorer: AestheticScorer) -> None:
        super().__init__(("aes",))
        self.scorer = scorer

    def score(self, sample: StorySample) -> dict[str, float]:
        return {"aes": self.scorer(list(sample.shots.values())).mean().item()}


class AlignmentMetric(StoryMetric):
    """Alignment: the judge's 0-4 scores. Per story: the mean over shots of `scene`, `camera` and
    `character_action`; `single_character_action` is, per evaluated shot (`StoryMatches.evaluated`: a shot
    with no listed character, no detection or no face is left out, as ViStoryBench does), the mean over its
    matched characters' crops rounded to an integer, then the story mean rounded again; a story with no
    evaluated shot has none. `alignment` is the paper's: the mean of the four dataset-level averages (per
    story, the mean of the story's four values, for the per-story table).

    Without a matcher (no character crops) the single-character dimension, and so `alignment`, are absent. When
    the judge cannot answer (`JudgeUnavailable`) the metric fails for the run: no question is asked after it,
    and every alignment value is missing with the reason (never a score of 0).
    """

    why_absent = (
        "no shot of any story could score a listed character: none found in its crops (no detection, or for "
        "realistic humans no face), or no character listed"
    )

    def __init__(self, judge: Judge, matcher: CharacterMatcher | None) -> None:
        dims = ALIGNMENT_DIMENSIONS if matcher is not None else ALIGNMENT_DIMENSIONS[:3]
        names = tuple(f"alignment_{d}" for d in dims) + (("alignment",) if matcher is not None else ())
        super().__init__(names)
        self.judge, self.matcher = judge, matcher

    def score(self, sample: StorySample) -> dict[str, float]:
        if self.failure is not None:
            return {}
        questions, asked_for = self._questions(sample)
        # One batch per story: the judge asks them concurrently, within its bound on requests in flight.
        try:
            scores = self.judge.score_many(questions)
        except JudgeUnavailable as e:
            self.failure = f"the judge cannot answer: {e}"
            log.warning("alignment is missing for this run: %s", self.failure)
            return {}
        answers: dict[tuple[str, int], list[int]] = defaultdict(list)
        for key, answer in zip(asked_for, scores, strict=True):
            answers[key].append(answer)
        values = {
            f"alignment_{d}": mean([answers[(d, index)][0] for index in sample.shots]) for d in ALIGNMENT_DIMENSIONS[:3]
        }
        evaluated = sample.matches(self.matcher).evaluated if self.matcher is not None else set()
        singles = [rounded_mean(answers[("single_character_action", i)]) for i in sample.shots if i in evaluated]
        if singles:
            values["alignment_single_character_action"] = float(rounded_mean(singles))
            values["alignment"] = mean([values[f"alignment_{d}"] for d in ALIGNMENT_DIMENSIONS])
        return values

    def compute(self) -> dict[str, torch.Tensor]:
        values = super().compute()
        dimensions = {d: values[f"alignment_{d}"].item() for d in ALIGNMENT_DIMENSIONS if f"alignment_{d}" in values}
        if len(dimensions) == len(ALIGNMENT_DIMENSIONS):
            values["alignment"] = torch.tensor(alignment_score(dimensions), dtype=torch.float64)
        return values

    def _questions(self, sample: StorySample) -> tuple[list[Question], list[tuple[str, int]]]:
        """Every question of a story, and for each the (dimension, shot index) it scores."""
        story = sample.story
        shots = {shot.index: shot for shot in story.shots}
        found = sample.matches(self.matcher) if self.matcher is not None else None
        questions, asked_for = [], []
        for index, image in sample.shots.items():
            shot = shots[index]
            for dimension, text in (("scene", shot.scene), ("camera", shot.camera), ("character_action", shot.action)):
                questions.append(Question(image, text, dimension))
                asked_for.append((dimension, index))
            for key, match in (found.in_shot(index) if found is not None else {}).items():
                name = story.characters[key].name
                questions.append(Question(match.crop, shot.action, "single_character_action", name))
                asked_for.append(("single_character_action", index))
        return questions, asked_for
