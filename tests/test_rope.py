"""Storyboard RoPE: equals Wan's own with the default layout; handles the ablation layouts, fractional and
negative positions, and the condition phase."""

import math

import pytest
import torch
from diffusers import WanTransformer3DModel

from dreamshot.models.layout import StoryboardLayout
from dreamshot.models.wan.rope import rope_split, storyboard_rope, storyboard_rotary_emb

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
