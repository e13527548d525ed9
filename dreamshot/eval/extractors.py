"""Frozen image encoders sharing `forward(images) -> features` (EVAL.md "CIDS", "CSD", "AES").

Every encoder (`Encoder`) takes a list of PIL images and returns float32 CPU features, one row per image:
- `ClipImageEncoder`: CLIP ViT-L/14 image features (CIDS, non-human and unrealistic-human characters);
- `CsdStyleEncoder`: the CSD style descriptor (CSD);
- `AestheticScorer`: Aesthetic Predictor v2.5 scores, shape (N,) (AES);
- `ColourHistogram`: a weight-free colour descriptor, used only by the toy benchmark's labelled proxies.
Each one preprocesses exactly as ViStoryBench does; the loaders build the towers from open_clip / transformers
and read local weights strictly (`dreamshot.eval.weights`).
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchvision.transforms.v2 import functional as TF

from dreamshot.config.schema import AestheticConfig, ClipEncoderConfig, CsdConfig
from dreamshot.eval.weights import load_strict, read_state_dict, require_path
from dreamshot.utils.errors import ConfigError, WeightsError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CLIP_SIZE = 224
AES_SIZE = 378
# Aesthetic Predictor v2.5 head: Linear widths after the SigLIP pooler, and the dropout after each hidden layer.
AES_HEAD_WIDTHS = (1024, 128, 64, 16, 1)
AES_HEAD_DROPOUTS = (0.5, 0.5, 0.5, 0.2)


class Encoder(Protocol):
    """What the metrics need of an extractor: a list of images -> (N, D) features (or (N,) scores)."""

    def __call__(self, images: Sequence[Image.Image]) -> torch.Tensor: ...


class ImageEncoder(nn.Module, ABC):
    """A frozen model: `forward(images)` -> (N, D) features (float32, CPU), in batches of `batch_size`."""

    batch_size = 16

    @abstractmethod
    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """One RGB image -> (3, H, W) model input."""

    @abstractmethod
    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) preprocessed batch -> (B, ...) features."""

    @property
    def device(self) -> torch.device:
        parameter = next(self.parameters(), None)
        return torch.device("cpu") if parameter is None else parameter.device

    @torch.no_grad()
    def forward(self, images: Sequence[Image.Image]) -> torch.Tensor:
        if not images:
            raise ValueError("an encoder needs at least one image")
        parameter = next(self.parameters(), None)
        dtype = torch.float32 if parameter is None else parameter.dtype
        features = []
        for start in range(0, len(images), self.batch_size):
            chunk = images[start : start + self.batch_size]
            pixels = torch.stack([self.preprocess(image.convert("RGB")) for image in chunk])
            features.append(self.embed(pixels.to(self.device, dtype)).float().cpu())
        return torch.cat(features)


def to_unit_tensor(image: Image.Image) -> torch.Tensor:
    """RGB image -> (3, H, W) float32 in [0, 1] (torchvision's ToTensor)."""
    array = np.asarray(image, dtype=np.float32) / 255.0
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


def clip_normalize(pixels: torch.Tensor) -> torch.Tensor:
    return TF.normalize(pixels, list(CLIP_MEAN), list(CLIP_STD))


class ClipImageEncoder(ImageEncoder):
    """CLIP image features, L2-normalised: (N, embed_dim).

    Preprocessing as transformers' CLIPImageProcessor (ViStoryBench's): shortest side to 224 and the long side
    to int(224 * long / short) (bicubic), centre crop 224 x 224, CLIP mean/std.
    """

    def __init__(self, visual: nn.Module) -> None:
        super().__init__()
        self.visual = visual.eval().requires_grad_(False)

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        width, height = image.size
        short, long = min(width, height), max(width, height)
        # The processor's arithmetic to the pixel: `long * (224 / short)` is one short for e.g. 640 x 720.
        side = int(CLIP_SIZE * long / short)
        size = (CLIP_SIZE, side) if width <= height else (side, CLIP_SIZE)
        image = image.resize(size, Image.BICUBIC)
        left, top = (size[0] - CLIP_SIZE) // 2, (size[1] - CLIP_SIZE) // 2
        image = image.crop((left, top, left + CLIP_SIZE, top + CLIP_SIZE))
        return clip_normalize(to_unit_tensor(image))

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.visual(pixels), dim=-1)


class CsdStyleEncoder(ImageEncoder):
    """CSD style embeddings, L2-normalise(ln_post(CLS) @ W_style): (N, 768) for ViT-L.

    `visual` is an open_clip VisionTransformer whose `proj` holds W_style. Preprocessing as ViStoryBench's CSD
    evaluator: RGB in [0, 1], Resize((224, 224)) bicubic on the tensor (a square squash, no crop), CLIP mean/std.
    """

    def __init__(self, visual: nn.Module) -> None:
        super().__init__()
        self.visual = visual.eval().requires_grad_(False)

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        pixels = TF.resize(to_unit_tensor(image), [CLIP_SIZE, CLIP_SIZE], TF.InterpolationMode.BICUBIC, antialias=True)
        return clip_normalize(pixels)

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.visual(pixels), dim=-1)


