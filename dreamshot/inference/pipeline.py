"""Storyboard sampling with reference-free guidance (DESIGN §2 "Reference-free CFG (Eq. 9)" and "Modes").

One storyboard per call. The condition frames — the references, then the given shots (s2s: a story's previous
shots, or the kept shots when re-rolling) — stand clean in the layout's condition slot at every step, with
per-token timestep 0, exactly as in training; only the N target frames start from noise and are stepped by the
scheduler. Every shot, given or drawn, takes its story position in the RoPE indices (`StoryboardLayout`), so a
re-rolled middle shot sits between its neighbours as in training. A request whose condition set the run's mode
mix never trained (e.g. references and given shots together with `storyboard.modes.r2s_s2s = 0`) is refused
before anything runs. Each step needs three velocity predictions; the branches that share a sequence layout run
as ONE batched forward:
- with condition frames: [v_r, v_c] together (K+M conditions, N targets), v_u alone (no conditions);
- without (t2s): [v_u, v_c] together, and the guidance is ordinary CFG with ω2.
The negative prompt (`storyboard.negative_prompt`) replaces the shot texts in v_u and v_r; condition frames keep
their own texts, as in training's text dropout. The drawn latents are decoded in one shot stream with the given
shots' latents, in story order, as training encoded them (`decode_in_context`).

What does not change between steps is computed once per storyboard (`encode`): the condition latents, the umT5
embeddings of every distinct frame text (the conditions', the shots', the negative prompt), their cross-attention
keys and values in every block (`inference.cache_text`; each forward selects its frames' rows, so branches that
share a text share them), and the RoPE of each layout. The result equals the step-by-step computation within float
rounding (tests/test_sampling.py).

Opt-in approximations (`inference`, off by default; their speed and drift in benchmarks/RESULTS.md):
- `guidance_fraction` < 1: the steps after that share of the schedule use v_c alone (one forward of the
  conditioned layout, Eq. 9 with ω1 = ω2 = 1) instead of the two or three branches;
- `cache`: a diffusers cache hook on the DiT's blocks for the storyboard (`block_cache.py`); every kind of batched
  forward (the guided pair, v_u, the conditional-only forward) keeps its own cache state.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler
from tqdm.auto import tqdm

from dreamshot.config.schema import Config
from dreamshot.diffusion.conditioning import check_trained, storyboard_layout
from dreamshot.diffusion.flow_matching import NUM_TRAIN_TIMESTEPS, dit_timesteps
from dreamshot.diffusion.guidance import guided_velocity
from dreamshot.models.layout import StoryboardLayout
from dreamshot.models.wan.adapter import WanAdapter
from dreamshot.models.wan.attention import CrossAttentionText
from dreamshot.models.wan.block_cache import CacheContext, no_cache_context
from dreamshot.models.wan.latents import encode_references, encode_shots


@dataclass
class StoryboardRequest:
    """What to draw: N shot texts at `size` (H, W), with optional condition images in [-1, 1].

    references: (K, 3, H, W) with K `reference_texts`; given_shots: (M, 3, H, W) with M `given_texts`,
    in story order (they are encoded as one shot stream, like the first shots of a training storyboard).
    given_positions / shot_positions: the story position (0-based) of each given shot and each shot to draw;
    default: the given shots first (0..M-1), then the shots to draw (M..M+N-1). earlier_takes: (N, 3, H, W), the
    shots to draw as they stand now (a re-roll), or None; they only join the shot stream the given shots are
    encoded in, so that a given shot after a re-rolled one is encoded with the shots before it, as in training.
    """

    shot_texts: list[str]
    size: tuple[int, int]
    references: torch.Tensor | None = None
    reference_texts: list[str] = field(default_factory=list)
    given_shots: torch.Tensor | None = None
    given_texts: list[str] = field(default_factory=list)
    given_positions: list[int] | None = None
    shot_positions: list[int] | None = None
    earlier_takes: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if not self.shot_texts:
            raise ValueError("a request needs at least one shot text")
        for images, texts, name in (
            (self.references, self.reference_texts, "references"),
            (self.given_shots, self.given_texts, "given_shots"),
        ):
            count = 0 if images is None else images.shape[0]
            if count != len(texts):
                raise ValueError(f"{name}: {count} images but {len(texts)} texts")
        given, shots = len(self.given_texts), len(self.shot_texts)
        if self.given_positions is None:
            self.given_positions = list(range(given))
        if self.shot_positions is None:
            self.shot_positions = list(range(given, given + shots))
        if (len(self.given_positions), len(self.shot_positions)) != (given, shots):
            raise ValueError(f"{given} given shots and {shots} shots to draw need as many story positions")
        if self.earlier_takes is not None and self.earlier_takes.shape[0] != shots:
            raise ValueError(f"earlier_takes: {self.earlier_takes.shape[0]} images for {shots} shots to draw")

    @property
    def mode(self) -> str:
        """The condition set: t2s (none), r2s (references), s2s (given shots), r2s_s2s (both)."""
        if self.given_texts:
            return "r2s_s2s" if self.reference_texts else "s2s"
        return "r2s" if self.reference_texts else "t2s"


@dataclass
class StoryboardResult:
    """images: (N, 3, H, W) float32 in [0, 1] on CPU; latents: (1, C, N, h, w) final target latents."""

    images: torch.Tensor
    latents: torch.Tensor
    mode: str
    seed: int
    step_seconds: list[float]
    total_seconds: float


@dataclass(frozen=True)
class Branch:
    """A kind of batched forward, fixed for one storyboard: its layout and that layout's RoPE (cos, sin)."""

    layout: StoryboardLayout
    rotary: tuple[torch.Tensor, torch.Tensor]


