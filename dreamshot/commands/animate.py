"""`dreamshot animate STORYBOARD_DIR --i2v WAN_I2V_DIR --out video.mp4` (paper appendix B.4).

STORYBOARD_DIR is the output folder of `dreamshot generate`: its shots (`shot_01.png` …) and their annotations
(`generation.json`) become one Wan image-to-video clip each, concatenated in shot order. The mp4's folder and the
shots (one size, in multiples of 16) are checked before the I2V model loads: a clip takes it minutes.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from dreamshot.inference.animate import ClipSettings, animate_shots, check_shot_sizes, load_i2v_pipeline, write_video
from dreamshot.inference.outputs import storyboard_shots
from dreamshot.inference.story import open_rgb
from dreamshot.utils.arguments import positive_int, seed_value
from dreamshot.utils.devices import pick_device
from dreamshot.utils.errors import DreamShotError
from dreamshot.utils.io import check_output_dir

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("storyboard", type=Path, help="output folder of `dreamshot generate`")
    parser.add_argument("--i2v", type=Path, required=True, help="local diffusers-format Wan2.1 I2V folder")
    parser.add_argument("--out", type=Path, required=True, help="the mp4 to write")
    parser.add_argument("--frames", type=clip_length, default=ClipSettings.num_frames, help="frames per shot (4k+1)")
    parser.add_argument("--steps", type=positive_int, default=ClipSettings.steps, help="sampler steps per clip")
    parser.add_argument("--guidance", type=float, default=ClipSettings.guidance_scale, help="CFG scale")
    parser.add_argument("--negative-prompt", default=ClipSettings.negative_prompt)
    parser.add_argument("--seed", type=seed_value, default=ClipSettings.seed, help="clip n uses seed + n - 1")
    parser.add_argument("--fps", type=positive_int, default=16, help="frame rate of the video (Wan2.1 draws 16 fps)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--dtype", choices=list(DTYPES), default=None, help="DiT / umT5 dtype (default: bf16 on cuda)")


def clip_length(text: str) -> int:
    frames = int(text)
    if frames < 1 or (frames - 1) % 4:
        raise argparse.ArgumentTypeError(f"frames must be 4k + 1 (1, 5, 9, ..., 33, ..., 81), got {frames}")
    return frames


def run(args: argparse.Namespace) -> None:
    shots = storyboard_shots(args.storyboard)
    check_video_path(args.out)
    images = [open_rgb(path, str(path)) for path, _ in shots]
    check_shot_sizes([(path, image) for (path, _), image in zip(shots, images, strict=True)])
    device = pick_device(args.device, "--device")
    dtype = DTYPES[args.dtype or ("bfloat16" if device.type == "cuda" else "float32")]
    pipe = load_i2v_pipeline(args.i2v, device, dtype)
    settings = ClipSettings(args.frames, args.steps, args.guidance, args.negative_prompt, args.seed)
    clips = animate_shots(pipe, images, [annotation for _, annotation in shots], settings)
    frames = write_video(clips, args.out, args.fps)
    print(f"{len(clips)} clips, {frames} frames at {args.fps} fps -> {args.out}")


def check_video_path(out: Path) -> None:
    """The mp4 `out` can be written (checked before the clips are drawn, which takes the I2V model minutes a shot)."""
    if out.is_dir():
        raise DreamShotError(f"--out {out}: a folder; name the mp4 to write")
    check_output_dir(out.parent, f"--out {out}: its folder")
