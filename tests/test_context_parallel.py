"""Context parallelism on CPU: two gloo processes sharing one storyboard against one process (its twin).

Each spawned rank runs the same seeded tiny Wan twice on the same batch, once alone (degree 1) and once with its
group (degree 2), and reports the largest differences: the prediction, the losses, the role-attention maps and
the LoRA gradients averaged over the group as DDP and DeepSpeed average them. The Ulysses storyboards are 15 tokens
per frame with an odd number of frames, so the degree never divides the sequence and the padding path always runs.
The ring storyboards are 12 tokens per frame (ring cannot pad: the degree must divide the tokens per frame), and
run in the same processes on a second mesh, with the test support's CPU log-sum-exp kernel (`cp_support`).
"""

from __future__ import annotations

from datetime import timedelta
from unittest import mock

import cp_support
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from cp_support import context_parallel_group, run_group, sampling_adapter

from dreamshot.config.schema import Config
from dreamshot.data.bucketing import StoryboardBatch
from dreamshot.diffusion.conditioning import BatchPlan
from dreamshot.inference.pipeline import StoryboardPipeline, StoryboardRequest
from dreamshot.models.wan.adapter import WanAdapter
from dreamshot.models.wan.context_parallel import ContextParallel, build_mesh, launched_group
from dreamshot.training import strategy as strategy_module
from dreamshot.training.module import DreamShotModule
from dreamshot.training.strategy import ContextParallelDDPStrategy
from dreamshot.utils.errors import ConfigError

TOLERANCE = 1e-5
SIZE = (48, 80)  # 3 x 5 = 15 tokens per frame
# (layout, mode, given shots, gradient checkpointing): every frame count below is odd (K = 2 references, N = 3
# shots, 1 of them given in s2s and r2s_s2s).
CASES = [
    ("refs_first", "r2s", 0, False),
    ("last", "r2s", 0, True),
    ("refs_first", "t2s", 0, False),
    ("refs_first", "s2s", 1, True),
    ("last", "s2s", 1, False),
    ("refs_first", "r2s_s2s", 1, False),
]
RING_SIZE = (48, 64)  # 3 x 4 = 12 tokens per frame, which degree 2 divides
RING_CASES = [("refs_first", "r2s", 0, True), ("last", "s2s", 1, False)]


def _config(layout: str, checkpointing: bool) -> Config:
    cfg = Config()
    cfg.trainer.gradient_checkpointing = checkpointing
    cfg.racl.weight = 0.1
    cfg.racl.blocks = [0, 1]
    cfg.racl.absent_negative = True
    cfg.storyboard.layout = layout
    return cfg


def _batch(size: tuple[int, int], shots: int = 3, refs: int = 2, seed: int = 0) -> StoryboardBatch:
    g = torch.Generator().manual_seed(seed)
    height, width = size
    masks = torch.zeros(1, shots, refs, height, width)
    for n in range(shots):
        for k in range(refs):
            if (n + k) % 3:  # some roles absent from some shots
                top, left = 16 * (n % 2), 16 * ((n + 2 * k) % 4)
                masks[0, n, k, top : top + 32, left : left + 32] = 1
    ref_masks = torch.zeros(1, refs, height, width)
    ref_masks[:, :, 8:40, 16:64] = 1
    return StoryboardBatch(
        ids=["cp"],
        sources=["synthetic"],
        shots=torch.rand(1, shots, 3, height, width, generator=g) * 2 - 1,
        shot_texts=[[f"shot {n}" for n in range(shots)]],
        refs=torch.rand(1, refs, 3, height, width, generator=g) * 2 - 1,
        ref_texts=[[f"role {k}" for k in range(refs)]],
        ref_masks=ref_masks,
        shot_masks=masks,
    )


