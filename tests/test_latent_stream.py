"""The storyboard latent stream through the Wan VAE: one latent frame per shot, references alone, decoding."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKLWan

from dreamshot.models.wan.latents import (
    decode_images,
    decode_in_context,
    decode_shots,
    denormalize_latents,
    encode_references,
    encode_shots,
    latent_stats,
    normalize_latents,
    shots_to_pixel_video,
)

H, W = 16, 32


@pytest.fixture(scope="module")
def vae(tiny_components):
    return tiny_components.vae


@pytest.fixture(scope="module")
def stats_vae():
    """A tiny VAE with non-trivial latent statistics (the random tiny model's are the identity)."""
    torch.manual_seed(0)
    z_dim = 4
    return AutoencoderKLWan(
        base_dim=8,
        z_dim=z_dim,
        num_res_blocks=1,
        latents_mean=torch.randn(z_dim).tolist(),
        latents_std=(torch.rand(z_dim) + 0.5).tolist(),
    ).eval()


def _images(*lead: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(*lead, 3, H, W, generator=generator) * 2 - 1


def test_pixel_video_repeats_every_shot_after_the_first_four_times():
    shots = torch.arange(3.0).view(1, 3, 1, 1, 1).expand(2, 3, 3, H, W)
    video = shots_to_pixel_video(shots)
    assert video.shape == (2, 3, 9, H, W)
    assert video[0, 0, :, 0, 0].tolist() == [0, 1, 1, 1, 1, 2, 2, 2, 2]
    assert shots_to_pixel_video(shots[:, :1]).shape == (2, 3, 1, H, W)


@pytest.mark.parametrize("num_shots", [1, 2, 5])
def test_one_latent_frame_per_shot_and_round_trip_shape(vae, num_shots):
    shots = _images(2, num_shots)
    z = encode_shots(vae, shots)
    assert z.shape == (2, 16, num_shots, H // 8, W // 8)
    images = decode_shots(vae, z)
    assert images.shape == (2, num_shots, 3, H, W)
    assert images.abs().max() <= 1


def test_a_shot_latent_depends_only_on_its_own_and_earlier_shots(vae):
    shots = _images(1, 3)
    changed = shots.clone()
    changed[:, 2] = _images(1, seed=1)[:, 0]
    a, b = encode_shots(vae, shots), encode_shots(vae, changed)
    assert torch.equal(a[:, :, :2], b[:, :, :2])
    assert not torch.allclose(a[:, :, 2], b[:, :, 2])


def test_encode_uses_posterior_mode_unless_sampling(stats_vae):
    shots = _images(1, 2)
    raw = stats_vae.encode(shots_to_pixel_video(shots)).latent_dist.mode()
    assert torch.allclose(encode_shots(stats_vae, shots), normalize_latents(raw, stats_vae))
    first, second = (encode_shots(stats_vae, shots, torch.Generator().manual_seed(3)) for _ in range(2))
    assert torch.equal(first, second)
    assert not torch.allclose(first, encode_shots(stats_vae, shots))


def test_references_are_encoded_alone(vae):
    refs = _images(2, 3)
    z = encode_references(vae, refs)
    assert z.shape == (2, 16, 3, H // 8, W // 8)
    alone = encode_shots(vae, refs[1:2, 2:3])
    assert torch.allclose(z[1:2, :, 2:3], alone, atol=1e-6)
    assert encode_references(vae, refs[:, :0]).shape == (2, 16, 0, H // 8, W // 8)


def test_decode_images_decodes_each_frame_alone(vae):
    z = encode_references(vae, _images(1, 2))
    images = decode_images(vae, z)
    assert images.shape == (1, 2, 3, H, W)
    # Batched and single convolutions differ by float32 rounding (~1e-6); a frame leaking into another, by ~0.1.
    assert torch.allclose(images[:, 1:2], decode_shots(vae, z[:, :, 1:2]), atol=1e-5)
    assert decode_images(vae, z[:, :, :0]).shape == (1, 0, 3, H, W)


def test_decode_takes_frame_zero_then_the_last_frame_of_each_group(stats_vae, monkeypatch):
    seen = []

    def fake_decode(z, return_dict=True):
        """A video whose every pixel holds its frame index: 1 + 4(F−1) frames for F latent frames."""
        seen.append(z)
        frames = 1 + 4 * (z.shape[2] - 1)
        video = torch.arange(frames, dtype=z.dtype).view(1, 1, frames, 1, 1)
        return (video.expand(z.shape[0], 3, frames, z.shape[3] * 8, z.shape[4] * 8),)

    monkeypatch.setattr(stats_vae, "decode", fake_decode)
    latents = torch.randn(2, 4, 5, 2, 4)
    images = decode_shots(stats_vae, latents)
    assert images.shape == (2, 5, 3, 16, 32)
    assert images[:, :, 0, 0, 0].tolist() == [[0, 4, 8, 12, 16]] * 2
    assert torch.allclose(seen[0], denormalize_latents(latents, stats_vae))


@pytest.mark.parametrize(
    ("given", "targets"),
    [([], [0, 1, 2, 3]), ([0, 1], [2, 3]), ([0, 2, 3], [1]), ([1, 2, 3], [0])],
    ids=["t2s-r2s", "s2s", "re-roll-middle", "re-roll-first"],
)
def test_round_trip_per_mode_decodes_targets_as_the_whole_storyboard_does(vae, given, targets):
    """Encode a storyboard as training does, split it as each mode does, decode the targets in their stream.

    The random tiny VAE is no identity (its round trip is off by ~0.5 on the [-1, 1] scale), so what it allows is
    its own reconstruction of the whole storyboard: each drawn shot must come back exactly as that, value by value,
    the same distance from the input image. Decoding a later shot's latent alone would take the first-frame path.
    """
    shots = _images(1, 4, seed=3)
    z = encode_shots(vae, shots)
    whole = decode_shots(vae, z)
    decoded = decode_in_context(vae, z[:, :, given], z[:, :, targets], given, targets)
    torch.testing.assert_close(decoded, whole[:, targets], rtol=0, atol=1e-5)
    error, allowed = ((x - shots[:, targets]).abs().mean((2, 3, 4)) for x in (decoded, whole[:, targets]))
    torch.testing.assert_close(error, allowed, rtol=0, atol=1e-6)
    if targets[0] > 0:  # the first drawn shot follows a given one: decoded alone it would come out otherwise
        alone = decode_shots(vae, z[:, :, targets])
        assert (alone[:, 0] - whole[:, targets[0]]).abs().max() > 0.1


def test_normalization_matches_wan_pipeline_and_inverts(stats_vae):
    mean, std = latent_stats(stats_vae)
    assert mean.shape == std.shape == (1, 4, 1, 1, 1)
    assert mean.flatten().tolist() == pytest.approx(stats_vae.config.latents_mean)
    z = torch.randn(2, 4, 3, 2, 2)
    normalized = normalize_latents(z, stats_vae)
    assert torch.allclose(normalized, (z - mean) / std, atol=1e-6)
    assert torch.allclose(denormalize_latents(normalized, stats_vae), z, atol=1e-6)


def test_the_frozen_encoders_ignore_an_autocast_around_them(tiny_components):
    """`trainer=ddp`'s bf16-mixed runs the training step, and so the encoding of its batch, in autocast; the VAE and
    umT5 must encode as at sampling (no autocast there), or the model trains on latents of another encoder."""
    from dreamshot.models.wan.text import encode_texts

    vae, umt5, tokenizer = tiny_components.vae, tiny_components.text_encoder, tiny_components.tokenizer
    g = torch.Generator().manual_seed(0)
    shots = torch.rand(1, 2, 3, H, W, generator=g) * 2 - 1
    texts = [["a red circle walks", "a blue square"]]

    def encoded():
        latents = encode_shots(vae, shots)
        return latents, decode_shots(vae, latents), encode_texts(umt5, tokenizer, texts, 8)

    plain = encoded()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = encoded()
    for reference, result in zip(plain, under_autocast, strict=True):
        assert result.dtype == reference.dtype and torch.equal(result, reference)
