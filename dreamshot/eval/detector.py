"""The open-vocabulary character detector of CIDS (EVAL.md "CIDS"): GroundingDINO through transformers.

ViStoryBench detects the text "character" with GroundingDINO Swin-T (box and text thresholds 0.25) in each
reference image (top-1 box) and in each generated shot (the top boxes). transformers' port of the same model
(IDEA-Research/grounding-dino-tiny) loads from a local folder.
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

    def crops(self, image: Image.Image, limit: int) -> list[Image.Image]:
        """The `limit` best detections of `image`, cropped (boxes clipped to the image; empty boxes dropped)."""
        boxes, _ = self.detect(image.convert("RGB"))
        return [image.crop(box) for box in (clip_box(b, image.size) for b in boxes[:limit]) if box is not None]


def clip_box(box: torch.Tensor, size: tuple[int, int]) -> Box | None:
    """An (x0, y0, x1, y1) float box -> integer pixels inside an image of `size` (W, H); None when empty."""
    width, height = size
    x0, y0, x1, y1 = (int(v) for v in box.tolist())
    x0, x1 = max(0, min(x0, width)), max(0, min(x1, width))
    y0, y1 = max(0, min(y0, height)), max(0, min(y1, height))
    return (x0, y0, x1, y1) if x1 > x0 and y1 > y0 else None


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
