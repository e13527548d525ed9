"""Which ranks draw the training sample (`trainer.sample`), and when: `samples.draws_at`."""

from __future__ import annotations

import pytest

from dreamshot.training.samples import draws_at


@pytest.mark.parametrize(
    ("step", "last_step", "expected"),
    [(0, -1, False), (1, -1, False), (2, -1, True), (2, 2, False), (3, 2, False), (4, 2, True)],
)
def test_a_sample_is_due_every_n_steps_once_per_step(step, last_step, expected):
    """Under gradient accumulation global_step stays put for several batches: the second batch of step 2 skips."""
    assert draws_at(step, last_step, 2, global_rank=0, degree=1) is expected


def test_rank_zeros_context_parallel_group_draws_and_the_other_groups_skip():
    """8 ranks in groups of 4 consecutive ranks (the mesh's layout): ranks 0-3 draw together, 4-7 train on."""
    assert [draws_at(2, -1, 2, rank, degree=4) for rank in range(8)] == [True] * 4 + [False] * 4


def test_without_context_parallelism_rank_zero_draws_alone():
    assert [draws_at(2, -1, 2, rank, degree=1) for rank in range(4)] == [True, False, False, False]
