"""Shot-wise cross-attention (DESIGN §2, Eq. 2): the tokens of latent frame f attend only to frame f's text.

Each frame's text embedding is padded to a fixed length L with zero embeddings after its real tokens; the
padding is attended, not masked, as Wan does with its own text padding. Frames are folded into the batch so
every (sample, frame) pair is one small attention of h·w queries against L keys: the dense masked form over
F·h·w × F·L costs F times more and is kept here only as a reference for tests and the benchmark.

A frame's text keys and values depend on its text alone, not on the video tokens or the timestep, so a sampler
computes them once per storyboard (`cross_attention_text`: the condition embedder's text projection, then every
block's K/V projections, for each distinct frame text) and every forward of every step picks its frames' rows
(`CrossAttentionText.select`): the same arithmetic on the same rows, so the same output within float rounding.

Under context parallelism a rank holds a run of tokens that may start and end inside a frame, and the texts of
the frames it touches; its queries are placed in those whole frames (`SequenceShard.whole_frames`) and attend
to their own frame's text as above: no communication.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch
import torch.nn.functional as F

from dreamshot.models.wan.context_parallel import WHOLE_SEQUENCE


def _per_frame(length: int, num_frames: int) -> int:
    """Tokens per frame of a frame-major sequence of `length` tokens."""
    if length % num_frames:
        raise ValueError(f"sequence length {length} is not a multiple of the {num_frames} frames")
    return length // num_frames


def _frames_into_batch(x: torch.Tensor, num_frames: int) -> torch.Tensor:
    """(B, F·S, H, d) -> (B·F, H, S, d): one attention batch entry per (sample, frame), heads first."""
    batch, length, heads, dim = x.shape
    return x.reshape(batch * num_frames, _per_frame(length, num_frames), heads, dim).transpose(1, 2)


def shotwise_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, num_frames: int) -> torch.Tensor:
    """Attention of every frame's queries to that frame's keys only.

    query: (B, F·S, H, d) — S tokens per frame, frame-major; key, value: (B, F·L, H, d) — L text tokens per
    frame, frames in the same order. Returns (B, F·S, H, d).
    """
    folded = TextKV(_frames_into_batch(key, num_frames), _frames_into_batch(value, num_frames))
    return _attend_folded(query, folded)


def _attend_folded(query: torch.Tensor, text: TextKV) -> torch.Tensor:
    """query (B, F·S, H, d) against keys and values with the frames already in the batch -> (B, F·S, H, d)."""
    num_frames = text.key.shape[0] // query.shape[0]
    out = F.scaled_dot_product_attention(_frames_into_batch(query, num_frames), text.key, text.value)
    return out.transpose(1, 2).reshape(query.shape)


class TextKV(NamedTuple):
    """One block's shot-wise cross-attention keys and values, one batch entry per (sample, frame): (B·F, H, L, d)."""

    key: torch.Tensor
    value: torch.Tensor


def text_key_value(attn, text: torch.Tensor, num_frames: int) -> TextKV:
    """A `WanAttention`'s keys and values of `text` (B, F·L, D), frames folded into the batch."""
    key = attn.norm_k(attn.to_k(text)).unflatten(2, (attn.heads, -1))
    value = attn.to_v(text).unflatten(2, (attn.heads, -1))
    return TextKV(_frames_into_batch(key, num_frames), _frames_into_batch(value, num_frames))


@dataclasses.dataclass(frozen=True)
class CrossAttentionText:
    """Every block's cross-attention keys and values of U distinct frame texts, computed once
    (`cross_attention_text`), and which of them the frames of one forward take (`select`).

    keys, values: one (U, H, L, d) tensor per block; frames: (B, F) indices into U, frames in sequence order.
    Memory: 2·U·L·D values per block (for the 14B at 480p with 8 shots and 3 references, U = 12 distinct texts of
    512 tokens: 120 MiB a block in bf16, 4.7 GiB for the 40 blocks), where each step would otherwise project the
    texts of 30 frames (r2s: 2 × 11 in the guided pair, 8 in v_u) in every block.
    """

    keys: tuple[torch.Tensor, ...]
    values: tuple[torch.Tensor, ...]
    text_dim: int
    frames: torch.Tensor | None = None

    def select(self, frames: torch.Tensor) -> CrossAttentionText:
        """The same keys and values, for a forward whose frame texts are `frames` (B, F) (indices into U)."""
        return dataclasses.replace(self, frames=frames.to(self.keys[0].device))

    @property
    def shape(self) -> tuple[int, int]:
        """(B, F) of the selected forward."""
        return tuple(self.frames.shape)

    def block(self, index: int) -> TextKV:
        """Block `index`'s keys and values for the selected frames: (B·F, H, L, d) each."""
        rows = self.frames.flatten()
        return TextKV(self.keys[index].index_select(0, rows), self.values[index].index_select(0, rows))

    def empty_text(self) -> torch.Tensor:
        """A (B, 0, D_text) text: what the condition embedder is given when its text projection is done here."""
        return self.keys[0].new_empty(self.frames.shape[0], 0, self.text_dim)


