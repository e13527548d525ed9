"""Training modes and condition dropout (DESIGN §2 "Modes")."""

import random
from collections import Counter

import pytest
import torch

from dreamshot.config.schema import ModeMixConfig, StoryboardConfig
from dreamshot.diffusion.conditioning import (
    MODES,
    BatchPlan,
    StoryboardLatents,
    check_trained,
    compose,
    sample_plan,
    trained_modes,
)
from dreamshot.utils.errors import ConfigError


def _latents(batch=2, refs=3, shots=5):
    return StoryboardLatents(
        refs=torch.randn(batch, 4, refs, 2, 2),
        shots=torch.randn(batch, 4, shots, 2, 2),
        ref_text=torch.randn(batch, refs, 6, 8),
        shot_text=torch.randn(batch, shots, 6, 8),
    )


def test_mode_mix_matches_configuration():
    mix = ModeMixConfig(t2s=0.2, r2s=0.4, s2s=0.25, r2s_s2s=0.15)
    cfg = StoryboardConfig(modes=mix, drop_joint=0.0, drop_refs=0.0, drop_text=0.25)
    rng = random.Random(0)
    plans = [sample_plan(cfg, num_shots=5, num_refs=2, batch_size=1, rng=rng) for _ in range(4000)]
    modes = Counter(p.mode for p in plans)
    for mode, expected in (("t2s", 0.2), ("r2s", 0.4), ("s2s", 0.25), ("r2s_s2s", 0.15)):
        assert abs(modes[mode] / 4000 - expected) < 0.03
    assert abs(sum(p.dropped_text[0] for p in plans) / 4000 - 0.25) < 0.03
    assert all(1 <= p.given_shots <= 4 for p in plans if p.mode in ("s2s", "r2s_s2s"))


@pytest.mark.parametrize(
    ("mode", "shots", "refs", "expected"),
    [("s2s", 1, 0, "t2s"), ("s2s", 1, 2, "r2s"), ("r2s_s2s", 1, 2, "r2s"), ("r2s_s2s", 3, 0, "s2s")],
)
def test_impossible_modes_fall_back(mode, shots, refs, expected):
    # Given shots need two shots, references need a reference.
    cfg = StoryboardConfig(modes=ModeMixConfig(**{name: float(name == mode) for name in MODES}))
    plan = sample_plan(cfg, num_shots=shots, num_refs=refs, batch_size=1, rng=random.Random(0))
    assert plan.mode == expected


def test_default_mix_gives_the_unconditioned_branch_a_tenth_of_the_samples():
    """Eq. 9 weights v_u (no condition frame, negative prompt) by -(ω1 - 1): it needs a usual CFG share (~10%)."""
    cfg, rng = StoryboardConfig(), random.Random(0)
    draws, unconditioned = 20000, 0
    for _ in range(draws):
        plan = sample_plan(cfg, num_shots=5, num_refs=2, batch_size=1, rng=rng)
        no_conditions = plan.dropped_all or not (plan.keeps_references or plan.given_shots)
        unconditioned += no_conditions and plan.dropped_text[0]
    assert 0.09 < unconditioned / draws < 0.12
    assert 0.07 < cfg.drop_joint < 0.09


def test_joint_drop_removes_every_condition_and_every_text():
    latents, negative = _latents(), torch.full((6, 8), 7.0)
    plan = BatchPlan("r2s_s2s", 2, False, (True, True), dropped_all=True)
    composed = compose(plan, latents, negative, StoryboardConfig())
    assert composed.layout.num_conditions == 0 and composed.conditions.shape[2] == 0
    assert (composed.target_text == 7.0).all() and torch.equal(composed.targets, latents.shots[:, :, 2:])
    # The targets keep their story positions (2..4); without conditions only their differences matter.
    assert composed.layout.target_shots == (2, 3, 4)
    assert plan.counts() == {"mode_r2s_s2s": 2, "drop_refs": 0, "drop_text": 0, "drop_joint": 2}


def test_r2s_s2s_conditions_on_references_and_the_first_shots():
    latents = _latents()
    composed = compose(BatchPlan("r2s_s2s", 2, False, (False, False)), latents, torch.zeros(6, 8), StoryboardConfig())
    assert torch.equal(composed.conditions, torch.cat([latents.refs, latents.shots[:, :, :2]], dim=2))
    assert torch.equal(composed.condition_text, torch.cat([latents.ref_text, latents.shot_text[:, :2]], dim=1))
    assert torch.equal(composed.targets, latents.shots[:, :, 2:])
    layout = composed.layout
    assert (layout.num_references, layout.given_shots, layout.target_shots) == (3, (0, 1), (2, 3, 4))
    # Shots at K + story position: the same indices as r2s gives them.
    assert layout.frame_positions().tolist() == [0, 1, 2, 3, 4, 5, 6, 7]
    dropped = compose(BatchPlan("r2s_s2s", 2, True, (False, False)), latents, torch.zeros(6, 8), StoryboardConfig())
    assert dropped.layout.num_references == 0 and dropped.layout.given_shots == (0, 1)  # trains as s2s


