"""Storyboard to video (paper appendix B.4): every shot becomes a short clip with Wan2.1's image-to-video model,
and the clips are concatenated into one mp4.

The I2V model is diffusers' `WanImageToVideoPipeline` loaded from a local diffusers-format folder
(e.g. a copy of Wan2.1-I2V-14B-480P-Diffusers), never from the Hub. Each clip starts from its shot (the I2V
model's first frame) and is driven by the shot's annotation; clips are drawn at the shot's own size.
The mp4 is written with `imageio-ffmpeg` (its wheel ships the ffmpeg binary).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import torch
from diffusers import WanImageToVideoPipeline
from PIL import Image

from dreamshot.utils.errors import DataError, WeightsError
from dreamshot.utils.io import atomic_path

# WanImageToVideoPipeline draws heights and widths in multiples of 16 (the VAE's 8x times the DiT's 2x2 patches).
SIZE_MULTIPLE = 16
# The VAE and the CLIP image encoder stay float32 (as in diffusers' Wan I2V examples); these two may be bf16.
_LOW_PRECISION_PARTS = ("transformer", "transformer_2", "text_encoder")


@dataclass(frozen=True)
class ClipSettings:
    """How each shot is animated."""

    # Frames per clip; Wan needs 4k + 1 (its VAE compresses time 4x after the first frame).
    num_frames: int = 33
    steps: int = 40
    guidance_scale: float = 5.0
    negative_prompt: str = ""
    # Clip n draws its noise from seed + n - 1 (CPU generator: the same clips on any device).
    seed: int = 0


def load_i2v_pipeline(path: Path, device: torch.device | str, dtype: torch.dtype) -> WanImageToVideoPipeline:
    """Wan I2V from the local diffusers folder `path` (with model_index.json), on `device`.

    A missing folder or an unloadable one is a WeightsError naming the path.
    """
    if not (path / "model_index.json").is_file():
        raise WeightsError(
            f"{path}: not a diffusers Wan image-to-video folder (no model_index.json) (--i2v must be a local "
            "copy, e.g. of Wan2.1-I2V-14B-480P-Diffusers)"
        )
    dtypes = {name: dtype for name in _LOW_PRECISION_PARTS} | {"default": torch.float32}
    try:
        pipe = WanImageToVideoPipeline.from_pretrained(path, local_files_only=True, dtype=dtypes)
    except (OSError, ValueError) as e:
        raise WeightsError(f"{path}: cannot load the I2V pipeline ({str(e).splitlines()[0]})") from None
    pipe.set_progress_bar_config(leave=False)
    return pipe.to(device)


def check_shot_sizes(shots: Sequence[tuple[Path, Image.Image]]) -> None:
    """DataError naming the file unless every shot has the first one's size (one video has one frame size) in
    multiples of `SIZE_MULTIPLE`: found before any clip is drawn, not when the clips are joined."""
    first, size = shots[0][0], shots[0][1].size
    for path, image in shots:
        if image.size != size:
            raise DataError(
                f"{path}: is {image.width}x{image.height}, {first.name} is {size[0]}x{size[1]}: one video has one size"
            )
        if image.width % SIZE_MULTIPLE or image.height % SIZE_MULTIPLE:
            raise DataError(
                f"{path}: is {image.width}x{image.height}; Wan's I2V draws sizes in multiples of {SIZE_MULTIPLE}"
            )


def animate_shots(
    pipe: WanImageToVideoPipeline, shots: Sequence[Image.Image], prompts: Sequence[str], settings: ClipSettings
) -> list[np.ndarray]:
    """One clip per shot: (num_frames, H, W, 3) uint8 each, H x W the shot's size."""
    clips = []
    for n, (shot, prompt) in enumerate(zip(shots, prompts, strict=True)):
        generator = torch.Generator().manual_seed(settings.seed + n)
        frames = pipe(
            image=shot,
            prompt=prompt,
            negative_prompt=settings.negative_prompt,
            height=shot.height,
            width=shot.width,
            num_frames=settings.num_frames,
            num_inference_steps=settings.steps,
            guidance_scale=settings.guidance_scale,
            generator=generator,
            output_type="np",
        ).frames[0]
        clips.append((np.clip(frames, 0, 1) * 255).round().astype(np.uint8))
    return clips


def write_video(clips: Sequence[np.ndarray], path: Path, fps: int) -> int:
    """Concatenate clips (F, H, W, 3) uint8 of one size into an H.264 mp4 at `path` (atomic). Returns frames."""
    frames = np.concatenate(list(clips))
    height, width = frames.shape[1:3]
    with atomic_path(path) as tmp:
        # The temporary name has no .mp4 suffix, so the container is named explicitly.
        writer = imageio_ffmpeg.write_frames(
            str(tmp), (width, height), fps=fps, codec="libx264", quality=8, output_params=["-f", "mp4"]
        )
        writer.send(None)
        try:
            for frame in frames:
                writer.send(np.ascontiguousarray(frame))
        finally:
            writer.close()
    return len(frames)
