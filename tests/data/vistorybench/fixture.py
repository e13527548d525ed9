"""A frozen ViStoryBench check: a tiny benchmark, tiny random encoder weights, and the numbers ViStoryBench's
own metric code gives for them, so that `tests/test_vistorybench_reference.py` catches any drift of ours.

What is here (all made by this script, nothing of ViStoryBench's is stored):
- `dataset/ViStory/<NN>/story.json` and reference images; `generated/<NN>/shot_NN.png`: three stories built to
  reach every branch the published CIDS and alignment code has (every detector box a candidate, a missed
  reference skipped, whole references when all are missed, `.png` references CIDS does not read, shots with no
  listed character / no detection / no face, a face found only at a lowered threshold, a character with no
  usable reference);
- `weights/`: tiny seeded instances of the real classes (open_clip ViT for CLIP, the CSD layout on the same
  architecture, a transformers SigLIP and the v2.5 head), stored in the formats our loaders read;
- `detections.json`: the boxes the mocked detector gives each image (normalised centre / size, and a score);
- `expected.json`: the upstream commit, and per story the values its code gives (`upstream` below).

The detector, the face models and the judge are mocks defined here and used by both sides: a face is found in
an image when enough of it has the skin colour (a score the detection threshold is compared with), each face
model embeds it as a fixed random projection of its 3 x 3 colour means, and the judge's answer is a hash of
the request (rubric text replaced by a placeholder, as the published prompt files are not ours to ship), at
times an unparsable one first so that the temperature rule is exercised.

    .venv/bin/python tests/data/vistorybench/fixture.py make           # images, weights, detections
    /path/to/venv/bin/python tests/data/vistorybench/fixture.py upstream /path/to/vistorybench
                                                                         # expected.json, with ViStoryBench's code

`upstream` runs in an environment with ViStoryBench's requirements (its pinned transformers; torch,
torchvision, numpy, scipy, natsort, opencv, pandas, pyyaml, requests); it imports the checkout's modules,
stubs the packages whose models are mocked (GroundingDINO, insightface, facexlib, AdaFace), and runs its
evaluators on the fixture in float32 (the published AES runs in float16).
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
DATASET = HERE / "dataset"
OUTPUTS = HERE / "generated"
WEIGHTS = HERE / "weights"
DETECTIONS = HERE / "detections.json"
EXPECTED = HERE / "expected.json"
PLACEHOLDER_PROMPTS = HERE / "prompts"

# The tiny ViT shared by CLIP and CSD (an open_clip model config, registered under ARCH).
ARCH = "vistorybench-fixture-vit"
WIDTH, LAYERS, HEADS, PATCH, EMBED = 16, 2, 2, 14, 8
OPEN_CLIP_CONFIG = {
    "embed_dim": EMBED,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 224, "layers": LAYERS, "width": WIDTH, "patch_size": PATCH, "head_width": 8},
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1},
}
SIGLIP_CONFIG = {
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "image_size": 378,
    "patch_size": 14,
}
METHOD, MODE, LANGUAGE, TIMESTAMP = "fixture", "r2s", "en", "20250101-000000"

# --- the mocked face models -----------------------------------------------------------------------------

SKIN = (255, 205, 170)  # RGB
FACE_MODELS = ("arcface", "adaface", "facenet")
LOWEST_THRESHOLD = 0.15  # the last face detection threshold both sides try (0.45 lowered by 0.1)


def face_score(bgr: np.ndarray) -> float:
    """The mocked face detector's confidence: twice the share of skin-coloured pixels (BGR uint8 image)."""
    skin = np.array(SKIN[::-1], dtype=np.int64)
    close = (np.abs(bgr.astype(np.int64) - skin) <= 12).all(axis=-1)
    return float(min(1.0, 2.0 * close.mean()))


