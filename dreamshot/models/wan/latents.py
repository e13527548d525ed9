"""The latent stream of a storyboard (DESIGN §2 "Latent stream"): shots and references through the Wan VAE.

The Wan VAE is causal in time with compression 4: pixel frame 0 gets its own latent frame and every later
group of 4 pixel frames shares one. A storyboard of N shots becomes the pixel video
`[I_1, I_2×4, …, I_N×4]` (1 + 4(N−1) frames), which encodes to exactly one latent frame per shot. Each
reference is encoded alone as a 1-frame video. Latents leave this module normalised the way diffusers'
WanPipeline scales them, `(z − mean) · (1 / std)`, with the VAE config's `latents_mean` / `latents_std`.

Images are (…, 3, H, W) in [-1, 1]; latents are (B, C, F, h, w) with h = H / 8, w = W / 8. The VAE runs in
its own dtype, without gradients, and with autocast off: `trainer=ddp`'s bf16-mixed runs the training step in
autocast, which would run the float32 VAE's convolutions in bf16, so training would encode references and shots
with another encoder than sampling does.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

# Pixel frames per latent frame after the first one.
TEMPORAL_GROUP = 4


def shots_to_pixel_video(shots: torch.Tensor) -> torch.Tensor:
    """(B, N, 3, H, W) shots -> (B, 3, 1 + 4(N−1), H, W) video: shot 1 once, every later shot 4 times."""
    repeats = torch.full((shots.shape[1],), TEMPORAL_GROUP, device=shots.device)
    repeats[0] = 1
    return shots.repeat_interleave(repeats, dim=1).transpose(1, 2)


def latent_stats(vae) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE's per-channel latent (mean, std), each shaped (1, C, 1, 1, 1), float32."""
    mean = torch.tensor(vae.config.latents_mean, dtype=torch.float32)
    std = torch.tensor(vae.config.latents_std, dtype=torch.float32)
    return mean.view(1, -1, 1, 1, 1), std.view(1, -1, 1, 1, 1)


def normalize_latents(z: torch.Tensor, vae) -> torch.Tensor:
    """Raw VAE latents (B, C, F, h, w) -> the DiT's scale, as WanPipeline does: (z − mean) · (1 / std)."""
    mean, std = (s.to(z.device, z.dtype) for s in latent_stats(vae))
    return (z - mean) * (1.0 / std)


def denormalize_latents(z: torch.Tensor, vae) -> torch.Tensor:
    """The inverse of `normalize_latents`: z / (1 / std) + mean."""
    mean, std = (s.to(z.device, z.dtype) for s in latent_stats(vae))
    return z / (1.0 / std) + mean


@torch.no_grad()
def encode_shots(vae, shots: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, N, 3, H, W) shots -> (B, C, N, h, w) normalised latents, one latent frame per shot.

    The posterior mean by default; a `generator` samples from the posterior instead.
    """
    video = shots_to_pixel_video(shots.to(vae.dtype))
    with torch.autocast(vae.device.type, enabled=False):
        posterior = vae.encode(video).latent_dist
    z = posterior.mode() if generator is None else posterior.sample(generator)
    return normalize_latents(z, vae)


@torch.no_grad()
def encode_references(vae, refs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, K, 3, H, W) references -> (B, C, K, h, w) normalised latents, each encoded as a 1-frame video.

    The K references are folded into the batch so one VAE call encodes them all; K = 0 gives (B, C, 0, h, w).
    """
    batch, k, _, height, width = refs.shape
    if k == 0:
        ratio = vae.spatial_compression_ratio
        return refs.new_zeros(batch, vae.config.z_dim, 0, height // ratio, width // ratio, dtype=vae.dtype)
    z = encode_shots(vae, refs.flatten(0, 1).unsqueeze(1), generator)
    return z.squeeze(2).unflatten(0, (batch, k)).transpose(1, 2)


@torch.no_grad()
def decode_shots(vae, latents: torch.Tensor) -> torch.Tensor:
    """(B, C, N, h, w) normalised shot latents -> (B, N, 3, H, W) images in [-1, 1].

    The whole stream is decoded as one video (the causal decoder carries its state from shot to shot, as in
    encoding), then each shot takes one frame of its group: frame 0 for shot 1 and, for shot n ≥ 2, the last
    frame of its 4-frame group, pixel index 4(n−1). Why the last: the causal temporal convolutions give the
    first frames of a group a receptive field reaching into the previous shot, while the last frame is
    produced once the decoder has seen the whole group, which was encoded from 4 copies of the same shot.
    """
    z = denormalize_latents(latents.to(vae.dtype), vae)
    with torch.autocast(vae.device.type, enabled=False):
        video = vae.decode(z, return_dict=False)[0]
    frames = torch.arange(latents.shape[2], device=video.device) * TEMPORAL_GROUP
    return video.index_select(2, frames).transpose(1, 2)


@torch.no_grad()
def decode_in_context(
    vae,
    given: torch.Tensor,
    targets: torch.Tensor,
    given_positions: Sequence[int],
    target_positions: Sequence[int],
) -> torch.Tensor:
    """Decode target shot latents inside the shot stream they belong to: (B, N, 3, H, W) in [-1, 1].

    given: (B, C, M, h, w) clean shot latents at story positions `given_positions`; targets: (B, C, N, h, w) at
    `target_positions`. Training encodes a storyboard's shots as one stream, so the latent of a shot after the
    first is a 4-frame-group latent whose meaning depends on the shots before it; decoding it alone would send it
    through the VAE's first-frame path instead. So the given and target latents are decoded as one stream in story
    order and each target takes its own frame of it (`decode_shots`). Without given shots this is
    `decode_shots(vae, targets)`.
    """
    positions = [*given_positions, *target_positions]
    order = sorted(range(len(positions)), key=positions.__getitem__)
    stream = torch.cat([given, targets], dim=2)[:, :, order]
    images = decode_shots(vae, stream)
    frame_of = {latent: frame for frame, latent in enumerate(order)}
    return images[:, [frame_of[given.shape[2] + n] for n in range(targets.shape[2])]]


@torch.no_grad()
def decode_images(vae, latents: torch.Tensor) -> torch.Tensor:
    """(B, C, K, h, w) single-frame latents (references) -> (B, K, 3, H, W), each decoded alone."""
    batch, _, k, height, width = latents.shape
    if k == 0:
        ratio = vae.spatial_compression_ratio
        return latents.new_zeros(batch, 0, 3, height * ratio, width * ratio, dtype=vae.dtype)
    images = decode_shots(vae, latents.transpose(1, 2).flatten(0, 1).unsqueeze(2))
    return images.squeeze(1).unflatten(0, (batch, k))
