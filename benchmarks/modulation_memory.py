"""Memory of the timestep modulation: per token (diffusers' per-token timesteps) against per frame (this project).

One run, side by side on the CPU: a LoRA training step (forward + backward) of a Wan DiT on a storyboard whose
3 reference frames are clean (timestep 0) and whose 8 shots are noised (timestep t), the timesteps given
  per_token  as diffusers' Wan takes them, (B, T): every block computes and keeps a (6, D) fp32 modulation and
             two (1 + scale) factors for every token, and the model a (D) embedding and (6, D) projection;
  per_frame  as the storyboard forward feeds them, (B, F): one per frame, broadcast over the frame's tokens
             (`storyboard_block_forward`).
for the tiny Wan and a Wan2.1-1.3B-shaped DiT (its width, heads, FFN and text width; `--layers` blocks). Memory is
the step's peak of live tensor bytes, replayed from the profiler's allocation records (`peak_mib` of
benchmarks/racl_step.py). The blocks' arithmetic is the same element for element (bit-equal given the same
modulation: tests/test_wan_forward.py); the time embedder's matmul runs over B·F rows instead of B·T, which the
CPU's BLAS may round differently in the last bit, so the outputs' largest difference is printed.

    python benchmarks/modulation_memory.py [--layers 2] [--height 192 --width 336] [--text-len 64]
"""

from __future__ import annotations

import argparse
import copy

import torch
from racl_step import peak_mib

from dreamshot.config.schema import LoraConfig, ModelConfig, TransformerConfig
from dreamshot.models.layout import StoryboardLayout
from dreamshot.models.wan.attention import use_shotwise_cross_attention
from dreamshot.models.wan.build import build_transformer
from dreamshot.models.wan.forward import storyboard_forward, use_frame_modulation
from dreamshot.models.wan.lora import apply_lora
from dreamshot.models.wan.rope import storyboard_rotary_emb

REFS, SHOTS = 3, 8


def shapes(layers: int) -> dict[str, TransformerConfig]:
    """The DiTs to measure: the tiny one and one with Wan2.1-1.3B's dimensions (conf/model/wan1_3b.yaml)."""
    wan1_3b = TransformerConfig(
        num_layers=layers,
        num_attention_heads=12,
        attention_head_dim=128,
        ffn_dim=8960,
        text_dim=4096,
        freq_dim=256,
    )
    return {"tiny": TransformerConfig(num_layers=layers), "wan1_3b-shaped": wan1_3b}


def step(transformer, latents, timesteps, text, rotary) -> torch.Tensor:
    """Forward + backward of the LoRA step; returns the velocity."""
    transformer.zero_grad(set_to_none=True)
    velocity = storyboard_forward(transformer, latents, timesteps, text, rotary)
    velocity.square().mean().backward()
    return velocity.detach()


def measure(dims: TransformerConfig, size: tuple[int, int], text_len: int, seed: int) -> dict:
    cfg = ModelConfig(text_len=text_len, transformer=dims, lora=LoraConfig(rank=16))
    torch.manual_seed(seed)
    per_token_model = build_transformer(cfg).requires_grad_(False)
    use_shotwise_cross_attention(per_token_model, text_len)
    apply_lora(per_token_model, cfg.lora)
    per_frame_model = copy.deepcopy(per_token_model)
    use_frame_modulation(per_frame_model)

    frames, grid = REFS + SHOTS, (size[0] // 16, size[1] // 16)
    tokens_per_frame = grid[0] * grid[1]
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(1, dims.in_channels, frames, 2 * grid[0], 2 * grid[1], generator=g)
    text = torch.randn(1, frames * text_len, dims.text_dim, generator=g)
    layout = StoryboardLayout.of(REFS, SHOTS)
    rotary = storyboard_rotary_emb(layout, grid, dims.attention_head_dim)
    per_frame = layout.target_frames().float()[None] * 700.0
    timesteps = {"per_token": per_frame.repeat_interleave(tokens_per_frame, dim=1), "per_frame": per_frame}
    models = {"per_token": per_token_model, "per_frame": per_frame_model}

    outputs = {mode: step(models[mode], latents, timesteps[mode], text, rotary) for mode in models}  # warm-up
    peaks = {
        mode: peak_mib(lambda mode=mode: step(models[mode], latents, timesteps[mode], text, rotary)) for mode in models
    }
    return {
        "tokens": frames * tokens_per_frame,
        "dim": dims.num_attention_heads * dims.attention_head_dim,
        "peaks": peaks,
        "difference": (outputs["per_token"] - outputs["per_frame"]).abs().max().item(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--height", type=int, default=192)
    parser.add_argument("--width", type=int, default=336)
    parser.add_argument("--text-len", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    print(
        f"{REFS} references + {SHOTS} shots at {args.height}x{args.width}, {args.layers} blocks, text_len "
        f"{args.text_len}, LoRA rank 16, float32, forward + backward, {torch.get_num_threads()} CPU threads"
    )
    print(f"{'model':<16}{'D':>6}{'tokens':>8}{'per-token MiB':>15}{'per-frame MiB':>15}{'saved MiB':>11}  max |Δv|")
    for name, dims in shapes(args.layers).items():
        result = measure(dims, (args.height, args.width), args.text_len, args.seed)
        token, frame = result["peaks"]["per_token"], result["peaks"]["per_frame"]
        print(
            f"{name:<16}{result['dim']:>6}{result['tokens']:>8}{token:>15.1f}{frame:>15.1f}{token - frame:>11.1f}"
            f"  {result['difference']:.1e}"
        )


if __name__ == "__main__":
    main()
