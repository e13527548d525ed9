"""One RoPE rotation of a (B, T, H, d) query: the eager complex form against the real form, alone.

  complex  `rope.apply_rotary_emb` as it runs eagerly: one complex float32 multiplication of the channel pairs;
  real     the form it takes in compiled blocks (`rope._rotate_pairs`, diffusers' arithmetic): four real
           multiplications on strided halves, a subtraction, an addition and a stack, here run eagerly.
Both get the same query and the same RoPE table (`storyboard_rope` of 3 references + the rest shots, positions as
the storyboard layout gives them, on a grid of T / frames tokens). Per form: milliseconds of this process's CPU
time per rotation (forward) and per rotation with its backward (forward + backward of a query that requires
grad, an upstream gradient of ones); each a mean over `--calls` calls, the median over `--rounds` rounds after
a warm-up round, the two forms alternating with the order flipped every round (benchmarks/peers.py's
`interleaved`). The largest difference of the two outputs is printed too (0: bit-equal).

    OMP_NUM_THREADS=1 python benchmarks/rope.py                                # (1, 660, 12, 128): 1.3B dims, 11 frames
    OMP_NUM_THREADS=1 python benchmarks/rope.py --shape 1,1560,40,128 --frames 1
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from peers import interleaved

from dreamshot.models.layout import StoryboardLayout
from dreamshot.models.wan.rope import _rotate_pairs, apply_rotary_emb, storyboard_rotary_emb

REFS = 3


def real_form(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The compiled blocks' rotation, run eagerly."""
    return _rotate_pairs(x, cos[..., 0::2], sin[..., 1::2])


FORMS = {"complex": apply_rotary_emb, "real": real_form}


def rope_table(frames: int, tokens: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each (1, tokens, 1, head_dim): the RoPE of 3 references + (frames − 3) shots (fewer frames: all
    shots) on a 1 × tokens/frames grid."""
    if tokens % frames:
        raise SystemExit(f"rope.py: --shape has {tokens} tokens, not a multiple of --frames {frames}")
    refs = min(REFS, frames - 1)
    layout = StoryboardLayout.of(refs, frames - refs)
    return storyboard_rotary_emb(layout, (1, tokens // frames), head_dim)


def timed(call: Callable[[], object], calls: int) -> Callable[[], list[float]]:
    """A side of `interleaved`: `calls` calls of `call`, the mean process CPU seconds per call."""

    def run() -> list[float]:
        start = time.process_time()
        for _ in range(calls):
            call()
        return [(time.process_time() - start) / calls]

    return run


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="1,660,12,128", help="B,T,H,d of the query")
    parser.add_argument("--frames", type=int, default=11, help="latent frames the T tokens are split into")
    parser.add_argument("--calls", type=int, default=30, help="rotations per timing")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds, after one warm-up round")
    args = parser.parse_args(argv)
    shape = tuple(int(size) for size in args.shape.split(","))
    cos, sin = rope_table(args.frames, shape[1], shape[3])
    query = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    leaf = query.clone().requires_grad_()
    grad = torch.ones(shape)

    def forward_backward(form: Callable) -> None:
        form(leaf, cos, sin).backward(grad)

    sides = {
        f"{name} forward": timed(lambda form=form: form(query, cos, sin), args.calls) for name, form in FORMS.items()
    }
    sides |= {
        f"{name} forward+backward": timed(lambda form=form: forward_backward(form), args.calls)
        for name, form in FORMS.items()
    }
    medians = interleaved(sides, args.rounds)
    difference = (FORMS["complex"](query, cos, sin) - FORMS["real"](query, cos, sin)).abs().max().item()
    print(
        f"one rotation of a {tuple(shape)} float32 query ({args.frames} frames); process CPU time, "
        f"{torch.get_num_threads()} CPU threads; mean of {args.calls} calls, median of {args.rounds} rounds, "
        "interleaved"
    )
    for name, seconds in medians.items():
        print(f"{name:<26}{seconds * 1e3:>9.3f} ms")
    print(f"max |complex − real|: {difference:.3g}")


if __name__ == "__main__":
    main()
