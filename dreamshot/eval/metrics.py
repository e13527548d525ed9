"""Metric maths as pure functions on features (EVAL.md). Features are rows of unit vectors; an all-zero row
means "nothing found" (e.g. no face in a crop) and can never be matched.

CIDS, per story: every crop of a shot is scored against each listed character as its best cosine over that
character's references; characters are assigned to crops by the Hungarian algorithm; a character's cross score
is the mean of its (matched crops x references) cosine matrix, its self score the mean pairwise cosine among its
matched crops (1.0 with one crop); a character never matched scores 0 for both and stays in the mean.
CSD, per story: self = mean cosine over all unordered pairs of shots; cross = per shot, the mean cosine to its
characters' first reference images, then the mean over shots.
A benchmark's value is the plain mean of its stories' values.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

ALIGNMENT_DIMENSIONS = ("scene", "camera", "character_action", "single_character_action")


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N, D) x (M, D) unit rows -> (N, M) cosines (rows are re-normalised; zero rows give 0)."""
    a = torch.nn.functional.normalize(a.float(), dim=-1)
    b = torch.nn.functional.normalize(b.float(), dim=-1)
    return a @ b.T


def found(features: torch.Tensor) -> torch.Tensor:
    """(N, D) -> (N,) bool: rows that hold a feature (not the all-zero "nothing found" row)."""
    return features.abs().sum(dim=-1) > 0


def best_reference_scores(crops: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """(P, D) crops, (R, D) references -> (P,) best cosine of each crop over the references.

    -inf where a crop holds nothing, or where there is no usable reference.
    """
    usable = references[found(references)]
    if usable.shape[0] == 0:
        return torch.full((crops.shape[0],), float("-inf"))
    scores = cosine_matrix(crops, usable).max(dim=1).values
    return torch.where(found(crops), scores, torch.tensor(float("-inf")))


def assign(scores: torch.Tensor) -> dict[int, int]:
    """Hungarian assignment maximising the total score. (C, P) scores (characters x crops; -inf: impossible)
    -> {character: crop}. With fewer crops than characters (or impossible pairs) some stay unassigned."""
    if scores.numel() == 0:
        return {}
    possible = torch.isfinite(scores)
    # Impossible pairs get a cost no real assignment beats, then are dropped from the result.
    cost = torch.where(possible, -scores.double(), torch.tensor(1e9, dtype=torch.float64)).numpy()
    rows, cols = linear_sum_assignment(cost)
    return {int(r): int(c) for r, c in zip(rows, cols, strict=True) if possible[r, c]}


@dataclass(frozen=True)
class IdentityScore:
    """One character's CIDS: cross (vs references) and self (among its matched crops)."""

    cross: float
    self: float


def character_identity(matched: torch.Tensor, references: torch.Tensor) -> IdentityScore:
    """(M, D) matched crops, (R, D) references -> the character's cross and self scores (0, 0 when M = 0)."""
    references = references[found(references)]
    if matched.shape[0] == 0 or references.shape[0] == 0:
        return IdentityScore(0.0, 0.0)
    cross = cosine_matrix(matched, references).mean().item()
    return IdentityScore(cross, pairwise_mean(matched, single=1.0))


def pairwise_mean(features: torch.Tensor, single: float) -> float:
    """Mean cosine over the unordered pairs of the (N, D) rows; `single` when there is no pair (N < 2)."""
    count = features.shape[0]
    if count < 2:
        return single
    rows, cols = torch.triu_indices(count, count, offset=1)
    return cosine_matrix(features, features)[rows, cols].mean().item()


def story_identity(scores: Sequence[IdentityScore]) -> IdentityScore:
    """A story's CIDS: the mean over its characters (matched or not)."""
    if not scores:
        return IdentityScore(0.0, 0.0)
    return IdentityScore(mean([s.cross for s in scores]), mean([s.self for s in scores]))


def style_self(shots: torch.Tensor) -> float:
    """(N, D) style embeddings of a story's shots -> mean pairwise cosine (0.0 with fewer than 2 shots, as
    ViStoryBench)."""
    return pairwise_mean(shots, single=0.0)


def style_cross(shots: torch.Tensor, references: Sequence[torch.Tensor]) -> float:
    """(N, D) shot embeddings and, per shot, (k_n, D) embeddings of its characters' first reference images ->
    mean over shots of the mean cosine to those references."""
    if shots.shape[0] != len(references):
        raise ValueError(f"{shots.shape[0]} shots but {len(references)} reference sets")
    per_shot = [cosine_matrix(shot[None], refs).mean().item() for shot, refs in zip(shots, references, strict=True)]
    return mean(per_shot)


def mean(values: Sequence[float]) -> float:
    """Plain mean (0.0 for no values)."""
    return float(np.mean(values)) if len(values) else 0.0


def rounded_mean(values: Sequence[float]) -> int:
    """Mean rounded to an integer as ViStoryBench does (Python's round: halves to even); 0 for no values."""
    return int(round(mean(values)))


def alignment_score(dimension_means: dict[str, float]) -> float:
    """The paper's Alignment: the plain mean of the four dataset-level dimension averages."""
    missing = [d for d in ALIGNMENT_DIMENSIONS if d not in dimension_means]
    if missing:
        raise ValueError(f"alignment needs every dimension; missing {', '.join(missing)}")
    return mean([dimension_means[d] for d in ALIGNMENT_DIMENSIONS])
