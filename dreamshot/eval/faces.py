"""Face identity features for `realistic_human` characters (EVAL.md "CIDS"), from insightface ONNX models.

A face detector with five landmarks (antelopev2's SCRFD) finds the face in a character crop, the face is
aligned to each recognition model's input (insightface's `norm_crop`), and every configured recognition model
embeds it (antelopev2's ArcFace, and any other ONNX face encoder, e.g. an exported AdaFace or FaceNet).

Ensemble: the published code averages the cosines of its face encoders. With each encoder's embedding
L2-normalised, concatenated and divided by sqrt(E), the plain cosine of two such vectors IS that average, so
the encoder returns one vector per image and the metric code needs no ensemble logic.

Detection follows ViStoryBench: threshold 0.45, lowered by 0.1 down to 0.1 until a face is found; the
highest-scoring face is used. An image with no face at any threshold gets an all-zero row, which the metric
functions treat as "nothing found" (it cannot be matched to a character).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from dreamshot.config.schema import FaceConfig
from dreamshot.eval.weights import require_path
from dreamshot.utils.errors import WeightsError

FIRST_THRESHOLD = 0.45
THRESHOLD_STEP = 0.1
LAST_THRESHOLD = 0.1
CPU = ["CPUExecutionProvider"]


def detection_thresholds() -> list[float]:
    """0.45, 0.35, 0.25, 0.15: the thresholds tried in turn."""
    count = int((FIRST_THRESHOLD - LAST_THRESHOLD) / THRESHOLD_STEP + 1e-9) + 1
    return [round(FIRST_THRESHOLD - i * THRESHOLD_STEP, 6) for i in range(count)]


class FaceEncoder:
    """`encoder(images)` -> (N, D) ensemble face embeddings (D = sum of the recognisers' widths), zero rows
    where no face is found. `detector` is an insightface SCRFD, `recognizers` insightface ArcFaceONNX models."""

    def __init__(self, detector, recognizers: Sequence, det_size: int = 640) -> None:
        if not recognizers:
            raise ValueError("a face encoder needs at least one recognition model")
        self.detector = detector
        self.recognizers = list(recognizers)
        self.det_size = (det_size, det_size)
        self.width = sum(int(np.prod(r.output_shape[1:])) for r in self.recognizers)

    def __call__(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return torch.stack([self.embed_one(image) for image in images])

    def embed_one(self, image: Image.Image) -> torch.Tensor:
        # insightface works on BGR uint8 arrays (OpenCV's order).
        bgr = np.ascontiguousarray(np.asarray(image.convert("RGB"))[..., ::-1])
        landmarks = self.find_face(bgr)
        if landmarks is None:
            return torch.zeros(self.width)
        from insightface.utils.face_align import norm_crop  # imported here with the ONNX models

        parts = []
        for recognizer in self.recognizers:
            aligned = norm_crop(bgr, landmark=landmarks, image_size=recognizer.input_size[0])
            embedding = torch.from_numpy(np.asarray(recognizer.get_feat(aligned), dtype=np.float32)).flatten()
            parts.append(F.normalize(embedding, dim=0))
        return torch.cat(parts) / len(parts) ** 0.5

    def find_face(self, bgr: np.ndarray) -> np.ndarray | None:
        """Five landmarks (5, 2) of the best face at the first threshold that finds one, else None."""
        for threshold in detection_thresholds():
            boxes, landmarks = self.detector.detect(bgr, input_size=self.det_size, det_thresh=threshold)
            if len(boxes) and landmarks is not None:
                return landmarks[0]
        return None


def load_face_encoder(cfg: FaceConfig) -> FaceEncoder:
    """The detector and recognisers of `cfg` through insightface's model router (CPU onnxruntime)."""
    from insightface.model_zoo import get_model  # imported here: onnxruntime sessions are costly to set up
    from insightface.model_zoo.arcface_onnx import ArcFaceONNX
    from insightface.model_zoo.scrfd import SCRFD

    detector = _route(get_model, require_path(cfg.detector, "eval.face.detector"), SCRFD, "eval.face.detector")
    if not detector.use_kps:
        raise WeightsError(f"{cfg.detector}: the face detector gives no landmarks (config key eval.face.detector)")
    if not cfg.recognizers:
        raise WeightsError("eval.face.recognizers is empty: list at least one ONNX face recognition model")
    recognizers = [
        _route(get_model, require_path(path, "eval.face.recognizers"), ArcFaceONNX, "eval.face.recognizers")
        for path in cfg.recognizers
    ]
    return FaceEncoder(detector, recognizers, cfg.det_size)


def _route(get_model, path: Path, kind: type, key: str):
    """insightface picks the model class from the ONNX graph; anything else than `kind` is a wrong file."""
    try:
        model = get_model(str(path), providers=CPU)
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own types for unreadable graphs
        raise WeightsError(f"{path}: not a loadable ONNX model ({type(e).__name__}) (config key {key})") from None
    if not isinstance(model, kind):
        found = type(model).__name__ if model is not None else "an unrecognised model"
        raise WeightsError(f"{path}: insightface reads it as {found}, expected {kind.__name__} (config key {key})")
    return model
