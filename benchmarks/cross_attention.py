"""Shot-wise cross-attention: batched over frames vs one dense block-diagonal masked attention (DESIGN §5).

A 192p storyboard of 8 shots + 3 references: 11 latent frames of 12×21 = 252 tokens, each against its own
text. Times forward+backward of both forms in one run (repeats interleaved, median) on the CPU.

    python benchmarks/cross_attention.py [--repeats 5] [--heads 12] [--head-dim 64] [--text-len 128]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from dreamshot.models.wan.attention import dense_shotwise_attention, shotwise_attention, shotwise_mask

FRAMES, TOKENS_PER_FRAME = 11, 12 * 21


def forward_backward(attention, query, key, value) -> float:
    """Seconds for one forward and backward pass."""
    for x in (query, key, value):
        x.grad = None
    start = time.perf_counter()
    attention(query, key, value, FRAMES).sum().backward()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--text-len", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    query, key, value = (
        torch.randn(1, FRAMES * length, args.heads, args.head_dim, requires_grad=True)
        for length in (TOKENS_PER_FRAME, args.text_len, args.text_len)
    )
    forms = {"shotwise": shotwise_attention, "dense": dense_shotwise_attention}
    with torch.no_grad():
        outputs = [attention(query, key, value, FRAMES) for attention in forms.values()]
    diff = (outputs[0] - outputs[1]).abs().max().item()

    times: dict[str, list[float]] = {name: [] for name in forms}
    for repeat in range(args.repeats + 1):  # the first round warms up and is not counted
        for name, attention in forms.items():
            seconds = forward_backward(attention, query, key, value)
            if repeat:
                times[name].append(seconds)

    mask_mib = shotwise_mask(FRAMES, query.shape[1], key.shape[1]).numel() / 2**20  # one byte per bool
    score_mib = {
        "shotwise": args.heads * FRAMES * TOKENS_PER_FRAME * args.text_len * 4 / 2**20,
        "dense": args.heads * (FRAMES * TOKENS_PER_FRAME) * (FRAMES * args.text_len) * 4 / 2**20,
    }
    print(
        f"{FRAMES} frames × {TOKENS_PER_FRAME} tokens, text_len {args.text_len}, {args.heads} heads × "
        f"{args.head_dim}, float32, {torch.get_num_threads()} CPU threads, median of {args.repeats}"
    )
    print(f"{'form':<10}{'fwd+bwd ms':>12}{'scores MiB':>12}")
    for name in forms:
        print(f"{name:<10}{1e3 * statistics.median(times[name]):>12.1f}{score_mib[name]:>12.1f}")
    ratio = statistics.median(times["dense"]) / statistics.median(times["shotwise"])
    print(f"dense / shotwise time: {ratio:.1f}×  (max |difference| {diff:.1e})")
    print(f"scores: float32 query×key matrix where a kernel materialises it; dense mask: {mask_mib:.1f} MiB")
    print(
        f"Wan's text length is 512: both forms grow linearly with it, so the ratio stays about F = {FRAMES} "
        "while the time saved grows (try --text-len 512)."
    )


if __name__ == "__main__":
    main()
