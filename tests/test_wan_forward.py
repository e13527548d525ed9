"""The storyboard forward reproduces diffusers' Wan forward, and adds per-token timesteps and explicit positions."""

import pytest
import torch

from dreamshot.models.layout import StoryboardLayout
from dreamshot.models.wan.forward import storyboard_forward
from dreamshot.models.wan.rope import storyboard_rotary_emb


@pytest.fixture()
def transformer(tiny_transformer):
    return tiny_transformer


def _inputs(frames=4, batch=2):
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(batch, 16, frames, 4, 6, generator=g)
    text = torch.randn(batch, frames * 5, 32, generator=g)
    t = torch.tensor([300.0, 800.0])[:batch]
    return latents, text, t


@torch.no_grad()
def test_equals_diffusers_forward_with_wan_positions(transformer):
    latents, text, t = _inputs()
    expected = transformer(latents, t, text, return_dict=False)[0]
    rotary = storyboard_rotary_emb(StoryboardLayout.of(1, 3), (2, 3), 24)
    got = storyboard_forward(transformer, latents, t, text, rotary)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_uniform_per_token_timestep_equals_global(transformer):
    latents, text, t = _inputs()
    rotary = storyboard_rotary_emb(StoryboardLayout.of(1, 3), (2, 3), 24)
    per_token = t[:, None].expand(-1, 4 * 6).contiguous()
    torch.testing.assert_close(
        storyboard_forward(transformer, latents, per_token, text, rotary),
        storyboard_forward(transformer, latents, t, text, rotary),
        atol=1e-5,
        rtol=1e-5,
    )


@torch.no_grad()
def test_positions_change_the_output(transformer):
    latents, text, t = _inputs()
    rotary = storyboard_rotary_emb(StoryboardLayout.of(1, 3), (2, 3), 24)
    base = storyboard_forward(transformer, latents, t, text, rotary)
    neg = storyboard_forward(
        transformer,
        latents,
        t,
        text,
        storyboard_rotary_emb(StoryboardLayout.of(1, 3, position_mode="neg", neg_offset=2.0), (2, 3), 24),
    )
    assert not torch.allclose(base, neg, atol=1e-4)


def test_gradient_checkpointing_gives_same_gradients(transformer):
    latents, text, t = _inputs()
    rotary = storyboard_rotary_emb(StoryboardLayout.of(1, 3), (2, 3), 24)
    grads = []
    for checkpointing in (False, True):
        transformer.zero_grad()
        storyboard_forward(
            transformer, latents, t, text, rotary, gradient_checkpointing=checkpointing
        ).square().mean().backward()
        grads.append(transformer.proj_out.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])
    transformer.zero_grad()


@torch.no_grad()
def test_two_layouts_back_to_back_leave_nothing_behind(transformer):
    latents, text, t = _inputs()
    last = storyboard_rotary_emb(StoryboardLayout.of(1, 3, position_mode="last"), (2, 3), 24)
    first = storyboard_rotary_emb(StoryboardLayout.of(1, 3), (2, 3), 24)
    alone = storyboard_forward(transformer, latents, t, text, first)
    storyboard_forward(transformer, latents, t, text, last)
    torch.testing.assert_close(storyboard_forward(transformer, latents, t, text, first), alone)