def cross_attention_text(transformer, texts: torch.Tensor) -> CrossAttentionText:
    """The condition embedder's text projection and every block's keys and values of `texts` (U, L, D_text):
    U distinct frame texts (umT5 embeddings), projected once."""
    count = texts.shape[0]
    embedded = transformer.condition_embedder.text_embedder(texts.flatten(0, 1)[None])  # (1, U·L, D)
    keys, values = [], []
    for block in transformer.blocks:
        if not isinstance(block.attn2.processor, ShotwiseCrossAttnProcessor):
            raise ValueError("cross_attention_text needs the shot-wise cross-attention: use_shotwise_cross_attention")
        ShotwiseCrossAttnProcessor.check_module(block.attn2)
        key, value = text_key_value(block.attn2, embedded, count)
        keys.append(key)
        values.append(value)
    return CrossAttentionText(tuple(keys), tuple(values), texts.shape[-1])


def shotwise_mask(num_frames: int, query_len: int, key_len: int, device=None) -> torch.Tensor:
    """Block-diagonal (F·S, F·L) bool mask, True where query and key belong to the same frame."""
    query_frame = torch.arange(query_len, device=device) // _per_frame(query_len, num_frames)
    key_frame = torch.arange(key_len, device=device) // _per_frame(key_len, num_frames)
    return query_frame[:, None] == key_frame[None, :]


def dense_shotwise_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, num_frames: int
) -> torch.Tensor:
    """Reference for `shotwise_attention`: one dense attention over F·S × F·L with a block-diagonal mask.

    Same shapes and result as `shotwise_attention`, at F times the cost; used only by the tests and
    benchmarks/cross_attention.py to show the equivalence and the cost difference.
    """
    mask = shotwise_mask(num_frames, query.shape[1], key.shape[1], device=query.device)
    out = F.scaled_dot_product_attention(
        query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), attn_mask=mask
    )
    return out.transpose(1, 2)


class ShotwiseCrossAttnProcessor:
    """diffusers processor for a text-to-video `WanAttention` used as cross-attention (a block's `attn2`).

    Same call signature and projections as diffusers' `WanAttnProcessor`; only the attention itself is
    shot-wise. The text sequence is F frames of `text_len` tokens; F is read from its length at each call, so
    one instance serves every block and every storyboard size; its only per-call state is the `shard` a block
    runner binds for the duration of a block call.
    """

    def __init__(self, text_len: int) -> None:
        if text_len < 1:
            raise ValueError(f"text_len must be positive, got {text_len}")
        self.text_len = text_len
        self.shard = WHOLE_SEQUENCE

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """hidden_states (B, F·S, D) video tokens, encoder_hidden_states (B, F·text_len, D) -> (B, F·S, D).

        encoder_hidden_states may also be the text's keys and values already projected (`TextKV`, computed once
        per storyboard by `cross_attention_text`): the projections are then skipped.
        """
        self.check_module(attn)
        if encoder_hidden_states is None or attention_mask is not None or rotary_emb is not None:
            raise ValueError("shot-wise cross-attention needs text states and takes no mask or rotary emb")

        query = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1))
        query, restore = self.shard.whole_frames(query)
        text = encoder_hidden_states
        if not isinstance(text, TextKV):
            text = text_key_value(attn, text, self.num_frames(text.shape[1], query.shape[1]))
        hidden_states = restore(_attend_folded(query, text)).flatten(2, 3).type_as(query)
        hidden_states = attn.to_out[0](hidden_states)
        return attn.to_out[1](hidden_states)

    def num_frames(self, text_length: int, video_length: int) -> int:
        """F = text_length / text_len, checked to divide both sequences."""
        if text_length % self.text_len:
            raise ValueError(f"text of {text_length} tokens is not whole frames of text_len={self.text_len}")
        frames = text_length // self.text_len
        if frames == 0 or video_length % frames:
            raise ValueError(f"{video_length} video tokens cannot be split into the text's {frames} frames")
        return frames

    @staticmethod
    def check_module(attn) -> None:
        if attn.add_k_proj is not None:
            raise ValueError("shot-wise cross-attention supports text-to-video Wan only (attn has image K/V)")
        if getattr(attn, "fused_projections", False):
            raise ValueError("shot-wise cross-attention needs unfused projections: attn.unfuse_projections()")


def use_shotwise_cross_attention(transformer, text_len: int) -> None:
    """Install `ShotwiseCrossAttnProcessor(text_len)` as the cross-attention of every block."""
    processor = ShotwiseCrossAttnProcessor(text_len)
    for block in transformer.blocks:
        block.attn2.set_processor(processor)
