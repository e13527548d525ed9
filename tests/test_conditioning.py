"""Training modes and condition dropout (DESIGN §2 "Modes")."""

import random
from collections import Counter

import pytest
import torch

from dreamshot.config.schema import ModeMixConfig, StoryboardConfig
from dreamshot.diffusion.conditioning import BatchPlan, StoryboardLatents, compose, sample_plan


def _latents(batch=2, refs=3, shots=5):
    return StoryboardLatents(
        refs=torch.randn(batch, 4, refs, 2, 2),
        shots=torch.randn(batch, 4, shots, 2, 2),
        ref_text=torch.randn(batch, refs, 6, 8),
        shot_text=torch.randn(batch, shots, 6, 8),
    )


def test_mode_mix_matches_configuration():
    cfg = StoryboardConfig(modes=ModeMixConfig(t2s=0.2, r2s=0.5, s2s=0.3), drop_refs=0.0, drop_text=0.25)
    rng = random.Random(0)
    plans = [sample_plan(cfg, num_shots=5, num_refs=2, batch_size=1, rng=rng) for _ in range(4000)]
    modes = Counter(p.mode for p in plans)
    for mode, expected in (("t2s", 0.2), ("r2s", 0.5), ("s2s", 0.3)):
        assert abs(modes[mode] / 4000 - expected) < 0.03
    assert abs(sum(p.dropped_text[0] for p in plans) / 4000 - 0.25) < 0.03
    assert all(1 <= p.given_shots <= 4 for p in plans if p.mode == "s2s")


def test_impossible_modes_fall_back():
    cfg = StoryboardConfig(modes=ModeMixConfig(t2s=0.0, r2s=0.0, s2s=1.0))
    plan = sample_plan(cfg, num_shots=1, num_refs=0, batch_size=1, rng=random.Random(0))
    assert plan.mode == "t2s"  # s2s needs two shots, r2s needs a reference


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
