"""The storyboard forward of a diffusers `WanTransformer3DModel`.

It runs the model's own modules (patch embedding, condition embedder, blocks, output head) in the order of
diffusers' `WanTransformer3DModel.forward`, with four differences that the storyboard needs and that
diffusers' forward cannot take as arguments:
- the rotary embedding is passed in (computed from explicit frame positions, see `rope.py`) instead of being
  looked up in Wan's fixed table;
- the timestep modulation is computed once per frame (a storyboard has one timestep per frame: 0 on clean
  conditions, t on noised targets) and broadcast over the frame's tokens, where diffusers' per-token timesteps
  store a (6, D) fp32 modulation for every token (~1 GiB bf16 plus a ~2 GiB fp32 temporary per block for the
  14B at 480p with 8 shots and 3 references). The blocks run `storyboard_block_forward`
  (`use_frame_modulation`), which does diffusers' block arithmetic on (frame, token) views, so the output is
  bit-equal to per-token modulation (tests/test_wan_forward.py, benchmarks/modulation_memory.py);
- the block loop is ours, so a block can be wrapped (role-attention capture) and checkpointed as a unit;
- the text may come as its cross-attention keys and values, projected once per storyboard by a sampler
  (`CrossAttentionText`): the condition embedder then runs its time part alone and every block gets its own;
- nothing is stored on the modules between calls;
- under context parallelism (`context_parallel.py`) the blocks run on this rank's share of the tokens: the
  `SequenceShard` slices the tokens, timesteps, texts and RoPE before the blocks, binds itself to the blocks'
  attention processors, and gathers the prediction after the output head (with degree 1 all of it is the
  identity).
With Wan's own positions and a global timestep it equals diffusers' forward (tests/test_wan_forward.py).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

import torch
from torch.utils.checkpoint import checkpoint

from dreamshot.models.wan.attention import CrossAttentionText
from dreamshot.models.wan.context_parallel import ContextParallel, SequenceShard

# (block index, block, hidden (B, T, D), text (B, L_total, D) or the block's TextKV, temb, rotary_emb) -> (B, T, D)
BlockRunner = Callable[[int, torch.nn.Module, torch.Tensor, torch.Tensor, torch.Tensor, tuple], torch.Tensor]


def run_block(index: int, block, hidden, text, temb, rotary_emb) -> torch.Tensor:
    return block(hidden, text, temb, rotary_emb)


def storyboard_block_forward(self, hidden_states, encoder_hidden_states, temb, rotary_emb) -> torch.Tensor:
    """A `WanTransformerBlock`'s forward with its timestep modulation shared by groups of consecutive tokens.

    hidden_states: (B, T, D); encoder_hidden_states: the text, (B, L_total, D); temb: (B, 6, D), one modulation per
    sample, or (B, G, 6, D), one per group of T/G tokens: G = F frames in the storyboard forward, G = T is
    diffusers' per-token form. The arithmetic is diffusers' block's, element for element in the same precision,
    on (B, G, T/G, D) views of the tokens, so the output equals the per-token form's bit for bit while the fp32
    modulation and its (1 + scale) factors (kept for backward) are stored per group.
    """
    modulation = temb if temb.ndim == 4 else temb.unsqueeze(1)
    groups, dtype = modulation.shape[1], hidden_states.dtype
    # Six (B, G, 1, D) fp32 vectors, each broadcast over its group's tokens.
    shift, scale, gate, ffn_shift, ffn_scale, ffn_gate = (
        (self.scale_shift_table.unsqueeze(0) + modulation.float()).unsqueeze(2).unbind(3)
    )

    def grouped(x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(1, (groups, -1))

    def modulated(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return (grouped(x) * (1 + scale) + shift).flatten(1, 2).to(dtype)

    def gated(x: torch.Tensor, update: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        return (grouped(x.float()) + grouped(update) * gate).flatten(1, 2).to(dtype)

    # 1. Self-attention.
    attention = self.attn1(modulated(self.norm1(hidden_states.float()), shift, scale), None, None, rotary_emb)
    hidden_states = gated(hidden_states, attention, gate)
    # 2. Cross-attention (unmodulated).
    normed = self.norm2(hidden_states.float()).to(dtype)
    hidden_states = hidden_states + self.attn2(normed, encoder_hidden_states, None, None)
    # 3. Feed-forward.
    update = self.ffn(modulated(self.norm3(hidden_states.float()), ffn_shift, ffn_scale))
    return gated(hidden_states, update.float(), ffn_gate)


def use_frame_modulation(transformer) -> None:
    """Make every block run `storyboard_block_forward` (given the block instance: parameter names, hooks and
    `torch.compile` of the block are unchanged, and diffusers' own forward still works through it). A partial, not
    a bound method: the model pickles (`trainer.strategy=ddp_spawn` sends it to its processes), where a bound method
    of a function the block's class lacks does not unpickle."""
    for block in transformer.blocks:
        block.forward = functools.partial(storyboard_block_forward, block)


def uses_frame_modulation(transformer) -> bool:
    """Whether every block runs `storyboard_block_forward`, also under diffusers' hooks (which wrap the forward)."""
    return all(
        getattr(inspect.unwrap(block.forward), "func", None) is storyboard_block_forward for block in transformer.blocks
    )


def compile_blocks(transformer) -> None:
    """`torch.compile` every DiT block in place (parameter names unchanged).

    Outside attention and the matmuls, a block is a chain of small elementwise kernels (fp32 modulation, norms,
    RoPE, LoRA scaling); compiled, they fuse, which is most of what eager mode leaves on the table (measured in
    benchmarks/RESULTS.md). All blocks share one code object and their weights are graph inputs, so the first
    block's compilation serves the others. A block that captures role attention runs eagerly for that call
    (`RoleCapture.runner`), so capture blocks are compiled too and run compiled whenever nothing is captured.
    """
    for block in transformer.blocks:
        block.compile()


def storyboard_forward(
    transformer,
    latents: torch.Tensor,
    timesteps: torch.Tensor,
    text: torch.Tensor | CrossAttentionText,
    rotary_emb: tuple[torch.Tensor, torch.Tensor],
    gradient_checkpointing: bool = False,
    block_runner: BlockRunner = run_block,
    shard: SequenceShard | None = None,
) -> torch.Tensor:
    """Velocity prediction for a storyboard latent sequence.

    latents: (B, C, F, h, w) — condition and target frames in sequence order.
    timesteps: (B,) one timestep per sample, or (B, G) one per group of T/G consecutive tokens (T = F·h·w / 4,
    frame-major): (B, F) per frame, as the storyboard feeds it (blocks of `use_frame_modulation`), or (B, T) per
    token, as diffusers' Wan takes it.
    text: (B, F·L, D_text) — every frame's own text embedding, frames in sequence order; or its cross-attention
    keys and values (`CrossAttentionText` with the B × F frames selected).
    rotary_emb: (cos, sin), each (1, T, 1, head_dim).
    shard: this rank's share of the tokens (`ContextParallel.shard`); None: all of them.
    Returns (B, C_out, F, h, w), the whole sequence on every rank.
    """
    batch, _, frames, height, width = latents.shape
    p_t, p_h, p_w = transformer.config.patch_size
    grid = (frames // p_t, height // p_h, width // p_w)
    grouped = timesteps.ndim == 2
    tokens = grid[0] * grid[1] * grid[2]
    if grouped and tokens % timesteps.shape[1]:
        raise ValueError(f"{timesteps.shape[1]} timesteps per sample cannot split {tokens} tokens into equal groups")
    if grouped and timesteps.shape[1] < tokens and not uses_frame_modulation(transformer):
        raise ValueError("timesteps per group of tokens need the blocks of use_frame_modulation(transformer)")
    shard = shard or ContextParallel().shard(grid[0], grid[1] * grid[2])

    # 1. Patchify to tokens (B, T, D); this rank's share of them and of everything per token or per frame.
    hidden = shard.tokens(transformer.patch_embedding(latents).flatten(2).transpose(1, 2).contiguous())
    projected = isinstance(text, CrossAttentionText)
    # Projected text is sliced by its frames' indices (B, F): one "token" of text per frame.
    text = text.select(shard.text(text.frames)) if projected else shard.text(text)
    timesteps = shard.timesteps(timesteps)
    rotary_emb = tuple(shard.tokens(x) for x in rotary_emb)
    block_runner = shard.runner(block_runner)

    # 2. Time and text conditioning: one (6, D) modulation per sample, or per group of tokens. Text already projected
    # to keys and values is not embedded again: the embedder gets zero text tokens, so only its time part runs.
    temb, timestep_proj, embedded, _ = transformer.condition_embedder(
        timesteps.flatten(),
        text.empty_text() if projected else text,
        None,
        timestep_seq_len=timesteps.shape[1] if grouped else None,
    )
    timestep_proj = timestep_proj.unflatten(-1, (6, -1))

    # 3. Blocks. Non-reentrant checkpointing keeps gradients of anything a block runner captures.
    for index, block in enumerate(transformer.blocks):
        block_text = text.block(index) if projected else embedded
        if gradient_checkpointing and torch.is_grad_enabled():
            hidden = checkpoint(
                block_runner, index, block, hidden, block_text, timestep_proj, rotary_emb, use_reentrant=False
            )
        else:
            hidden = block_runner(index, block, hidden, block_text, timestep_proj, rotary_emb)

    # 4. Output modulation (per group, broadcast like the blocks'), projection and unpatchify.
    per_group = temb if grouped else temb.unsqueeze(1)  # (B, G, D)
    shift, scale = (transformer.scale_shift_table.unsqueeze(0) + per_group.unsqueeze(2)).unsqueeze(2).unbind(3)
    normed = transformer.norm_out(hidden.float()).unflatten(1, (per_group.shape[1], -1))
    hidden = (normed * (1 + scale) + shift).flatten(1, 2).type_as(hidden)
    hidden = shard.gather(transformer.proj_out(hidden))
    hidden = hidden.reshape(batch, *grid, p_t, p_h, p_w, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
    return hidden.flatten(6, 7).flatten(4, 5).flatten(2, 3)
