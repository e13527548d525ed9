"""Role-Attention Consistency Loss (DESIGN §2, Eq. 5-8). Pure tensor functions.

Notation inside one sample: the DiT sequence has F latent frames of S tokens each (T = F·S, frame-major).
A *source* is a (role r, frame f) pair where role r is visible in frame f (its reference image, a given shot,
or a generated shot); its query tokens are the role's tokens in that frame. A *target* is a noised shot j; its
keys are the S tokens of that shot. For source p and target j the role-attention map is

    A_{p→j} = mean_{i ∈ Q_p} softmax_{keys of shot j}( mean_heads(q_i · k / √d) )        (S,)

and it is compared, scaled to [0, 1] by its maximum, with the role's token mask in shot j by binary
cross-entropy. Only the |Q| rows of the role query tokens are ever formed, one target shot at a time, in
float32 (|Q| rows only, so cheap; bf16 logits would carry ~1% relative error into the softmax). Maps and loss are
computed with autocast off: under `bf16-mixed` without DeepSpeed (`trainer=ddp`) Lightning runs the whole training
step in autocast, which would cast the role rows' float32 matmuls back to bf16 and, on CUDA, refuses
`binary_cross_entropy` outright ("unsafe to autocast").

A role absent from shot j has an all-zero label, which the max-scaled map cannot approach (a map that sums to 1
over shot j, scaled by its maximum, is minimised by a one-hot). So with `racl.absent_negative` the absent-role
term penalises the attention mass instead: the share of the role's attention, softmax over ALL T keys, that
lands on shot j,

    m_{p→j} = mean_{i ∈ Q_p} Σ_{k ∈ shot j} softmax_{all keys}( mean_heads(q_i · k / √d) )[k]        (scalar)

by BCE against 0, −log(1 − m): its gradient always moves attention away from the shot. This needs the
log-sum-exp of the role rows over the other frames too (one more chunk per frame that is not a target).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F


def token_grid_masks(masks: torch.Tensor, grid: tuple[int, int], threshold: float = 0.5) -> torch.Tensor:
    """Pixel masks (..., H, W) in [0, 1] -> token masks (..., h, w) bool: a token belongs to the role where the
    mask covers at least `threshold` of its H/h × W/w pixel cell (16×16 for Wan: VAE 8× and patch 2×)."""
    *lead, height, width = masks.shape
    h, w = grid
    if height % h or width % w:
        raise ValueError(f"mask size {height}x{width} is not a multiple of the token grid {h}x{w}")
    coverage = F.avg_pool2d(masks.reshape(-1, 1, height, width).float(), (height // h, width // w))
    return (coverage >= threshold).reshape(*lead, h, w)


@dataclass
class RolePlan:
    """What to capture and compare for one sample.

    source_weights: (P, T) — row p is a uniform distribution over source p's query tokens.
    target_tokens: (N, S) long — sequence indices of each target shot's tokens.
    target_masks: (P, N, S) float — role r's token mask in target shot j (the BCE label).
    other_masks: (P, N, S) float — the other roles' tokens in shot j (for the confusion diagnostic).
    present_pairs: (P, N) bool — pairs whose role is visible in the target shot: the map BCE and the diagnostic.
    absent_pairs: (P, N) bool — pairs whose role is absent from the target shot, penalised through the
        attention mass (all False unless `absent_negative`).
    """

    source_weights: torch.Tensor
    target_tokens: torch.Tensor
    target_masks: torch.Tensor
    other_masks: torch.Tensor
    present_pairs: torch.Tensor
    absent_pairs: torch.Tensor


def build_role_plan(frame_masks: torch.Tensor, target_frames: torch.Tensor, absent_negative: bool = False) -> RolePlan:
    """Sources, targets and labels of one sample.

    frame_masks: (F, R, S) bool — role r's tokens in frame f, frames in sequence order (all-False where absent).
    target_frames: (F,) bool — the noised shots.
    A source never targets its own frame. A role absent from a target shot enters the loss (through its
    attention mass) only with `absent_negative`.
    """
    frames, roles, tokens = frame_masks.shape
    present = frame_masks.any(-1)  # (F, R)
    source_frame, source_role = present.nonzero(as_tuple=True)
    targets = target_frames.nonzero(as_tuple=True)[0]
    masks = frame_masks.float()

    weights = torch.zeros(len(source_frame), frames, tokens, device=frame_masks.device)
    weights[torch.arange(len(source_frame)), source_frame] = masks[source_frame, source_role]
    weights = weights.flatten(1)
    weights = weights / weights.sum(-1, keepdim=True)

    target_masks = masks[targets][:, source_role].transpose(0, 1)  # (P, N, S)
    all_roles = masks[targets].amax(1)  # (N, S)
    other_masks = (all_roles.unsqueeze(0) - target_masks).clamp_min(0)
    role_in_target = present[targets][:, source_role].transpose(0, 1)  # (P, N)
    not_self = source_frame[:, None] != targets[None, :]
    token_index = torch.arange(frames * tokens, device=frame_masks.device).view(frames, tokens)
    return RolePlan(
        source_weights=weights,
        target_tokens=token_index[targets],
        target_masks=target_masks,
        other_masks=other_masks,
        present_pairs=not_self & role_in_target,
        absent_pairs=not_self & ~role_in_target & absent_negative,
    )


def _autocast_off(tensor: torch.Tensor) -> torch.autocast:
    return torch.autocast(tensor.device.type, enabled=False)


class RoleAttention(NamedTuple):
    """The role-attention maps (P, N, S) of one sample and, when asked for, the attention masses (P, N)."""

    maps: torch.Tensor
    mass: torch.Tensor | None = None


def role_attention_maps(
    query: torch.Tensor,
    key: torch.Tensor,
    source_weights: torch.Tensor,
    target_tokens: torch.Tensor,
    with_mass: bool = False,
) -> RoleAttention:
    """Attention of each source's query tokens over each target shot, averaged as in Eq. 5 (module docstring).

    query, key: (T, H, d) after qk-norm and RoPE (one sample), any dtype; computed in float32.
    source_weights: (P, T), rows sum to 1. target_tokens: (N, S).
    Returns maps (P, N, S), each (p, n) row summing to 1, and with `with_mass` the masses m_{p→n} (P, N).
    Logits are averaged over heads before the softmax: mean_h q_h·k_h/√d = (q_flat · k_flat) / (H·√d).
    """
    with _autocast_off(query):
        heads, head_dim = query.shape[-2:]
        rows = (source_weights > 0).any(0).nonzero(as_tuple=True)[0]
        q = query.flatten(-2)[rows].float() / (heads * head_dim**0.5)  # (U, H·d): only tokens of some source
        keys = key.flatten(-2)
        weights = source_weights[:, rows].float()
        maps, target_lse = [], []
        for tokens in target_tokens:
            logits = q @ keys[tokens].float().T  # (U, S)
            maps.append(weights @ torch.softmax(logits, dim=-1))
            if with_mass:
                target_lse.append(torch.logsumexp(logits, dim=-1))
        maps = torch.stack(maps, dim=1)
        if not with_mass:
            return RoleAttention(maps)
        targeted = torch.zeros(keys.shape[0], dtype=torch.bool, device=keys.device)
        targeted[target_tokens.flatten()] = True
        others = (~targeted).nonzero(as_tuple=True)[0].split(target_tokens.shape[1])
        other_lse = [torch.logsumexp(q @ keys[tokens].float().T, dim=-1) for tokens in others]
        total = torch.stack(target_lse + other_lse).logsumexp(0)  # (U,): over all T keys
        share = torch.exp(torch.stack(target_lse, dim=1) - total[:, None])  # (U, N)
        return RoleAttention(maps, weights @ share)


def naive_role_attention_maps(
    query: torch.Tensor,
    key: torch.Tensor,
    source_weights: torch.Tensor,
    target_tokens: torch.Tensor,
    with_mass: bool = False,
) -> RoleAttention:
    """Reference for `role_attention_maps` that materialises the full (H, T, T) logit matrix.

    Same shapes and result; used only by the tests (exactness, gradients) and benchmarks/racl_step.py (the cost
    of the naive capture). Never used in training.
    """
    with _autocast_off(query):
        head_dim = query.shape[-1]
        logits = torch.einsum("qhd,khd->hqk", query.float(), key.float()) / head_dim**0.5  # (H, T, T)
        mean_logits = logits.mean(0)
        maps = [source_weights.float() @ torch.softmax(mean_logits[:, tokens], dim=-1) for tokens in target_tokens]
        mass = None
        if with_mass:
            attention = torch.softmax(mean_logits, dim=-1)
            mass = torch.stack([source_weights.float() @ attention[:, tokens].sum(-1) for tokens in target_tokens], 1)
        return RoleAttention(torch.stack(maps, dim=1), mass)


def racl_loss(
    maps: torch.Tensor,
    target_masks: torch.Tensor,
    pairs: torch.Tensor,
    mass: torch.Tensor | None = None,
    absent_pairs: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Eq. 7-8: BCE between max-scaled maps and role masks over the present `pairs`, and, for `absent_pairs`,
    BCE between the attention mass and 0; averaged over all the terms.

    maps, target_masks: (P, N, S); pairs, absent_pairs: (P, N) bool; mass: (P, N). Returns a scalar (0 with a
    graph when no term is present).
    """
    with _autocast_off(maps):
        scaled = maps / maps.amax(-1, keepdim=True).clamp_min(eps)
        bce = F.binary_cross_entropy(scaled.clamp(eps, 1 - eps), target_masks.to(scaled.dtype), reduction="none")
        terms = [bce.mean(-1)[pairs]]
        if absent_pairs is not None and absent_pairs.any():
            if mass is None:
                raise ValueError("absent-role pairs need the attention mass: capture with with_mass=True")
            absent_mass = mass.clamp(eps, 1 - eps)[absent_pairs]
            terms.append(F.binary_cross_entropy(absent_mass, torch.zeros_like(absent_mass), reduction="none"))
        terms = torch.cat(terms)
        if terms.numel() == 0:
            return maps.sum() * 0.0
        return terms.mean()


def attention_shares(
    maps: torch.Tensor, target_masks: torch.Tensor, other_masks: torch.Tensor, present_pairs: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Diagnostic: the share of a role's attention mass inside its own mask in a shot, and inside the other
    roles' masks (role confusion), averaged over the (source, shot) pairs where the role is visible.
    maps, target_masks, other_masks: (P, N, S); present_pairs: (P, N). Returns two scalars (NaN without pairs)."""
    own = (maps * target_masks).sum(-1)[present_pairs]
    other = (maps * other_masks).sum(-1)[present_pairs]
    return own.mean(), other.mean()


def stack_plans(plans: list[RolePlan], field: str) -> torch.Tensor:
    """One per-pair field of several samples' plans, concatenated along the source axis (P)."""
    return torch.cat([getattr(plan, field) for plan in plans])
