"""The storyboard forward reproduces diffusers' Wan forward, and adds per-token timesteps and explicit positions."""

import copy
import pickle

import pytest
import torch

from dreamshot.config.schema import ModelConfig
from dreamshot.models.layout import StoryboardLayout
from dreamshot.models.wan.build import build_components
from dreamshot.models.wan.forward import (
    storyboard_block_forward,
    storyboard_forward,
    use_frame_modulation,
    uses_frame_modulation,
)
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
def test_uniform_per_frame_timestep_equals_global(transformer):
    latents, text, t = _inputs()
    use_frame_modulation(transformer)
    rotary = storyboard_rotary_emb(StoryboardLayout.of(1, 3), (2, 3), 24)
    torch.testing.assert_close(
        storyboard_forward(transformer, latents, t[:, None].expand(-1, 4), text, rotary),
        storyboard_forward(transformer, latents, t, text, rotary),
        atol=1e-5,
        rtol=1e-5,
    )


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_block_with_per_frame_modulation_is_bit_equal_to_per_token(dtype):
    """A storyboard has one timestep per frame: the block's modulation is computed per frame and broadcast over
    the frame's tokens, and must give diffusers' per-token block output and gradients exactly."""
    from diffusers.models.transformers.transformer_wan import WanTransformerBlock

    torch.manual_seed(0)
    block = build_components(ModelConfig(dtype=dtype)).transformer.blocks[0]
    dtype = block.scale_shift_table.dtype
    g = torch.Generator().manual_seed(2)
    frames, tokens, dim = 4, 6, 48
    hidden = torch.randn(2, frames * tokens, dim, generator=g).to(dtype).requires_grad_(True)
    text = torch.randn(2, 5, dim, generator=g).to(dtype)
    per_frame = torch.randn(2, frames, 6, dim, generator=g).to(dtype)
    rotary = storyboard_rotary_emb(StoryboardLayout.of(1, 3), (2, 3), 24)
    outputs, grads = [], []
    for forward, temb in (
        (WanTransformerBlock.forward, per_frame.repeat_interleave(tokens, dim=1)),
        (storyboard_block_forward, per_frame),
    ):
        out = forward(block, hidden, text, temb, rotary)
        (grad,) = torch.autograd.grad(out.float().square().sum(), hidden)
        outputs.append(out.detach())
        grads.append(grad)
    assert outputs[1].dtype == outputs[0].dtype == dtype
    assert torch.equal(outputs[1], outputs[0]) and torch.equal(grads[1], grads[0])


@torch.no_grad()
def test_per_frame_timesteps_give_diffusers_per_token_output():
    torch.manual_seed(0)
    wan = build_components(ModelConfig()).transformer
    latents, text, _ = _inputs()
    per_frame = torch.tensor([[0.0, 300.0, 300.0, 300.0], [0.0, 0.0, 800.0, 800.0]])
    expected = wan(latents, per_frame.repeat_interleave(2 * 3, dim=1), text, return_dict=False)[0]
    framed = copy.deepcopy(wan)
    use_frame_modulation(framed)
    rotary = storyboard_rotary_emb(StoryboardLayout.of(1, 3), (2, 3), 24)
    got = storyboard_forward(framed, latents, per_frame, text, rotary)
    # The blocks and the head are bit-equal (above); the time embedder's matmul runs over B·F rows instead of
    # B·T, which a BLAS kernel may round differently in the last bit.
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    # diffusers' own forward still runs (per token) through the installed blocks; per frame needs them.
    torch.testing.assert_close(framed(latents, per_frame.repeat_interleave(6, 1), text, return_dict=False)[0], got)
    with pytest.raises(ValueError, match="use_frame_modulation"):
        storyboard_forward(wan, latents, per_frame, text, rotary)


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


@torch.no_grad()
def test_a_model_with_per_frame_modulation_pickles_as_ddp_spawn_sends_it():
    torch.manual_seed(0)
    framed = build_components(ModelConfig()).transformer
    use_frame_modulation(framed)
    copied = pickle.loads(pickle.dumps(framed))
    assert uses_frame_modulation(copied)
    latents, text, _ = _inputs()
    per_frame = torch.tensor([[0.0, 300.0, 300.0, 300.0], [0.0, 0.0, 800.0, 800.0]])
    rotary = storyboard_rotary_emb(StoryboardLayout.of(1, 3), (2, 3), 24)
    expected = storyboard_forward(framed, latents, per_frame, text, rotary)
    assert torch.equal(storyboard_forward(copied, latents, per_frame, text, rotary), expected)
