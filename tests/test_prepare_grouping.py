"""Stage 5 of `dreamshot prepare`: sliding windows, overlap-based merging and the judges."""

from __future__ import annotations

from itertools import pairwise

import pytest

from dreamshot.data.toyworld import plan_group, render_shot
from dreamshot.eval.judge import JudgeRequestError
from dreamshot.prepare.config import GroupingConfig
from dreamshot.prepare.grouping import FeatureJudge, merge_windows, split_group, windows
from dreamshot.prepare.toyvideo import cut_shots, scene_groups
from dreamshot.prepare.vlm import VlmClient, VlmJudge, parse_labels
from dreamshot.utils.errors import DataError


def test_windows_cover_every_keyframe_with_the_overlap():
    spans = windows(10, size=4, overlap=1)
    assert [list(s) for s in spans] == [[0, 1, 2, 3], [3, 4, 5, 6], [6, 7, 8, 9]]
    spans = windows(11, size=4, overlap=2)
    assert spans[-1] == range(7, 11) and all(len(set(a) & set(b)) >= 2 for a, b in pairwise(spans))
    assert windows(3, size=8, overlap=2) == [range(3)]
    assert windows(0, size=8, overlap=2) == []


def test_groups_cross_window_borders_through_the_overlap():
    spans = windows(7, size=4, overlap=1)  # [0..3], [3..6]
    labels = [[1, 1, 2, 2], [5, 5, 6, 6]]  # keyframe 3 links the second group of window 1 with window 2's first
    groups, outliers = merge_windows(7, spans, labels)
    assert groups == [[0, 1], [2, 3, 4], [5, 6]]
    assert outliers == []


def test_disagreeing_windows_are_settled_by_majority_and_outliers_dropped():
    spans = [range(0, 4), range(1, 5), range(2, 6)]
    labels = [
        [1, 1, 2, 2],  # 0 1 | 2 3
        [1, 1, 1, None],  # 1 2 3 | 4 left out
        [3, 3, 4, None],  # 2 3 | 4 | 5 left out
    ]
    groups, outliers = merge_windows(6, spans, labels)
    # 1-2 and 1-3: together once, apart once -> not linked; 2-3: together in all three windows. Keyframe 4 is
    # left out by one of its two windows (not a majority), keyframe 5 by its only one.
    assert groups == [[0, 1], [2, 3], [4]]
    assert outliers == [5]


def test_long_groups_split_into_equal_consecutive_parts():
    cfg = GroupingConfig(min_shots=2, max_shots=4)
    assert split_group(list(range(9)), cfg) == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert split_group([5, 6, 7], cfg) == [[5, 6, 7]]
    assert split_group(list(range(7)), GroupingConfig(min_shots=5, max_shots=6)) == [[0, 1, 2, 3, 4, 5]]


@pytest.mark.parametrize(("min_shots", "max_shots"), [(2, 4), (5, 6), (8, 8), (3, 30)])
def test_split_parts_are_never_under_min_shots(min_shots, max_shots):
    # Halves of a group just over max_shots are under min_shots when max_shots < 2 * min_shots - 1: parts of
    # max_shots are kept then, and the rest (under min_shots) dropped.
    cfg = GroupingConfig(min_shots=min_shots, max_shots=max_shots)
    for count in range(min_shots, 3 * max_shots + 2):
        parts = split_group(list(range(count)), cfg)
        assert all(min_shots <= len(part) <= max_shots for part in parts), (count, parts)
        kept = [i for part in parts for i in part]
        assert kept == list(range(len(kept))) and count - len(kept) < min_shots


@pytest.fixture(scope="module")
def scene_shots():
    """Shots of 4 toy scenes, in order, with the scene of each."""
    images, scenes = [], []
    for scene, group in enumerate(scene_groups(seed=0, count=4)):
        plan = plan_group(0, group, 2, 4, 2)
        for shot in cut_shots(plan):
            images.append(render_shot(plan, shot, 96, 160)[0])
            scenes.append(scene)
    return images, scenes


def test_feature_judge_keeps_the_known_scenes_together(scene_shots):
    images, scenes = scene_shots
    judge = FeatureJudge(GroupingConfig().similarity)
    spans = windows(len(images), size=4, overlap=2)
    assert len(spans) > 2  # scenes straddle windows
    groups, outliers = merge_windows(len(images), spans, [judge.group([images[i] for i in s]) for s in spans])
    truth = [[i for i, s in enumerate(scenes) if s == scene] for scene in sorted(set(scenes))]
    assert groups == truth and outliers == []


class FakeChat:
    """A ChatBackend that plays back answers (an exception instance is raised) and records the prompts."""

    model = "fake-vlm"

    def __init__(self, answers):
        self.answers, self.messages = list(answers), []

    def complete(self, messages, temperature):
        self.messages.append((messages, temperature))
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer


def test_vlm_judge_retries_until_an_answer_parses(scene_shots):
    images = scene_shots[0][:4]
    chat = FakeChat([JudgeRequestError("HTTP 500"), "groups: 1, 1, 2", "1, 1, 2, 0"])
    labels = VlmJudge(VlmClient(chat, image_size=64, max_retries=3)).group(images)
    assert labels == [1, 1, 2, None]
    content = chat.messages[-1][0][0]["content"]
    assert "4 comma-separated integers" in content[0]["text"]
    assert sum(part["type"] == "image_url" for part in content) == 4
    assert [t for _, t in chat.messages] == pytest.approx([0.0, 0.1, 0.2])


def test_vlm_judge_without_a_usable_answer_is_a_data_error(scene_shots):
    chat = FakeChat(["I cannot tell"] * 2)
    with pytest.raises(DataError, match="fake-vlm.*2 attempts"):
        VlmJudge(VlmClient(chat, image_size=64, max_retries=2)).group(scene_shots[0][:3])


def test_parse_labels():
    assert parse_labels("1,2,2", 3) == [1, 2, 2]
    assert parse_labels("Answer: 0, 1, 1", 3) == [None, 1, 1]
    assert parse_labels("1,2", 3) is None
    assert parse_labels("1,-1,2", 3) is None
