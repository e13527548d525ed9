"""Role-Attention Consistency Loss: token masks, role plans, the capture's exactness and gradients, the loss."""

import pytest
import torch

from dreamshot.diffusion import racl as racl_module
from dreamshot.diffusion.racl import (
    attention_shares,
    build_role_plan,
    naive_role_attention_maps,
    racl_loss,
    role_attention_maps,
    token_grid_masks,
)
from dreamshot.models.layout import StoryboardLayout
from dreamshot.models.wan.forward import compile_blocks, storyboard_forward
from dreamshot.models.wan.role_capture import RoleCapture, RoleCaptureSelfAttnProcessor, use_role_capture
from dreamshot.models.wan.rope import storyboard_rotary_emb

# --- token masks and plans -------------------------------------------------------------------------------------


def test_token_grid_masks_use_coverage_threshold():
    mask = torch.zeros(32, 48)
    mask[:16, :16] = 1  # token (0, 0) fully covered
    mask[16:24, 16:32] = 1  # token (1, 1) half covered
    mask[16:20, 32:48] = 1  # token (1, 2) quarter covered
    grid = token_grid_masks(mask, (2, 3), threshold=0.5)
    assert grid.tolist() == [[True, False, False], [False, True, False]]
    assert token_grid_masks(mask, (2, 3), threshold=0.25)[1, 2]
    with pytest.raises(ValueError):
        token_grid_masks(torch.zeros(31, 48), (2, 3))


def _frame_masks():
    """3 frames (a reference for role 0, then 2 shots) x 2 roles x 4 tokens."""
    masks = torch.zeros(3, 2, 4, dtype=torch.bool)
    masks[0, 0, :2] = True  # reference of role 0
    masks[1, 0, 0] = True  # role 0 in shot 1
    masks[1, 1, 3] = True  # role 1 in shot 1
    masks[2, 1, 2:] = True  # role 1 in shot 2 (role 0 absent)
    return masks


def test_role_plan_sources_targets_and_absent_roles():
    targets = torch.tensor([False, True, True])
    plan = build_role_plan(_frame_masks(), targets)
    # Sources: (ref, role 0), (shot 1, role 0), (shot 1, role 1), (shot 2, role 1).
    assert plan.source_weights.shape == (4, 12)
    assert torch.allclose(plan.source_weights.sum(-1), torch.ones(4))
    assert plan.source_weights[0, :2].tolist() == [0.5, 0.5]
    assert plan.target_tokens.tolist() == [[4, 5, 6, 7], [8, 9, 10, 11]]
    # Role 0 is absent from shot 2; a source never targets its own frame.
    assert plan.present_pairs.tolist() == [[True, False], [False, False], [False, True], [True, False]]
    assert not plan.absent_pairs.any()
    assert plan.other_masks[0, 0].tolist() == [0, 0, 0, 1]
    negative = build_role_plan(_frame_masks(), targets, absent_negative=True)
    assert torch.equal(negative.present_pairs, plan.present_pairs)
    assert negative.absent_pairs.tolist() == [[False, True], [False, True], [False, False], [False, False]]
    assert negative.target_masks[0, 1].sum() == 0  # the label of an absent role is all zero


def test_role_with_empty_masks_has_no_sources():
    masks = _frame_masks()
    masks[:, 1] = False
    plan = build_role_plan(masks, torch.tensor([False, True, True]))
    assert plan.source_weights.shape[0] == 2


# --- maps and loss ---------------------------------------------------------------------------------------------


