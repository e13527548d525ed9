"""Face identity features for `realistic_human` characters (EVAL.md "CIDS"), from ONNX models.

A face detector with five landmarks (antelopev2's SCRFD) finds the face in a character crop, the face is
aligned for each recognition model and every configured model embeds it. Each model is fed as ViStoryBench
feeds it:
- ArcFace (`eval.face.recognizers`, antelopev2's glintr100.onnx): insightface's own path, the face aligned to
  the ArcFace template (`norm_crop`), RGB, (x - 127.5) / 127.5;
- AdaFace IR-101 (`eval.face.adaface`) and FaceNet (`eval.face.facenet`), ONNX exports of the torch models the
  published code runs: the face aligned to facexlib's FFHQ template at 112 x 112 (gray border), BGR, and
  (x / 255 - 0.5) / 0.5 for AdaFace, x / 255 for FaceNet (`OnnxFaceModel`).
The published code finds the AdaFace / FaceNet faces with facexlib's RetinaFace; here SCRFD's landmarks serve
all three models (docs/evaluation.md, "Known differences").

Ensemble: the published code averages the cosines of its face encoders (ArcFace, AdaFace IR-101 and FaceNet).
With each encoder's embedding L2-normalised, concatenated and divided by sqrt(E), the plain cosine of two such
vectors IS that average, so the encoder returns one vector per image and the metric code needs no ensemble
logic.

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

# facexlib's five-point FFHQ template at 512 x 512 (scaled to the model's side), and the border colour of its warp.
FFHQ_TEMPLATE_512 = np.array(
    [[192.98138, 239.94708], [318.90277, 240.1936], [256.63416, 314.01935], [201.26117, 371.41043],
     [313.08905, 371.15118]],
    dtype=np.float32,
)  # fmt: skip
FFHQ_BORDER = (135, 133, 132)
# Pixel scaling (x / 255 - mean) / std of the face models ViStoryBench runs in torch, on BGR input.
TORCH_FACE_MODELS = {"adaface": (0.5, 0.5), "facenet": (0.0, 1.0)}
FIRST_THRESHOLD = 0.45
THRESHOLD_STEP = 0.1
LAST_THRESHOLD = 0.1
CPU = ["CPUExecutionProvider"]


def detection_thresholds() -> list[float]:
    """0.45, 0.35, 0.25, 0.15: the thresholds tried in turn."""
    count = int((FIRST_THRESHOLD - LAST_THRESHOLD) / THRESHOLD_STEP + 1e-9) + 1
    return [round(FIRST_THRESHOLD - i * THRESHOLD_STEP, 6) for i in range(count)]


def ffhq_align(bgr: np.ndarray, landmarks: np.ndarray, side: int) -> np.ndarray:
    """The face of a BGR image warped as facexlib aligns it: the similarity transform (LMEDS) taking the five
    landmarks (5, 2) to the FFHQ template scaled to `side`, a side x side crop with a gray border."""
    import cv2  # imported here with the ONNX models

    template = FFHQ_TEMPLATE_512 * (side / 512.0)
    matrix = cv2.estimateAffinePartial2D(landmarks.astype(np.float32), template, method=cv2.LMEDS)[0]
    return cv2.warpAffine(bgr, matrix, (side, side), borderMode=cv2.BORDER_CONSTANT, borderValue=FFHQ_BORDER)


class OnnxFaceModel:
    """An ONNX export of a face model ViStoryBench runs in torch (`kind`: adaface | facenet), fed as it is fed
    there (module docstring). Its first output is the embedding."""

    def __init__(self, session, kind: str) -> None:
        self.session, self.kind = session, kind
        self.mean, self.std = TORCH_FACE_MODELS[kind]
        shape = session.get_inputs()[0].shape
        side = shape[-1] if isinstance(shape[-1], int) else 112
        self.input_size = (side, side)
        self.output_shape = session.get_outputs()[0].shape

    def align(self, bgr: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
        return ffhq_align(bgr, landmarks, self.input_size[0])

    def get_feat(self, aligned: np.ndarray) -> np.ndarray:
        pixels = (aligned.astype(np.float32) / 255.0 - self.mean) / self.std
        blob = np.ascontiguousarray(pixels.transpose(2, 0, 1)[None])
        return self.session.run(None, {self.session.get_inputs()[0].name: blob})[0]


class FaceEncoder:
    """`encoder(images)` -> (N, D) ensemble face embeddings (D = sum of the recognisers' widths), zero rows
    where no face is found. `detector` is an insightface SCRFD; `recognizers` are insightface ArcFaceONNX models
    (aligned with `norm_crop`) or models with their own `align(bgr, landmarks)` (`OnnxFaceModel`)."""

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
            align = getattr(recognizer, "align", None)
            if align is not None:
                aligned = align(bgr, landmarks)
            else:
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


def face_models(cfg: FaceConfig) -> list[str]:
    """The face models `cfg` configures, as named in the published ensemble."""
    return ["arcface"] * len(cfg.recognizers) + [kind for kind in TORCH_FACE_MODELS if getattr(cfg, kind)]


def published_ensemble(cfg: FaceConfig) -> bool:
    """Whether `cfg` has the three face models every published CIDS averages (ArcFace, AdaFace, FaceNet)."""
    return set(face_models(cfg)) == {"arcface", *TORCH_FACE_MODELS}


def load_face_encoder(cfg: FaceConfig) -> FaceEncoder:
    """The detector and recognisers of `cfg` (CPU onnxruntime): ArcFace models through insightface's model
    router, then AdaFace and FaceNet when configured."""
    from insightface.model_zoo import get_model  # imported here: onnxruntime sessions are costly to set up
    from insightface.model_zoo.arcface_onnx import ArcFaceONNX
    from insightface.model_zoo.scrfd import SCRFD

    detector = _route(get_model, require_path(cfg.detector, "eval.face.detector"), SCRFD, "eval.face.detector")
    if not detector.use_kps:
        raise WeightsError(f"{cfg.detector}: the face detector gives no landmarks (config key eval.face.detector)")
    if not face_models(cfg):
        raise WeightsError(
            "eval.face.recognizers is empty and eval.face.adaface / eval.face.facenet are unset: configure at "
            "least one face recognition model"
        )
    recognizers = [
        _route(get_model, require_path(path, "eval.face.recognizers"), ArcFaceONNX, "eval.face.recognizers")
        for path in cfg.recognizers
    ]
    for kind in TORCH_FACE_MODELS:
        if getattr(cfg, kind):
            recognizers.append(
                OnnxFaceModel(_session(require_path(getattr(cfg, kind), f"eval.face.{kind}"), kind), kind)
            )
    return FaceEncoder(detector, recognizers, cfg.det_size)


def _session(path: Path, kind: str):
    import onnxruntime

    try:
        return onnxruntime.InferenceSession(str(path), providers=CPU)
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own types for unreadable graphs
        raise WeightsError(
            f"{path}: not a loadable ONNX model ({type(e).__name__}) (config key eval.face.{kind})"
        ) from None


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