def face_embedding(model: str, bgr: np.ndarray) -> np.ndarray:
    """(8,) float32: a fixed random projection of the image's 3 x 3 grid of BGR means (unnormalised)."""
    height, width = bgr.shape[:2]
    cells = [
        bgr[i * height // 3 : (i + 1) * height // 3, j * width // 3 : (j + 1) * width // 3].reshape(-1, 3).mean(0)
        for i in range(3)
        for j in range(3)
    ]
    projection = np.random.RandomState(FACE_MODELS.index(model) + 11).standard_normal((27, 8))
    return (np.concatenate(cells) / 255.0 @ projection).astype(np.float32)


# --- the mocked detector --------------------------------------------------------------------------------


def pixel_key(image: Image.Image) -> str:
    """What the mocked detector recognises an image by: a hash of its RGB pixels and size."""
    rgb = image.convert("RGB")
    return hashlib.sha256(f"{rgb.size}".encode() + rgb.tobytes()).hexdigest()[:16]


def detections() -> dict[str, list[list[float]]]:
    """pixel key -> [[cx, cy, w, h, score], ...] (normalised), in the order GroundingDINO would list them."""
    return json.loads(DETECTIONS.read_text())


# --- the mocked judge -----------------------------------------------------------------------------------


def judge_reply(messages: list[dict], temperature: float) -> str:
    """The judge's reply to a request: "Score: N" from a hash of it; for some requests the first answer (at
    temperature 0) is unparsable, so the next attempt must come at 0.1."""
    digest = request_digest(messages)
    if int(digest[2:4], 16) % 4 == 0 and round(temperature, 6) == 0.0:
        return "Hard to say."
    return f"Reasoning.\nScore: {int(digest[:2], 16) % 5}"


def request_digest(messages: list[dict]) -> str:
    return hashlib.sha256(json.dumps(messages, sort_keys=True).encode()).hexdigest()


def rubric(dimension: str) -> str:
    """The placeholder standing for the published rubric of `dimension` in requests."""
    return f"<published rubric: {dimension}>"


# --- the benchmark ----------------------------------------------------------------------------------------

# Character key -> (tag, colour RGB, skin share of its patch: 0 = no face).
CHARACTERS = {
    "01": {"fox": ("non_human", (200, 90, 20), 0.0), "owl": ("non_human", (90, 60, 160), 0.0),
           "ann": ("realistic_human", (40, 120, 60), 0.4)},
    "02": {"bob": ("realistic_human", (30, 60, 140), 0.35), "cat": ("non_human", (160, 160, 30), 0.0),
           "dog": ("non_human", (120, 70, 40), 0.0)},
    "03": {"eve": ("realistic_human", (150, 40, 90), 0.0)},
}  # fmt: skip
# Reference images per character: (file name, patch box in a 40 x 40 image as x0, y0, x1, y1, detected?).
# Box corners are multiples of 5 here and of 3 vertically in the 64 x 48 shots, so that the normalised boxes are
# exact in float32 and both sides cut the same pixels.
REFERENCES = {
    "01": {"fox": [("00.jpg", (5, 5, 30, 35), True), ("01.jpg", (10, 5, 35, 30), False)],
           "owl": [("00.jpg", (5, 5, 35, 35), True), ("01.png", (0, 0, 20, 40), True)],
           "ann": [("00.jpg", (5, 0, 35, 40), True), ("01.jpg", (10, 10, 30, 35), "no face")]},
    "02": {"bob": [("00.jpg", (5, 5, 35, 35), False)],
           "cat": [("00.jpg", (0, 10, 40, 30), False), ("01.jpg", (10, 10, 30, 30), False)],
           "dog": [("00.jpg", (5, 5, 35, 35), True)]},
    "03": {"eve": [("00.jpg", (5, 5, 35, 35), True)]},
}  # fmt: skip
# Shots: (listed characters, patches drawn as (character, box in 64 x 48, skin share, detection score or None)).
SHOTS = {
    "01": [
        (["fox", "owl"], [("fox", (2, 3, 26, 45), 0.0, 0.62), ("owl", (34, 6, 60, 42), 0.0, 0.55),
                          ("fox", (40, 30, 56, 45), 0.0, 0.71)]),
        (["fox"], [("owl", (4, 3, 28, 39), 0.0, 0.9), ("fox", (36, 9, 62, 45), 0.0, 0.4)]),
        ([], [("fox", (10, 9, 40, 39), 0.0, 0.5)]),
        (["owl", "ann"], [("owl", (6, 6, 30, 39), 0.0, None), ("ann", (34, 3, 60, 45), 0.4, None)]),
        (["ann"], [("ann", (8, 3, 40, 45), 0.0, 0.8)]),
        (["ann", "fox"], [("ann", (2, 3, 30, 45), 0.4, 0.66), ("fox", (34, 9, 62, 39), 0.0, 0.58)]),
    ],
    "02": [
        (["bob", "cat"], [("bob", (4, 3, 30, 45), 0.35, 0.7), ("cat", (36, 6, 60, 42), 0.0, 0.6)]),
        (["cat"], [("cat", (6, 9, 34, 39), 0.0, 0.5), ("dog", (40, 3, 62, 30), 0.0, 0.45)]),
        (["bob"], [("bob", (16, 3, 48, 45), 0.16, 0.77)]),
    ],
    "03": [(["eve"], [("eve", (10, 3, 50, 45), 0.0, 0.6)]), ([], [])],
}  # fmt: skip


def _canvas(size: tuple[int, int], seed: int) -> np.ndarray:
    """A smooth background with a little texture (W, H) -> (H, W, 3) uint8."""
    width, height = size
    rng = np.random.RandomState(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = rng.uniform(60, 200, 3)
    image = base + 40 * np.sin(x[..., None] / (5 + 3 * rng.rand(3)) + y[..., None] / 7)
    return np.clip(image, 0, 255).astype(np.uint8)


def _patch(image: np.ndarray, box: tuple[int, int, int, int], colour, skin_share: float, seed: int) -> None:
    """A character: its colour with a stripe texture, and a skin-coloured block covering `skin_share` of it."""
    x0, y0, x1, y1 = box
    rng = np.random.RandomState(seed)
    stripes = (np.arange(y1 - y0)[:, None] + np.arange(x1 - x0)[None, :]) % 6 < 3
    block = np.array(colour, dtype=np.float64) + np.where(stripes[..., None], 25, -25) + rng.uniform(-8, 8, 3)
    image[y0:y1, x0:x1] = np.clip(block, 0, 255).astype(np.uint8)
    if skin_share > 0:
        rows = max(1, round((y1 - y0) * skin_share))
        image[y0 : y0 + rows, x0:x1] = SKIN


def _normalised(box, size) -> list[float]:
    (x0, y0, x1, y1), (width, height) = box, size
    return [(x0 + x1) / 2 / width, (y0 + y1) / 2 / height, (x1 - x0) / width, (y1 - y0) / height]


def _story_json(story: str) -> dict:
    characters = {
        key: {"tag": tag, "name_en": key.title(), "name_ch": key, "prompt_en": f"a {key}", "prompt_ch": key,
              "num_of_appearances": 1}
        for key, (tag, _, _) in CHARACTERS[story].items()
    }  # fmt: skip
    shots = []
    for i, (listed, _) in enumerate(SHOTS[story], start=1):
        text = {field: f"{field} of shot {i} of story {story}" for field in ("scene", "camera", "plot", "script")}
        shots.append(
            {
                "index": i,
                "Plot Correspondence": {"en": text["plot"], "ch": "-"},
                "Setting Description": {"en": text["scene"], "ch": "-"},
                "Shot Perspective Design": {"en": text["camera"], "ch": "-"},
                "Characters Appearing": {"en": listed, "ch": listed},
                "Static Shot Description": {"en": f"{' and '.join(listed) or 'nobody'} in shot {i}", "ch": "-"},
            }
        )
    return {"Story_type": {"en": "fixture", "ch": "-"}, "Characters": characters, "Shots": shots}


def make() -> None:
    """Write the benchmark, the outputs, the detections and the weights (in this project's environment)."""
    table: dict[str, list[list[float]]] = {}
    seed = 0
    for story, characters in CHARACTERS.items():
        folder = DATASET / "ViStory" / story
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "story.json").write_text(json.dumps(_story_json(story), indent=1))
        for key, references in REFERENCES[story].items():
            _, colour, skin = characters[key]
            for name, box, detected in references:
                seed += 1
                image = _canvas((40, 40), seed)
                _patch(image, box, colour, 0.0 if detected == "no face" else skin, seed)
                path = folder / "image" / key / name
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(image).save(path, quality=95)
                if detected:
                    table[pixel_key(Image.open(path))] = [[*_normalised(box, (40, 40)), 0.8]]
        for i, (_, patches) in enumerate(SHOTS[story], start=1):
            seed += 1
            image = _canvas((64, 48), seed)
            found = []
            for key, box, skin, score in patches:
                _patch(image, box, characters[key][1], skin, seed)
                if score is not None:
                    found.append([*_normalised(box, (64, 48)), score])
            path = OUTPUTS / story / f"shot_{i:02d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(path, optimize=True)
            if found:
                table[pixel_key(Image.open(path))] = found
    DETECTIONS.write_text(json.dumps(table, indent=1, sort_keys=True))
    PLACEHOLDER_PROMPTS.mkdir(exist_ok=True)
    for dimension in ("scene", "camera", "character_action", "single_character_action"):
        (PLACEHOLDER_PROMPTS / f"{dimension}.txt").write_text(rubric(dimension))
    _make_weights()


def _random_state(module, seed: int, scale: float) -> dict:
    """`module`'s state dict redrawn from a seeded normal: layer norms 1 + noise with no bias, other biases a
    tenth of `scale` (large enough that the tiny towers tell the fixture's characters apart)."""
    import torch

    rng = np.random.RandomState(seed)
    state = {}
    for name, tensor in sorted(module.state_dict().items()):
        if not tensor.is_floating_point():
            state[name] = tensor
            continue
        values = rng.standard_normal(tuple(tensor.shape)) * scale
        if any(part in name for part in ("ln_", "norm")):
            values = 1.0 + values if name.endswith("weight") else 0.0 * values
        elif name.endswith("bias"):
            values = 0.1 * values
        state[name] = torch.tensor(values, dtype=torch.float32)
    return state


def _make_weights() -> None:
    import open_clip
    import torch
    from safetensors.torch import save_file
    from transformers import SiglipVisionConfig, SiglipVisionModel

    WEIGHTS.mkdir(exist_ok=True)
    (WEIGHTS / f"{ARCH}.json").write_text(json.dumps(OPEN_CLIP_CONFIG, indent=1))
    open_clip.add_model_config(WEIGHTS)
    visual = open_clip.create_model(ARCH, pretrained=None).visual
    half = {k: v.half() for k, v in _random_state(visual, 1, scale=0.5).items()}
    save_file({f"visual.{k}": v for k, v in half.items()}, WEIGHTS / "clip.safetensors")
    style = _random_state(visual, 2, scale=0.5)
    csd = {f"backbone.{k}": v.half() for k, v in style.items() if k != "proj"}
    csd["last_layer_style"] = style["proj"].half()
    csd["last_layer_content"] = torch.zeros_like(style["proj"]).half()
    save_file(csd, WEIGHTS / "csd.safetensors")
    siglip = SiglipVisionModel(SiglipVisionConfig(**SIGLIP_CONFIG))
    siglip.load_state_dict(_random_state(siglip, 3, scale=0.1))
    siglip.save_pretrained(WEIGHTS / "siglip")
    from dreamshot.eval.extractors import AestheticHead

    head = AestheticHead(SIGLIP_CONFIG["hidden_size"])
    save_file({k: v.half() for k, v in _random_state(head, 4, scale=0.1).items()}, WEIGHTS / "aes_head.safetensors")


def load_weights(name: str) -> dict:
    """A stored weight file as float32 tensors."""
    from safetensors.torch import load_file

    return {k: v.float() for k, v in load_file(WEIGHTS / name).items()}


# --- ViStoryBench's side --------------------------------------------------------------------------------


def upstream(checkout: Path) -> None:
    """Run ViStoryBench's evaluators (CIDS with single-character action, CSD, AES, prompt alignment) on the
    fixture and write expected.json."""
    import os
    import subprocess

    commit = subprocess.run(["git", "-C", str(checkout), "rev-parse", "HEAD"], capture_output=True, text=True)
    if commit.returncode != 0:
        raise SystemExit(f"{checkout}: not a git checkout of ViStoryBench")
    _stub_mocked_packages()
    sys.path.insert(0, str(checkout))
    os.chdir(checkout)  # its prompt files are read from paths relative to the repository root
    os.environ.update(API_KEY="fixture-key", BASE_URL="http://judge.invalid/v1")
    root = _upstream_outputs()
    config = {
        "core": {"paths": {"dataset": str(DATASET), "outputs": str(root), "pretrain": str(WEIGHTS),
                           "results": str(root.parent / "results")}, "runtime": {"device": "cpu"}},
        "evaluators": {"cids": {"ref_mode": "origin", "use_multi_face_encoder": True, "ensemble_method": "average"}},
    }  # fmt: skip
    requests: list[str] = []
    _patch_judge(checkout, requests)
    stories = {story: {} for story in CHARACTERS}
    evaluators = _upstream_evaluators(config)
    for story in stories:
        for name, evaluator in evaluators.items():
            try:
                result = evaluator.evaluate(method=METHOD, story_id=story)
            except AssertionError as e:  # what bench_run does with a story its CIDS cannot score: skips it
                print(f"story {story}: {name} skipped ({e})")
                continue
            stories[story].update(_upstream_values(name, result))
    expected = {
        "upstream": "github.com/ViStoryBench/vistorybench",
        "commit": commit.stdout.strip(),
        "stories": stories,
        "requests": sorted(requests),
    }
    EXPECTED.write_text(json.dumps(expected, indent=1, sort_keys=True) + "\n")
    print(json.dumps(stories, indent=1))


def _upstream_outputs() -> Path:
    """ViStoryBench's output layout, {method}/{mode}/{language}/{timestamp}/{story}/, linked to the shots."""
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="vistorybench-fixture-")) / "outputs"
    run = root / METHOD / MODE / LANGUAGE / TIMESTAMP
    run.mkdir(parents=True)
    for story in CHARACTERS:
        (run / story).symlink_to(OUTPUTS / story)
    return root


