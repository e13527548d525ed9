"""Side by side with the tools a user would pick instead: DiffSynth-Studio's Wan LoRA training step and diffusers'
`WanPipeline` sampling step, against DreamShot's, on the same work, in one process.

Rows (medians of timed steps after a warm-up round; the two sides alternate step by step, the order flipping
every round, so the machine's noise hits both; seconds are wall time with the device drained on a GPU, and the
process's CPU time on the CPU, which other processes on a shared machine do not inflate as they do wall time):
  train fm      our training step — `DreamShotModule.model_step` on an r2s storyboard of N shots + K references
                (flow matching, per-frame timesteps, shot-wise cross-attention), backward, AdamW step — against
                DiffSynth-Studio's (`diffsynth` on PyPI): its `WanModel`, its `FlowMatchSFTLoss` through its
                `WanVideoPipeline.model_fn`, its LoRA injection (`DiffusionTrainingModule.add_lora_to_model`), the
                same AdamW step, on a video of the same K + N latent frames;
  train racl    the same with the Role-Attention Consistency Loss on (λ = racl.weight, the configured blocks
                captured) against the same DiffSynth step: what RACL costs next to a trainer without it;
  train fm·FL   our `train fm` step against DiffSynth's given the storyboard's whole text as one prompt of F·L
                tokens (what a DiffSynth user training on a multi-shot storyboard would feed it: every frame's
                prompt concatenated). It makes the text work equal: both sides embed F·L text tokens and project
                them to every block's cross-attention keys and values (with LoRA). It does not make the attention
                equal: DiffSynth's cross-attention then scores every video token against all F·L keys, ours against
                its frame's L (F times more cross-attention scores for the peer: work the peer does and we do not).
                A second view, not the goal's row: `train fm` (the peer on L tokens) is the headline;
  sample t2s    one step of `StoryboardPipeline`'s loop (`velocity`, t2s: [v_u, v_c] as one batch-2 forward;
                then the scheduler; the request encoded once beforehand) against one step of diffusers'
                `WanPipeline.__call__` (its cond and uncond forwards, then the scheduler; timed between its
                step-end callbacks, prompt embeddings given) on a video of the same N latent frames: the same
                tokens, so the ratio is per token too. The first step of every call is not counted;
  sample r2s    r2s ([v_r, v_c] batched over K + N frames, plus v_u over N) against `WanPipeline` on K + N
                frames; the ratio is per token processed (ours: 2(K+N)+N frames a step, diffusers': 2(K+N)).
Peak memory of the training rows: what one extra step adds at its peak to what is resident (both sides' models
and optimiser states stay loaded through a row, so the allocator's absolute peak would count the other side's too):
on a GPU `torch.cuda.max_memory_allocated` above `memory_allocated` before the step, on the CPU the peak of live
tensor bytes replayed by the profiler (benchmarks/racl_step.py's `peak_mib`).
With --profile DIR, one more step of each side per row is profiled: its operator table (by input shapes) per side,
and per row `<row>_summary.txt`: each side's self CPU time in all, on the F·L text rows, on L-token rows, in
concatenations and in RoPE's multiplication, and how many times each aten operator ran, with the difference.

Made equal, and checked where a count can be checked (the script stops if it differs): the Wan shape (dims,
heads, layers, FFN, text dim: both DiTs have the same number of frozen parameters), the token count, LoRA of the
same rank and alpha on the same ten linears of every block (q, k, v, o of self- and cross-attention, the two FFN
linears: the same number of trainable parameters), LoRA weights in float32 and the DiT in the same dtype on both
(float32 on the CPU, bf16 on a GPU, no autocast), gradient checkpointing of every block on or off for both, the
optimiser (AdamW, same learning rate), the sampler (the same UniPC scheduler and guidance branches per step).

What cannot be made equal, and how the comparison handles it:
  - attention dispatch: DiffSynth calls FlashAttention-3/-2 or SageAttention when installed, else
    `scaled_dot_product_attention`; ours and diffusers' go through `scaled_dot_product_attention`. The table
    names the kernel DiffSynth picked: a fair row has "sdpa" on both (a GPU machine with flash-attn would give
    DiffSynth a kernel we do not use).
  - text: a storyboard has one text per frame and every frame's queries attend to their own L tokens (shot-wise
    cross-attention); DiffSynth and diffusers attend the whole video to one prompt. Each side is given L text
    tokens per query, so the cross-attention scores are the same work, but our text embedder and K/V projections
    run over F·L tokens against their L. It is real work of the method, counted against us in training; its share
    of our step's matmul FLOPs is printed ("work only ours does"); the `train fm·FL` row gives DiffSynth the F·L
    tokens instead (equal text work, more attention work for the peer); on the CPU the default text length (20
    tokens per 60-token frame) keeps Wan's 480p ratio of text to video tokens (512 per 1,560). In sampling our
    text keys and values are projected once per storyboard (`StoryboardPipeline.encode`, outside the timed step),
    as diffusers' prompt embeddings are given ready-made.
  - timesteps: ours are per frame (clean references at t = 0, DESIGN §2), so the time embedding runs on F rows
    and every block's modulation is kept per frame (`forward.py`); DiffSynth's and diffusers' Wan2.1 use one
    timestep per sample. Counted against us; the time embedding's share of our FLOPs is printed too.
  - RoPE and norms: DiffSynth applies RoPE in complex float64 and its own RMSNorm; ours is diffusers' rotation and
    RMSNorm in float32 (the rotation eagerly as one complex float32 multiplication, `rope.apply_rotary_emb`).
    That is DiffSynth's code as users run it, so it stays.
  - LoRA injection: both are peft LoRA layers (DiffSynth `inject_adapter_in_model`, ours diffusers'
    `add_adapter`); DiffSynth's trainer keeps them in the pipeline dtype (bf16), here they are float32 on both.
  - the loss: DiffSynth's MSE over all frames with its timestep weighting, ours over the target shots only —
    the same order of work; our step also composes the batch (conditioning, role plans), which is part of it.
  - compiled blocks (--compile): ours only; DiffSynth's trainer has no compile option.
Everything is random (weights, latents, text embeddings; umT5 and the VAE are built one layer deep and never run
on the timed path of training): step time does not depend on the values.

    OMP_NUM_THREADS=1 python benchmarks/peers.py                     # CPU: the tiny Wan, 96×160, text 20
    OMP_NUM_THREADS=1 python benchmarks/peers.py --shape wan1_3b     # CPU: 1.3B dims, 2 blocks
    python benchmarks/peers.py --device cuda --shape wan1_3b         # GPU: all 30 blocks at 480p, text 512
    CHECKS="first more" bash benchmarks/gpu_checks.sh                # the GPU rows (1.3B eager and compiled, 14B)
Needs the bench extra: pip install -e '.[bench]' (one line and exit status 1 without it).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from racl_step import peak_mib
from train_throughput import profile_step, shallow_encoders, synchronize

from dreamshot.config.load import load_config
from dreamshot.config.schema import Config
from dreamshot.data.bucketing import StoryboardBatch
from dreamshot.diffusion.conditioning import BatchPlan, StoryboardLatents
from dreamshot.inference.pipeline import StoryboardPipeline, StoryboardRequest, build_scheduler, initial_noise
from dreamshot.models.wan.build import DTYPES, build_components
from dreamshot.models.wan.lora import apply_lora, load_lora_state_dict, trainable_parameter_count
from dreamshot.planner.flops import training_flops
from dreamshot.planner.shape import model_shape
from dreamshot.planner.workload import Workload, parse_resolution, tokens_per_frame
from dreamshot.training.module import DreamShotModule

GIB = 2**30
# DiffSynth's names for the linears our config targets (to_q … ffn.net.2), the defaults of its Wan trainer.
DIFFSYNTH_LORA_TARGETS = ["q", "k", "v", "o", "ffn.0", "ffn.2"]
GOALS = {"train": 1.0, "sample": 1.0}
# The row whose peer is given the storyboard's F·L text tokens as one prompt: a second view, without a goal.
WHOLE_TEXT_ROW = "train fm·FL"
# λ of the RACL row when the experiment's is 0 (this project's default for the paper's recipe).
RACL_WEIGHT = 0.1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="tiny", choices=("tiny", "wan1_3b", "wan14b"), help="conf/model option")
    parser.add_argument("--layers", type=int, help="DiT blocks (default: all; 2 for a full-width shape on the CPU)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--resolution", help="HEIGHTxWIDTH or 480p (default: 480p on a GPU, 96x160 on the CPU)")
    parser.add_argument("--shots", type=int, default=8)
    parser.add_argument("--refs", type=int, default=3)
    parser.add_argument("--text-len", type=int, help="text tokens per query (default: model.text_len; 20 on the CPU)")
    parser.add_argument("--rank", type=int, help="LoRA rank (default: the experiment's; alpha = rank when given)")
    parser.add_argument("--checkpointing", choices=("on", "off"), default="on", help="gradient checkpointing, both")
    parser.add_argument("--compile", action="store_true", help="compile our DiT blocks (DiffSynth's stay eager)")
    parser.add_argument("--steps", type=int, default=3, help="timed training steps per side, after one warm-up")
    parser.add_argument("--sample-calls", type=int, default=2, help="timed sampling calls per side, after one warm-up")
    parser.add_argument("--sample-steps", type=int, default=3, help="scheduler steps per sampling call (first dropped)")
    parser.add_argument("--rows", default="train,sample", help="comma list of: train, sample")
    parser.add_argument(
        "--profile", type=Path, help="folder: per side, the operators of one step (text tables), and a summary per row"
    )
    args = parser.parse_args(argv)
    if not args.device.startswith("cuda"):
        # Wan's text-to-video token ratio at 480p (512 text tokens per 1,560 video tokens of a frame), small.
        args.resolution = args.resolution or "96x160"
        args.text_len = args.text_len or 20
        args.layers = args.layers or (None if args.shape == "tiny" else 2)
    args.resolution = args.resolution or "480p"
    args.rows = [row.strip() for row in args.rows.split(",") if row.strip()]
    return args


def bench_config(args: argparse.Namespace) -> Config:
    """The run's config at the benchmark's shape: float32 on the CPU, the model's dtype (bf16) on a GPU."""
    overrides = [
        f"trainer.gradient_checkpointing={args.checkpointing == 'on'}",
        f"trainer.compile_blocks={args.compile}",
    ]
    cfg_name = "smoke" if args.shape == "tiny" else "dreamshot"
    if args.shape != "tiny":
        # The trainer group only matters for its checks here: no Lightning trainer is built.
        overrides += [f"model={args.shape}", "trainer=cpu"]
        if not args.device.startswith("cuda"):
            overrides.append("model.dtype=float32")
    if args.layers is not None:
        overrides.append(f"model.transformer.num_layers={args.layers}")
    if args.text_len is not None:
        overrides.append(f"model.text_len={args.text_len}")
    if args.rank is not None:
        overrides += [f"model.lora.rank={args.rank}", f"model.lora.alpha={args.rank}"]
    cfg = load_config(cfg_name, overrides)
    return dataclasses.replace(cfg, model=shallow_encoders(cfg.model))


