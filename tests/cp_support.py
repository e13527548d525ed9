"""Test support for context parallelism: run a function in a group of CPU processes over gloo.

`run_group(fn, world, *args)` starts `world` processes (torch.multiprocessing, spawn), each with the process group
initialised and one (dp, ring, ulysses) mesh built by the product's `build_mesh`, calls
`fn(context_parallel, *args)` with its `ContextParallel`, and returns every rank's result (rank order). diffusers'
attention-level context parallelism runs on CPU with its native kernel, so no shim is needed.
"""

from __future__ import annotations

import os
import socket
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dreamshot.models.wan.context_parallel import ContextParallel, build_mesh


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, degree: int, port: int, fn, args, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        mesh = build_mesh(world, degree, "ulysses", "cpu")
        results[rank] = ("ok", fn(ContextParallel.from_mesh(mesh, "ulysses", torch.device("cpu")), *args))
    except BaseException:  # reported to the test, which fails with the worker's traceback
        results[rank] = ("error", traceback.format_exc())
    finally:
        dist.destroy_process_group()


def run_group(fn, world: int = 2, *args, degree: int | None = None) -> list:
    """fn(ContextParallel, *args) on `world` gloo processes in groups of `degree` (default: all in one group)."""
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_worker, args=(world, degree or world, free_port(), fn, args, results), nprocs=world)
        outcome = [results[rank] for rank in range(world)]
    errors = [message for status, message in outcome if status == "error"]
    if errors:
        raise AssertionError(errors[0])
    return [value for _, value in outcome]