def _random_lora(module: DreamShotModule) -> None:
    """Trained-like LoRA weights (B is zero at init, which would leave A without gradient)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in module.adapter.trainable_parameters():
            parameter.copy_(0.2 * torch.randn(parameter.shape, generator=g))


def _step(module: DreamShotModule, batch: StoryboardBatch, plan: BatchPlan) -> dict[str, torch.Tensor]:
    """Prediction, losses, role maps and LoRA gradients of one training step."""
    recorded = {}
    predict, role_capture = module.adapter.predict_velocity, module._role_capture

    def record_prediction(*args, **kwargs):
        recorded["prediction"] = predict(*args, **kwargs)
        return recorded["prediction"]

    def record_capture(composed):
        recorded["capture"] = role_capture(composed)
        return recorded["capture"]

    module.adapter.predict_velocity, module._role_capture = record_prediction, record_capture
    try:
        losses = module.model_step(batch, plan, torch.Generator().manual_seed(2), racl_weight=0.1, diagnostic=True)
    finally:
        del module.adapter.predict_velocity, module._role_capture
    gradients = torch.autograd.grad(losses["loss"], module.adapter.trainable_parameters())
    return {
        "prediction": recorded["prediction"].detach(),
        "maps": torch.cat(recorded["capture"].block_mean()).detach(),
        **{name: value.detach() for name, value in losses.items()},
        "gradients": torch.cat([g.flatten() for g in gradients]),
    }


def compare_step(cp: ContextParallel, cases, size: tuple[int, int]) -> dict[str, float]:
    """Rank's largest |CP − one process| per case and quantity; gradients averaged over the group first."""
    batch, differences = _batch(size), {}
    for layout, mode, given, checkpointing in cases:
        module = DreamShotModule(_config(layout, checkpointing))
        _random_lora(module)
        plan = BatchPlan(mode, given, False, (False,))
        alone = _step(module, batch, plan)
        module.adapter.context_parallel = cp
        shared = _step(module, batch, plan)
        dist.all_reduce(shared["gradients"])  # the data-parallel average of DDP / DeepSpeed over the group
        shared["gradients"] /= cp.degree
        for name, value in alone.items():
            key = f"{layout}/{mode}/{name}"
            differences[key] = (shared[name] - value).abs().max().item()
        differences[f"{layout}/{mode}/gradient scale"] = alone["gradients"].abs().max().item()
    return differences


def compare_all(cp: ContextParallel) -> dict[str, dict[str, float]]:
    """Both comparisons for both attentions in one group of processes (starting one costs seconds): `cp` is the
    Ulysses group, the ring group is built on the same processes."""
    ring = context_parallel_group(cp.degree, "ring")
    differences = {
        "ulysses step": compare_step(cp, CASES, SIZE),
        "ulysses sampling": compare_sampling(cp, SIZE),
        "ring step": compare_step(ring, RING_CASES, RING_SIZE),
        "ring sampling": compare_sampling(ring, RING_SIZE),
        "ulysses kernel": padded_ulysses_kernel(cp),
    }
    return {**differences, "ring kernel calls": cp_support.RING_KERNEL_CALLS[0], "timeouts": group_timeouts(cp)}


def group_timeouts(cp: ContextParallel) -> list[timedelta]:
    """The timeouts of a group built with a strategy's 123 s: its gathers' group and Ulysses' all-to-all group."""
    mesh = build_mesh(dist.get_world_size(), cp.degree, "ulysses", "cpu", timedelta(seconds=123))
    group = ContextParallel.from_mesh(mesh, "ulysses", torch.device("cpu"))
    groups = [group.group, group.parallel_config.context_parallel_config._ulysses_mesh.get_group()]
    return [g._get_backend(torch.device("cpu")).options._timeout for g in groups]


def test_the_groups_collectives_wait_as_long_as_the_strategys(group_differences, monkeypatch):
    """NCCL's default for a new group is 10 minutes, Lightning's for its own 30: a rank drawing a sample alone must not
    time out its group's next collective sooner than the data-parallel one."""
    assert all(ranks["timeouts"] == [timedelta(seconds=123)] * 2 for ranks in group_differences)
    built = []
    monkeypatch.setattr(strategy_module, "build_mesh", lambda *args: built.append(args))
    monkeypatch.setattr(ContextParallel, "from_mesh", classmethod(lambda cls, *args: cls()))

    class Started:  # stands for Lightning's strategy once its processes run
        def __init__(self, timeout):
            self._timeout, self.world_size, self.root_device = timeout, 4, torch.device("cpu")

        def setup_distributed(self):
            pass

    class Hosting(strategy_module.HostsContextParallel, Started):
        pass

    config = Config().trainer.context_parallel
    config.degree = 2
    Hosting(config, timeout=timedelta(hours=2)).setup_distributed()
    assert built == [(4, 2, "ulysses", "cpu", timedelta(hours=2))]


