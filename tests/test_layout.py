"""Storyboard layouts: frame order, positions and the assemble/split round trip."""

import pytest
import torch

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
    layout = StoryboardLayout(2, 3, position_mode=mode, phase=0.7, neg_offset=0.5)
    assert layout.frame_positions().tolist() == positions
    assert layout.target_frames().tolist() == targets
    phases = layout.frame_phases()
    expected = [0.7 if (mode == "phase" and not is_target) else 0.0 for is_target in targets]
    assert phases.tolist() == pytest.approx(expected)


@pytest.mark.parametrize("mode", ["refs_first", "last"])
def test_assemble_split_round_trip(mode):
    layout = StoryboardLayout(2, 3, position_mode=mode)
    cond, target = torch.randn(1, 4, 2, 3, 3), torch.randn(1, 4, 3, 3, 3)
    seq = layout.assemble(cond, target)
    assert seq.shape[2] == 5
    back_cond, back_target = layout.split(seq)
    assert torch.equal(back_cond, cond) and torch.equal(back_target, target)
    assert torch.equal(seq[:, :, layout.target_frames()], target)


def test_no_conditions_is_valid_and_bad_mode_rejected():
    layout = StoryboardLayout(0, 4)
    assert layout.frame_positions().tolist() == [0, 1, 2, 3] and layout.target_frames().all()
    with pytest.raises(ValueError):
        StoryboardLayout(1, 1, position_mode="sideways")