@dataclass
class EncodedRequest:
    """Everything of one request that no sampling step changes.

    conditions: (1, C, K+M, h, w) clean latents (references, then given shots); texts: (1, U, L, D) the umT5
    embeddings of the U = K+M+N+1 distinct frame texts — the conditions', the N shots', the negative prompt;
    cross_text: their cross-attention keys and values (`inference.cache_text`), else None; conditioned: the layout
    with the conditions, free: the one without them (v_u; None in t2s, where the conditioned layout has none);
    dtype: the DiT's (diffusers' `dtype` property walks every module: 12% of a tiny Wan's step when read per forward).
    """

    conditions: torch.Tensor
    texts: torch.Tensor
    num_references: int
    given_positions: list[int]
    shot_positions: list[int]
    conditioned: Branch
    free: Branch | None
    cross_text: CrossAttentionText | None
    dtype: torch.dtype

    @property
    def given_latents(self) -> torch.Tensor:
        return self.conditions[:, :, self.num_references :]

    @property
    def shot_frames(self) -> torch.Tensor:
        """(N,) indices into `texts` of the shot prompts."""
        conditions = self.conditions.shape[2]
        return torch.arange(conditions, conditions + len(self.shot_positions))

    @property
    def negative_frames(self) -> torch.Tensor:
        """(N,) indices into `texts` of the negative prompt, one per shot."""
        return torch.full((len(self.shot_positions),), self.texts.shape[1] - 1)


class WanEulerScheduler(FlowMatchEulerDiscreteScheduler):
    """diffusers' flow-matching Euler on the sigmas Wan2.1's UniPC steps through: N steps at
    linspace(1, 1/1000, N + 1)[:-1], shifted, then 0. diffusers' own grid puts N points from 1 down to its sigma_min,
    which is shifted already, and shifts them again: its last step starts near zero noise (4 steps at shift 5:
    1, 0.91, 0.72, 0.024 instead of 1, 0.94, 0.83, 0.63), so a few-step schedule loses a step."""

    def set_timesteps(self, num_inference_steps=None, device=None, sigmas=None, mu=None, timesteps=None):
        if sigmas is None and timesteps is None and num_inference_steps is not None:
            sigmas = np.linspace(1, 1 / NUM_TRAIN_TIMESTEPS, num_inference_steps + 1)[:-1]
        super().set_timesteps(num_inference_steps, device, sigmas, mu, timesteps)


