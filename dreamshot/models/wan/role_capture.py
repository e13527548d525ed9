"""Role-attention capture inside Wan's self-attention (DESIGN §2, RACL).

Every block's self-attention is `StoryboardSelfAttnProcessor`: Wan's T2V self-attention, its attention call made
through the block's `SequenceShard` (the context-parallel seam, `context_parallel.py`: the plain fused kernel
through diffusers' attention dispatch without context parallelism). In the configured blocks,
`RoleCaptureSelfAttnProcessor` runs the same self-attention and, only while its block runs under a `RoleCapture`,
also forms the role-attention maps (and, for absent roles, the attention masses) from the same post-qk-norm,
post-RoPE queries and keys (`dreamshot.diffusion.racl.role_attention_maps`: only the role query rows, one
target shot at a time, in float32).

The capture is switched on by the block runner for the duration of one block call, inside the function that
gradient checkpointing replays, so a recomputed block captures again and nothing is left on the processor
between calls.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from dreamshot.diffusion.racl import RolePlan, naive_role_attention_maps, role_attention_maps
from dreamshot.models.wan.context_parallel import WHOLE_SEQUENCE
from dreamshot.models.wan.rope import apply_rotary_emb


@dataclass
class RoleCapture:
    """One forward's capture: a plan per sample, the blocks to capture in, and the maps they produced."""

    plans: list[RolePlan]
    blocks: frozenset[int]
    # Materialise the full attention matrix instead (reference for tests and the benchmark only).
    naive: bool = False
    # Also capture the attention masses (racl.absent_negative).
    with_mass: bool = False
    # block index -> one (P, N, S) map per sample
    maps: dict[int, list[torch.Tensor]] = field(default_factory=dict)
    # block index -> one (P, N) attention mass per sample (with_mass only)
    masses: dict[int, list[torch.Tensor]] = field(default_factory=dict)

    def block_mean(self) -> list[torch.Tensor]:
        """Per sample, the maps averaged over the captured blocks: (P, N, S)."""
        return _mean_over_blocks(self.maps)

    def block_mean_mass(self) -> list[torch.Tensor]:
        """Per sample, the attention masses averaged over the captured blocks: (P, N)."""
        return _mean_over_blocks(self.masses)

    def runner(self, index: int, block, hidden, text, temb, rotary_emb) -> torch.Tensor:
        """A `BlockRunner`: runs a block, capturing in it when it is one of `blocks`."""
        if index not in self.blocks:
            return block(hidden, text, temb, rotary_emb)
        processor = block.attn1.processor
        processor.sink = (self, index)
        try:
            # Eager even where blocks are compiled: the capture is per-sample Python work on the processor, which
            # dynamo would trace into a new graph for every storyboard's role plan.
            with torch.compiler.set_stance("force_eager"):
                return block(hidden, text, temb, rotary_emb)
        finally:
            processor.sink = None


def _mean_over_blocks(per_block: dict[int, list[torch.Tensor]]) -> list[torch.Tensor]:
    if not per_block:
        raise RuntimeError("no block captured role attention: check racl.blocks against the model depth")
    return [torch.stack(blocks).mean(0) for blocks in zip(*per_block.values(), strict=True)]


class StoryboardSelfAttnProcessor:
    """Wan self-attention (T2V) over this rank's tokens (all tokens without context parallelism)."""

    def __init__(self) -> None:
        # Bound by `SequenceShard.runner` for the duration of a block call.
        self.shard = WHOLE_SEQUENCE

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        """hidden_states: (B, T, D); rotary_emb: (cos, sin) each (1, T, 1, d) (T: this rank's tokens). -> (B, T, D)."""
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("storyboard self-attention takes no encoder states and no mask")
        query = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1))
        key = attn.norm_k(attn.to_k(hidden_states)).unflatten(2, (attn.heads, -1))
        value = attn.to_v(hidden_states).unflatten(2, (attn.heads, -1))
        if rotary_emb is not None:
            query, key = apply_rotary_emb(query, *rotary_emb), apply_rotary_emb(key, *rotary_emb)
        self.capture(query, key)
        out = self.shard.attention(query, key, value).flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))

    def capture(self, query: torch.Tensor, key: torch.Tensor) -> None:
        """Called with the post-qk-norm, post-RoPE queries and keys (B, T, H, d); nothing to do here."""


class RoleCaptureSelfAttnProcessor(StoryboardSelfAttnProcessor):
    """Wan self-attention (T2V) that can also emit role-attention maps."""

    def __init__(self) -> None:
        super().__init__()
        self.sink: tuple[RoleCapture, int] | None = None

    def capture(self, query: torch.Tensor, key: torch.Tensor) -> None:
        """Under context parallelism each rank scores its own source rows against every key; the partial maps and
        masses (sums over rows) add up over the group to those of the whole sequence."""
        if self.sink is None:
            return
        capture, index = self.sink
        maps_fn = naive_role_attention_maps if capture.naive else role_attention_maps
        keys = self.shard.gather(key)
        captured = [
            maps_fn(
                query[b], keys[b], self.shard.local_rows(plan.source_weights), plan.target_tokens, capture.with_mass
            )
            for b, plan in enumerate(capture.plans)
        ]
        capture.maps[index] = [self.shard.sum(attention.maps) for attention in captured]
        if capture.with_mass:
            capture.masses[index] = [self.shard.sum(attention.mass) for attention in captured]


def use_storyboard_self_attention(transformer) -> None:
    """Install `StoryboardSelfAttnProcessor` as the self-attention of every block (one instance per block)."""
    for block in transformer.blocks:
        block.attn1.set_processor(StoryboardSelfAttnProcessor())


def use_role_capture(transformer, blocks: list[int]) -> None:
    """Install the capturing processor on the self-attention of the given blocks (one instance per block)."""
    for index in blocks:
        transformer.blocks[index].attn1.set_processor(RoleCaptureSelfAttnProcessor())