@pytest.fixture(scope="module")
def group_differences():
    return run_group(compare_all, 2)


def _assert_step_equal(group_differences, attention: str, case) -> None:
    layout, mode, _, _ = case
    for rank, differences in enumerate(ranks[f"{attention} step"] for ranks in group_differences):
        assert differences[f"{layout}/{mode}/gradient scale"] > 1e-3, "no LoRA gradient to compare"
        for name in ("prediction", "loss", "loss_fm", "loss_racl", "racl_in_mask", "maps", "gradients"):
            difference = differences[f"{layout}/{mode}/{name}"]
            assert difference < TOLERANCE, f"rank {rank}: {name} differs by {difference:.2e}"


@pytest.mark.parametrize("case", CASES, ids=[f"{layout}-{mode}" for layout, mode, _, _ in CASES])
def test_two_processes_equal_one_on_an_undivided_sequence(group_differences, case):
    _assert_step_equal(group_differences, "ulysses", case)


@pytest.mark.parametrize("case", RING_CASES, ids=[f"{layout}-{mode}" for layout, mode, _, _ in RING_CASES])
def test_ring_attention_on_two_processes_equals_one(group_differences, case):
    assert all(ranks["ring kernel calls"] > 0 for ranks in group_differences), "the ring never ran"
    _assert_step_equal(group_differences, "ring", case)


def padded_ulysses_kernel(cp: ContextParallel) -> dict:
    """One padded Ulysses attention (15 tokens on 2 ranks, 16 padded), forward and backward: what each SDPA call
    received (the mask's shape or None, the keys' length), and |CP − one process| of the output on this rank's real
    tokens and of the query, key and value gradients on all its tokens (zero on the padding)."""
    shard, g = cp.shard(5, 3), torch.Generator().manual_seed(3)
    query, key, value, grad_out = (torch.randn(1, 15, 4, 8, generator=g) for _ in range(4))
    whole = [x.clone().requires_grad_() for x in (query, key, value)]
    alone = F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in whole)).transpose(1, 2)
    alone.backward(grad_out)
    calls, sdpa = [], F.scaled_dot_product_attention

    def recorded(query, key, value, attn_mask=None, **kwargs):
        calls.append((None if attn_mask is None else tuple(attn_mask.shape), key.shape[-2]))
        return sdpa(query, key, value, attn_mask=attn_mask, **kwargs)

    local = [shard.tokens(x).requires_grad_() for x in (query, key, value)]
    with mock.patch.object(F, "scaled_dot_product_attention", recorded):
        shared = shard.attention(*local)
        shared.backward(shard.tokens(grad_out))
    # The padding query attends too: its output row is dropped at the gather.
    differences = {"output": (shared - shard.tokens(alone)).narrow(1, 0, shard.real).abs().max().item()}
    for name, mine, its in zip(("query", "key", "value"), local, whole, strict=True):
        differences[f"{name} gradient"] = (mine.grad - shard.tokens(its.grad)).abs().max().item()
    return {"calls": calls, "differences": differences}


def test_padded_ulysses_attends_the_real_keys_without_a_mask(group_differences):
    """After Ulysses' all-to-all a rank holds the whole padded sequence for its heads, so the kernel attends the
    first 15 keys with no mask (with one, torch's SDPA cannot use FlashAttention on a GPU), forward and backward,
    and equals one process; the padding keys get zero gradient."""
    for rank, ranks in enumerate(group_differences):
        kernel = ranks["ulysses kernel"]
        assert kernel["calls"] == [(None, 15), (None, 15)], f"rank {rank}"
        for name, difference in kernel["differences"].items():
            assert difference < TOLERANCE, f"rank {rank}: {name} differs by {difference:.2e}"


