"""Context parallelism: one storyboard's token sequence split over the processes of a group (DESIGN §2 "Sizes":
a 30-shot storyboard at 480p is 53,040 tokens, too many activations for one GPU).

Every rank of a context-parallel (CP) group holds the same storyboard and keeps only its contiguous share of the
tokens through the DiT blocks (`SequenceShard`): block inputs, the recomputed block, attention and the
role-attention capture shrink by the degree; everything per token that the blocks read (modulation, RoPE, the
frames' texts) is sliced with the tokens. What needs other ranks' tokens goes through an engine:
- self-attention: diffusers' context-parallel attention with its `ParallelConfig` (`TemplatedUlyssesAttention`:
  all-to-all to all tokens × degree-th of the heads, the attention kernel, all-to-all back; or
  `TemplatedRingAttention`);
- the role-attention capture (RACL): each rank scores its own role query rows against every key (gathered with
  torch's differentiable functional all-gather) and the partial maps, sums over rows, are summed over the group
  (functional all-reduce): the same maps as one process, since a map is a weighted sum of per-row softmaxes;
- the prediction: gathered back to the whole sequence (functional all-gather) at the output head.
Shot-wise cross-attention needs no communication: a rank's tokens attend to their own frames' texts only.

A sequence the degree does not divide is padded at its end with zero tokens, kept out of self-attention as keys,
dropped from the gathered prediction (so from the loss) and never a role token (so from RACL). Padding rather than
refusing: a storyboard's length is the data's (shots × tokens per frame), so a refusal would stop a run on the first
odd storyboard, while the cost of padding is at most degree − 1 tokens. Keys without a mask: after Ulysses' all-to-all
a rank holds the whole padded sequence for its heads, the padding at its end, so the kernel attends the first
`length` keys and values and no mask at all (`_real_keys_forward_op`; the padding queries attend too, their rows
dropped at the gather; the backward pads the key and value gradients back with zeros). A key mask would be the same
numbers, but with any mask torch's SDPA cannot use its FlashAttention kernel on a GPU and falls back to the
memory-efficient one, in every block of every step. A padded sequence's Ulysses therefore calls diffusers' templated
Ulysses with diffusers' native (SDPA) ops wrapped by ours, whatever diffusers' active backend
(`DIFFUSERS_ATTN_BACKEND`, native unless set; its flash-attn and native-flash backends refuse any mask): SDPA then
picks the kernel (FlashAttention first on CUDA for bf16 / fp16). A sequence the degree divides, and degree 1, keep
the active backend through `dispatch_attention_fn`.
Ring attention cannot take a key mask (diffusers' ring reuses one local mask for every rotated chunk), so
`attention=ring` requires the degree to divide the tokens per frame: checked when the config loads for training
(which then also refuses aspect buckets, frames of other sizes), and for any storyboard as its shard is made (a
story's size in sampling), a one-line error raised on every rank before any collective. Under gradient checkpointing
the ring's saved tensors bypass the checkpoint (its backward reads them once per chunk, which the checkpoint does
not allow): each block keeps this rank's query, key, value and output through the forward, and diffusers' ring keeps
its merged output too, so ring with checkpointing holds five block-input-sized tensors per block more than Ulysses
(14B, 30 shots + 4 references, degree 4: about 25 GiB), which the planner counts ("ring attention kept").

The gradient: every rank computes the same loss from the gathered prediction and the summed maps. The backward of
a functional all-gather is a reduce-scatter (sum) and that of an all-reduce an all-reduce, so the gradients of the
degree identical losses add up: a CP group's LoRA gradients sum to degree × the storyboard's. DDP and DeepSpeed
average over all degree × data-parallel ranks, which divides that factor back out: the update equals one process's
on the same batches (tests/test_context_parallel.py), with no scaling of our own.

The process groups: a `DeviceMesh` of dims ("dp", "ring", "ulysses") (diffusers' context-parallel mesh dims with a
data-parallel dim in front, ranks of a group consecutive so a group stays inside a node), built by the Lightning
strategy after it has started the processes (`dreamshot/training/strategy.py`), or by `dreamshot generate` under
torchrun. With degree 1 there is no mesh and every method here is the identity or the plain attention call: a
one-process run takes this same path.

Why diffusers' attention-level context parallelism (`ContextParallelConfig`, `dispatch_attention_fn`):
- it is where Wan's attention already goes (`WanAttnProcessor` and our processors call `dispatch_attention_fn`),
  offers Ulysses and ring with backward passes, and runs over gloo on CPU, so two CPU processes can be compared
  with one: Ulysses with the native (SDPA) ops, as on GPUs; ring with a kernel that returns the log-sum-exp, which
  on CPU only the tests supply (tests/cp_support.py, on torch's CPU flash kernel), while a run uses diffusers' cuDNN
  ops (CUDA).
  Its model-level hooks (`enable_parallelism`, Wan's `_cp_plan`) are not used: they split the arguments of
  diffusers' `WanTransformer3DModel.forward` and of its `rope` module, neither of which our storyboard forward calls
  (positions and per-frame timesteps are ours), split in equal chunks only (no padding), and
  `_resolve_parallel_config` builds its mesh for an accelerator (no CPU). We give `ContextParallelConfig.setup` our
  own mesh instead.
- DeepSpeed's `DistributedAttention` offers Ulysses only, communicates through `deepspeed.comm`, initialised by
  DeepSpeed's engine and absent from our DDP and CPU runs, and expects its sequence-parallel group to be handed to
  that engine, so DDP and DeepSpeed runs would differ.
- torch's `context_parallel` is ring-only, supports CUDA flash / efficient / cuDNN kernels only (no CPU twin
  tests), takes no attention mask (no padding), and patches `scaled_dot_product_attention` for everything inside
  its context, which would make the shot-wise cross-attention communicate too.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
from diffusers.models._modeling_parallel import ContextParallelConfig as DiffusersContextParallel
from diffusers.models._modeling_parallel import ParallelConfig
from diffusers.models.attention_dispatch import (
    AttentionBackendName,
    _native_attention_backward_op,
    _native_attention_forward_op,
    _templated_context_parallel_attention,
    dispatch_attention_fn,
)
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from dreamshot.config.schema import ContextParallelConfig
from dreamshot.utils.errors import ConfigError

MESH_DIMS = ("dp", "ring", "ulysses")
# Ring attention merges its chunks by their log-sum-exp, which diffusers' native (SDPA) kernel does not return.
RING_BACKEND = AttentionBackendName._NATIVE_CUDNN


def build_mesh(
    world_size: int, degree: int, attention: str, device_type: str, timeout: timedelta | None = None
) -> DeviceMesh:
    """The (dp, ring, ulysses) mesh of `world_size` started processes in groups of `degree` consecutive ranks.
    `timeout`: of every collective on its groups (the strategy's, which its default group has); None: torch's
    default for the backend, which for NCCL (10 minutes) is shorter than Lightning's (30). Collective: every process
    must call it."""
    ring, ulysses = (degree, 1) if attention == "ring" else (1, degree)
    options = None if timeout is None else _group_options(device_type, timeout)
    mesh = init_device_mesh(
        device_type,
        (world_size // degree, ring, ulysses),
        mesh_dim_names=MESH_DIMS,
        backend_override=None if options is None else dict.fromkeys(MESH_DIMS, options),
    )
    # The group of a whole CP group, which diffusers' setup flattens (ring, ulysses) into and our gathers use: made
    # here with the same options (diffusers' own `_flatten()` then finds it).
    mesh["ring", "ulysses"]._flatten(backend_override=options)
    return mesh


def _group_options(
    device_type: str, timeout: timedelta
) -> dist.ProcessGroupNCCL.Options | dist.ProcessGroupGloo._Options:
    options = dist.ProcessGroupNCCL.Options() if device_type == "cuda" else dist.ProcessGroupGloo._Options()
    options._timeout = timeout
    return options


@contextmanager
def launched_group(config: ContextParallelConfig, device: torch.device, key: str) -> Iterator[ContextParallel]:
    """All the processes torchrun started as one group, for sampling one storyboard together (degree 1: none),
    its process group closed on exit. `key` names the config in errors."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if config.degree == 1:
        if world > 1:  # each process would draw the whole storyboard and write the same files
            raise ConfigError(
                f"{key}.degree=1 with {world} processes started by the distributed launcher: set "
                f"{key}.degree={world} to draw the storyboard on all of them, or start one process"
            )
        yield ContextParallel()
        return
    if world != config.degree:
        raise ConfigError(
            f"{key}.degree={config.degree} needs {config.degree} processes started by the distributed launcher "
            f"(torchrun --nproc-per-node {config.degree} -m dreamshot.cli ...), this is {world}"
        )
    if config.attention == "ring" and device.type != "cuda":
        raise ConfigError(f"{key}.attention=ring needs CUDA GPUs (kernels that return the log-sum-exp); use ulysses")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        mesh = build_mesh(world, config.degree, config.attention, device.type)
        yield ContextParallel.from_mesh(mesh, config.attention, device, key)
    finally:
        dist.destroy_process_group()


@dataclass(frozen=True, eq=False)
class ContextParallel:
    """A context-parallel group (degree > 1, with its mesh and diffusers' `ParallelConfig`), or none (degree 1)."""

    degree: int = 1
    attention: str = "ulysses"
    mesh: DeviceMesh | None = None
    parallel_config: ParallelConfig | None = None
    # The config this group was set by, named in errors (trainer.context_parallel / inference.context_parallel).
    key: str = "context_parallel"

    @classmethod
    def from_mesh(
        cls, mesh: DeviceMesh, attention: str, device: torch.device, key: str = "context_parallel"
    ) -> ContextParallel:
        """The group of this process in `mesh` (a `build_mesh` mesh); `key` names its config in errors."""
        ring, ulysses = mesh["ring"].size(), mesh["ulysses"].size()
        if ring * ulysses == 1:
            return cls()
        config = ParallelConfig(
            context_parallel_config=DiffusersContextParallel(ring_degree=ring, ulysses_degree=ulysses)
        )
        config.setup(dist.get_rank(), dist.get_world_size(), device, mesh=mesh)
        return cls(ring * ulysses, attention, mesh, config, key)

    @property
    def group(self) -> dist.ProcessGroup:
        return self.parallel_config.context_parallel_config._flattened_mesh.get_group()

    @property
    def rank(self) -> int:
        """This process's place in its group (0..degree-1)."""
        return 0 if self.mesh is None else self.parallel_config.context_parallel_config._flattened_mesh.get_local_rank()

    @functools.lru_cache(maxsize=64)  # noqa: B019 (one small object per storyboard shape, kept for compiled guards)
    def shard(self, frames: int, tokens_per_frame: int) -> SequenceShard:
        """This rank's share of a sequence of `frames` frames of `tokens_per_frame` tokens."""
        return SequenceShard(self, frames, tokens_per_frame)


@dataclass(frozen=True, eq=False)
class SequenceShard:
    """The tokens [start, stop) of a storyboard sequence padded to `padded` tokens, held by one rank of `cp`.

    Notation: T = frames · S tokens, frame-major; `padded` = T rounded up to a multiple of the degree; each rank
    holds `local` = padded / degree consecutive tokens. Tensors "along tokens" are (B, T, ...) unless said otherwise.
    """

    cp: ContextParallel
    frames: int
    tokens_per_frame: int

    def __post_init__(self) -> None:
        if self.length <= (self.cp.degree - 1) * self.local:
            raise ValueError(f"{self.length} tokens are too few to give each of {self.cp.degree} ranks one")
        if self.cp.attention == "ring" and self.padded > self.length:
            raise ConfigError(
                f"{self.cp.key}.attention=ring cannot pad: degree {self.cp.degree} must divide the {self.length} "
                f"tokens of this storyboard ({self.frames} frames x {self.tokens_per_frame}); use attention=ulysses "
                "or a size whose tokens per frame the degree divides"
            )

    @property
    def length(self) -> int:
        return self.frames * self.tokens_per_frame

    @property
    def local(self) -> int:
        return -(-self.length // self.cp.degree)

    @property
    def padded(self) -> int:
        return self.local * self.cp.degree

    @property
    def start(self) -> int:
        return self.cp.rank * self.local

    @property
    def real(self) -> int:
        """Tokens of this rank that are not padding."""
        return max(0, min(self.local, self.length - self.start))

    @property
    def first_frame(self) -> int:
        return min(self.start // self.tokens_per_frame, self.frames)

    @property
    def local_frames(self) -> int:
        """Frames with at least one token on this rank (0 on a rank that holds padding only)."""
        return -(-(self.start + self.real) // self.tokens_per_frame) - self.first_frame if self.real else 0

    # --- splitting the inputs ------------------------------------------------------------------------------

    def tokens(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """x with T along `dim` -> this rank's `local` tokens (zeros for padding). A copy, so the full tensor is
        freed when its caller lets it go."""
        if self.cp.degree == 1:
            return x
        if self.padded > self.length:
            pad = [0, 0] * (x.ndim - 1 - dim % x.ndim) + [0, self.padded - self.length]
            x = F.pad(x, pad)
        return x.narrow(dim, self.start, self.local).clone()

    def text(self, text: torch.Tensor) -> torch.Tensor:
        """(B, F·L, D) every frame's text -> (B, F_local·L, D), the texts of this rank's frames."""
        if self.cp.degree == 1:
            return text
        per_frame = text.shape[1] // self.frames
        return text.narrow(1, self.first_frame * per_frame, self.local_frames * per_frame)

    def timesteps(self, timesteps: torch.Tensor) -> torch.Tensor:
        """(B,) one timestep per sample, unchanged; (B, G) one per group of T/G consecutive tokens (per frame, or
        per token) -> (B, G_local), one per group of this rank's tokens, groups as long as possible while each
        lies inside one of the given groups (padding groups at 0)."""
        if timesteps.ndim == 1 or self.cp.degree == 1:
            return timesteps
        given = self.length // timesteps.shape[1]
        size = math.gcd(given, self.local)
        first = torch.arange(self.start, self.start + self.local, size, device=timesteps.device)
        index = first // given
        inside = index < timesteps.shape[1]
        return torch.where(inside, timesteps[:, index.clamp_max(timesteps.shape[1] - 1)], 0)

    # --- attention -------------------------------------------------------------------------------------------

    def attention(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """Self-attention of this rank's queries over the whole sequence. (B, local, H, d) each -> (B, local, H, d)."""
        if self.cp.degree == 1:
            return dispatch_attention_fn(query, key, value, dropout_p=0.0, is_causal=False)
        if self.cp.attention == "ulysses" and self.padded == self.length:
            return dispatch_attention_fn(query, key, value, parallel_config=self.cp.parallel_config)
        if self.cp.attention == "ulysses":
            return _templated_context_parallel_attention(
                query,
                key,
                value,
                forward_op=functools.partial(_real_keys_forward_op, length=self.length),
                backward_op=_real_keys_backward_op,
                _parallel_config=self.cp.parallel_config,
            )
        # diffusers' ring backward reads its saved tensors once, then once more per key/value chunk in the kernel's
        # backward op; non-reentrant checkpointing allows one read. Kept as plain references they can be read again,
        # at the cost of holding this rank's query, key, value and output per block through the forward.
        with torch.autograd.graph.saved_tensors_hooks(_kept, _kept):
            return dispatch_attention_fn(
                query, key, value, backend=RING_BACKEND, parallel_config=self.cp.parallel_config
            )

    def whole_frames(self, query: torch.Tensor) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
        """For the shot-wise cross-attention: this rank's (B, local, H, d) queries placed in its F_local whole
        frames, (B, F_local·S, H, d) with zeros where another rank holds the token, and the function that takes an
        output of that shape back to this rank's tokens (zeros on padding)."""
        if self.cp.degree == 1:
            return query, lambda out: out
        offset = self.start - self.first_frame * self.tokens_per_frame
        after = self.local_frames * self.tokens_per_frame - offset - self.real
        placed = F.pad(query.narrow(1, 0, self.real), (0, 0, 0, 0, offset, after))

        def restore(out: torch.Tensor) -> torch.Tensor:
            return F.pad(out.narrow(1, offset, self.real), (0, 0, 0, 0, 0, self.local - self.real))

        return placed, restore

    # --- gathering -----------------------------------------------------------------------------------------

    def gather(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """Every rank's `local` tokens along `dim` -> the whole sequence (T along `dim`, padding dropped).
        Differentiable: the backward sums every rank's gradient of its copy (reduce-scatter)."""
        if self.cp.degree == 1:
            return x
        whole = _waited(funcol.all_gather_single(x.contiguous(), dim, self.cp.group))
        return whole.narrow(dim, 0, self.length)

    def local_rows(self, weights: torch.Tensor) -> torch.Tensor:
        """(P, T) per-token weights (e.g. a role plan's source weights) -> (P, local), this rank's columns."""
        return self.tokens(weights, dim=1)

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of every rank's `x` (same shape on all), on every rank. Differentiable (all-reduce backward)."""
        if self.cp.degree == 1:
            return x
        return _waited(funcol.all_reduce(x.contiguous(), "sum", self.cp.group))

    # --- binding to the blocks -----------------------------------------------------------------------------

    def runner(self, inner):
        """A `BlockRunner` that runs `inner` with this shard bound to the block's attention processors. Inside the
        function that gradient checkpointing replays, so a recomputed block sees the shard again."""

        def run(index, block, hidden, text, temb, rotary_emb):
            processors = [block.attn1.processor, block.attn2.processor]
            for processor in processors:
                processor.shard = self
            try:
                return inner(index, block, hidden, text, temb, rotary_emb)
            finally:
                for processor in processors:
                    processor.shard = None

        return run


def _real_keys_forward_op(ctx, query, key, value, attn_mask, *args, length: int, **kwargs) -> torch.Tensor:
    """diffusers' native (SDPA) forward op, in Ulysses after the all-to-all ((B, padded, H/degree, d) each), over
    the first `length` keys and values only: the rest is padding. `attn_mask` is None (`SequenceShard.attention`
    passes none), so on CUDA SDPA may pick FlashAttention, which takes no mask. The padding queries attend too; their
    rows are dropped at the gather."""
    ctx.padded = key.shape[1]
    real_key, real_value = key.narrow(1, 0, length), value.narrow(1, 0, length)
    return _native_attention_forward_op(ctx, query, real_key, real_value, attn_mask, *args, **kwargs)


def _real_keys_backward_op(ctx, grad_out, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """diffusers' native backward op; the gradients of the real keys and values padded back with zeros to the
    padded sequence that Ulysses' all-to-all sends back (the padding keys never attended: zero gradient)."""
    grad_query, grad_key, grad_value = _native_attention_backward_op(ctx, grad_out, *args, **kwargs)
    pad = (0, 0, 0, 0, 0, ctx.padded - grad_key.shape[1])
    return grad_query, F.pad(grad_key, pad), F.pad(grad_value, pad)


def _kept(x: torch.Tensor) -> torch.Tensor:
    """A saved-tensor hook that keeps the tensor itself (the default without checkpointing)."""
    return x


def _waited(x: torch.Tensor) -> torch.Tensor:
    """A functional collective's result once it has arrived (its autograd kept): the first use would wait for it
    anyway, but a result whose only uses are views is otherwise never waited on."""
    return funcol.wait_tensor(x)


# What an attention processor works with outside a context-parallel forward: the whole sequence, plain attention.
WHOLE_SEQUENCE = ContextParallel().shard(1, 1)
