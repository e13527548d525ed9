"""Storyboard layouts: frame order, positions (story positions kept by every shot) and the assemble/split round
trip."""

import pytest
import torch

from dreamshot.config.schema import StoryboardConfig
from dreamshot.diffusion.conditioning import storyboard_layout
from dreamshot.models.layout import StoryboardLayout


@pytest.mark.parametrize(
    ("mode", "positions", "targets"),
    [
        ("refs_first", [0, 1, 2, 3, 4], [False, False, True, True, True]),
        ("phase", [0, 1, 2, 3, 4], [False, False, True, True, True]),
        ("neg", [-2.5, -1.5, 0, 1, 2], [False, False, True, True, True]),
        ("last", [0, 1, 2, 3, 4], [True, True, True, False, False]),
    ],
)
def test_positions_and_target_frames(mode, positions, targets):
    layout = StoryboardLayout.of(2, 3, position_mode=mode, phase=0.7, neg_offset=0.5)
    assert layout.frame_positions().tolist() == positions
    assert layout.target_frames().tolist() == targets
    phases = layout.frame_phases()
    expected = [0.7 if (mode == "phase" and not is_target) else 0.0 for is_target in targets]
    assert phases.tolist() == pytest.approx(expected)


def test_neg_layout_leaves_a_configured_gap_before_the_shots():
    # DESIGN's Neg-Pos: shots at 0..N-1, references at -K-g..-1-g; the default gap is not 0.
    gap = StoryboardConfig().neg_offset
    assert gap > 0
    layout = storyboard_layout(StoryboardConfig(layout="neg"), 3, range(2))
    assert layout.frame_positions().tolist() == [-3 - gap, -2 - gap, -1 - gap, 0, 1]
    # Without a gap the references sit right before the shots: refs_first shifted by -K, the same differences.
    no_gap = storyboard_layout(StoryboardConfig(layout="neg", neg_offset=0.0), 3, range(2)).frame_positions()
    base = storyboard_layout(StoryboardConfig(), 3, range(2)).frame_positions()
    assert torch.equal(no_gap - no_gap[0], base - base[0])


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        # refs 0, 1; story positions 0..3 at 2..5. Sequence: refs, given shots 1, 3, 4, then the target shot 2.
        ("refs_first", [0, 1, 2, 4, 5, 3]),
        ("phase", [0, 1, 2, 4, 5, 3]),
        ("neg", [-6, -5, 0, 2, 3, 1]),
        # Targets first in the sequence, then refs after the whole story (4, 5), then the given shots.
        ("last", [1, 4, 5, 0, 2, 3]),
    ],
)
def test_a_re_rolled_middle_shot_keeps_its_story_position(mode, expected):
    """Re-rolling shot 2 of 4 with 2 references: every shot's temporal index is its story position, kept or drawn."""
    cfg = StoryboardConfig(layout=mode, neg_offset=4.0)
    layout = storyboard_layout(cfg, 2, target_shots=[1], given_shots=[0, 2, 3])
    assert layout.frame_positions().tolist() == expected
    # Training's r2s_s2s with the first three shots given puts each story position at the same index.
    trained = storyboard_layout(cfg, 2, target_shots=[3], given_shots=[0, 1, 2])
    story_index = dict(zip([*layout.given_shots, *layout.target_shots], _shot_positions(layout), strict=True))
    trained_index = dict(zip([*trained.given_shots, *trained.target_shots], _shot_positions(trained), strict=True))
    assert story_index == trained_index


def _shot_positions(layout):
    """The temporal index of each shot, given then targets (the references left out)."""
    conditions, targets = layout.split(layout.frame_positions(), dim=0)
    return [*conditions[layout.num_references :].tolist(), *targets.tolist()]


def test_phase_rotates_references_only():
    layout = StoryboardLayout(2, (2, 3), (0, 1), position_mode="phase", phase=0.5)
    assert layout.frame_phases().tolist() == [0.5, 0.5, 0, 0, 0, 0]


@pytest.mark.parametrize("mode", ["refs_first", "last"])
def test_assemble_split_round_trip(mode):
    layout = StoryboardLayout.of(2, 3, position_mode=mode)
    cond, target = torch.randn(1, 4, 2, 3, 3), torch.randn(1, 4, 3, 3, 3)
    seq = layout.assemble(cond, target)
    assert seq.shape[2] == 5
    back_cond, back_target = layout.split(seq)
    assert torch.equal(back_cond, cond) and torch.equal(back_target, target)
    assert torch.equal(seq[:, :, layout.target_frames()], target)


def test_no_conditions_is_valid_and_bad_layouts_are_rejected():
    layout = StoryboardLayout.of(0, 4)
    assert layout.frame_positions().tolist() == [0, 1, 2, 3] and layout.target_frames().all()
    with pytest.raises(ValueError):
        StoryboardLayout.of(1, 1, position_mode="sideways")
    with pytest.raises(ValueError, match="distinct"):
        StoryboardLayout(1, (1, 2), (2,))
    with pytest.raises(ValueError, match="target"):
        StoryboardLayout(1, ())