def _upstream_values(name: str, result: dict | None) -> dict:
    if not result:
        return {}
    metrics = result.get("metrics", result)
    if name == "cids":
        values = {"cids_cross": metrics["cids_cross_mean"], "cids_self": metrics["cids_self_mean"]}
        values["cids_characters"] = result["cids"]
        if "single_character_action" in metrics:
            values["alignment_single_character_action"] = metrics["single_character_action"]
        return values
    if name == "csd":
        return {"csd_cross": metrics["cross_csd"], "csd_self": metrics["self_csd"]}
    if name == "aesthetic":
        return {"aes": metrics["aesthetic_score"]}
    return {f"alignment_{dimension}": value for dimension, value in metrics.items()}


def _stub_mocked_packages() -> None:
    """Modules ViStoryBench's CIDS imports for the models that are mocked here."""
    import types

    def module(name: str, **attributes) -> None:
        stub = types.ModuleType(name)
        stub.__dict__.update(attributes)
        stub.__path__ = []
        sys.modules[name] = stub

    def unused(*args, **kwargs):
        raise AssertionError("a mocked model's loader was called")

    module("insightface", app=types.SimpleNamespace(FaceAnalysis=unused))
    module("insightface.app", FaceAnalysis=unused)
    module("groundingdino")
    module("groundingdino.util")
    module("groundingdino.util.inference", load_model=unused, load_image=None, predict=None, annotate=None)
    module("facexlib")
    module("facexlib.utils")
    module("facexlib.utils.face_restoration_helper", FaceRestoreHelper=unused)
    module("vistorybench.bench.content.AdaFace")
    module(
        "vistorybench.bench.content.AdaFace.inference", load_pretrained_model=unused, to_input=None, adaface_models={}
    )


