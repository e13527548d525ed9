"""Local weight files of the evaluation models: where each is published, and strict state-dict reading.

Nothing is ever downloaded: a config key that is set must name an existing file, else a one-line WeightsError
names the file, the key and where the weights are published.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from dreamshot.utils.errors import WeightsError

# Config key -> where its weights are published (docs/evaluation.md says how to fetch each).
PUBLISHED = {
    "eval.clip.weights": "OpenAI CLIP ViT-L/14 (open_clip): huggingface.co/timm/vit_large_patch14_clip_224.openai",
    "eval.csd.weights": "CSD ViT-L checkpoint, github.com/learn2phoenix/CSD (checkpoint.pth)",
    "eval.aes.siglip": "huggingface.co/google/siglip-so400m-patch14-384",
    "eval.aes.head": "github.com/discus0434/aesthetic-predictor-v2-5 (models/aesthetic_predictor_v2_5.pth)",
    "eval.face.detector": "insightface's antelopev2 pack (scrfd_10g_bnkps.onnx), github.com/deepinsight/insightface",
    "eval.face.recognizers": "insightface's antelopev2 pack (glintr100.onnx), github.com/deepinsight/insightface",
    "eval.face.adaface": "an ONNX export of github.com/mk-minchul/AdaFace's adaface_ir101_webface12m.ckpt "
    "(docs/evaluation.md)",
    "eval.face.facenet": "an ONNX export of facenet-pytorch's InceptionResnetV1 with the VGGFace2 weights "
    "(docs/evaluation.md)",
    "eval.detector.weights": "huggingface.co/IDEA-Research/grounding-dino-tiny",
}


def require_path(path: str | Path, key: str, folder: bool = False) -> Path:
    """`path` as a Path, after checking that it exists (a file, or a folder with `folder`)."""
    path = Path(path).expanduser()
    if not (path.is_dir() if folder else path.is_file()):
        kind = "folder" if folder else "file"
        raise WeightsError(f"{path}: {kind} not found (config key {key}; published at {PUBLISHED[key]})")
    return path


def read_state_dict(path: Path, key: str) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file or a torch checkpoint (weights_only), unwrapped from `state_dict` /
    `model_state_dict` and stripped of DataParallel's `module.` prefix."""
    try:
        if path.suffix == ".safetensors":
            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise WeightsError(f"{path}: not a readable checkpoint ({type(e).__name__}) (config key {key})") from None
    for wrapper in ("state_dict", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path}: holds no tensor state dict (config key {key})")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], path: Path, key: str) -> None:
    """`module.load_state_dict(state)` with every key and shape required; a fault names the first bad key."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        what = f"lacks {missing[0]!r}" if missing else f"has unexpected {unexpected[0]!r}"
        raise WeightsError(
            f"{path}: {what} ({len(missing)} missing, {len(unexpected)} unexpected keys) (config key {key})"
        )
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise WeightsError(
                f"{path}: {name!r} has shape {tuple(tensor.shape)}, the model needs "
                f"{tuple(expected[name].shape)} (config key {key})"
            )
    module.load_state_dict(state)