def test_shards_cover_the_sequence_once():
    """Every token (real or padding) on exactly one rank; padding only at the end."""

    class Rank(ContextParallel):
        @property
        def rank(self):
            return self._rank

    for frames, per_frame, degree in ((5, 15, 2), (34, 1560, 8), (3, 7, 4)):
        covered = []
        for rank in range(degree):
            cp = Rank(degree=degree)
            object.__setattr__(cp, "_rank", rank)
            shard = cp.shard(frames, per_frame)
            covered += list(range(shard.start, shard.start + shard.real))
            assert shard.local * degree - frames * per_frame < degree
            assert shard.first_frame + shard.local_frames <= frames
        assert covered == list(range(frames * per_frame))


def test_ring_refuses_a_sequence_it_would_have_to_pad():
    """diffusers' ring cannot mask padding: an undivided storyboard (a story's size, an aspect bucket) is one line
    naming the key, raised on every rank as the shard is made, before any collective."""
    ring = ContextParallel(degree=2, attention="ring", key="inference.context_parallel")
    with pytest.raises(ConfigError, match=r"^inference.context_parallel.attention=ring cannot pad: .*75 tokens"):
        ring.shard(5, 15)
    assert ring.shard(4, 15).padded == 60
    assert ContextParallel(degree=2).shard(5, 15).padded == 76  # ulysses pads


def test_degree_one_is_the_identity():
    shard = ContextParallel().shard(5, 15)
    x = torch.randn(1, 75, 4)
    assert shard.tokens(x) is x and shard.gather(x) is x and shard.sum(x) is x
    t = torch.rand(1, 75)
    assert shard.timesteps(t) is t
    assert shard.whole_frames(x)[0] is x


# --- sampling ------------------------------------------------------------------------------------------------


def compare_sampling(cp: ContextParallel, size: tuple[int, int]) -> dict[str, float]:
    """Rank's largest |CP − one process| of the final latents of an r2s and an s2s storyboard (2 steps)."""
    cfg = Config()
    cfg.inference.steps = 2
    g = torch.Generator().manual_seed(3)
    adapter = sampling_adapter(cfg, g)
    images = torch.rand(4, 3, *size, generator=g) * 2 - 1
    requests = {
        "r2s": StoryboardRequest(["a", "b", "c"], size, images[:2], ["role 1", "role 2"]),
        "s2s": StoryboardRequest(["c", "d", "e"], size, given_shots=images[2:], given_texts=["a", "b"]),
    }
    differences = {}
    for name, request in requests.items():
        adapter.context_parallel = ContextParallel()
        alone = StoryboardPipeline(adapter, cfg)(request, seed=0, progress=False)
        adapter.context_parallel = cp
        shared = StoryboardPipeline(adapter, cfg)(request, seed=0, progress=False)
        differences[name] = (shared.latents - alone.latents).abs().max().item()
        differences[f"{name} images"] = (shared.images - alone.images).abs().max().item()
    return differences


@pytest.mark.parametrize("attention", ["ulysses", "ring"])
def test_two_processes_sample_the_storyboard_of_one(group_differences, attention):
    for rank, differences in enumerate(ranks[f"{attention} sampling"] for ranks in group_differences):
        for name, difference in differences.items():
            assert difference < TOLERANCE, f"rank {rank}: {name} differs by {difference:.2e}"


def test_strategies_shard_data_over_data_parallel_ranks_only():
    """A context-parallel group is one data-parallel replica: 4 ranks in groups of 2 are 2 replicas."""
    config = Config().trainer.context_parallel
    config.degree = 2

    class OfRank(ContextParallelDDPStrategy):
        world_size = 4
        global_rank = property(lambda self: self.rank_for_test)

    seen = []
    for rank in range(4):
        strategy = OfRank(config)
        strategy.rank_for_test = rank
        seen.append(strategy.distributed_sampler_kwargs)
    assert seen == [{"num_replicas": 2, "rank": r} for r in (0, 0, 1, 1)]


