"""The storyboard forward of a diffusers `WanTransformer3DModel`.

It runs the model's own modules (patch embedding, condition embedder, blocks, output head) in the order of
diffusers' `WanTransformer3DModel.forward`, with three differences that the storyboard needs and that
diffusers' forward cannot take as arguments:
- the rotary embedding is passed in (computed from explicit frame positions, see `rope.py`) instead of being
  looked up in Wan's fixed table;
- the block loop is ours, so a block can be wrapped (role-attention capture) and checkpointed as a unit;
- nothing is stored on the modules between calls;
- under context parallelism (`context_parallel.py`) the blocks run on this rank's share of the tokens: the
  `SequenceShard` slices the tokens, timesteps, texts and RoPE before the blocks, binds itself to the blocks'
  attention processors, and gathers the prediction after the output head (with degree 1 all of it is the
  identity).
With Wan's own positions and a global timestep it equals diffusers' forward (tests/test_wan_forward.py).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.checkpoint import checkpoint

from dreamshot.models.wan.context_parallel import ContextParallel, SequenceShard

# (block index, block, hidden (B, T, D), text (B, L_total, D), temb, rotary_emb) -> hidden (B, T, D)
BlockRunner = Callable[[int, torch.nn.Module, torch.Tensor, torch.Tensor, torch.Tensor, tuple], torch.Tensor]


def run_block(index: int, block, hidden, text, temb, rotary_emb) -> torch.Tensor:
    return block(hidden, text, temb, rotary_emb)


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
    text: torch.Tensor,
    rotary_emb: tuple[torch.Tensor, torch.Tensor],
    gradient_checkpointing: bool = False,
    block_runner: BlockRunner = run_block,
    shard: SequenceShard | None = None,
) -> torch.Tensor:
    """Velocity prediction for a storyboard latent sequence.

    latents: (B, C, F, h, w) — condition and target frames in sequence order.
    timesteps: (B,) one timestep per sample, or (B, T) one per token (T = F·h·w / 4, frame-major).
    text: (B, F·L, D_text) — every frame's own text embedding, frames in sequence order.
    rotary_emb: (cos, sin), each (1, T, 1, head_dim).
    shard: this rank's share of the tokens (`ContextParallel.shard`); None: all of them.
    Returns (B, C_out, F, h, w), the whole sequence on every rank.
    """
    batch, _, frames, height, width = latents.shape
    p_t, p_h, p_w = transformer.config.patch_size
    grid = (frames // p_t, height // p_h, width // p_w)
    shard = shard or ContextParallel().shard(grid[0], grid[1] * grid[2])

    # 1. Patchify to tokens (B, T, D); this rank's share of them and of everything per token or per frame.
    hidden = shard.tokens(transformer.patch_embedding(latents).flatten(2).transpose(1, 2).contiguous())
    timesteps, text = shard.timesteps(timesteps), shard.text(text)
    rotary_emb = tuple(shard.tokens(x) for x in rotary_emb)
    block_runner = shard.runner(block_runner)

    # 2. Time and text conditioning; a 2-D timestep gives one modulation per token.
    per_token = timesteps.ndim == 2
    temb, timestep_proj, text, _ = transformer.condition_embedder(
        timesteps.flatten(), text, None, timestep_seq_len=timesteps.shape[1] if per_token else None
    )
    timestep_proj = timestep_proj.unflatten(2 if per_token else 1, (6, -1))

    # 3. Blocks. Non-reentrant checkpointing keeps gradients of anything a block runner captures.
    for index, block in enumerate(transformer.blocks):
        if gradient_checkpointing and torch.is_grad_enabled():
            hidden = checkpoint(
                block_runner, index, block, hidden, text, timestep_proj, rotary_emb, use_reentrant=False
            )
        else:
            hidden = block_runner(index, block, hidden, text, timestep_proj, rotary_emb)

    # 4. Output modulation, projection and unpatchify.
    table = transformer.scale_shift_table
    if per_token:
        shift, scale = (table.unsqueeze(0) + temb.unsqueeze(2)).chunk(2, dim=2)
        shift, scale = shift.squeeze(2), scale.squeeze(2)
    else:
        shift, scale = (table + temb.unsqueeze(1)).chunk(2, dim=1)
    hidden = (transformer.norm_out(hidden.float()) * (1 + scale) + shift).type_as(hidden)
    hidden = shard.gather(transformer.proj_out(hidden))
    hidden = hidden.reshape(batch, *grid, p_t, p_h, p_w, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
    return hidden.flatten(6, 7).flatten(4, 5).flatten(2, 3)
