"""The open-vocabulary character detector of CIDS (EVAL.md "CIDS"): GroundingDINO through transformers.

ViStoryBench detects the text "character" with GroundingDINO Swin-T (box and text thresholds 0.25) in each
reference image (top-1 box) and in each generated shot (every box, best first). transformers' port of the same
model (IDEA-Research/grounding-dino-tiny) loads from a local folder. A box is cut out of the image the way the
published code cuts it (`clip_box`), so the same detections give the same crops to the pixel.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image
from torch import nn

from dreamshot.config.schema import DetectorConfig
from dreamshot.eval.weights import require_path
from dreamshot.utils.errors import WeightsError

Box = tuple[int, int, int, int]


class CharacterDetector(nn.Module):
    """`forward(images)` -> per image, (boxes (n, 4) xyxy in pixels, scores (n,)) sorted by score, highest first."""

    def __init__(self, model: nn.Module, processor, cfg: DetectorConfig) -> None:
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.processor = processor
        # GroundingDINO's captions are lower case and end with a full stop.
        self.caption = cfg.prompt.lower().strip().rstrip(".") + "."
        self.box_threshold = cfg.box_threshold
        self.text_threshold = cfg.text_threshold

    @torch.no_grad()
    def forward(self, images: Sequence[Image.Image]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [self.detect(image.convert("RGB")) for image in images]

    def detect(self, image: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        device = next(self.model.parameters()).device
        inputs = self.processor(images=[image], text=[self.caption], return_tensors="pt").to(device)
        outputs = self.model(**inputs)
        found = self.processor.post_process_grounded_object_detection(
            outputs,
            inputs["input_ids"],
            threshold=self.box_threshold,
            text_threshold=self.text_threshold,
            target_sizes=[(image.height, image.width)],
        )[0]
        order = torch.argsort(found["scores"], descending=True)
        return found["boxes"][order].float().cpu(), found["scores"][order].float().cpu()

    def crops(self, image: Image.Image, limit: int | None = None) -> list[Image.Image]:
        """The detections of `image` (the `limit` best ones, or all), cropped; empty boxes are dropped."""
        return crop_boxes(image, self.detect(image.convert("RGB"))[0], limit)


def crop_boxes(image: Image.Image, boxes: torch.Tensor, limit: int | None = None) -> list[Image.Image]:
    """`image` cut to the first `limit` (or all) of the (n, 4) `boxes`; empty boxes are dropped."""
    return [image.crop(box) for box in (clip_box(b, image.size) for b in boxes[:limit]) if box is not None]


def clip_box(box: torch.Tensor, size: tuple[int, int]) -> Box | None:
    """An (x0, y0, x1, y1) float box in pixels -> the integer crop box ViStoryBench takes in an image of `size`
    (W, H); None when empty.

    The published code scales GroundingDINO's (centre, size) box to pixels and truncates it to integers before
    converting it to corners, clips the corners to the image, and PIL rounds them (half to even) when cropping.
    A box with no pixel left after rounding (a 1-pixel-wide one can lose both edges) is None too: the published
    code would hand the encoders an empty crop.
    """
    width, height = size
    x0, y0, x1, y1 = box.tolist()
    cx, cy, w, h = (int(v) for v in ((x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0))
    left, right = (max(0.0, min(v, width)) for v in (cx - w / 2, cx + w / 2))
    top, bottom = (max(0.0, min(v, height)) for v in (cy - h / 2, cy + h / 2))
    box = round(left), round(top), round(right), round(bottom)
    return box if box[2] > box[0] and box[3] > box[1] else None


def load_detector(cfg: DetectorConfig) -> CharacterDetector:
    """GroundingDINO and its processor from the local transformers folder `cfg.weights`."""
    from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor  # imported here: slow import

    folder = require_path(cfg.weights, "eval.detector.weights", folder=True)
    try:
        processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
        model = AutoModelForZeroShotObjectDetection.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as e:
        raise WeightsError(f"{folder}: cannot load GroundingDINO ({str(e).splitlines()[0]})") from None
    return CharacterDetector(model, processor, cfg)