class AestheticHead(nn.Module):
    """The v2.5 scoring MLP on the L2-normalised SigLIP pooler output: width -> 1024 -> 128 -> 64 -> 16 -> 1,
    dropout after each hidden layer (inactive in eval). Its state-dict keys are the published file's
    (`scoring_head.0`, `.2`, `.4`, `.6`, `.8`)."""

    def __init__(self, width: int = 1152) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i, out in enumerate(AES_HEAD_WIDTHS):
            layers.append(nn.Linear(width, out))
            if i < len(AES_HEAD_DROPOUTS):
                layers.append(nn.Dropout(AES_HEAD_DROPOUTS[i]))
            width = out
        self.scoring_head = nn.Sequential(*layers)

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """(N, width) unit vectors -> (N,) scores."""
        return self.scoring_head(embeddings).squeeze(-1)


class AestheticScorer(ImageEncoder):
    """Aesthetic Predictor v2.5 scores (N,). Preprocessing as ViStoryBench: Resize((378, 378)) bilinear on the
    PIL image, ToTensor, no mean/std normalisation."""

    def __init__(self, siglip: nn.Module, head: AestheticHead) -> None:
        super().__init__()
        self.siglip = siglip.eval().requires_grad_(False)
        self.head = head.eval().requires_grad_(False)

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        return to_unit_tensor(image.resize((AES_SIZE, AES_SIZE), Image.BILINEAR))

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        pooled = self.siglip(pixel_values=pixels).pooler_output
        return self.head(F.normalize(pooled, dim=-1))


class ColourHistogram(ImageEncoder):
    """TOY PROXY, not CIDS or CSD: the square root of an image's RGB histogram (`bins` per channel), a unit
    vector whose cosine is the Bhattacharyya coefficient of two colour distributions. Toy characters are
    identified by colour and texture, and toy scenes by their palette, so it needs no weights."""

    def __init__(self, bins: int = 8) -> None:
        super().__init__()
        self.bins = bins

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        index = (np.asarray(image, dtype=np.int64) * self.bins) // 256
        flat = (index[..., 0] * self.bins + index[..., 1]) * self.bins + index[..., 2]
        counts = np.bincount(flat.ravel(), minlength=self.bins**3).astype(np.float32)
        return torch.from_numpy(np.sqrt(counts / counts.sum()))

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        return pixels


# --- loading -----------------------------------------------------------------------------------------------


def open_clip_visual(arch: str, key: str) -> nn.Module:
    """A randomly initialised open_clip vision tower of architecture `arch` (weights are loaded after)."""
    import open_clip  # imported here: it takes seconds and training never needs it

    if arch not in open_clip.list_models():
        raise ConfigError(f"{key}: unknown open_clip architecture {arch!r}")
    # open_clip logs a warning for pretrained=None; the weights are loaded strictly right after.
    logger = logging.getLogger()
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        model = open_clip.create_model(arch, pretrained=None)
    finally:
        logger.setLevel(level)
    return model.visual


def load_clip_encoder(cfg: ClipEncoderConfig) -> ClipImageEncoder:
    """CLIP's image tower from an open_clip checkpoint (only its `visual.*` tensors are read, strictly)."""
    key = "eval.clip.weights"
    path = require_path(cfg.weights, key)
    visual = open_clip_visual(cfg.arch, "eval.clip.arch")
    state = {k.removeprefix("visual."): v for k, v in read_state_dict(path, key).items() if k.startswith("visual.")}
    if not state:
        raise WeightsError(f"{path}: no 'visual.*' tensors, not an open_clip CLIP checkpoint (config key {key})")
    load_strict(visual, state, path, key)
    return ClipImageEncoder(visual)


def csd_to_open_clip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CSD's key layout -> an open_clip visual tower's: `backbone.X` -> `X`, `last_layer_style` -> `proj`.

    CSD's backbone is OpenAI CLIP's visual tower with `proj` removed, whose keys open_clip's quick-GELU ViT
    shares one to one; `last_layer_content` (the content head) is not used by the CSD metric.
    """
    converted = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
    if "last_layer_style" in state:
        converted["proj"] = state["last_layer_style"]
    unknown = set(state) - {f"backbone.{k}" for k in converted} - {"last_layer_style", "last_layer_content"}
    converted.update({k: state[k] for k in unknown})  # kept so the strict load names them
    return converted


def load_csd_encoder(cfg: CsdConfig) -> CsdStyleEncoder:
    key = "eval.csd.weights"
    path = require_path(cfg.weights, key)
    visual = open_clip_visual(cfg.arch, "eval.csd.arch")
    load_strict(visual, csd_to_open_clip(read_state_dict(path, key)), path, key)
    return CsdStyleEncoder(visual)


def load_aesthetic_scorer(cfg: AestheticConfig) -> AestheticScorer:
    """SigLIP from a local transformers folder and the v2.5 head from its .pth / .safetensors file."""
    from transformers import SiglipVisionModel  # imported here: see open_clip_visual

    folder = require_path(cfg.siglip, "eval.aes.siglip", folder=True)
    head_path = require_path(cfg.head, "eval.aes.head")
    try:
        siglip = SiglipVisionModel.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as e:
        raise WeightsError(f"{folder}: cannot load a SigLIP vision model ({str(e).splitlines()[0]})") from None
    head = AestheticHead(siglip.config.hidden_size)
    load_strict(head, read_state_dict(head_path, "eval.aes.head"), head_path, "eval.aes.head")
    return AestheticScorer(siglip, head)
