"""Images are read as viewers show them: a phone photo stored sideways with an EXIF orientation tag, and the mask
drawn on it as shown, line up in training, in the manifest's checks and in story files."""

from __future__ import annotations

import json

import numpy as np
import torch
from PIL import ExifTags, Image

from dreamshot.data.dataset import StoryboardDataset
from dreamshot.data.manifest import load_manifest
from dreamshot.inference.story import open_rgb

H, W = 48, 80  # as shown


def _phone_photo(path, shown: Image.Image) -> None:
    """`shown` stored as a phone stores a portrait: the pixels turned, and EXIF orientation 6 to turn them back."""
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6
    shown.transpose(Image.Transpose.ROTATE_90).save(path, format="JPEG", quality=95, exif=exif)


def test_a_phone_photo_and_the_mask_drawn_on_it_line_up(tmp_path):
    shown = np.full((H, W, 3), 230, np.uint8)
    shown[8:24, 50:74] = (220, 20, 20)  # the role, top right as the photo is shown
    mask = np.zeros((H, W), np.uint8)
    mask[8:24, 50:74] = 255
    _phone_photo(tmp_path / "photo.jpg", Image.fromarray(shown))
    Image.fromarray(mask).save(tmp_path / "mask.png")
    Image.fromarray(shown).save(tmp_path / "ref.png")
    Image.fromarray(mask).save(tmp_path / "ref_mask.png")
    record = {
        "id": "phone",
        "source": "real",
        "style": "photo",
        "references": [{"role": "r", "image": "ref.png", "prompt": "<Role 1>: a red box", "mask": "ref_mask.png"}],
        "shots": [{"image": "photo.jpg", "annotation": "The box.", "masks": {"r": "mask.png"}}],
    }
    (tmp_path / "manifest.jsonl").write_text(json.dumps(record) + "\n")
    records = load_manifest(tmp_path / "manifest.jsonl")  # the mask's size is the photo's as shown
    sample = StoryboardDataset(records, (H, W), max_shots=1)[0]
    red = (sample["shots"][0, 0] > 0.5) & (sample["shots"][0, 1] < -0.5)
    inside = sample["shot_masks"][0, 0].bool()
    assert inside.sum() == 16 * 24 and (red == inside).float().mean() > 0.95
    assert open_rgb(tmp_path / "photo.jpg", "story").size == (W, H)
    assert torch.equal(sample["shot_masks"][0, 0, 8:24, 50:74], torch.ones(16, 24))


def test_a_cut_out_character_is_read_on_white_in_training_and_in_story_files(tmp_path):
    # A red box on a transparent background whose hidden pixels are black, as image editors often leave them.
    cut_out = np.zeros((H, W, 4), np.uint8)
    cut_out[8:24, 50:74] = (220, 20, 20, 255)
    Image.fromarray(cut_out, "RGBA").save(tmp_path / "ref.png")
    palette = Image.fromarray(cut_out[..., :3]).quantize(colors=4)
    palette.info["transparency"] = palette.getpixel((0, 0))
    palette.save(tmp_path / "palette.png", transparency=palette.getpixel((0, 0)))
    mask = np.zeros((H, W), np.uint8)
    mask[8:24, 50:74] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    Image.fromarray(np.full((H, W, 3), 128, np.uint8)).save(tmp_path / "shot.png")
    record = {
        "id": "cut-out",
        "source": "real",
        "style": "flat",
        "references": [{"role": "r", "image": "ref.png", "prompt": "<Role 1>: a red box", "mask": "mask.png"}],
        "shots": [{"image": "shot.png", "annotation": "The box.", "masks": {"r": "mask.png"}}],
    }
    (tmp_path / "manifest.jsonl").write_text(json.dumps(record) + "\n")
    sample = StoryboardDataset(load_manifest(tmp_path / "manifest.jsonl"), (H, W), max_shots=1)[0]
    background = sample["refs"][0][:, :4, :4]  # top left: transparent in the file
    assert torch.allclose(background, torch.ones_like(background))  # white, not the hidden black
    for name in ("ref.png", "palette.png"):
        pixels = np.asarray(open_rgb(tmp_path / name, "story"))
        assert (pixels[0, 0] == 255).all() and pixels[12, 60, 0] > 200 and pixels[12, 60, 1] < 60