def build_scheduler(name: str, shift: float):
    """Wan's flow-matching sampler: UniPC set up as Wan2.1's shipped scheduler config, or Euler on its sigmas."""
    if name == "euler":
        return WanEulerScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, shift=shift)
    return UniPCMultistepScheduler(
        num_train_timesteps=NUM_TRAIN_TIMESTEPS,
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        flow_shift=shift,
    )


def initial_noise(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Standard normal float32 noise drawn on CPU, so a seed gives the same storyboard on any device."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


class StoryboardPipeline:
    """Draws storyboards with a `WanAdapter` (LoRA loaded or not) and a run's `Config`."""

    def __init__(self, adapter: WanAdapter, config: Config) -> None:
        self.adapter = adapter
        self.config = config

    @property
    def device(self) -> torch.device:
        return next(self.adapter.transformer.parameters()).device

    @torch.no_grad()
    def __call__(
        self, request: StoryboardRequest, seed: int | None = None, steps: int | None = None, progress: bool = True
    ) -> StoryboardResult:
        """Sample the N target shots of `request` (seed / steps default to the config's `inference`)."""
        settings = self.config.inference
        seed = settings.seed if seed is None else seed
        check_trained(self.config.storyboard, request.mode)
        start = time.perf_counter()
        encoded = self.encode(request)
        targets = initial_noise(self.latent_shape(request), seed).to(self.device)
        scheduler = build_scheduler(settings.scheduler, settings.shift)
        scheduler.set_timesteps(settings.steps if steps is None else steps, device=self.device)
        guided_steps = settings.guidance_fraction * len(scheduler.timesteps)
        step_seconds = []
        with self.adapter.block_cache(settings, len(scheduler.timesteps)) as cache_context:
            for index, timestep in enumerate(
                tqdm(scheduler.timesteps, desc="sampling", disable=not progress, leave=False)
            ):
                tick = time.perf_counter()
                velocity = self.velocity(encoded, targets, timestep, index < guided_steps, cache_context)
                targets = scheduler.step(velocity, timestep, targets, return_dict=False)[0]
                _synchronize(self.device)
                step_seconds.append(time.perf_counter() - tick)
        images = self.adapter.decode_shots(
            targets, encoded.shot_positions, encoded.given_latents, encoded.given_positions
        )
        images = images[0].float().add(1).div(2).clamp(0, 1).cpu()
        return StoryboardResult(images, targets, request.mode, seed, step_seconds, time.perf_counter() - start)

    def latent_shape(self, request: StoryboardRequest) -> tuple[int, int, int, int, int]:
        """(1, C, N, h, w) of the target latents."""
        vae = self.adapter.vae
        ratio = vae.spatial_compression_ratio
        height, width = request.size
        return 1, vae.config.z_dim, len(request.shot_texts), height // ratio, width // ratio

    def encode(self, request: StoryboardRequest) -> EncodedRequest:
        """What no step changes: condition latents (one VAE pass per stream), every distinct text embedding (one umT5
        batch) and, with `inference.cache_text`, their cross-attention keys and values, and each layout's RoPE."""
        texts = request.reference_texts + request.given_texts + request.shot_texts
        embedded = self.adapter.encode_text([texts + [self.config.storyboard.negative_prompt]])
        vae = self.adapter.vae
        references = torch.zeros(0, 3, *request.size) if request.references is None else request.references
        latents = encode_references(vae, references[None].to(self.device))
        if request.given_texts:
            latents = torch.cat([latents, self.encode_given(request)], dim=2)
        cfg = self.config.storyboard
        layout = storyboard_layout(cfg, len(request.reference_texts), request.shot_positions, request.given_positions)
        latent_size = self.latent_shape(request)[3:]
        free = storyboard_layout(cfg, 0, request.shot_positions) if layout.num_conditions else None
        return EncodedRequest(
            conditions=latents,
            texts=embedded,
            num_references=len(request.reference_texts),
            given_positions=list(request.given_positions),
            shot_positions=list(request.shot_positions),
            conditioned=Branch(layout, self.adapter.rotary_emb(layout, latent_size, self.device)),
            free=None if free is None else Branch(free, self.adapter.rotary_emb(free, latent_size, self.device)),
            cross_text=self.adapter.cross_attention_text(embedded[0]) if self.config.inference.cache_text else None,
            dtype=self.adapter.transformer.dtype,
        )

    def encode_given(self, request: StoryboardRequest) -> torch.Tensor:
        """(1, C, M, h, w) latents of the given shots, encoded as one shot stream in story order: training encodes
        a storyboard's shots so, and a shot after the first is a 4-frame-group latent whose meaning depends on the
        shots before it. A re-roll's earlier takes stand in the stream at their positions, then are dropped."""
        images, positions = request.given_shots, list(request.given_positions)
        if request.earlier_takes is not None:
            images = torch.cat([images, request.earlier_takes])
            positions += request.shot_positions
        order = sorted(range(len(positions)), key=positions.__getitem__)
        stream = encode_shots(self.adapter.vae, images[order][None].to(self.device))
        frame_of = {image: frame for frame, image in enumerate(order)}
        return stream[:, :, [frame_of[m] for m in range(len(request.given_texts))]]

    def velocity(
        self,
        encoded: EncodedRequest,
        targets: torch.Tensor,
        timestep: torch.Tensor,
        guided: bool = True,
        cache_context: CacheContext = no_cache_context,
    ) -> torch.Tensor:
        """Guided velocity (1, C, N, h, w) of the targets at a scheduler timestep (0..1000); with `guided` False,
        v_c alone (the steps after `inference.guidance_fraction`)."""
        settings = self.config.inference
        t = (timestep.float() / NUM_TRAIN_TIMESTEPS).reshape(1).to(self.device)
        shots, negative = encoded.shot_frames, encoded.negative_frames
        if not guided:
            with cache_context("conditional"):
                return self.predict(encoded, encoded.conditioned, targets, t, [shots])[0]
        with cache_context("guided"):
            negative_branch, v_c = self.predict(encoded, encoded.conditioned, targets, t, [negative, shots])
        if encoded.free is None:
            # t2s: the negative-prompt branch has no condition frames, so it is v_u and v_r does not exist.
            return guided_velocity(negative_branch, v_c, None, settings.omega1, settings.omega2)
        with cache_context("free"):
            (v_u,) = self.predict(encoded, encoded.free, targets, t, [negative])
        return guided_velocity(v_u, v_c, negative_branch, settings.omega1, settings.omega2)

    def predict(
        self,
        encoded: EncodedRequest,
        branch: Branch,
        targets: torch.Tensor,
        t: torch.Tensor,
        target_texts: list[torch.Tensor],
    ) -> tuple[torch.Tensor, ...]:
        """One batched forward of `branch`'s layout: the targets' velocity (1, C, N, h, w), float32, for each row of
        target texts ((N,) indices into `encoded.texts`; the condition frames keep their own texts).

        targets: (1, C, N, h, w) noised to t (shape (1,), in [0, 1]).
        """
        layout, batch, dtype = branch.layout, len(target_texts), encoded.dtype
        conditions = encoded.conditions[:, :, : layout.num_conditions].to(dtype)
        sequence = layout.assemble(conditions, targets.to(dtype)).repeat(batch, 1, 1, 1, 1)
        condition_texts = torch.arange(layout.num_conditions)
        frames = torch.stack([layout.assemble(condition_texts, row, dim=0) for row in target_texts])  # (B, F)
        text = encoded.texts[0, frames] if encoded.cross_text is None else encoded.cross_text.select(frames)
        # The DiT timesteps as the model was trained: per token (condition frames at 0) or one per sample.
        per_token = self.config.diffusion.timestep_mode == "per_token"
        timesteps = dit_timesteps(t.expand(batch), layout.target_frames(), per_token)
        velocity = self.adapter.predict_velocity(sequence, timesteps, text, layout, rotary=branch.rotary)
        return layout.split(velocity.float())[1].chunk(batch)


def _synchronize(device: torch.device) -> None:
    # Kernels run asynchronously on CUDA: without a sync the step timings would measure the launch only.
    if device.type == "cuda":
        torch.cuda.synchronize(device)