def compare_compiled_step(cp: ContextParallel) -> dict[str, float]:
    """`compare_step` of one r2s storyboard with compiled blocks (the non-capturing blocks run compiled)."""
    module = DreamShotModule(_config("refs_first", False))
    module.adapter = WanAdapter.seeded(
        module.cfg.model, module.cfg.seed, capture_blocks=module.cfg.racl_blocks(), compiled=True
    )
    _random_lora(module)
    plan, batch = BatchPlan("r2s", 0, False, (False,)), _batch(SIZE)
    alone = _step(module, batch, plan)
    module.adapter.context_parallel = cp
    shared = _step(module, batch, plan)
    return {name: (shared[name] - alone[name]).abs().max().item() for name in ("prediction", "loss", "maps")}


@pytest.mark.slow
def test_compiled_blocks_under_context_parallelism_equal_one_process():
    for rank, differences in enumerate(run_group(compare_compiled_step, 2)):
        for name, difference in differences.items():
            assert difference < TOLERANCE, f"rank {rank}: {name} differs by {difference:.2e}"


def compare_in_data_parallel_groups(cp: ContextParallel) -> dict:
    """One of 4 ranks in 2 groups of 2: its group (from the product's mesh), the data-parallel rank the strategy's
    sampler gives it, and |CP − one process| of a step on that replica's own storyboard (groups of other
    replicas' ranks would mix two storyboards' tokens)."""
    config = Config().trainer.context_parallel
    config.degree = cp.degree

    class OfThisProcess(ContextParallelDDPStrategy):
        world_size = property(lambda self: dist.get_world_size())
        global_rank = property(lambda self: dist.get_rank())

    sampler = OfThisProcess(config).distributed_sampler_kwargs
    module = DreamShotModule(_config("refs_first", True))
    _random_lora(module)
    batch, plan = _batch(SIZE, seed=sampler["rank"]), BatchPlan("r2s", 0, False, (False,))
    alone = _step(module, batch, plan)
    module.adapter.context_parallel = cp
    shared = _step(module, batch, plan)
    dist.all_reduce(shared["gradients"], group=cp.group)  # the group's part of the data-parallel average
    shared["gradients"] /= cp.degree
    return {
        "group": dist.get_process_group_ranks(cp.group),
        "sampler": sampler,
        "loss": alone["loss"].item(),
        **{name: (shared[name] - alone[name]).abs().max().item() for name in ("prediction", "maps", "gradients")},
    }


@pytest.mark.slow
def test_four_processes_are_two_data_parallel_groups_of_two():
    """dp 2 × cp 2: the ranks a mesh group joins are those the sampler gives one replica, and each group trains on
    its own storyboard as one process does (the 2-process tests have a single replica, so they cannot tell)."""
    ranks = run_group(compare_in_data_parallel_groups, 4, degree=2)
    assert [r["group"] for r in ranks] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert [r["sampler"] for r in ranks] == [{"num_replicas": 2, "rank": r} for r in (0, 0, 1, 1)]
    assert ranks[0]["loss"] == ranks[1]["loss"] != ranks[2]["loss"] == ranks[3]["loss"]
    for rank, differences in enumerate(ranks):
        for name in ("prediction", "maps", "gradients"):
            assert differences[name] < TOLERANCE, f"rank {rank}: {name} differs by {differences[name]:.2e}"


def test_sampling_started_on_several_processes_without_a_group_is_refused(monkeypatch):
    # torchrun with degree 1: every process would draw the whole storyboard and write the same files.
    monkeypatch.setenv("WORLD_SIZE", "2")
    config = Config().inference.context_parallel
    refused = pytest.raises(ConfigError, match=r"inference.context_parallel.degree=1 with 2 processes.*degree=2")
    with refused, launched_group(config, torch.device("cpu"), "inference.context_parallel"):
        pass
    monkeypatch.setenv("WORLD_SIZE", "1")
    with launched_group(config, torch.device("cpu"), "inference.context_parallel") as group:
        assert group.degree == 1
