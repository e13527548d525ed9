"""Storyboard RoPE: equals Wan's own with the default layout; handles the ablation layouts, fractional and
negative positions, and the condition phase."""

import math

import pytest
import torch
from diffusers import WanTransformer3DModel
from torch.utils._python_dispatch import TorchDispatchMode

from dreamshot.models.layout import StoryboardLayout
from dreamshot.models.wan.rope import apply_rotary_emb, rope_split, storyboard_rope, storyboard_rotary_emb

HEAD_DIM = 24  # t / h / w parts of 8 channels each
GRID = (3, 4)


def test_default_layout_equals_wan_rope():
    torch.manual_seed(0)
    transformer = WanTransformer3DModel(
        num_layers=1,
        num_attention_heads=2,
        attention_head_dim=HEAD_DIM,
        in_channels=16,
        out_channels=16,
        text_dim=32,
        freq_dim=32,
        ffn_dim=32,
    )
    layout = StoryboardLayout.of(2, 3)
    hidden_states = torch.randn(1, 16, layout.num_frames, 2 * GRID[0], 2 * GRID[1])
    wan_cos, wan_sin = transformer.rope(hidden_states)

    cos, sin = storyboard_rotary_emb(layout, GRID, HEAD_DIM)

    assert cos.shape == wan_cos.shape == (1, layout.num_frames * GRID[0] * GRID[1], 1, HEAD_DIM)
    assert cos.dtype == wan_cos.dtype
    torch.testing.assert_close(cos, wan_cos, atol=1e-6, rtol=0)
    torch.testing.assert_close(sin, wan_sin, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    ("layout", "positions", "phases"),
    [
        (StoryboardLayout.of(3, 4, position_mode="refs_first"), [0, 1, 2, 3, 4, 5, 6], [0] * 7),
        (StoryboardLayout.of(3, 4, position_mode="phase", phase=0.5), [0, 1, 2, 3, 4, 5, 6], [0.5] * 3 + [0] * 4),
        (StoryboardLayout.of(3, 4, position_mode="neg", neg_offset=2.0), [-5, -4, -3, 0, 1, 2, 3], [0] * 7),
        # Targets first in the sequence (0..3), conditions after them (4..6).
        (StoryboardLayout.of(3, 4, position_mode="last"), [0, 1, 2, 3, 4, 5, 6], [0] * 7),
    ],
    ids=["refs_first", "phase", "neg", "last"],
)
def test_layout_positions_and_phases(layout, positions, phases):
    expected_positions = torch.tensor(positions, dtype=torch.float64)
    expected_phases = torch.tensor(phases, dtype=torch.float64)
    assert torch.equal(layout.frame_positions(), expected_positions)
    assert torch.equal(layout.frame_phases(), expected_phases)

    got = storyboard_rotary_emb(layout, GRID, HEAD_DIM)
    expected = storyboard_rope(expected_positions, expected_phases, GRID, HEAD_DIM)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


@pytest.mark.parametrize("position", [2.5, -1.5])
def test_fractional_and_negative_positions_rotate_by_position_times_frequency(position):
    phase = 0.3
    cos, sin = storyboard_rope(torch.tensor([0.0, position]), torch.tensor([0.0, phase]), GRID, HEAD_DIM)
    token = GRID[0] * GRID[1] + 5  # a token of the second frame (row 1, column 1)
    t_dim = rope_split(HEAD_DIM)[0]
    # Temporal pair j = 1 occupies channels 2 and 3 and turns at 10000^(-2/8) = 0.1 rad per position.
    angle = position * 10000.0 ** (-2 / t_dim) + phase
    for channel in (2, 3):
        assert cos[0, token, 0, channel].item() == pytest.approx(math.cos(angle), abs=1e-6)
        assert sin[0, token, 0, channel].item() == pytest.approx(math.sin(angle), abs=1e-6)
    # Height pair 0 (channel t_dim) turns at 1 rad per row: token 5 is in row 1.
    assert cos[0, token, 0, t_dim].item() == pytest.approx(math.cos(1.0), abs=1e-6)