def test_inference_asks_only_for_condition_sets_the_mix_trained():
    assert trained_modes(StoryboardConfig()) == {"t2s", "r2s", "s2s", "r2s_s2s"}
    paper_mix = StoryboardConfig(modes=ModeMixConfig(t2s=0.2, r2s=0.6, s2s=0.2, r2s_s2s=0.0))
    assert trained_modes(paper_mix) == {"t2s", "r2s", "s2s"}
    with pytest.raises(ConfigError, match=r"^storyboard\.modes\.r2s_s2s is 0\.0: this run never trained references"):
        check_trained(paper_mix, "r2s_s2s")
    # Dropping the references of r2s batches trains t2s even when t2s is never drawn.
    no_t2s = StoryboardConfig(modes=ModeMixConfig(t2s=0.0, r2s=1.0, s2s=0.0, r2s_s2s=0.0))
    assert trained_modes(no_t2s) == {"r2s", "t2s"}
    check_trained(no_t2s, "t2s")


def test_t2s_batch_has_no_reference_frames():
    composed = compose(BatchPlan("t2s", 0, False, (False, False)), _latents(), torch.zeros(6, 8), StoryboardConfig())
    assert composed.conditions.shape[2] == 0 and composed.layout.num_conditions == 0
    assert composed.targets.shape[2] == 5


def test_dropped_references_train_as_t2s():
    composed = compose(BatchPlan("r2s", 0, True, (False, False)), _latents(), torch.zeros(6, 8), StoryboardConfig())
    assert composed.layout.num_conditions == 0


def test_r2s_keeps_references_clean_in_the_condition_slot():
    latents = _latents()
    composed = compose(BatchPlan("r2s", 0, False, (False, False)), latents, torch.zeros(6, 8), StoryboardConfig())
    assert torch.equal(composed.conditions, latents.refs) and torch.equal(composed.condition_text, latents.ref_text)
    assert composed.layout.num_conditions == 3 and composed.layout.num_targets == 5


def test_s2s_given_shots_are_conditions_with_their_own_text():
    latents = _latents()
    composed = compose(BatchPlan("s2s", 2, False, (False, False)), latents, torch.zeros(6, 8), StoryboardConfig())
    assert torch.equal(composed.conditions, latents.shots[:, :, :2])
    assert torch.equal(composed.condition_text, latents.shot_text[:, :2])
    assert torch.equal(composed.targets, latents.shots[:, :, 2:])
    assert composed.layout.target_frames().tolist() == [False, False, True, True, True]


@pytest.mark.parametrize("layout", ["refs_first", "last"])
def test_text_dropout_replaces_only_that_samples_target_text(layout):
    latents, negative = _latents(), torch.full((6, 8), 7.0)
    composed = compose(BatchPlan("r2s", 0, False, (True, False)), latents, negative, StoryboardConfig(layout=layout))
    assert (composed.target_text[0] == 7.0).all()
    assert torch.equal(composed.target_text[1], latents.shot_text[1])
    assert torch.equal(composed.condition_text, latents.ref_text)  # role prompts are kept


def test_plan_counts():
    assert BatchPlan("r2s", 0, True, (True, False, True)).counts() == {
        "mode_r2s": 3,
        "drop_refs": 3,
        "drop_text": 2,
        "drop_joint": 0,
    }


def _with_masks(latents, roles=3):
    batch, refs, shots = latents.refs.shape[0], latents.refs.shape[2], latents.shots.shape[2]
    ref_masks = torch.zeros(batch, refs, roles, 4, 4)
    for k in range(refs):
        ref_masks[:, k, k] = 1.0
    latents.ref_masks = ref_masks
    latents.shot_masks = torch.rand(batch, shots, roles, 4, 4).round()
    return latents


@pytest.mark.parametrize("layout", ["refs_first", "last"])
def test_frame_masks_follow_the_frames(layout):
    latents = _with_masks(_latents())
    cfg = StoryboardConfig(layout=layout)
    r2s = compose(BatchPlan("r2s", 0, False, (False, False)), latents, torch.zeros(6, 8), cfg)
    cond_masks, target_masks = r2s.layout.split(r2s.frame_masks, dim=1)
    assert torch.equal(cond_masks, latents.ref_masks) and torch.equal(target_masks, latents.shot_masks)
    s2s = compose(BatchPlan("s2s", 2, False, (False, False)), latents, torch.zeros(6, 8), cfg)
    cond_masks, target_masks = s2s.layout.split(s2s.frame_masks, dim=1)
    assert torch.equal(cond_masks, latents.shot_masks[:, :2]) and torch.equal(target_masks, latents.shot_masks[:, 2:])
    both = compose(BatchPlan("r2s_s2s", 2, False, (False, False)), latents, torch.zeros(6, 8), cfg)
    cond_masks, target_masks = both.layout.split(both.frame_masks, dim=1)
    assert torch.equal(cond_masks, torch.cat([latents.ref_masks, latents.shot_masks[:, :2]], dim=1))
    assert torch.equal(target_masks, latents.shot_masks[:, 2:])