@dataclass
class Work:
    """What both sides process: K references + N shots of h×w latents, L text tokens per query."""

    refs: int
    shots: int
    latent_size: tuple[int, int]
    text_len: int
    image_size: tuple[int, int]

    @property
    def frames(self) -> int:
        return self.refs + self.shots

    @property
    def tokens_per_frame(self) -> int:
        return tokens_per_frame(*self.image_size, "--resolution")


def work_of(cfg: Config, args: argparse.Namespace) -> Work:
    height, width = parse_resolution(args.resolution)
    return Work(args.refs, args.shots, (height // 8, width // 8), cfg.model.text_len, (height, width))


# --- training: ours --------------------------------------------------------------------------------------------


def role_boxes(generator: torch.Generator, frames: int, roles: int, size: tuple[int, int], own: bool) -> torch.Tensor:
    """(1, frames, roles, H, W) {0, 1} pixel masks: with `own`, frame k shows role k (a reference), else each role
    is in each frame with probability 0.7, as a box of a third of the frame."""
    height, width = size
    masks = torch.zeros(1, frames, roles, height, width)
    for frame in range(frames):
        for role in range(roles):
            if (role != frame) if own else torch.rand(1, generator=generator) >= 0.7:
                continue
            top = int(torch.randint(0, height - height // 3 + 1, (1,), generator=generator))
            left = int(torch.randint(0, width - width // 3 + 1, (1,), generator=generator))
            masks[0, frame, role, top : top + height // 3, left : left + width // 3] = 1
    return masks


def storyboard_batch(cfg: Config, work: Work, device: torch.device, dtype: torch.dtype) -> StoryboardBatch:
    """One storyboard as the latent cache serves it: random latents and text embeddings, random role boxes."""
    generator = torch.Generator().manual_seed(cfg.seed)
    channels, text_dim = cfg.model.transformer.in_channels, cfg.model.transformer.text_dim

    def randn(*shape):
        return torch.randn(shape, generator=generator).to(device, dtype)

    latents = StoryboardLatents(
        refs=randn(1, channels, work.refs, *work.latent_size),
        shots=randn(1, channels, work.shots, *work.latent_size),
        ref_text=randn(1, work.refs, work.text_len, text_dim),
        shot_text=randn(1, work.shots, work.text_len, text_dim),
    )
    ref_masks = role_boxes(generator, work.refs, work.refs, work.image_size, own=True)[
        :, range(work.refs), range(work.refs)
    ]
    return StoryboardBatch(
        ids=["bench"],
        sources=["synthetic"],
        shots=None,
        shot_texts=[["shot"] * work.shots],
        refs=None,
        ref_texts=[["role"] * work.refs],
        ref_masks=ref_masks.to(device),
        shot_masks=role_boxes(generator, work.shots, work.refs, work.image_size, own=False).to(device),
        latents=latents,
    )


def our_training(cfg: Config, work: Work, device: torch.device, racl_weight: float):
    """(module, step): `step()` is one LoRA optimiser step of DreamShot's training step on an r2s storyboard."""
    with device:
        module = DreamShotModule(cfg)
    module.to(device).train()
    dtype = DTYPES[cfg.model.dtype]
    batch = storyboard_batch(cfg, work, device, dtype)
    optimizer = torch.optim.AdamW(module.adapter.trainable_parameters(), lr=cfg.optim.lr)
    plan = BatchPlan("r2s", 0, False, (False,))
    generator = torch.Generator(device).manual_seed(cfg.seed)

    def step(weight: float = racl_weight) -> None:
        losses = module.model_step(batch, plan, generator, racl_weight=weight)
        losses["loss"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return module, step


# --- training: DiffSynth-Studio --------------------------------------------------------------------------------


def diffsynth_attention() -> str:
    """The attention kernel DiffSynth's Wan DiT dispatches to on this machine."""
    from diffsynth.models import wan_video_dit as dit

    for flag, name in (
        ("FLASH_ATTN_3_AVAILABLE", "flash-attn-3"),
        ("FLASH_ATTN_2_AVAILABLE", "flash-attn-2"),
        ("SAGE_ATTN_AVAILABLE", "sageattention"),
    ):
        if getattr(dit, flag):
            return name
    return "sdpa"


def diffsynth_training(cfg: Config, work: Work, device: torch.device, checkpointing: bool):
    """(pipeline, step): DiffSynth-Studio's Wan LoRA training step as its trainer runs it, on a random DiT of our
    shape: `WanVideoPipeline` in training mode (1000-step scheduler, everything frozen), LoRA by its injection,
    `FlowMatchSFTLoss` on a video of the same latent frames with one prompt: `step()` of L tokens, as many as each
    of our frames has, `step(F·L)` of the storyboard's F·L (every frame's prompt concatenated)."""
    from diffsynth.diffusion.loss import FlowMatchSFTLoss
    from diffsynth.diffusion.training_module import DiffusionTrainingModule
    from diffsynth.models.wan_video_dit import WanModel
    from diffsynth.pipelines.wan_video import WanVideoPipeline

    dims, lora, dtype = cfg.model.transformer, cfg.model.lora, DTYPES[cfg.model.dtype]
    pipe = WanVideoPipeline(device=str(device), torch_dtype=dtype)
    with device:
        pipe.dit = WanModel(
            dim=dims.num_attention_heads * dims.attention_head_dim,
            in_dim=dims.in_channels,
            ffn_dim=dims.ffn_dim,
            out_dim=dims.in_channels,
            text_dim=dims.text_dim,
            freq_dim=dims.freq_dim,
            eps=1e-6,
            patch_size=(1, 2, 2),
            num_heads=dims.num_attention_heads,
            num_layers=dims.num_layers,
            has_image_input=False,
        ).to(dtype)
    pipe.scheduler.set_timesteps(1000, training=True)
    pipe.freeze_except([])
    pipe.dit = DiffusionTrainingModule().add_lora_to_model(
        pipe.dit, DIFFSYNTH_LORA_TARGETS, lora.rank, lora.alpha, upcast_dtype=torch.float32
    )
    generator = torch.Generator().manual_seed(cfg.seed)
    latents = torch.randn(1, dims.in_channels, work.frames, *work.latent_size, generator=generator)
    contexts = {
        tokens: torch.randn(1, tokens, dims.text_dim, generator=generator).to(device, dtype)
        for tokens in (work.text_len, work.frames * work.text_len)
    }
    inputs = dict(
        input_latents=latents.to(device, dtype),
        use_gradient_checkpointing=checkpointing,
        use_gradient_checkpointing_offload=False,
    )
    optimizer = torch.optim.AdamW([p for p in pipe.dit.parameters() if p.requires_grad], lr=cfg.optim.lr)

    def step(text_tokens: int = work.text_len) -> None:
        FlowMatchSFTLoss(pipe, **inputs, context=contexts[text_tokens]).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return pipe, step


# --- sampling ------------------------------------------------------------------------------------------------


def our_sampling(cfg: Config, module: DreamShotModule, work: Work, device: torch.device):
    """`run(refs, steps)` -> seconds of each step of `StoryboardPipeline`'s sampling loop (its guided velocity, then
    the scheduler) with `refs` of the K references (0: t2s). The request is encoded once, outside the clock, as
    diffusers' side gets its embeddings ready-made."""
    pipeline = StoryboardPipeline(module.adapter, cfg)
    references = torch.rand(work.refs, 3, *work.image_size, generator=torch.Generator().manual_seed(cfg.seed))
    encoded = {
        refs: pipeline.encode(
            StoryboardRequest(
                shot_texts=["shot"] * work.shots,
                size=work.image_size,
                references=references[:refs] * 2 - 1 if refs else None,
                reference_texts=["role"] * refs,
            )
        )
        for refs in {0, work.refs}
    }
    shape = (1, cfg.model.transformer.in_channels, work.shots, *work.latent_size)

    @torch.no_grad()
    def run(refs: int, steps: int) -> list[float]:
        targets = initial_noise(shape, cfg.seed).to(device)
        scheduler = build_scheduler(cfg.inference.scheduler, cfg.inference.shift)
        scheduler.set_timesteps(steps, device=device)
        seconds = []
        for timestep in scheduler.timesteps:
            start = clock(device)
            velocity = pipeline.velocity(encoded[refs], targets, timestep)
            targets = scheduler.step(velocity, timestep, targets, return_dict=False)[0]
            seconds.append(clock(device) - start)
        return seconds

    return run


def diffusers_sampling(
    cfg: Config,
    work: Work,
    device: torch.device,
    lora_state: dict[str, torch.Tensor] | None = None,
    fuse_lora: bool = False,
):
    """`run(frames, steps)` -> seconds of each denoising step of one diffusers `WanPipeline` call: a random Wan DiT
    of our shape with the same LoRA (`lora_state`: its weights; `fuse_lora`: folded in by diffusers' `fuse_lora`),
    the same scheduler, a video of `frames` latent frames, prompt and negative prompt embeddings of L tokens
    (guidance on: its cond and uncond forwards each step)."""
    from diffusers import WanPipeline

    with device:
        parts = build_components(cfg.model)
    apply_lora(parts.transformer, cfg.model.lora)
    if lora_state is not None:
        load_lora_state_dict(parts.transformer, lora_state)
    if fuse_lora:
        parts.transformer.fuse_lora()
    pipe = WanPipeline(
        tokenizer=parts.tokenizer,
        text_encoder=parts.text_encoder,
        vae=parts.vae,
        transformer=parts.transformer,
        scheduler=build_scheduler(cfg.inference.scheduler, cfg.inference.shift),
    )
    pipe.set_progress_bar_config(disable=True)
    dims, dtype = cfg.model.transformer, DTYPES[cfg.model.dtype]
    generator = torch.Generator().manual_seed(cfg.seed)
    prompt, negative = (torch.randn(1, work.text_len, dims.text_dim, generator=generator) for _ in range(2))
    latents = torch.randn(1, dims.in_channels, work.frames, *work.latent_size, generator=generator)

    def run(frames: int, steps: int) -> list[float]:
        ticks = [clock(device)]

        def tick(pipeline, index, timestep, tensors):
            ticks.append(clock(device))
            return tensors

        pipe(
            prompt_embeds=prompt.to(device, dtype),
            negative_prompt_embeds=negative.to(device, dtype),
            latents=latents[:, :, :frames].to(device),
            height=work.image_size[0],
            width=work.image_size[1],
            num_frames=4 * (frames - 1) + 1,
            num_inference_steps=steps,
            guidance_scale=cfg.inference.omega2,
            output_type="latent",
            callback_on_step_end=tick,
        )
        return [b - a for a, b in zip(ticks, ticks[1:], strict=False)]

    return run


# --- measuring -----------------------------------------------------------------------------------------------


@dataclass
class Row:
    name: str
    peer_name: str
    ours: float
    peer: float
    # Tokens processed per step by each side (the ratio is per token).
    our_tokens: int
    peer_tokens: int
    our_mib: float | None = None
    peer_mib: float | None = None
    # The ratio this row is held to; None: shown, not held to one.
    goal: float | None = None

    @property
    def ratio(self) -> float:
        return (self.ours / self.our_tokens) / (self.peer / self.peer_tokens)


def interleaved(sides: dict[str, Callable[[], list[float]]], rounds: int) -> dict[str, float]:
    """Median seconds of each side: `rounds` rounds after one warm-up round, each side once a round (its call
    returns the seconds it measured), the order flipped every round."""
    seconds: dict[str, list[float]] = {name: [] for name in sides}
    names = list(sides)
    for index in range(rounds + 1):
        for name in names if index % 2 == 0 else names[::-1]:
            measured = sides[name]()
            if index:
                seconds[name] += measured
    return {name: statistics.median(values) for name, values in seconds.items()}


def clock(device: torch.device) -> float:
    """Seconds: on a GPU wall time, the device drained first; on the CPU this process's CPU time, which the other
    processes of a shared machine do not inflate as they do wall time (the benchmark runs on one thread)."""
    if device.type != "cuda":
        return time.process_time()
    synchronize(device)
    return time.perf_counter()


def timed_step(step: Callable[[], None], device: torch.device) -> Callable[[], list[float]]:
    """`step` as a side of `interleaved`: one call, its seconds."""

    def run() -> list[float]:
        start = clock(device)
        step()
        return [clock(device) - start]

    return run


def peak_step_mib(step: Callable[[], None], device: torch.device) -> float:
    """Peak memory one step adds to what is resident: CUDA's allocator peak above its allocation before the step,
    or the CPU's live tensor bytes replayed by the profiler (which counts from the step's start too)."""
    if device.type != "cuda":
        return peak_mib(step)
    torch.cuda.reset_peak_memory_stats(device)
    resident = torch.cuda.memory_allocated(device)
    step()
    return (torch.cuda.max_memory_allocated(device) - resident) / 2**20


def check_equal(what: str, ours: int, peer: int) -> str:
    if ours != peer:
        raise SystemExit(f"peers.py: {what} differ: ours {ours:,}, DiffSynth {peer:,} (not the same model)")
    return f"{what} {ours:,} = {peer:,}"


def extra_work(cfg: Config, work: Work, checkpointing: bool) -> dict[str, float]:
    """Shares of our training step's FLOPs that the peers do not do (matmuls; the planner's count plus the
    embedders it leaves out): the text embedder and every block's K/V over F·L text tokens against one prompt of
    L, and the time embedding (D → D → 6·D) of every frame against one per sample."""
    shape = model_shape(cfg.model, count_encoders=False)
    dims, dim = cfg.model.transformer, shape.dim
    workload = Workload(work.frames, work.tokens_per_frame, work.text_len, work.shots, checkpointing=checkpointing)
    text_tokens = workload.text_tokens
    text_embedder = 2 * (dims.text_dim * dim + dim * dim)
    time_embedder = 2 * (dims.freq_dim * dim + 7 * dim * dim)
    blocks_text = training_flops(shape, dataclasses.replace(workload, tokens_per_frame=0)).total
    total = training_flops(shape, workload).total + text_tokens * text_embedder + work.frames * time_embedder
    extra_text = (blocks_text + text_tokens * text_embedder) * (work.frames - 1) / work.frames
    return {"text": extra_text / total, "timesteps": (work.frames - 1) * time_embedder / total}


def train_rows(cfg: Config, args, work: Work, device: torch.device) -> tuple[list[Row], list[str], DreamShotModule]:
    checkpointing = args.checkpointing == "on"
    racl_weight = cfg.racl.weight or RACL_WEIGHT
    module, our_step = our_training(cfg, work, device, racl_weight)
    pipe, peer_step = diffsynth_training(cfg, work, device, checkpointing)
    notes = [
        check_equal("frozen DiT parameters", _count(module.adapter.transformer, False), _count(pipe.dit, False)),
        check_equal("LoRA parameters", trainable_parameter_count(module.adapter.transformer), _count(pipe.dit, True)),
        f"DiffSynth attention: {diffsynth_attention()}; ours: sdpa",
    ]
    shares = extra_work(cfg, work, checkpointing)
    notes.append(
        f"work only ours does: {shares['text']:.1%} of our step's matmul FLOPs on text (F·L tokens embedded and "
        f"projected to K/V, theirs L), {shares['timesteps']:.1%} on per-frame time embeddings (theirs one)"
    )
    notes.append(
        f"{WHOLE_TEXT_ROW}: DiffSynth's prompt is the storyboard's {work.frames * work.text_len} text tokens (every "
        f"frame's {work.text_len} concatenated): text work equal, its cross-attention {work.frames}× ours"
    )
    tokens = work.frames * work.tokens_per_frame
    rows = []
    summarize = partial(profile_summary, work=work, dims=cfg.model.transformer)
    text_tokens = {"train fm": work.text_len, "train racl": work.text_len, WHOLE_TEXT_ROW: work.frames * work.text_len}
    for name, weight in (("train fm", 0.0), ("train racl", racl_weight), (WHOLE_TEXT_ROW, 0.0)):
        ours, peer = partial(our_step, weight), partial(peer_step, text_tokens[name])
        sides = {"ours": timed_step(ours, device), "DiffSynth": timed_step(peer, device)}
        seconds = compare(name, sides, args.steps, args.profile, device, summarize)
        mib = (peak_step_mib(ours, device), peak_step_mib(peer, device))
        goal = None if name == WHOLE_TEXT_ROW else GOALS["train"]
        rows.append(Row(name, "DiffSynth", *seconds, tokens, tokens, *mib, goal=goal))
    del pipe, peer_step
    return rows, notes, module


def sample_rows(cfg: Config, args, work: Work, device: torch.device, module: DreamShotModule) -> list[Row]:
    module.eval()
    per_frame = work.tokens_per_frame
    ours, peer = our_sampling(cfg, module, work, device), diffusers_sampling(cfg, work, device)
    rows = []
    summarize = partial(profile_summary, work=work, dims=cfg.model.transformer)
    for name, refs in (("sample t2s", 0), ("sample r2s", work.refs)):
        frames = work.shots + refs
        steps = args.sample_steps
        sides = {"ours": later_steps(ours, refs, steps), "diffusers": later_steps(peer, frames, steps)}
        seconds = compare(name, sides, args.sample_calls, args.profile, device, summarize)
        # ours: the batch-2 forward over the layout's frames, plus v_u over the N shots when there are conditions.
        our_tokens = (2 * frames + (work.shots if refs else 0)) * per_frame
        rows.append(Row(name, "diffusers", *seconds, our_tokens, 2 * frames * per_frame, goal=GOALS["sample"]))
    return rows


def later_steps(run: Callable[[int, int], list[float]], size: int, steps: int) -> Callable[[], list[float]]:
    """One sampling call `run(size, steps)`; the seconds of all its steps but the first (lower order, allocations)."""
    return lambda: run(size, steps)[1:]


def compare(
    name: str, sides: dict, rounds: int, profile: Path | None, device: torch.device, summarize: Callable
) -> tuple[float, float]:
    """Median seconds of the two sides (ours first), interleaved; with `profile`, one profiled call of each: its
    operator table per side, and `summarize(profiles)` of the two in `<row>_summary.txt`."""
    medians = interleaved(sides, rounds)
    if profile:
        stem = name.replace(" ", "_").replace("·", "_")
        profiles = {
            side: profile_step(run, device, profile / f"{stem}_{side}.txt", shapes=True) for side, run in sides.items()
        }
        (profile / f"{stem}_summary.txt").write_text(summarize(profiles))
    return tuple(medians.values())


def carries_rows(shape: list, tokens: int) -> bool:
    """Whether an input of `shape` (as the profiler records it) has rows of `tokens` tokens: a matrix with that many
    rows or columns (columns: the transposed operand of a backward matmul), or a larger tensor with them on axis 1
    (B, T, …) or −2 (B, H, T, d)."""
    if len(shape) == 2:
        return tokens in shape
    return len(shape) > 2 and tokens in (shape[1], shape[-2])


def self_cpu_split(prof, work: Work, dims) -> dict[str, float]:
    """Milliseconds of self CPU time of one profiled step (`record_shapes=True`; events grouped by input shapes):
    in all; in ops with an input on the storyboard's F·L text rows (our text embedder, K/V projections and their
    LoRA); on L-token rows and none on F·L (one prompt of L, or a frame's own L keys in our folded
    cross-attention); in concatenations; in RoPE's multiplication (aten::mul on (…, H, d/2) channel pairs)."""
    events = prof.key_averages(group_by_input_shape=True)
    whole, pairs = work.frames * work.text_len, [dims.num_attention_heads, dims.attention_head_dim // 2]

    def ms(selected: Callable) -> float:
        return sum(event.self_cpu_time_total for event in events if selected(event)) / 1e3

    def on_rows(event, tokens: int) -> bool:
        return any(carries_rows(shape, tokens) for shape in event.input_shapes)

    return {
        "total": ms(lambda event: True),
        f"on {whole}-token rows": ms(lambda event: on_rows(event, whole)),
        f"on {work.text_len}-token rows": ms(lambda event: on_rows(event, work.text_len) and not on_rows(event, whole)),
        "cat": ms(lambda event: event.key == "aten::cat"),
        "RoPE mul": ms(
            lambda event: event.key == "aten::mul" and any(shape[-2:] == pairs for shape in event.input_shapes)
        ),
    }


def aten_op_counts(prof) -> Counter:
    """How many times each aten operator was dispatched in one profiled step (ops called by other ops included)."""
    return Counter({event.key: event.count for event in prof.key_averages() if event.key.startswith("aten::")})


def profile_summary(profiles: dict, work: Work, dims) -> str:
    """Text of the profiled sides of one row: per side `self_cpu_split`, then every aten operator's count per side
    and the first side's minus the second's (largest first; the total on top)."""
    lines = [
        f"self CPU time of one step, ms ({work.frames * work.text_len} = F·L text tokens, {work.text_len} = L):",
        *(
            f"  {side:<10}" + "; ".join(f"{key} {value:.1f}" for key, value in self_cpu_split(prof, work, dims).items())
            for side, prof in profiles.items()
        ),
    ]
    counts = {side: aten_op_counts(prof) for side, prof in profiles.items()}
    first, second = counts.values()
    ops = sorted(first.keys() | second.keys(), key=lambda op: (second[op] - first[op], op))
    lines.append(f"aten ops dispatched in one step:\n{'op':<44}" + "".join(f"{side:>11}" for side in counts) + "  diff")
    for op, values in [("all", [sum(c.values()) for c in counts.values()])] + [
        (op, [first[op], second[op]]) for op in ops
    ]:
        lines.append(f"{op:<44}" + "".join(f"{value:>11,}" for value in values) + f"  {values[0] - values[1]:+,}")
    return "\n".join(lines) + "\n"


def _count(module: torch.nn.Module, trainable: bool) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad == trainable)


def report(cfg: Config, args, work: Work, rows: list[Row], notes: list[str]) -> None:
    dims, lora = cfg.model.transformer, cfg.model.lora
    threads = f", {torch.get_num_threads()} CPU threads" if args.device == "cpu" else ""
    print(
        f"{cfg.model.name} shape: {dims.num_layers} blocks, {dims.num_attention_heads} heads × "
        f"{dims.attention_head_dim}, FFN {dims.ffn_dim}, text dim {dims.text_dim}; LoRA rank {lora.rank} "
        f"(alpha {lora.alpha:g}) on attention + FFN linears; {cfg.model.dtype}, gradient checkpointing "
        f"{args.checkpointing}{', our blocks compiled' if args.compile else ''}; {args.device}{threads}"
    )
    print(
        f"{work.refs} references + {work.shots} shots = {work.frames} latent frames × {work.tokens_per_frame} tokens "
        f"({work.image_size[0]}×{work.image_size[1]}) = {work.frames * work.tokens_per_frame:,} video tokens; the "
        f"peers get a video of the same latent frames; {work.text_len} text tokens per query"
    )
    for note in notes:
        print(f"  {note}")
    print(
        f"{'row':<12}{'peer':<11}{'ours s':>9}{'peer s':>9}{'tokens':>15}{'ratio':>8}{'ours MiB':>10}{'peer MiB':>10}"
    )
    for row in rows:
        memory = "".join(f"{mib:>10.0f}" if mib is not None else f"{'':>10}" for mib in (row.our_mib, row.peer_mib))
        tokens = f"{row.our_tokens:,}/{row.peer_tokens:,}"
        if row.goal is None:
            verdict = "no goal: the peer given F·L text tokens"
        else:
            verdict = "ok" if row.ratio <= row.goal else f"over the goal ≤ {row.goal:.1f}×"
        print(
            f"{row.name:<12}{row.peer_name:<11}{row.ours:>9.3f}{row.peer:>9.3f}{tokens:>15}{row.ratio:>7.2f}×"
            f"{memory}  {verdict}"
        )
    print(
        "ratio: our seconds per token / the peer's (training: same tokens; sampling: tokens of all forwards of a "
        f"step); medians of {args.steps} steps (training) and {args.sample_calls} calls × "
        f"{args.sample_steps - 1} steps (sampling) after a warm-up, interleaved"
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if importlib.util.find_spec("diffsynth") is None:
        sys.exit("peers.py: needs the bench extra (diffsynth is not installed): pip install -e '.[bench]'")
    device = torch.device(args.device)
    cfg = bench_config(args)
    work = work_of(cfg, args)
    torch.manual_seed(cfg.seed)
    rows, notes, module = [], [], None
    if "train" in args.rows:
        rows, notes, module = train_rows(cfg, args, work, device)
    if "sample" in args.rows:
        if module is None:
            with device:
                module = DreamShotModule(cfg)
            module.to(device)
        rows += sample_rows(cfg, args, work, device, module)
    report(cfg, args, work, rows, notes)


if __name__ == "__main__":
    main()