def test_phase_changes_only_the_temporal_part_of_condition_tokens():
    plain = storyboard_rotary_emb(StoryboardLayout.of(2, 3, position_mode="refs_first"), GRID, HEAD_DIM)
    phased = storyboard_rotary_emb(StoryboardLayout.of(2, 3, position_mode="phase", phase=0.7), GRID, HEAD_DIM)
    t_dim = rope_split(HEAD_DIM)[0]
    condition_tokens = 2 * GRID[0] * GRID[1]
    for a, b in zip(plain, phased, strict=True):
        assert torch.equal(a[:, :, :, t_dim:], b[:, :, :, t_dim:])
        assert torch.equal(a[:, condition_tokens:], b[:, condition_tokens:])
        # Every temporal channel of every condition token is rotated further.
        assert (a[:, :condition_tokens, :, :t_dim] - b[:, :condition_tokens, :, :t_dim]).abs().min() > 1e-3


def test_mismatched_positions_and_phases_are_rejected():
    with pytest.raises(ValueError, match="frame_phases"):
        storyboard_rope(torch.zeros(3), torch.zeros(2), GRID, HEAD_DIM)


def _rotation_inputs(dtype=torch.float32):
    torch.manual_seed(0)
    cos, sin = storyboard_rotary_emb(StoryboardLayout.of(1, 2, position_mode="phase", phase=0.4), GRID, HEAD_DIM)
    return torch.randn(2, cos.shape[1], 3, HEAD_DIM).to(dtype), cos, sin


def _rotated_in_float64(x, cos, sin):
    """The rotation written out: channel pair (2j, 2j+1) turned by the angle whose cos / sin the pair carries."""
    pairs = x.double().unflatten(-1, (-1, 2))
    c, s = cos.double()[..., 0::2], sin.double()[..., 1::2]
    first, second = pairs[..., 0], pairs[..., 1]
    return torch.stack([first * c - second * s, first * s + second * c], -1).flatten(-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("compiling", [False, True], ids=["eager", "compiled_form"])
def test_rotation_turns_channel_pairs_and_both_forms_agree(monkeypatch, dtype, compiling):
    x, cos, sin = _rotation_inputs(dtype)
    eager = apply_rotary_emb(x, cos, sin)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: compiling)
    got = apply_rotary_emb(x, cos, sin)
    assert got.dtype == dtype and got.shape == x.shape
    # The same products and sums; the complex kernel's scalar tail may round a cancelling sum differently.
    torch.testing.assert_close(got, eager, atol=1e-6, rtol=0)
    torch.testing.assert_close(got.double(), _rotated_in_float64(x, cos, sin).to(dtype).double(), atol=1e-6, rtol=0)


def test_rotation_gradient_is_the_inverse_rotation():
    x, cos, sin = _rotation_inputs()
    x.requires_grad_()
    grad = torch.randn_like(x)
    apply_rotary_emb(x, cos, sin).backward(grad)
    torch.testing.assert_close(x.grad, apply_rotary_emb(grad, cos, -sin), atol=1e-6, rtol=0)


class _FullSizeOps(TorchDispatchMode):
    """Records the non-view aten ops whose output has at least half the bytes of `numel` float32 values."""

    def __init__(self, numel):
        super().__init__()
        self.numel, self.ops = numel, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor) and not func.is_view and out.numel() * out.element_size() >= self.numel * 2:
            self.ops.append(func.__name__)
        return out


def test_eager_rotation_is_one_kernel_over_the_queries():
    """Four real multiplications on strided halves, a subtraction, an addition and a stack each read or write the
    whole (B, T, H, d) tensor; one complex multiplication does it in one pass (benchmarks/RESULTS.md#peers)."""
    x, cos, sin = _rotation_inputs()
    with _FullSizeOps(x.numel()) as recorded:
        apply_rotary_emb(x, cos, sin)
    assert recorded.ops == ["mul.Tensor"]
