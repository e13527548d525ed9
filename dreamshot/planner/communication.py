"""Bytes one GPU sends per training step for context parallelism (DESIGN §2 "Sizes"; the collectives of
dreamshot/models/wan/context_parallel.py, as diffusers' and torch's functional collectives issue them).

Notation: N the CP degree, t = ⌈T/N⌉ one GPU's tokens, D = heads·head_dim, b bytes per activation, n_l blocks.
Per self-attention call, one GPU sends:
  ulysses  all-to-all of q, k, v before the kernel and of the output after it: 4 · t·D·b · (N−1)/N; the
           backward exchanges the output gradient and dq, dk, dv: 4 more.
  ring     diffusers' ring all-gathers the key/value chunks: 2 · t·D·b · (N−1) in the forward; the backward
           gathers them again and passes the fp32 key/value gradient around the ring, N hops: 2 · t·D·4 · N.
Gradient checkpointing replays every forward once in backward. The role-attention capture (captured blocks)
gathers the keys, t·D·b · (N−1) in forward and in the replay, and reduce-scatters their gradient, the same again;
its maps' all-reduce (|sources| × shots × S floats) and the gather of the prediction (t × 64 values) are small and
left out. An all-gather or reduce-scatter of x per GPU sends x·(N−1); an all-to-all sends x·(N−1)/N.
"""

from __future__ import annotations

from dreamshot.planner.shape import ModelShape
from dreamshot.planner.workload import Workload

FP32 = 4


def context_parallel_bytes(shape: ModelShape, work: Workload, attention: str) -> dict[str, int]:
    """Bytes one GPU sends per micro-batch, by what sends them ({} without context parallelism)."""
    n = work.context_parallel
    if n == 1:
        return {}
    share = work.rank_tokens * shape.dim * work.activation_bytes * work.micro_batch
    forwards = 2 if work.checkpointing else 1
    if attention == "ring":
        forward = 2 * share * (n - 1)
        backward = 2 * share * (n - 1) + 2 * (share // work.activation_bytes) * FP32 * n
        name = "ring attention (key/value all-gather, gradient ring)"
    else:
        forward = 4 * share * (n - 1) // n
        backward = forward
        name = "ulysses attention (all-to-all of q, k, v, out)"
    sent = {name: shape.num_layers * (forwards * forward + backward)}
    if work.racl_blocks:
        sent["RACL key all-gather"] = work.racl_blocks * (forwards + 1) * share * (n - 1)
    return sent
