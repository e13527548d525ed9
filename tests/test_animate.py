"""`dreamshot animate` on a tiny Wan image-to-video pipeline saved to a local diffusers folder."""

from __future__ import annotations

import json
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanImageToVideoPipeline, WanTransformer3DModel
from PIL import Image
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, UMT5Config, UMT5EncoderModel

from dreamshot.cli import main
from dreamshot.inference.animate import write_video
from dreamshot.inference.outputs import RECORD_FILE, shot_file
from dreamshot.models.wan.tokenizer import build_tiny_tokenizer

HEIGHT, WIDTH = 32, 48


def read_video(path: Path) -> np.ndarray:
    """(F, H, W, 3) uint8 frames of a video file."""
    reader = imageio_ffmpeg.read_frames(str(path))
    meta = next(reader)
    width, height = meta["size"]
    return np.stack([np.frombuffer(frame, np.uint8).reshape(height, width, 3) for frame in reader])


@pytest.fixture(scope="module")
def i2v_dir(tmp_path_factory) -> Path:
    """Wan2.1 I2V's parts with tiny random weights: the DiT takes CLIP image tokens (image_dim, added_kv_proj_dim)
    and 36 input channels (16 noise + 4 first-frame mask + 16 first-frame latents)."""
    torch.manual_seed(0)
    heads, head_dim = 2, 12
    pipe = WanImageToVideoPipeline(
        tokenizer=build_tiny_tokenizer(384),
        text_encoder=UMT5EncoderModel(
            UMT5Config(
                vocab_size=384, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4, feed_forward_proj="gated-gelu"
            )
        ),
        vae=AutoencoderKLWan(
            base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
        ),
        scheduler=UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0),
        image_processor=CLIPImageProcessor(crop_size=32, size=32),
        image_encoder=CLIPVisionModel(
            CLIPVisionConfig(
                hidden_size=4,
                projection_dim=4,
                num_hidden_layers=2,
                num_attention_heads=2,
                image_size=32,
                intermediate_size=16,
                patch_size=4,
            )
        ),
        transformer=WanTransformer3DModel(
            patch_size=(1, 2, 2),
            num_attention_heads=heads,
            attention_head_dim=head_dim,
            in_channels=36,
            out_channels=16,
            text_dim=32,
            freq_dim=32,
            ffn_dim=32,
            num_layers=1,
            cross_attn_norm=True,
            qk_norm="rms_norm_across_heads",
            rope_max_seq_len=32,
            image_dim=4,
            added_kv_proj_dim=heads * head_dim,
        ),
    )
    folder = tmp_path_factory.mktemp("wan_i2v")
    pipe.save_pretrained(folder)
    return folder


@pytest.fixture
def storyboard(tmp_path) -> Path:
    """An output folder as `dreamshot generate` leaves it: two shots and generation.json."""
    shots = []
    for n, colour in ((1, (214, 39, 40)), (2, (31, 90, 200))):
        Image.new("RGB", (WIDTH, HEIGHT), colour).save(tmp_path / shot_file(n))
        shots.append({"index": n, "file": shot_file(n), "annotation": f"Shot {n}: a circle moves."})
    (tmp_path / RECORD_FILE).write_text(json.dumps({"seed": 0, "shots": shots}))
    return tmp_path


def test_animate_writes_one_clip_per_shot(i2v_dir, storyboard, tmp_path):
    out = tmp_path / "video" / "story.mp4"
    args = ["animate", str(storyboard), "--i2v", str(i2v_dir), "--out", str(out), "--frames", "5", "--steps", "2"]
    assert main(args) == 0
    frames = read_video(out)
    assert frames.shape == (10, HEIGHT, WIDTH, 3)
    assert not list(out.parent.glob(".*.tmp"))


def test_missing_i2v_folder_is_a_weights_error(storyboard, tmp_path, capsys):
    missing = tmp_path / "no_such_model"
    assert main(["animate", str(storyboard), "--i2v", str(missing), "--out", str(tmp_path / "v.mp4")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(missing) in err and "model_index.json" in err


def test_animate_needs_a_generate_folder(i2v_dir, tmp_path, capsys):
    assert main(["animate", str(tmp_path), "--i2v", str(i2v_dir), "--out", str(tmp_path / "v.mp4")]) == 2
    assert f"{tmp_path / RECORD_FILE}: not found" in capsys.readouterr().err


def test_frames_must_be_4k_plus_1(storyboard, tmp_path):
    with pytest.raises(SystemExit):
        main(["animate", str(storyboard), "--i2v", str(tmp_path), "--out", str(tmp_path / "v.mp4"), "--frames", "6"])


@pytest.mark.parametrize(("option", "value"), [("--steps", "0"), ("--fps", "0"), ("--seed", "-1")])
def test_a_value_the_clips_or_the_video_cannot_take_is_refused_before_anything_runs(
    option, value, storyboard, tmp_path, capsys
):
    # 0 steps would decode each clip's noise as it is; 0 fps fails in ffmpeg once every clip is drawn.
    with pytest.raises(SystemExit):
        main(["animate", str(storyboard), "--i2v", str(tmp_path), "--out", str(tmp_path / "v.mp4"), option, value])
    assert f"argument {option}: expected" in capsys.readouterr().err


def test_write_video_round_trip(tmp_path):
    clips = [np.full((3, HEIGHT, WIDTH, 3), value, dtype=np.uint8) for value in (30, 220)]
    path = tmp_path / "clip.mp4"
    assert write_video(clips, path, fps=8) == 6
    frames = read_video(path)
    assert frames.shape == (6, HEIGHT, WIDTH, 3)
    assert frames[0].mean() == pytest.approx(30, abs=4) and frames[-1].mean() == pytest.approx(220, abs=4)


def test_an_unwritable_out_is_refused_before_the_model_loads(storyboard, tmp_path, capsys):
    """Drawing every clip takes the I2V model minutes a shot: a --out that cannot be written is found first."""
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    for out in (blocker / "story.mp4", storyboard):
        assert _animate_without_model(storyboard, out) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"--out {out}" in err


@pytest.mark.parametrize(
    ("sizes", "message"),
    [([(WIDTH, HEIGHT), (64, 32)], "is 64x32, shot_01.png is 48x32"), ([(40, 32), (40, 32)], "multiples of 16")],
)
def test_a_shot_the_video_cannot_hold_is_one_line_before_drawing(storyboard, sizes, message, tmp_path, capsys):
    """One video has one frame size, and Wan draws sizes in multiples of 16 (its VAE's 8 times its patch's 2)."""
    for n, size in enumerate(sizes, 1):
        Image.new("RGB", size, (31, 90, 200)).save(storyboard / shot_file(n))
    assert _animate_without_model(storyboard, tmp_path / "v.mp4") == 2
    err = capsys.readouterr().err.strip()
    shot = storyboard / shot_file(len(sizes) if sizes[0] == (WIDTH, HEIGHT) else 1)
    assert len(err.splitlines()) == 1 and f"{shot}: " in err and message in err


def test_a_record_without_shots_is_one_line(storyboard, tmp_path, capsys):
    (storyboard / RECORD_FILE).write_text(json.dumps({"seed": 0, "shots": []}))
    assert _animate_without_model(storyboard, tmp_path / "v.mp4") == 2
    assert f"{storyboard / RECORD_FILE}: shots: the storyboard has no shots" in capsys.readouterr().err


def _animate_without_model(storyboard: Path, out: Path) -> int:
    """`dreamshot animate` with no I2V model: what is refused before the model loads is refused first."""
    return main(["animate", str(storyboard), "--i2v", str(out.parent / "no_model"), "--out", str(out)])
