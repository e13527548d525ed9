"""Our metrics against the numbers ViStoryBench's own code gives on a frozen fixture (tests/data/vistorybench):
the same tiny random encoders, images, and mocked detector, face models and judge. `fixture.py` there made the
data and, run against a ViStoryBench checkout, `expected.json` (which records the commit); here only ours runs."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from insightface.utils.face_align import arcface_dst

from dreamshot.config.schema import AestheticConfig, ClipEncoderConfig, CsdConfig, DetectorConfig
from dreamshot.eval.benchmarks.vistorybench import load_vistorybench
from dreamshot.eval.crops import DetectorCrops
from dreamshot.eval.detector import CharacterDetector
from dreamshot.eval.extractors import load_aesthetic_scorer, load_clip_encoder, load_csd_encoder
from dreamshot.eval.faces import FaceEncoder
from dreamshot.eval.generation import read_story_shots
from dreamshot.eval.identity import CharacterMatcher
from dreamshot.eval.judge import AnswerCache, Judge, read_prompts
from dreamshot.eval.story_metrics import AestheticMetric, AlignmentMetric, IdentityMetric, StorySample, StyleMetric

pytestmark = pytest.mark.filterwarnings("ignore:`estimate` is deprecated:FutureWarning")

_spec = importlib.util.spec_from_file_location(
    "vistorybench_fixture", Path(__file__).parent / "data/vistorybench/fixture.py"
)
fixture = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fixture)

# Upstream rounds each character's CIDS to 4 decimals and the story mean again: at most 1e-4 apart.
CIDS_TOLERANCE = 1e-4
FLOAT_TOLERANCE = 1e-5


class FixtureDetector(CharacterDetector):
    """The mocked GroundingDINO: the fixture's boxes for an image, as transformers' post-processing gives them
    (corners in pixels, best first)."""

    def __init__(self) -> None:
        super().__init__(torch.nn.Identity(), None, DetectorConfig())
        self.table = fixture.detections()

    def detect(self, image):
        found = sorted(self.table.get(fixture.pixel_key(image), []), key=lambda row: -row[4])
        rows = torch.tensor(found, dtype=torch.float32).reshape(-1, 5)
        centre, size = rows[:, :2], rows[:, 2:4]
        scale = torch.tensor([image.width, image.height], dtype=torch.float32)
        boxes = torch.cat([(centre - size / 2) * scale, (centre + size / 2) * scale], dim=1)
        return boxes, rows[:, 4]


class FixtureFaceDetector:
    """The mocked SCRFD: one face (landmarks of the ArcFace template over the image) when the fixture's face
    score reaches the threshold. It keeps the image for the mocked recognisers."""

    image: np.ndarray | None = None

    def detect(self, bgr, input_size, det_thresh):
        self.image = bgr
        score = fixture.face_score(bgr)
        if score < det_thresh:
            return np.zeros((0, 5), dtype=np.float32), None
        height, width = bgr.shape[:2]
        landmarks = arcface_dst / 112.0 * np.array([width, height], dtype=np.float32)
        return np.array([[0, 0, width, height, score]], dtype=np.float32), landmarks[None]


class FixtureRecognizer:
    """A mocked face model: the fixture's embedding of the face the detector found."""

    input_size = (112, 112)
    output_shape = [1, 8]

    def __init__(self, model: str, detector: FixtureFaceDetector) -> None:
        self.model, self.detector = model, detector

    def get_feat(self, aligned):
        return fixture.face_embedding(self.model, self.detector.image)[None]


class FixtureJudge:
    """The mocked judge endpoint: the fixture's reply, and the digest of every request it got."""

    model = "gpt-4.1"
    settings = {"seed": 123, "max_tokens": 512}

    def __init__(self) -> None:
        self.requests: list[str] = []

    def complete(self, messages, temperature):
        messages = json.loads(json.dumps(messages))
        self.requests.append(fixture.request_digest(messages))
        return fixture.judge_reply(messages, temperature)


@pytest.fixture(scope="module")
def ours(tmp_path_factory):
    """Per story, our values on the fixture; and the judge's requests."""
    open_clip.add_model_config(fixture.WEIGHTS)
    general = load_clip_encoder(ClipEncoderConfig(arch=fixture.ARCH, weights=str(fixture.WEIGHTS / "clip.safetensors")))
    faces = FixtureFaceDetector()
    face = FaceEncoder(faces, [FixtureRecognizer(m, faces) for m in fixture.FACE_MODELS])
    matcher = CharacterMatcher(DetectorCrops(FixtureDetector()), {"general": general, "face": face})
    backend = FixtureJudge()
    cache = AnswerCache(tmp_path_factory.mktemp("judge") / "cache.jsonl")
    judge = Judge(backend, cache, read_prompts(fixture.PLACEHOLDER_PROMPTS))
    weights = fixture.WEIGHTS
    metrics = [
        IdentityMetric(matcher),
        StyleMetric(load_csd_encoder(CsdConfig(arch=fixture.ARCH, weights=str(weights / "csd.safetensors")))),
        AestheticMetric(
            load_aesthetic_scorer(
                AestheticConfig(siglip=str(weights / "siglip"), head=str(weights / "aes_head.safetensors"))
            )
        ),
        AlignmentMetric(judge, matcher),
    ]
    bench = load_vistorybench(fixture.DATASET)
    for story in bench.stories:
        sample = StorySample(story, read_story_shots(fixture.OUTPUTS, story, "r2s"))
        for metric in metrics:
            metric.update(sample)
    stories: dict[str, dict[str, float]] = {}
    for metric in metrics:
        for story, values in metric.per_story.items():
            stories.setdefault(story, {}).update(values)
    return stories, sorted(backend.requests)


@pytest.fixture(scope="module")
def expected():
    return json.loads(fixture.EXPECTED.read_text())


def test_the_fixture_records_the_upstream_commit(expected):
    assert expected["upstream"] == "github.com/ViStoryBench/vistorybench" and len(expected["commit"]) == 40


def test_the_same_stories_have_each_value(ours, expected):
    values, _ = ours
    for story, theirs in expected["stories"].items():
        names = {name for name in theirs if name != "cids_characters"}
        assert set(values[story]) - {"alignment"} == names, story


@pytest.mark.parametrize(
    ("name", "tolerance"),
    [("cids_cross", CIDS_TOLERANCE), ("cids_self", CIDS_TOLERANCE), ("csd_cross", FLOAT_TOLERANCE),
     ("csd_self", FLOAT_TOLERANCE), ("aes", FLOAT_TOLERANCE), ("alignment_scene", 0.0),
     ("alignment_camera", 0.0), ("alignment_character_action", 0.0), ("alignment_single_character_action", 0.0)],
)  # fmt: skip
def test_each_value_agrees_with_vistorybench(ours, expected, name, tolerance):
    values, _ = ours
    for story, theirs in expected["stories"].items():
        if name in theirs:
            assert values[story][name] == pytest.approx(theirs[name], abs=tolerance), story


def test_the_judge_gets_the_same_requests(ours, expected):
    _, requests = ours
    assert requests == expected["requests"]
