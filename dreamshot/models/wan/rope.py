"""Wan's 3D rotary position embedding, computed from explicit frame positions (DESIGN §2 "Positions").

diffusers' `WanRotaryPosEmbed` looks every temporal index up in a fixed table of integer positions 0..1023.
The storyboard layouts need temporal indices that are negative (`neg`), fractional, or carry an extra phase
(`phase`), so here the angles are computed from the position tensor itself. The output has exactly the format
of `WanRotaryPosEmbed.forward`, so it plugs into diffusers' `WanAttnProcessor` unchanged:

- (freqs_cos, freqs_sin), each (1, F·h·w, 1, head_dim), tokens frame-major, then row, then column;
- the head dim split into temporal / height / width parts of t = d − 4·(d//6), h = w = 2·(d//6) channels;
- each rotation angle repeated for its two interleaved channels (`repeat_interleave_real=True`);
- angles computed in float64 and returned as float32, as diffusers does (its `get_1d_rotary_pos_embed`
  computes in float64 and casts with `.float()`), so with integer positions and zero phase the result is
  bit-for-bit Wan's own.

`apply_rotary_emb` rotates queries and keys with it. Eagerly it is one complex multiplication in float32: the
products and sums of diffusers' real form (four multiplications on strided halves, a subtraction, an addition and a
stack: seven passes over the tensor) in one pass, equal to float32 rounding (bit-equal at Wan's head dim on the
CPU), there ~18x faster forward and ~8x with backward for one (1, 660, 12, 128) query (`python benchmarks/rope.py`,
benchmarks/RESULTS.md#peers). Compiled, it is
the real form, which inductor fuses: inductor has no code generation for complex operators and would fall back to
an eager kernel.
"""

from __future__ import annotations

import torch

from dreamshot.models.layout import StoryboardLayout


def rope_split(attention_head_dim: int) -> tuple[int, int, int]:
    """Channels of the temporal, height and width parts of one head (Wan's split)."""
    spatial = 2 * (attention_head_dim // 6)
    return attention_head_dim - 2 * spatial, spatial, spatial


def rope_angles(positions: torch.Tensor, dim: int, theta: float = 10000.0) -> torch.Tensor:
    """Rotation angles position · θ^(−2j/dim) for j < dim/2. positions (P,) -> (P, dim/2), float64."""
    exponents = torch.arange(0, dim, 2, dtype=torch.float64, device=positions.device) / dim
    return torch.outer(positions.to(torch.float64), 1.0 / theta**exponents)


def storyboard_rope(
    frame_positions: torch.Tensor,
    frame_phases: torch.Tensor,
    grid: tuple[int, int],
    attention_head_dim: int,
    theta: float = 10000.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE for F latent frames of h×w tokens each, in sequence order.

    frame_positions: (F,) temporal index of each frame (any real value).
    frame_phases: (F,) angle (radians) added to every temporal rotation of that frame's tokens.
    grid: (h, w) tokens per frame after patchify; rows and columns take Wan's integer indices.
    Returns (freqs_cos, freqs_sin), each (1, F·h·w, 1, attention_head_dim), float32, on the positions' device.
    """
    if frame_positions.ndim != 1 or frame_positions.shape != frame_phases.shape:
        raise ValueError(
            f"frame_positions and frame_phases must both be (F,), got {tuple(frame_positions.shape)} "
            f"and {tuple(frame_phases.shape)}"
        )
    if attention_head_dim % 2:
        raise ValueError(f"attention_head_dim must be even for RoPE, got {attention_head_dim}")
    t_dim, h_dim, w_dim = rope_split(attention_head_dim)
    height, width = grid
    frames = frame_positions.shape[0]
    device = frame_positions.device

    temporal = rope_angles(frame_positions, t_dim, theta) + frame_phases.to(device, torch.float64)[:, None]
    rows = rope_angles(torch.arange(height, device=device), h_dim, theta)
    cols = rope_angles(torch.arange(width, device=device), w_dim, theta)
    shape = (frames, height, width, -1)
    angles = torch.cat(
        [
            temporal[:, None, None].expand(shape),
            rows[None, :, None].expand(shape),
            cols[None, None, :].expand(shape),
        ],
        dim=-1,
    ).reshape(1, frames * height * width, 1, attention_head_dim // 2)
    angles = angles.repeat_interleave(2, dim=-1)
    return angles.cos().float(), angles.sin().float()


def apply_rotary_emb(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Wan's rotation of interleaved channel pairs. x: (B, T, H, d); cos, sin: (1, T, 1, d), each angle repeated
    for its pair (the format above). Returns x's shape and dtype, computed in float32."""
    if torch.compiler.is_compiling():
        return _rotate_pairs(x, cos[..., 0::2], sin[..., 1::2])
    rotation = torch.complex(cos[..., 0::2], sin[..., 1::2])
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    return torch.view_as_real(pairs * rotation).flatten(-2).type_as(x)


def _rotate_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """(x1 + i·x2)(cos + i·sin) in real arithmetic; cos, sin: (1, T, 1, d/2)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2).type_as(x)


def storyboard_rotary_emb(
    layout: StoryboardLayout,
    grid: tuple[int, int],
    attention_head_dim: int,
    theta: float = 10000.0,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`storyboard_rope` with the positions and phases of `layout`'s frames, built on `device`."""
    positions = layout.frame_positions().to(device)
    phases = layout.frame_phases().to(device)
    return storyboard_rope(positions, phases, grid, attention_head_dim, theta)
