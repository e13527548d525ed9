"""Rectified-flow (flow matching) maths as in Wan (DESIGN §2, Eq. 3-4). Pure tensor functions.

t in [0, 1] is the noise level: t = 0 is data, t = 1 is noise. The DiT is fed `t * NUM_TRAIN_TIMESTEPS`, as
Wan's scheduler does.

Clean latents come as stored (float32, also under DeepSpeed: `training.strategy.BatchAsStoredPrecision`), or
encoded by the frozen VAE, which under ZeRO-3 (`trainer=zero3`) runs in bf16: then they, and the noise drawn like
them, are bf16. The noising and the velocity target are formed in float32 all the same: z_t in bf16 arithmetic would
mix with t rounded to bf16 (up to 2^-9 off, while the DiT is told t in float32) and round each product, and ε − z_0
in bf16 carries ~0.4% error into the regression target. z_t enters the DiT in the DiT's dtype
(`WanAdapter.predict_velocity`).
"""

from __future__ import annotations

import torch

NUM_TRAIN_TIMESTEPS = 1000


def shift_timesteps(t: torch.Tensor, shift: float) -> torch.Tensor:
    """Wan's timestep shift `s·t / (1 + (s−1)·t)`: s > 1 spends more training on high noise. Any shape."""
    return shift * t / (1 + (shift - 1) * t)


def sample_timesteps(
    batch_size: int,
    shift: float,
    generator: torch.Generator | None = None,
    device: torch.device | None = None,
) -> torch.Tensor:
    """One shifted noise level per sample: u ~ U(0, 1), t = shift(u). Shape (B,)."""
    u = torch.rand(batch_size, generator=generator, device=device)
    return shift_timesteps(u, shift)


def _at_least_float32(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def add_noise(clean: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """z_t = (1 − t)·z_0 + t·ε, formed in (at least) float32 and returned in the latents' dtype, rounded once.
    clean, noise: (B, ...); t: (B,)."""
    dtype = _at_least_float32(clean)
    t = t.view(-1, *([1] * (clean.ndim - 1))).to(dtype)
    return ((1 - t) * clean.to(dtype) + t * noise.to(dtype)).to(clean.dtype)


def velocity_target(clean: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The flow-matching regression target ε − z_0 (same shape as the inputs), in (at least) float32."""
    dtype = _at_least_float32(clean)
    return noise.to(dtype) - clean.to(dtype)


def frame_masked_mse(pred: torch.Tensor, target: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the selected latent frames only.

    pred, target: (B, C, F, h, w); frames: (F,) bool, True for frames in the loss (the noised shots).
    Returns a scalar. Frames outside the mask (clean references / given shots) contribute nothing.
    """
    diff = (pred.float() - target.float())[:, :, frames]
    return diff.pow(2).mean()


def frame_timesteps(t: torch.Tensor, target_frames: torch.Tensor) -> torch.Tensor:
    """Per-frame DiT timesteps: `t·1000` on noised frames, 0 on clean frames. Every token of a frame shares its
    frame's timestep (diffusers' per-token timestep, stored once per frame; the forward broadcasts it).

    t: (B,); target_frames: (F,) bool in sequence order. Returns (B, F).
    """
    return t[:, None] * target_frames.to(t)[None, :] * NUM_TRAIN_TIMESTEPS


def dit_timesteps(t: torch.Tensor, target_frames: torch.Tensor, per_token: bool) -> torch.Tensor:
    """What the DiT is fed: per token (`frame_timesteps`: clean frames at 0) or one `t·1000` per sample.

    t: (B,); target_frames: (F,) bool. Returns (B, F) or (B,).
    """
    if per_token:
        return frame_timesteps(t, target_frames.to(t.device))
    return t * NUM_TRAIN_TIMESTEPS