class _Face:
    def __init__(self, embedding: np.ndarray) -> None:
        self.embedding = embedding


class _FaceAnalysis:
    """insightface's FaceAnalysis as the CIDS code uses it: prepare(det_thresh), get(BGR) -> faces."""

    def __init__(self) -> None:
        self.threshold = 0.45

    def prepare(self, ctx_id: int, det_thresh: float) -> None:
        self.threshold = det_thresh

    def get(self, bgr: np.ndarray) -> list[_Face]:
        return [_Face(face_embedding("arcface", bgr))] if face_score(bgr) >= self.threshold else []


class _FaceHelper:
    """facexlib's FaceRestoreHelper: the face it finds, "aligned" (the crop itself, in BGR)."""

    def clean_all(self) -> None:
        self.image, self.cropped_faces = None, []

    def read_image(self, bgr: np.ndarray) -> None:
        self.image = bgr

    def get_face_landmarks_5(self, only_center_face: bool = False) -> None:
        pass

    def align_warp_face(self) -> None:
        self.cropped_faces = [self.image] if face_score(self.image) >= LOWEST_THRESHOLD else []


def _upstream_evaluators(config: dict) -> dict:
    import torch
    from torch import nn
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        SiglipVisionConfig,
    )
    from vistorybench.bench.content import cids_evaluator
    from vistorybench.bench.prompt_align.prompt_align_evaluator import PromptAlignEvaluator
    from vistorybench.bench.quality import aesthetic_evaluator
    from vistorybench.bench.style import csd_evaluator
    from vistorybench.bench.style.csd import clip_model

    table = detections()

    def load_image(path):
        return path, path

    def predict(model, image, caption, box_threshold, text_threshold):
        found = table.get(pixel_key(Image.open(image)), [])
        boxes = torch.tensor([row[:4] for row in found], dtype=torch.float32).reshape(-1, 4)
        return boxes, torch.tensor([row[4] for row in found], dtype=torch.float32), ["character"] * len(found)

    cids_evaluator.load_image, cids_evaluator.predict = load_image, predict
    cids_evaluator.annotate = lambda **kwargs: None

    def adaface(bgr_input):
        bgr = (bgr_input[0].permute(1, 2, 0).numpy() * 0.5 + 0.5) * 255.0
        return torch.from_numpy(face_embedding("adaface", np.rint(bgr).astype(np.uint8)))[None], None

    def to_input(rgb):
        bgr = ((rgb[:, :, ::-1] / 255.0) - 0.5) / 0.5
        return torch.tensor(np.ascontiguousarray(bgr.transpose(2, 0, 1)))[None].float()

    def facenet(x):
        bgr = np.rint(x[0].permute(1, 2, 0).numpy() * 255.0).astype(np.uint8)
        return torch.from_numpy(face_embedding("facenet", bgr))[None]

    cids_evaluator.to_input = to_input
    clip_config = CLIPConfig(
        text_config={"vocab_size": 64, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "max_position_embeddings": 8},
        vision_config={"hidden_size": WIDTH, "intermediate_size": 4 * WIDTH, "num_hidden_layers": LAYERS,
                       "num_attention_heads": HEADS, "image_size": 224, "patch_size": PATCH,
                       "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5},
        projection_dim=EMBED,
    )  # fmt: skip
    clip = CLIPModel(clip_config).eval()
    missing, unexpected = clip.load_state_dict(_open_clip_to_transformers(load_weights("clip.safetensors")), False)
    assert not unexpected and all(k.startswith(("text_", "logit_scale")) for k in missing), (missing, unexpected)

    def load_models(self, pretrain_path, device="cpu"):
        self.dino, self.clip, self.clip_processor = object(), clip, CLIPImageProcessor()
        self.arcface, self.arcface_provider = _FaceAnalysis(), "cpu"
        self.adaface, self.facenet, self.face_helper = adaface, facenet, _FaceHelper()

    cids_evaluator.CIDSEvaluator._load_models = load_models

    def load_csd(path):
        model = csd_evaluator.CSD_CLIP.__new__(csd_evaluator.CSD_CLIP)
        nn.Module.__init__(model)
        model.backbone = clip_model.VisionTransformer(224, PATCH, WIDTH, LAYERS, HEADS, EMBED)
        model.backbone.proj = None
        state = load_weights("csd.safetensors")
        model.last_layer_style = nn.Parameter(state["last_layer_style"])
        model.last_layer_content = nn.Parameter(state["last_layer_content"])
        model.load_state_dict(state)
        return model.eval()

    csd_evaluator.load_csd = load_csd
    aes_path = Path(aesthetic_evaluator.__file__).parent / "aesthetic" / "aesthetic-predictor-v2-5" / "model.py"
    sys.path.insert(0, str(aes_path.parent))
    from model import AestheticPredictorV2p5Model  # the published predictor class, from the checkout

    predictor = AestheticPredictorV2p5Model(SiglipVisionConfig(**SIGLIP_CONFIG)).eval()
    siglip = {f"vision_model.{k.removeprefix('vision_model.')}": v for k, v in _siglip_state().items()}
    head = {f"layers.{k}": v for k, v in load_weights("aes_head.safetensors").items()}
    predictor.load_state_dict({**siglip, **head})
    real_hub_load = torch.hub.load
    torch.hub.load = lambda *args, **kwargs: (predictor, None)
    try:
        arguments = {"config": config, "timestamp": TIMESTAMP, "mode": MODE, "language": LANGUAGE}
        evaluators = {
            "cids": cids_evaluator.CIDSEvaluator(**arguments, outputs_timestamp=[TIMESTAMP]),
            "csd": csd_evaluator.CSDEvaluator(**arguments, outputs_timestamp=[TIMESTAMP]),
            "aesthetic": aesthetic_evaluator.AestheticEvaluator(**arguments, outputs_timestamp=[TIMESTAMP]),
            "prompt_align": PromptAlignEvaluator(**arguments, outputs_timestamp=[TIMESTAMP]),
        }
    finally:
        torch.hub.load = real_hub_load
    aes = evaluators["aesthetic"]
    aes.torch_dtype = torch.float32  # the published run is float16; the comparison is made in float32
    aes.aesthetic_predictor_v2_5 = predictor.float()
    return evaluators


def _siglip_state() -> dict:
    from safetensors.torch import load_file

    return {k: v.float() for k, v in load_file(WEIGHTS / "siglip" / "model.safetensors").items()}


def _open_clip_to_transformers(state: dict) -> dict:
    """An open_clip visual tower's tensors (`visual.*`) under transformers' CLIPModel names."""
    state = {k.removeprefix("visual."): v for k, v in state.items()}
    out = {
        "vision_model.embeddings.patch_embedding.weight": state["conv1.weight"],
        "vision_model.embeddings.class_embedding": state["class_embedding"],
        "vision_model.embeddings.position_embedding.weight": state["positional_embedding"],
        "visual_projection.weight": state["proj"].T.contiguous(),
    }
    for ours, theirs in (("ln_pre", "pre_layrnorm"), ("ln_post", "post_layernorm")):
        for kind in ("weight", "bias"):
            out[f"vision_model.{theirs}.{kind}"] = state[f"{ours}.{kind}"]
    for i in range(LAYERS):
        ours, theirs = f"transformer.resblocks.{i}", f"vision_model.encoder.layers.{i}"
        for kind in ("weight", "bias"):
            q, k, v = state[f"{ours}.attn.in_proj_{kind}"].chunk(3)
            out.update({f"{theirs}.self_attn.{n}_proj.{kind}": t for n, t in zip("qkv", (q, k, v), strict=True)})
            pairs = (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"),
                     ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2"))  # fmt: skip
            for a, b in pairs:
                out[f"{theirs}.{b}.{kind}"] = state[f"{ours}.{a}.{kind}"]
    return out


def _patch_judge(checkout: Path, requests: list[str]) -> None:
    """The judge both evaluators ask: `judge_reply`, on requests whose rubric text is the placeholder."""
    from vistorybench.bench.prompt_align import gptv_utils, prompt_align_evaluator

    files = {
        "scene": "user_prompt_environment_text_align.txt",
        "character_action": "user_prompt_character_text_align.txt",
        "camera": "user_prompt_camera_text_align.txt",
        "single_character_action": "user_prompt_single_character_text_align.txt",
    }
    folder = checkout / "vistorybench" / "bench" / "prompt_align" / "user_prompts"
    published = {(folder / name).read_text(encoding="utf-8", errors="replace"): d for d, name in files.items()}

    def query(transcript, top_p=0.2, temp=0.0, model_type="gpt-4.1", api_key="", base_url="", **kwargs):
        messages = json.loads(json.dumps(transcript))
        for message in messages:
            for part in message["content"]:
                if part.get("type") == "text" and part["text"] in published:
                    part["text"] = rubric(published[part["text"]])
        requests.append(request_digest(messages))
        return judge_reply(messages, temp)

    gptv_utils.gptv_query = query
    prompt_align_evaluator.gptv_query = query


def decoded_jpeg(url: str) -> Image.Image:
    """The image of a data URL (for checks on what a request shows)."""
    return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))


if __name__ == "__main__":
    if sys.argv[1:2] == ["make"]:
        make()
    elif sys.argv[1:2] == ["upstream"] and len(sys.argv) == 3:
        upstream(Path(sys.argv[2]).resolve())
    else:
        raise SystemExit(__doc__)
