"""Story sharding: the one place where evaluation and folder generation learn about processes (STYLE habit 9).

Launch: `torchrun --nproc-per-node 8 -m dreamshot.cli eval ...` (or `generate FOLDER`), one process per GPU;
several nodes add `--nnodes`, `--rdzv-backend c10d --rdzv-endpoint HEAD:29500` and need the output folder on
a shared filesystem. `Ranks.from_environment` reads torchrun's RANK / WORLD_SIZE / LOCAL_RANK /
LOCAL_WORLD_SIZE (SLURM's srun works when its tasks export the first three and MASTER_ADDR / MASTER_PORT) and
joins the process group:
gloo for the collectives of the runner (Python objects: `broadcast_object_list`, `all_gather_object`),
plus nccl for CUDA tensors where CUDA is used. Without those variables a run is one process of a world of one,
and takes the same path: the same plan, the same assignment, the same merge, with collectives of one.

The shard planner assigns stories to groups of ranks, balanced by drawing cost (`DrawingCost.flops`, which
counts shots, tokens per forward and guidance branches) with the longest-processing-time rule: stories by
decreasing cost, each to the group with the least cost so far (ties: the lower group, and stories by id), so
every rank computes the same assignment. Today every group is one rank. Context parallelism fits the same
plan: a story whose tokens do not fit one GPU would be given a group of several ranks that draw it together
(the group's first rank writing its files), and the planner would weigh it by its cost divided by the group's
size; nothing here depends on it yet.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from dreamshot.utils import errors
from dreamshot.utils.devices import cuda_device_count
from dreamshot.utils.errors import ConfigError, DreamShotError

T = TypeVar("T")
# A rank that finished its share waits at the next collective for the slowest one; with a balanced plan that is
# about one story's drawing time, so hours are a generous bound (a dead rank under torchrun ends the others).
COLLECTIVE_TIMEOUT = timedelta(hours=6)


class Ranks:
    """This process's rank among `world` evaluation processes (`local_rank` on its node) and the collectives
    the runner uses (on picklable Python objects: plans, benchmarks, per-story values)."""

    def __init__(self, rank: int = 0, world: int = 1, local_rank: int = 0, local_world: int = 1) -> None:
        self.rank, self.world, self.local_rank = rank, world, local_rank
        # Processes on this node (torchrun's LOCAL_WORLD_SIZE; 1 where a launcher does not say).
        self.local_world = local_world

    @classmethod
    def from_environment(cls, device_type: str) -> Ranks:
        """The ranks torchrun (or srun with the same variables) started; a world of one without them."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            return cls()
        local_rank, local_world = int(os.environ.get("LOCAL_RANK", "0")), int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        ranks = cls(int(os.environ["RANK"]), world, local_rank, local_world)
        if not dist.is_initialized():
            backend = "cpu:gloo,cuda:nccl" if device_type == "cuda" else "gloo"
            dist.init_process_group(backend, timeout=COLLECTIVE_TIMEOUT)
        return ranks

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, requested: torch.device) -> torch.device:
        """The device of this rank: `cuda` without an index is this node's GPU number `local_rank`, or the one
        GPU a process sees (srun binding one GPU to each task). A GPU index for several processes of one node
        is refused: they would all draw on that one GPU."""
        if requested.type != "cuda":
            return requested
        if requested.index is not None:
            if self.local_world > 1:
                raise ConfigError(
                    f"--device / eval.device {requested}: the {self.local_world} processes of this node would all "
                    "use that one GPU; use cuda (each process takes GPU LOCAL_RANK)"
                )
            return requested
        visible = cuda_device_count()
        if visible == 1:
            return torch.device("cuda", 0)
        if self.local_rank >= visible:
            raise ConfigError(
                f"LOCAL_RANK {self.local_rank}, but this process sees {visible} CUDA device(s): start at most "
                f"{visible} processes per node (torchrun --nproc-per-node)"
            )
        return torch.device("cuda", self.local_rank)

    def decide(self, decision: Callable[[], T]) -> T:
        """Rank 0 runs `decision` and every rank gets its result; a DreamShotError it raises is raised on every
        rank, so no rank waits for one that stopped."""
        outcome: list[Any] = [None]
        if self.is_main:
            try:
                outcome = [("ok", decision())]
            except DreamShotError as e:
                outcome = [("error", type(e).__name__, str(e))]
        if self.world > 1:
            dist.broadcast_object_list(outcome, src=0)
        if outcome[0][0] == "error":
            raise getattr(errors, outcome[0][1], DreamShotError)(outcome[0][2])
        return outcome[0][1]

    def all_gather(self, value: T) -> list[T]:
        """`value` of every rank, in rank order, on every rank."""
        if self.world == 1:
            return [value]
        gathered: list[Any] = [None] * self.world
        dist.all_gather_object(gathered, value)
        return gathered

    def close(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def rank_groups(world: int) -> list[tuple[int, ...]]:
    """The groups stories are assigned to: one rank each (a context-parallel story would span several)."""
    return [(rank,) for rank in range(world)]


def assign(costs: Mapping[str, float], groups: int) -> list[list[str]]:
    """Story ids per group, longest processing time first (see the module docstring); each share in drawing
    order, most costly first."""
    shares: list[list[str]] = [[] for _ in range(groups)]
    loads = [0.0] * groups
    for story in sorted(costs, key=lambda s: (-costs[s], s)):
        group = min(range(groups), key=lambda g: (loads[g], g))
        shares[group].append(story)
        loads[group] += costs[story]
    return shares


def balance(costs: Mapping[str, float], shares: Sequence[Sequence[str]]) -> float:
    """The most loaded group's cost over the mean group's (1.0 is perfect; the run takes this much longer
    than a perfect split)."""
    loads = [sum(costs[s] for s in share) for share in shares]
    mean = sum(loads) / len(loads)
    return max(loads) / mean if mean > 0 else 1.0


def share_of(ranks: Ranks, costs: Mapping[str, float]) -> list[str]:
    """The stories this rank draws (or scores) among `costs`, in its order."""
    groups = rank_groups(ranks.world)
    shares = assign(costs, len(groups))
    return next(share for group, share in zip(groups, shares, strict=True) if ranks.rank in group)
