"""Face encoders through insightface's real loading path: ONNX models exported from tiny random networks (a
recognition model, and an SCRFD-shaped detector with landmarks), the ensemble cosine, no-face rows."""

from __future__ import annotations

import logging

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from insightface.utils.face_align import arcface_dst, norm_crop
from PIL import Image
from torch import nn

from dreamshot.config.schema import EvalConfig, FaceConfig
from dreamshot.eval.benchmarks.types import BenchCharacter, Benchmark, BenchShot, BenchStory
from dreamshot.eval.faces import (
    FaceEncoder,
    detection_thresholds,
    face_models,
    ffhq_align,
    load_face_encoder,
    published_ensemble,
)
from dreamshot.eval.metrics import cosine_matrix
from dreamshot.eval.suite import build_suite
from dreamshot.utils.errors import WeightsError

# insightface's alignment calls a scikit-image method deprecated upstream; not this project's warning.
pytestmark = pytest.mark.filterwarnings("ignore:`estimate` is deprecated:FutureWarning")

SIDE = 64  # the tiny detector's fixed input
FACE_ROW = 6  # stride-32 level, cell (x=1, y=1), first anchor: the anchor centred at (32, 32)


class TinyRecognizer(nn.Module):
    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Conv2d(3, 4, 8, 8), nn.Flatten(), nn.Linear(4 * 14 * 14, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class TinyScrfd(nn.Module):
    """SCRFD's output contract (scores, boxes, 5 landmarks at strides 8 / 16 / 32, two anchors per cell) with
    one face candidate, centred, whose score grows with the image's brightness (a dark image has no face)."""

    def __init__(self) -> None:
        super().__init__()
        # Landmarks of the arcface template, placed in a 32-pixel box around the anchor, in units of 32 pixels.
        self.register_buffer("kps", torch.tensor((arcface_dst - 56.0) / 112.0, dtype=torch.float32).reshape(1, 10))

    def forward(self, x: torch.Tensor):
        brightness = x.mean()
        zero = 0 * brightness  # keeps every output a function of the input
        outputs = {"scores": [], "boxes": [], "kps": []}
        for stride in (8, 16, 32):
            rows = (SIDE // stride) ** 2 * 2
            hot = torch.zeros(rows, 1)
            if stride == 32:
                hot[FACE_ROW] = 1.0
            outputs["scores"].append(hot * torch.sigmoid(10 * brightness) + zero)
            outputs["boxes"].append(torch.full((rows, 4), 0.5) + zero)
            outputs["kps"].append((self.kps * 32 / stride).expand(rows, 10) + zero)
        return (*outputs["scores"], *outputs["boxes"], *outputs["kps"])


def _export(module: nn.Module, shape: tuple[int, ...], path, outputs: int, dynamic: bool):
    names = [f"out{i}" for i in range(outputs)]
    axes = {"data": {0: "n"}, names[0]: {0: "n"}} if dynamic else None
    torch.onnx.export(
        module.eval(),
        (torch.zeros(shape),),
        str(path),
        input_names=["data"],
        output_names=names,
        dynamic_axes=axes,
        dynamo=False,
    )
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("faces")
    detector = _export(TinyScrfd(), (1, 3, SIDE, SIDE), folder / "scrfd.onnx", 9, dynamic=False)
    recognizers = [
        _export(TinyRecognizer(seed), (1, 3, 112, 112), folder / f"rec{seed}.onnx", 1, dynamic=True) for seed in (0, 1)
    ]
    return detector, recognizers


def _face(seed: int, brightness: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(np.clip(rng.normal(brightness, 30, (SIDE, SIDE, 3)), 0, 255).astype(np.uint8))


def test_recognition_model_exported_from_a_tiny_network_loads_through_insightface(models):
    detector, recognizers = models
    encoder = load_face_encoder(FaceConfig(detector=str(detector), recognizers=[str(recognizers[0])]))
    assert type(encoder.recognizers[0]).__name__ == "ArcFaceONNX" and type(encoder.detector).__name__ == "SCRFD"
    image = _face(0, 200)
    got = encoder([image])[0]

    # Direct: the detector's landmarks (the template in the centred 32-pixel box), insightface's alignment,
    # the ONNX network on (pixel - 127.5) / 127.5, unit norm.
    landmarks = arcface_dst * 32 / 112 + 16
    bgr = np.asarray(image)[..., ::-1].copy()
    aligned = norm_crop(bgr, landmark=landmarks, image_size=112)
    blob = (aligned[..., ::-1].astype(np.float32) - 127.5) / 127.5
    with torch.no_grad():
        torch.manual_seed(0)
        raw = TinyRecognizer(0)(torch.from_numpy(blob.transpose(2, 0, 1).copy())[None])[0]
    torch.testing.assert_close(got, raw / raw.norm(), rtol=1e-3, atol=1e-4)


def test_ensemble_cosine_is_the_mean_of_the_encoders_cosines(models):
    detector, recognizers = models
    encoder = load_face_encoder(FaceConfig(detector=str(detector), recognizers=[str(r) for r in recognizers]))
    a, b = _face(1, 190), _face(2, 210)
    features = encoder([a, b])
    assert features.shape == (2, 16) and torch.allclose(features.norm(dim=-1), torch.ones(2))
    singles = [FaceEncoder(encoder.detector, [r])([a, b]) for r in encoder.recognizers]
    expected = sum(cosine_matrix(f[:1], f[1:]) for f in singles) / 2
    torch.testing.assert_close(cosine_matrix(features[:1], features[1:]), expected)


def test_no_face_at_any_threshold_gives_a_zero_row(models):
    detector, recognizers = models
    encoder = load_face_encoder(FaceConfig(detector=str(detector), recognizers=[str(recognizers[0])]))
    features = encoder([_face(3, 5), _face(4, 200)])
    assert features[0].abs().sum() == 0 and features[1].norm() == pytest.approx(1.0)
    assert detection_thresholds() == [0.45, 0.35, 0.25, 0.15]


class TinyAdaFace(TinyRecognizer):
    """AdaFace's output contract: (embedding, norm)."""

    def forward(self, x: torch.Tensor):
        feature = self.net(x)
        return feature, feature.norm(dim=1, keepdim=True)


def _ffhq_aligned(image: Image.Image) -> np.ndarray:
    """What ViStoryBench gives AdaFace and FaceNet: facexlib's warp of the face onto its FFHQ template at 112,
    gray border, in BGR (here from the tiny detector's landmarks)."""
    template = np.array(
        [[192.98138, 239.94708], [318.90277, 240.1936], [256.63416, 314.01935], [201.26117, 371.41043],
         [313.08905, 371.15118]]
    ) * (112 / 512)  # fmt: skip
    landmarks = (arcface_dst * 32 / 112 + 16).astype(np.float32)
    matrix = cv2.estimateAffinePartial2D(landmarks, template.astype(np.float32), method=cv2.LMEDS)[0]
    bgr = np.asarray(image)[..., ::-1].copy()
    return cv2.warpAffine(bgr, matrix, (112, 112), borderMode=cv2.BORDER_CONSTANT, borderValue=(135, 133, 132))


def test_adaface_and_facenet_exports_are_fed_as_vistorybench_feeds_them(models, tmp_path):
    detector, recognizers = models
    adaface = _export(TinyAdaFace(2), (1, 3, 112, 112), tmp_path / "adaface.onnx", 2, dynamic=True)
    facenet = _export(TinyRecognizer(3), (1, 3, 112, 112), tmp_path / "facenet.onnx", 1, dynamic=True)
    cfg = FaceConfig(
        detector=str(detector), recognizers=[str(recognizers[0])], adaface=str(adaface), facenet=str(facenet)
    )
    encoder = load_face_encoder(cfg)
    assert published_ensemble(cfg) and face_models(cfg) == ["arcface", "adaface", "facenet"]
    image = _face(5, 200)
    got = encoder([image])[0]
    aligned = torch.from_numpy(_ffhq_aligned(image).astype(np.float32).transpose(2, 0, 1).copy())[None] / 255
    with torch.no_grad():
        parts = [
            encoder.recognizers[0].get_feat(
                norm_crop(np.asarray(image)[..., ::-1].copy(), arcface_dst * 32 / 112 + 16)
            ),
            TinyAdaFace(2)((aligned - 0.5) / 0.5)[0].numpy(),  # BGR, (x / 255 - 0.5) / 0.5
            TinyRecognizer(3)(aligned).numpy(),  # BGR, x / 255
        ]
    expected = torch.cat([F.normalize(torch.from_numpy(p).flatten(), dim=0) for p in parts]) / 3**0.5
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-4)
    # A face at the image's corner: what the warp brings in from outside is facexlib's gray.
    corner = ffhq_align(np.full((64, 64, 3), 255, np.uint8), (arcface_dst * 32 / 112).astype(np.float32), 112)
    assert tuple(corner[0, 0]) == (135, 133, 132) and tuple(corner[-1, -1]) == (255, 255, 255)


def test_a_realistic_human_benchmark_scored_with_fewer_face_models_warns(models, tmp_path, caplog):
    detector, recognizers = models
    mask = tmp_path / "mask.png"
    ann = BenchCharacter("ann", "Ann", "realistic_human", "Ann", (tmp_path / "ann.png",), (mask,))
    story = BenchStory("s1", {"ann": ann}, (BenchShot(1, "p", "s", "c", "a", ("ann",), masks={"ann": mask}),))
    bench = Benchmark("bench", (story,))
    cfg = EvalConfig(
        metrics=["cids"], crops="masks", face=FaceConfig(detector=str(detector), recognizers=[str(recognizers[0])])
    )
    with caplog.at_level(logging.WARNING):
        suite = build_suite(cfg, bench, tmp_path, torch.device("cpu"))
    assert "cids" in suite.metrics
    assert "CIDS of 1 bench stories with realistic_human characters uses the face model(s) arcface" in caplog.text
    assert "AdaFace IR-101 and FaceNet" in caplog.text


def test_a_wrong_model_file_is_a_one_line_error(models, tmp_path):
    detector, recognizers = models
    with pytest.raises(WeightsError, match=r"reads it as ArcFaceONNX, expected SCRFD.*eval\.face\.detector"):
        load_face_encoder(FaceConfig(detector=str(recognizers[0]), recognizers=[str(recognizers[0])]))
    with pytest.raises(WeightsError, match=r"eval\.face\.recognizers is empty and eval\.face\.adaface"):
        load_face_encoder(FaceConfig(detector=str(detector)))
    with pytest.raises(WeightsError, match=r"glintr100\.onnx: file not found.*eval\.face\.recognizers.*antelopev2"):
        load_face_encoder(FaceConfig(detector=str(detector), recognizers=[str(tmp_path / "glintr100.onnx")]))
