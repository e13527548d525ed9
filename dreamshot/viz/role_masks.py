"""Role masks on the DiT's token grid drawn over the images they come from (the RACL labels, DESIGN §2).

The images are shown in grey, so every colour on the sheet is a label, never a character's own colour. Each
role gets a colour; a token cell that belongs to the role is tinted with it and outlined, and the legend says
which role each colour is, so one can check at a glance that the coverage threshold keeps the roles and that the
16×16-pixel grid is coarse where it is.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from dreamshot.diffusion.racl import token_grid_masks
from dreamshot.inference.contact_sheet import contact_sheet

ROLE_COLOURS = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240))
# Pixels per token side: the VAE's 8x and the DiT's 2x patch.
TOKEN_PIXELS = 16


def to_pil(image: torch.Tensor) -> Image.Image:
    """(3, H, W) in [-1, 1] -> RGB image."""
    array = ((image.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    return Image.fromarray(array)


def role_colour(role: int) -> tuple[int, int, int]:
    return ROLE_COLOURS[role % len(ROLE_COLOURS)]


def overlay_token_masks(image: torch.Tensor, token_masks: torch.Tensor, alpha: float = 0.55) -> Image.Image:
    """image: (3, H, W) in [-1, 1]; token_masks: (R, h, w) bool. The image in grey; role r's cells tinted with
    colour r, and the edge of its region drawn in it."""
    grey = np.asarray(to_pil(image).convert("L").convert("RGB"), dtype=np.float32)
    base = grey.copy()
    scale = base.shape[0] // token_masks.shape[-2]
    for role, cells in enumerate(token_masks):
        pixels = cells.repeat_interleave(scale, 0).repeat_interleave(scale, 1).numpy()
        colour = np.array(role_colour(role), dtype=np.float32)
        base[pixels] = (1 - alpha) * base[pixels] + alpha * colour
        base[_edge(pixels)] = colour
    return Image.fromarray(base.round().astype(np.uint8))


def _edge(region: np.ndarray) -> np.ndarray:
    """The pixels of `region` (H, W) bool next to a pixel outside it (or the border)."""
    padded = np.pad(region, 1, constant_values=False)
    inside = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return region & ~inside


def role_mask_sheet(sample: dict, threshold: float) -> Image.Image:
    """A contact sheet of one dataset sample (`StoryboardDataset` item) with every frame's token-grid masks."""
    height, width = sample["shots"].shape[-2:]
    grid = (height // TOKEN_PIXELS, width // TOKEN_PIXELS)
    shot_tokens = token_grid_masks(sample["shot_masks"], grid, threshold)  # (N, K, h, w)
    ref_tokens = token_grid_masks(sample["ref_masks"], grid, threshold)  # (K, h, w)
    references = [
        overlay_token_masks(image, _only_role(ref_tokens[k], k, len(ref_tokens)))
        for k, image in enumerate(sample["refs"])
    ]
    shots = [overlay_token_masks(image, masks) for image, masks in zip(sample["shots"], shot_tokens, strict=True)]
    legend = [(role_colour(k), f"role {k + 1}: {text}") for k, text in enumerate(sample["ref_texts"])]
    return contact_sheet(
        shots,
        _captions(sample["shot_texts"]),
        references,
        _captions(sample["ref_texts"]),
        title=f"RACL labels of {sample['id']}: token cells covered >= {threshold:g} by a role (images in grey)",
        legend=legend,
    )


def _only_role(mask: torch.Tensor, role: int, roles: int) -> torch.Tensor:
    """A reference shows one role: its mask placed in that role's channel (so it gets the role's colour)."""
    masks = torch.zeros(roles, *mask.shape, dtype=torch.bool)
    masks[role] = mask
    return masks


def _captions(texts: Sequence[str]) -> list[str]:
    return list(texts)
