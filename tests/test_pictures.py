"""Pictures a reader understands: contact sheets with a title, tagged shots and ground-truth rows; role-mask
overlays with a legend, in colours no character has."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dreamshot.config.schema import EvalConfig, ToyWorldConfig
from dreamshot.data.dataset import StoryboardDataset
from dreamshot.data.manifest import load_manifest
from dreamshot.data.toyworld import generate_toyworld
from dreamshot.eval.benchmarks import load_benchmark
from dreamshot.eval.generation import draw_story
from dreamshot.inference.contact_sheet import PAD, TAG_COLOURS, contact_sheet, header_height, panel_size
from dreamshot.viz.role_masks import ROLE_COLOURS, role_mask_sheet

SIZE = (48, 32)  # width, height


def _images(count: int, colour=(200, 30, 30)) -> list[Image.Image]:
    return [Image.new("RGB", SIZE, colour) for _ in range(count)]


def test_a_tagged_shot_is_framed_in_its_tag_colour_and_the_title_takes_a_band():
    sheet = contact_sheet(_images(2), ["a", "b"], title="r2s · seed 3", tags=["given", ""])
    panel_w, panel_h = panel_size(SIZE)
    top = header_height("r2s · seed 3")
    assert top > 0 and sheet.size == (2 * panel_w, top + panel_h)
    # The frame sits just outside the thumbnail's top-left corner; an untagged shot has none.
    assert sheet.getpixel((PAD - 2, top + PAD - 2)) == TAG_COLOURS["given"]
    assert sheet.getpixel((panel_w + PAD - 2, top + PAD - 2)) == (255, 255, 255)


def test_ground_truth_rows_stand_under_their_shots():
    shots, truth = _images(5), [*_images(4, (30, 160, 30)), None]
    sheet = contact_sheet(shots, list("abcde"), columns=4, ground_truth=truth)
    panel_w, panel_h = panel_size(SIZE)
    # Two rows of drawn shots, each followed by its row of true shots.
    assert sheet.size == (4 * panel_w, 4 * panel_h)
    assert sheet.getpixel((PAD + 5, panel_h + PAD + 5)) == (30, 160, 30)
    assert sheet.getpixel((PAD + 5, 2 * panel_h + PAD + 5)) == (200, 30, 30)
    # Without any ground truth the sheet has no such rows.
    assert contact_sheet(shots, list("abcde"), ground_truth=[None] * 5).size == (4 * panel_w, 2 * panel_h)


class _Drawer:
    """Stands in for StoryboardPipeline: grey shots of the requested count."""

    def __call__(self, request, seed, steps, progress):
        count = len(request.shot_texts)
        return type("Result", (), {"images": torch.full((count, 3, *request.size), 0.5)})()


@pytest.fixture(scope="module")
def toy_benchmark(tmp_path_factory):
    cfg = EvalConfig(toy=ToyWorldConfig(groups=1, seed=5, image_size=[32, 48], min_shots=3, max_shots=3))
    return load_benchmark(cfg, tmp_path_factory.mktemp("bench"))


def test_an_eval_sheet_has_the_benchmark_true_shots_and_the_s2s_given_shots_first(toy_benchmark, monkeypatch):
    from dreamshot.eval import generation

    calls = []
    monkeypatch.setattr(generation, "contact_sheet", lambda *a, **k: calls.append((a, k)) or contact_sheet(*a, **k))
    (story,) = toy_benchmark.stories
    shots, sheet = draw_story(_Drawer(), story, "r2s", (32, 48), seed=0, steps=1, weights="ours (run)")
    _, options = calls[-1]
    assert options["title"] == f"story {story.id} · r2s · seed 0 · ours (run)"
    assert all(image is not None for image in options["ground_truth"]) and options["numbers"] == [1, 2, 3]
    s2s = type(story)(story.id, story.characters, story.shots, previous=1)
    draw_story(_Drawer(), s2s, "s2s", (32, 48), seed=0, steps=1)
    (images, captions, *_), options = calls[-1]
    assert options["tags"] == ["given", "", ""] and options["numbers"] == [1, 2, 3]
    assert options["ground_truth"][0] is None and captions[0] == story.shots[0].prompt


def test_role_masks_are_drawn_on_grey_images_with_a_legend(tmp_path: Path):
    manifest = generate_toyworld(tmp_path, groups=1, seed=2, image_size=(64, 112))
    sample = StoryboardDataset(load_manifest(manifest), (64, 112), max_shots=6)[0]
    sheet = np.asarray(role_mask_sheet(sample, 0.5)).astype(int)
    colours = {tuple(c) for c in sheet.reshape(-1, 3)}
    # Every coloured pixel is a role's label colour (or a blend with grey): the characters' own colours are gone.
    saturated = [c for c in colours if max(c) - min(c) > 40]
    assert saturated
    role_hues = np.array(ROLE_COLOURS[: len(sample["ref_texts"])], dtype=float)
    for colour in saturated:
        assert any(np.corrcoef(np.array(colour, dtype=float), hue)[0, 1] > 0.9 for hue in role_hues), colour
    # The legend's swatches, one per role, are in the header band.
    band = sheet[: header_height("t", [(0, 0, 0)] * len(sample["ref_texts"]))]
    for hue in ROLE_COLOURS[: len(sample["ref_texts"])]:
        assert (np.abs(band - np.array(hue)).sum(-1) == 0).any()
