"""Metric maths on hand-made features: Hungarian assignment, CIDS cross / self, CSD, per-story averaging."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from dreamshot.eval.benchmarks.types import BenchCharacter, BenchShot, BenchStory
from dreamshot.eval.identity import CharacterMatcher
from dreamshot.eval.metrics import (
    alignment_score,
    assign,
    best_reference_scores,
    character_identity,
    cosine_matrix,
    rounded_mean,
    story_identity,
    style_cross,
    style_self,
)
from dreamshot.eval.story_metrics import IdentityMetric, StoryMetric, StorySample, StyleMetric


def unit(*values: float) -> torch.Tensor:
    vector = torch.tensor(values, dtype=torch.float32)
    return vector / vector.norm()


def test_hungarian_beats_greedy_assignment():
    # Greedy would give character 0 its best crop (0, score 0.9) and leave character 1 with 0.1 (total 1.0);
    # the optimal assignment swaps them (0.8 + 0.7 = 1.5).
    scores = torch.tensor([[0.9, 0.8], [0.7, 0.1]])
    assert assign(scores) == {0: 1, 1: 0}


def test_assignment_leaves_characters_without_crops_unmatched():
    scores = torch.tensor([[0.2], [0.9], [0.5]])  # three characters, one crop
    assert assign(scores) == {1: 0}
    assert assign(torch.zeros(2, 0)) == {}


def test_impossible_pairs_are_never_assigned():
    inf = float("-inf")
    assert assign(torch.tensor([[inf, 0.3], [0.4, inf]])) == {0: 1, 1: 0}
    assert assign(torch.tensor([[inf, inf]])) == {}


def test_best_reference_scores_take_the_max_and_skip_empty_rows():
    references = torch.stack([unit(1, 0), unit(0, 1)])
    crops = torch.stack([unit(1, 1), torch.zeros(2), unit(1, 0)])
    scores = best_reference_scores(crops, references)
    assert scores[0] == pytest.approx(math.sqrt(0.5))
    assert scores[1] == float("-inf")  # a crop with nothing found (e.g. no face)
    assert scores[2] == pytest.approx(1.0)
    assert torch.isinf(best_reference_scores(crops, torch.zeros(0, 2))).all()


def test_character_identity_cross_and_self():
    references = torch.stack([unit(1, 0), unit(1, 1)])
    matched = torch.stack([unit(1, 0), unit(0, 1), unit(1, 1)])
    score = character_identity(matched, references)
    expected_cross = cosine_matrix(matched, references).mean().item()
    # Pairs: (a,b)=0, (a,c)=√½, (b,c)=√½.
    assert score.cross == pytest.approx(expected_cross)
    assert score.self == pytest.approx(2 * math.sqrt(0.5) / 3)


def test_self_with_one_crop_is_one_and_unmatched_character_is_zero():
    references = torch.stack([unit(1, 0)])
    one = character_identity(torch.stack([unit(1, 2)]), references)
    assert one.self == 1.0 and one.cross == pytest.approx(1 / math.sqrt(5))
    none = character_identity(torch.zeros(0, 2), references)
    assert (none.cross, none.self) == (0.0, 0.0)


def test_story_identity_keeps_unmatched_characters_in_the_mean():
    found = character_identity(torch.stack([unit(1, 0)]), torch.stack([unit(1, 0)]))
    never = character_identity(torch.zeros(0, 2), torch.stack([unit(0, 1)]))
    story = story_identity([found, never])
    assert (story.cross, story.self) == (pytest.approx(0.5), pytest.approx(0.5))


def test_style_self_and_cross():
    shots = torch.stack([unit(1, 0), unit(0, 1), unit(1, 1)])
    assert style_self(shots) == pytest.approx(2 * math.sqrt(0.5) / 3)
    assert style_self(shots[:1]) == 0.0  # ViStoryBench: no pair, 0
    references = [torch.stack([unit(1, 0)]), torch.stack([unit(1, 0), unit(0, 1)]), torch.stack([unit(0, 1)])]
    # Shot 1: 1; shot 2: mean(0, 1) = 0.5; shot 3: √½.
    assert style_cross(shots, references) == pytest.approx((1 + 0.5 + math.sqrt(0.5)) / 3)


def test_rounding_and_alignment_mean():
    assert rounded_mean([3, 4]) == 4  # 3.5 rounds half to even
    assert rounded_mean([2, 3]) == 2  # 2.5 rounds half to even
    assert rounded_mean([]) == 0
    # The paper's UNO row: (3.510 + 3.247 + 2.793 + 2.475) / 4 = 3.006.
    dims = {"scene": 3.510, "camera": 3.247, "character_action": 2.793, "single_character_action": 2.475}
    assert alignment_score(dims) == pytest.approx(3.00625)
    with pytest.raises(ValueError, match="single_character_action"):
        alignment_score({k: v for k, v in dims.items() if k != "single_character_action"})


# --- the Metric layer on hand-made features ----------------------------------------------------------------


class TableEncoder(torch.nn.Module):
    """Maps an image to the feature registered for its solid colour (the hand-made features of these tests)."""

    def __init__(self, table: dict[tuple[int, int, int], torch.Tensor]) -> None:
        super().__init__()
        self.table = table

    def forward(self, images):
        return torch.stack([self.table[image.getpixel((0, 0))] for image in images])


class GivenCrops:
    """A crop source that returns the images themselves: references whole, each shot image as its only crop
    ... or, for shots built as horizontal strips, one crop per strip (detections, owner unknown)."""

    fixed = False

    def reference_crops(self, character):
        return [Image.open(path).convert("RGB") for path in character.images]

    def shot_crops(self, image, shot):
        width = image.width // 2
        return [(None, image.crop((i * width, 0, (i + 1) * width, image.height))) for i in range(2)]


RED, BLUE, GREEN, GREY = (255, 0, 0), (0, 0, 255), (0, 255, 0), (128, 128, 128)


def _image(path: Path, *colours) -> Path:
    image = Image.new("RGB", (4 * len(colours), 4))
    for i, colour in enumerate(colours):
        image.paste(colour, (4 * i, 0, 4 * (i + 1), 4))
    image.save(path)
    return path


def _story(tmp_path: Path) -> BenchStory:
    characters = {
        "ana": BenchCharacter("ana", "Ana", "non_human", "Ana: red", (_image(tmp_path / "ana.png", RED),)),
        "bo": BenchCharacter("bo", "Bo", "non_human", "Bo: blue", (_image(tmp_path / "bo.png", BLUE),)),
        "cy": BenchCharacter("cy", "Cy", "non_human", "Cy: green", (_image(tmp_path / "cy.png", GREEN),)),
    }
    shots = tuple(BenchShot(i, f"shot {i}", "s", "c", "a", ("ana", "bo")) for i in (1, 2))
    return BenchStory("s1", characters, shots)


def test_identity_metric_assigns_by_hungarian_and_averages_over_all_characters(tmp_path):
    table = {RED: unit(1, 0, 0), BLUE: unit(0, 1, 0), GREEN: unit(0, 0, 1), GREY: unit(1, 1, 0)}
    story = _story(tmp_path)
    # Shot 1 shows blue then red (assignment must swap), shot 2 shows red and grey (between red and blue).
    shots = {
        1: Image.open(_image(tmp_path / "s1.png", BLUE, RED)).convert("RGB"),
        2: Image.open(_image(tmp_path / "s2.png", RED, GREY)).convert("RGB"),
    }
    matcher = CharacterMatcher(GivenCrops(), {"general": TableEncoder(table)})
    found = matcher.match(story, shots)
    assert [m.shot for m in found.matches["ana"]] == [1, 2] and [m.shot for m in found.matches["bo"]] == [1, 2]
    assert found.matches["cy"] == []
    metric = IdentityMetric(matcher)
    metric.update(StorySample(story, shots))
    values = metric.compute()
    half = math.sqrt(0.5)
    # ana: crops red, red -> cross 1, self 1; bo: blue, grey -> cross (1 + √½)/2, self √½; cy: 0, 0.
    assert values["cids_cross"].item() == pytest.approx((1 + (1 + half) / 2 + 0) / 3)
    assert values["cids_self"].item() == pytest.approx((1 + half + 0) / 3)


def test_a_character_listed_only_in_unscored_shots_is_not_in_the_cids_mean(tmp_path):
    """In s2s the given shots are not scored: cy, listed only in the given shot 1, was never asked of the drawn
    shots 2 and 3, so its 0 stays out of the story mean; a character listed in no shot at all stays in it (as in
    ViStoryBench, which means over every character)."""
    table = {RED: unit(1, 0, 0), BLUE: unit(0, 1, 0), GREEN: unit(0, 0, 1)}
    base = _story(tmp_path)
    given = BenchShot(1, "shot 1", "s", "c", "a", ("cy",))
    drawn = tuple(BenchShot(i, f"shot {i}", "s", "c", "a", ("ana", "bo")) for i in (2, 3))
    story = BenchStory("s1", base.characters, (given, *drawn))
    shots = {i: Image.open(_image(tmp_path / f"s{i}.png", RED, BLUE)).convert("RGB") for i in (2, 3)}
    matcher = CharacterMatcher(GivenCrops(), {"general": TableEncoder(table)})
    metric = IdentityMetric(matcher)
    metric.update(StorySample(story, shots))
    assert metric.compute()["cids_cross"].item() == pytest.approx(1.0)  # ana and bo, each found as itself
    listed_nowhere = BenchStory("s1", base.characters, drawn)
    metric = IdentityMetric(matcher)
    metric.update(StorySample(listed_nowhere, shots))
    assert metric.compute()["cids_cross"].item() == pytest.approx(2 / 3)


def test_a_character_whose_references_give_no_feature_leaves_the_story_out_of_cids(tmp_path, caplog):
    # A face character with no face in any reference: the published code's assertion fails, the story is skipped.
    table = {RED: unit(1, 0, 0), BLUE: torch.zeros(3), GREEN: unit(0, 0, 1)}
    story = _story(tmp_path)
    shots = {1: Image.open(_image(tmp_path / "s1.png", RED, BLUE)).convert("RGB")}
    story = BenchStory("s1", story.characters, story.shots[:1])
    matcher = CharacterMatcher(GivenCrops(), {"general": TableEncoder(table)})
    assert matcher.match(story, shots).unusable == ["bo"]
    metric = IdentityMetric(matcher)
    metric.update(StorySample(story, shots))
    assert metric.per_story["s1"] == {} and metric.compute() == {}
    assert "story s1: no CIDS" in caplog.text and "'bo'" in caplog.text


def test_a_character_with_only_references_cids_does_not_read_is_named_with_why(tmp_path, caplog):
    """ViStoryBench's CIDS globs `.jpg` only: a character with `.png` references alone drops the story from CIDS,
    and the warning says so rather than blaming the features."""
    story = _story(tmp_path)
    png_only = BenchCharacter("bo", "Bo", "non_human", "Bo: blue", story.characters["bo"].images, cids_images=())
    story = BenchStory("s1", {**story.characters, "bo": png_only}, story.shots[:1])
    shots = {1: Image.open(_image(tmp_path / "s1.png", RED, BLUE)).convert("RGB")}
    matcher = CharacterMatcher(GivenCrops(), {"general": TableEncoder({RED: unit(1, 0, 0), GREEN: unit(0, 0, 1)})})
    assert matcher.match(story, shots).unusable == ["bo"]
    assert "'bo' has no .jpg reference image, the only kind ViStoryBench's CIDS reads (1 of other kinds)" in caplog.text


def test_story_metric_is_the_plain_mean_over_stories():
    class Fixed(StoryMetric):
        def score(self, sample):
            return {"x": sample.story.previous * 1.0, **({"y": 1.0} if sample.story.previous else {})}

    metric = Fixed(("x", "y"))
    for previous in (0, 1, 5):  # a story's value counts once, whatever its number of shots
        story = BenchStory(f"s{previous}", {}, (BenchShot(1, "", "", "", "", ()),) * (previous + 1), previous)
        metric.update(StorySample(story, {}))
    values = metric.compute()
    assert values["x"].item() == pytest.approx(2.0) and values["y"].item() == 1.0  # y: the 2 stories that have it
    assert set(metric.per_story) == {"s0", "s1", "s5"}
    metric.reset()
    assert metric.per_story == {} and metric.count.sum() == 0


def test_a_nan_story_value_is_left_out_of_the_mean_with_a_warning_not_averaged_in(caplog):
    class Degenerate(StoryMetric):
        def score(self, sample):
            return {"x": math.nan if sample.story.id == "bad" else 2.0, "y": 1.0}

    metric = Degenerate(("x", "y"))
    for story_id in ("a", "bad", "b"):
        metric.update(StorySample(BenchStory(story_id, {}, (BenchShot(1, "", "", "", "", ()),)), {}))
    values = metric.compute()
    assert values["x"].item() == 2.0 and values["y"].item() == 1.0
    assert metric.per_story["bad"] == {"y": 1.0}
    assert "story bad: x is nan, left out of the mean" in caplog.text


def test_style_metric_uses_first_reference_of_listed_characters(tmp_path):
    table = {RED: unit(1, 0, 0), BLUE: unit(0, 1, 0), GREEN: unit(0, 0, 1)}
    base = _story(tmp_path)
    shots = (
        BenchShot(1, "", "", "", "", ("bo",)),
        BenchShot(2, "", "", "", "", ()),  # no listed character: the first character with images (ana)
    )
    story = BenchStory("s", base.characters, shots)
    images = {i: Image.new("RGB", (4, 4), RED) for i in (1, 2)}
    metric = StyleMetric(TableEncoder(table))
    metric.update(StorySample(story, images))
    values = metric.compute()
    assert values["csd_self"].item() == pytest.approx(1.0)
    assert values["csd_cross"].item() == pytest.approx(0.5)  # shot 1 vs blue: 0, shot 2 vs red: 1


def test_style_cross_of_a_story_without_reference_images_is_zero_and_counts(tmp_path):
    # ViStoryBench's CSD gives such a story (a scenery story with no characters) cross 0.0, and its benchmark
    # mean averages that 0.0 with the other stories'.
    table = {RED: unit(1, 0, 0), BLUE: unit(0, 1, 0), GREEN: unit(0, 0, 1)}
    metric = StyleMetric(TableEncoder(table))
    scenery = BenchStory("scenery", {}, (BenchShot(1, "", "", "", "", ()),))
    metric.update(StorySample(scenery, {1: Image.new("RGB", (4, 4), RED)}))
    with_ana = BenchStory("ana", _story(tmp_path).characters, (BenchShot(1, "", "", "", "", ("ana",)),))
    metric.update(StorySample(with_ana, {1: Image.new("RGB", (4, 4), RED)}))
    assert metric.per_story["scenery"]["csd_cross"] == 0.0
    assert metric.compute()["csd_cross"].item() == pytest.approx(0.5)
