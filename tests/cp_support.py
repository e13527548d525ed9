"""Test support for context parallelism: run a function in a group of CPU processes over gloo.

`run_group(fn, world, *args)` starts `world` processes (torch.multiprocessing, spawn), each with the process group
initialised, calls `fn(context_parallel, *args)` with its `ContextParallel` (built by `context_parallel_group` on
the product's `build_mesh`), and returns every rank's result (rank order). diffusers' Ulysses attention runs on CPU
with its native kernel; its ring attention needs a kernel that returns the log-sum-exp, which
`install_cpu_ring_kernel` supplies (test support only: the product refuses ring on CPU).
"""

from __future__ import annotations

import os
import socket
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from diffusers.models.attention_dispatch import _AttentionBackendRegistry, _templated_context_parallel_attention

from dreamshot.config.schema import Config
from dreamshot.models.wan.adapter import WanAdapter
from dreamshot.models.wan.context_parallel import RING_BACKEND, ContextParallel, build_mesh


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def context_parallel_group(degree: int, attention: str) -> ContextParallel:
    """This process's group of `degree` consecutive ranks of the started process group (a new mesh: collective),
    with the CPU ring kernel installed for attention=ring."""
    if attention == "ring":
        install_cpu_ring_kernel()
    mesh = build_mesh(dist.get_world_size(), degree, attention, "cpu")
    return ContextParallel.from_mesh(mesh, attention, torch.device("cpu"))


def sampling_adapter(cfg: Config, generator: torch.Generator) -> WanAdapter:
    """The seeded tiny adapter of `cfg` (eval mode) with LoRA weights drawn from `generator`, large enough to change
    what it draws (like the conftest's `trained_adapter`, for spawned ranks, which cannot take fixtures)."""
    adapter = WanAdapter.seeded(cfg.model, cfg.seed).eval()
    with torch.no_grad():
        for parameter in adapter.trainable_parameters():
            parameter.copy_(0.2 * torch.randn(parameter.shape, generator=generator))
    return adapter


def _worker(rank: int, world: int, degree: int, attention: str, port: int, fn, args, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results[rank] = ("ok", fn(context_parallel_group(degree, attention), *args))
    except BaseException:  # reported to the test, which fails with the worker's traceback
        results[rank] = ("error", traceback.format_exc())
    finally:
        dist.destroy_process_group()


def run_group(fn, world: int = 2, *args, degree: int | None = None, attention: str = "ulysses") -> list:
    """fn(ContextParallel, *args) on `world` gloo processes in groups of `degree` (default: all in one group)."""
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_worker, args=(world, degree or world, attention, free_port(), fn, args, results), nprocs=world)
        outcome = [results[rank] for rank in range(world)]
    errors = [message for status, message in outcome if status == "error"]
    if errors:
        raise AssertionError(errors[0])
    return [value for _, value in outcome]


# --- ring attention on CPU -----------------------------------------------------------------------------------


def install_cpu_ring_kernel() -> None:
    """Make the product's ring backend (`RING_BACKEND`) run in this process on CPU tensors.

    What it replaces: `RING_BACKEND`'s entry in diffusers' attention registry, whose forward / backward ops call
    CUDA kernels (cuDNN attention). diffusers' `TemplatedRingAttention` calls a backend's ops once per key/value
    chunk with `return_lse=True`, merges the chunk outputs by their log-sum-exp, and in the backward hands each
    chunk's op the merged output and log-sum-exp (the global softmax normaliser). The native (SDPA) backend that
    runs elsewhere on CPU returns no log-sum-exp, so the ring cannot run with it. The entry installed here is the
    same call into diffusers' ring (`_templated_context_parallel_attention`) with ops on torch's CPU flash kernel,
    which returns the log-sum-exp and whose backward takes a given output and log-sum-exp: everything else (the
    key/value all-gather, the merge, the gradient ring) is diffusers' code, as on GPUs. The ops save and read
    their tensors in `ctx` as diffusers' do (once per chunk), so gradient checkpointing meets the ring as on GPUs.
    Per process (set in spawned ranks only); the product's refusal of ring on CPU stays for real runs.
    """
    _AttentionBackendRegistry._backends[RING_BACKEND] = _cpu_ring_backend


RING_KERNEL_CALLS = [0]  # forward-op calls in this process, so a test can tell the ring ran


def _cpu_ring_backend(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    return_lse: bool = False,
    _parallel_config=None,
):
    """The registry entry: (B, S_local, H, d) each -> (B, S_local, H, d), attended over every rank's keys."""
    if _parallel_config is None:
        raise AssertionError("the CPU ring kernel is for context-parallel calls only")
    return _templated_context_parallel_attention(
        query,
        key,
        value,
        attn_mask,
        dropout_p,
        is_causal,
        scale,
        enable_gqa,
        return_lse,
        forward_op=_cpu_lse_forward_op,
        backward_op=_cpu_lse_backward_op,
        _parallel_config=_parallel_config,
    )


def _heads_first(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """Model layout (B, S, H, ...) -> kernel layout (B, H, S, ...), and back (the same swap)."""
    return [x.transpose(1, 2).contiguous() for x in tensors]


def _cpu_lse_forward_op(
    ctx,
    query,
    key,
    value,
    attn_mask=None,
    dropout_p=0.0,
    is_causal=False,
    scale=None,
    enable_gqa=False,
    return_lse=False,
    _save_ctx=True,
    _parallel_config=None,
):
    """diffusers' forward-op contract: (B, S, H, d) in model layout -> out (B, S, H, d) and, with `return_lse`,
    the log-sum-exp (B, S, H); saves query, key, value, out, lse in model layout (the ring's backward reads the
    first three and overrides them per chunk)."""
    if enable_gqa:
        raise ValueError("the CPU ring kernel has no grouped-query attention")
    RING_KERNEL_CALLS[0] += 1
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        *_heads_first(query, key, value), dropout_p, is_causal, attn_mask=attn_mask, scale=scale
    )
    out, lse = _heads_first(out, lse)
    if _save_ctx:
        ctx.save_for_backward(query, key, value, out, lse)
        ctx.dropout_p, ctx.is_causal, ctx.scale, ctx.attn_mask = dropout_p, is_causal, scale, attn_mask
    return (out, lse) if return_lse else out


def _cpu_lse_backward_op(ctx, grad_out, *args, query=None, key=None, value=None, out=None, lse=None, **kwargs):
    """diffusers' backward-op contract: the gradients of query, key and value (model layout) of one chunk, given
    the output gradient and, from the ring, this chunk's key/value and the merged out / lse (saved ones if None)."""
    saved = dict(zip(("query", "key", "value", "out", "lse"), ctx.saved_tensors, strict=True))
    given = {"query": query, "key": key, "value": value, "out": out, "lse": lse}
    tensors = [saved[name] if tensor is None else tensor for name, tensor in given.items()]
    gradients = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        *_heads_first(grad_out, *tensors), ctx.dropout_p, ctx.is_causal, attn_mask=ctx.attn_mask, scale=ctx.scale
    )
    return tuple(_heads_first(*gradients))