def test_efficient_maps_equal_naive_and_are_distributions():
    g = torch.Generator().manual_seed(0)
    query, key = torch.randn(12, 2, 8, generator=g), torch.randn(12, 2, 8, generator=g)
    plan = build_role_plan(_frame_masks(), torch.tensor([False, True, True]))
    maps, mass = role_attention_maps(query, key, plan.source_weights, plan.target_tokens, with_mass=True)
    naive, naive_mass = naive_role_attention_maps(query, key, plan.source_weights, plan.target_tokens, True)
    torch.testing.assert_close(maps, naive, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(maps.sum(-1), torch.ones(4, 2))
    # The mass is the share of all T keys' attention on the shot: in (0, 1), below 1 with a reference frame.
    torch.testing.assert_close(mass, naive_mass, atol=1e-6, rtol=1e-5)
    assert (mass > 0).all() and (mass.sum(-1) < 1).all()
    assert role_attention_maps(query, key, plan.source_weights, plan.target_tokens).mass is None


def _float64_maps(query, key, plan):
    """Eq. 5 computed in float64 from the same (rounded) inputs."""
    heads, head_dim = query.shape[-2:]
    logits = query.double().flatten(-2) @ key.double().flatten(-2).T / (heads * head_dim**0.5)
    return torch.stack([plan.source_weights.double() @ torch.softmax(logits[:, t], -1) for t in plan.target_tokens], 1)


def test_bf16_queries_and_keys_give_float32_accurate_maps():
    """The role rows' logits are formed in float32: bf16 logits would round each to ~3 significant digits."""
    g = torch.Generator().manual_seed(0)
    query, key = (torch.randn(12, 2, 8, generator=g).mul(3).bfloat16() for _ in range(2))
    plan = build_role_plan(_frame_masks(), torch.tensor([False, True, True]))
    maps = role_attention_maps(query, key, plan.source_weights, plan.target_tokens).maps
    assert maps.dtype == torch.float32
    torch.testing.assert_close(maps.double(), _float64_maps(query, key, plan), atol=1e-6, rtol=1e-5)


def test_racl_under_bf16_autocast_stays_float32_and_never_calls_bce_in_autocast(bce_refused_in_autocast):
    """`trainer=ddp`'s bf16-mixed runs the whole training step in autocast. The role rows' logits must stay float32
    there, and the loss must not reach binary_cross_entropy with autocast on: CUDA's autocast refuses it ("unsafe to
    autocast"), CPU's allows it, so the test refuses it as CUDA does."""
    g = torch.Generator().manual_seed(0)
    query, key = (torch.randn(12, 2, 8, generator=g).mul(3) for _ in range(2))
    plan = build_role_plan(_frame_masks(), torch.tensor([False, True, True]), absent_negative=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        maps, mass = role_attention_maps(query, key, plan.source_weights, plan.target_tokens, with_mass=True)
        naive = naive_role_attention_maps(query, key, plan.source_weights, plan.target_tokens, True)
        loss = racl_loss(maps, plan.target_masks, plan.present_pairs, mass, plan.absent_pairs)
    exact = _float64_maps(query, key, plan)
    torch.testing.assert_close(maps.double(), exact, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(naive.maps.double(), exact, atol=1e-6, rtol=1e-5)
    plain = role_attention_maps(query, key, plan.source_weights, plan.target_tokens, with_mass=True)
    torch.testing.assert_close(
        loss, racl_loss(plain.maps, plan.target_masks, plan.present_pairs, plain.mass, plan.absent_pairs)
    )


def test_absent_role_term_pushes_the_attention_mass_on_the_shot_down():
    """A role absent from shot 2: raising every logit of shot 2's keys (which leaves the renormalised map, and so
    its max-scaled BCE, unchanged) must raise the loss, and a gradient step must lower the mass."""
    g = torch.Generator().manual_seed(0)
    query = torch.randn(12, 2, 8, generator=g)
    key = torch.randn(12, 2, 8, generator=g)
    masks = torch.zeros(3, 1, 4, dtype=torch.bool)
    masks[0, 0, 0] = True  # one query token: role 0 in its reference
    masks[1, 0, :2] = True  # role 0 visible in shot 1, absent from shot 2
    plan = build_role_plan(masks, torch.tensor([False, True, True]), absent_negative=True)
    assert plan.absent_pairs.tolist() == [[False, True], [False, True]]
    shift = torch.zeros((), requires_grad=True)
    shot2 = torch.zeros(12, 1, 1)
    shot2[8:] = 1.0
    # Adding shift·q to shot 2's keys adds shift·|q|²/(H·√d) to every logit of the one query row on shot 2.
    shifted = key + shift * shot2 * query[0:1]
    maps, mass = role_attention_maps(query, shifted, plan.source_weights, plan.target_tokens, with_mass=True)
    loss = racl_loss(maps, plan.target_masks, plan.present_pairs, mass, plan.absent_pairs)
    (slope,) = torch.autograd.grad(loss, shift)
    assert slope > 0
    key = key.clone().requires_grad_(True)
    before = role_attention_maps(query, key, plan.source_weights, plan.target_tokens, with_mass=True)
    racl_loss(before.maps, plan.target_masks, plan.present_pairs, before.mass, plan.absent_pairs).backward()
    with torch.no_grad():
        after = role_attention_maps(query, key - 0.5 * key.grad, plan.source_weights, plan.target_tokens, True)
    assert (after.mass[:, 1] < before.mass[:, 1].detach()).all()


def test_loss_prefers_maps_inside_the_mask():
    labels = torch.tensor([[[1.0, 1.0, 0.0, 0.0]]])
    pairs = torch.tensor([[True]])
    inside = racl_loss(torch.tensor([[[0.5, 0.5, 0.0, 0.0]]]), labels, pairs)
    outside = racl_loss(torch.tensor([[[0.0, 0.0, 0.5, 0.5]]]), labels, pairs)
    assert inside < 0.01 < 5 < outside
    none = racl_loss(torch.rand(1, 1, 4, requires_grad=True), labels, torch.tensor([[False]]))
    assert none == 0 and none.requires_grad


def test_attention_shares():
    maps = torch.tensor([[[0.6, 0.3, 0.1, 0.0]]])
    own, other = attention_shares(
        maps, torch.tensor([[[1.0, 0, 0, 0]]]), torch.tensor([[[0, 1.0, 0, 0]]]), torch.tensor([[True]])
    )
    assert own.item() == pytest.approx(0.6) and other.item() == pytest.approx(0.3)


# --- capture inside the tiny Wan -------------------------------------------------------------------------------


@pytest.fixture()
def transformer(tiny_transformer):
    use_role_capture(tiny_transformer, [0, 1])
    return tiny_transformer


def _run(transformer, capture=None, checkpointing=False):
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(1, 16, 3, 4, 4, generator=g)  # 3 frames of 2x2 = 4 tokens
    text = torch.randn(1, 3 * 5, 32, generator=g)
    rotary = storyboard_rotary_emb(StoryboardLayout.of(1, 2), (2, 2), 24)
    runner = capture.runner if capture is not None else None
    kwargs = {"block_runner": runner} if runner else {}
    return storyboard_forward(
        transformer, latents, torch.tensor([500.0]), text, rotary, gradient_checkpointing=checkpointing, **kwargs
    )


def _plan():
    return build_role_plan(_frame_masks(), torch.tensor([False, True, True]))


def test_inactive_processor_equals_wan_attention(transformer):
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    with torch.no_grad():
        ours = _run(transformer)
        for block in transformer.blocks:
            block.attn1.set_processor(WanAttnProcessor())
        theirs = _run(transformer)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_captured_map_equals_explicit_full_softmax(transformer):
    seen = {}

    def keep_inputs(index):
        def hook(module, args):
            seen[index] = (args[0].detach(), args[3])

        return hook

    for index, block in enumerate(transformer.blocks):
        block.attn1.register_forward_pre_hook(keep_inputs(index))
    plan = _plan()
    capture = RoleCapture([plan], frozenset({0, 1}))
    with torch.no_grad():
        _run(transformer, capture)
    expected = []
    for index, block in enumerate(transformer.blocks):
        hidden, (cos, sin) = seen[index]
        attn = block.attn1
        q = attn.norm_q(attn.to_q(hidden)).unflatten(2, (2, -1))
        k = attn.norm_k(attn.to_k(hidden)).unflatten(2, (2, -1))
        from dreamshot.models.wan.rope import apply_rotary_emb

        q, k = apply_rotary_emb(q, cos, sin)[0], apply_rotary_emb(k, cos, sin)[0]
        full = torch.softmax(torch.einsum("qhd,khd->hqk", q, k) / 24**0.5, dim=-1)  # explicit T x T attention
        logits = torch.einsum("qhd,khd->hqk", q, k).mean(0) / 24**0.5
        per_shot = torch.stack([plan.source_weights @ torch.softmax(logits[:, t], -1) for t in plan.target_tokens], 1)
        expected.append(per_shot)
        assert full.shape == (2, 12, 12)
    torch.testing.assert_close(capture.block_mean()[0], torch.stack(expected).mean(0), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_racl_gradients_reach_parameters_and_match_naive(transformer, checkpointing):
    plan = _plan()
    grads = []
    for naive in (False, True):
        transformer.zero_grad()
        capture = RoleCapture([plan], frozenset({0, 1}), naive=naive)
        _run(transformer, capture, checkpointing=checkpointing)
        racl_loss(capture.block_mean()[0], plan.target_masks, plan.present_pairs).backward()
        grads.append(transformer.blocks[0].attn1.to_q.weight.grad.clone())
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-4)


def test_compiled_blocks_give_the_same_role_maps_and_gradients(transformer):
    """Block 1 captures (it runs eagerly for that call), block 0 runs compiled; checkpointing replays both."""
    plan = _plan()
    results = []
    for compiled in (False, True):
        if compiled:
            compile_blocks(transformer)
        transformer.zero_grad()
        capture = RoleCapture([plan], frozenset({1}))
        output = _run(transformer, capture, checkpointing=True)
        (output.square().mean() + racl_loss(capture.block_mean()[0], plan.target_masks, plan.present_pairs)).backward()
        grads = {name: p.grad.clone() for name, p in transformer.named_parameters() if p.grad is not None}
        results.append((capture.block_mean()[0].detach(), grads))
    (eager_map, eager_grads), (compiled_map, compiled_grads) = results
    torch.testing.assert_close(compiled_map, eager_map, atol=1e-6, rtol=1e-5)
    assert compiled_grads.keys() == eager_grads.keys()
    for name, grad in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, atol=1e-6, rtol=1e-4, msg=name)


def test_nothing_is_captured_without_a_capture(transformer, monkeypatch):
    calls = []
    monkeypatch.setattr(racl_module, "role_attention_maps", lambda *a: calls.append(1))
    with torch.no_grad():
        _run(transformer)
    assert not calls
    assert all(block.attn1.processor.sink is None for block in transformer.blocks)
    assert isinstance(transformer.blocks[0].attn1.processor, RoleCaptureSelfAttnProcessor)


def test_capture_leaves_nothing_behind_between_layouts(transformer):
    capture = RoleCapture([_plan()], frozenset({1}))
    with torch.no_grad():
        _run(transformer, capture)
    assert set(capture.maps) == {1}
    assert all(block.attn1.processor.sink is None for block in transformer.blocks)
