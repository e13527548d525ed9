"""What one training step processes (a storyboard sample) and how it is spread over GPUs."""

from __future__ import annotations

import re
from dataclasses import dataclass

from dreamshot.utils.errors import ConfigError

# Wan's VAE downsamples 8x in space and the DiT patchifies 2x2: one token per 16x16 pixels (DESIGN §2 "Sizes").
PIXELS_PER_TOKEN = 16
# DESIGN §2: "192p means 192×336, 480p means 480×832".
NAMED_RESOLUTIONS = {"192p": (192, 336), "480p": (480, 832)}


@dataclass(frozen=True)
class Workload:
    """One storyboard sample as the DiT sees it, and how a step runs it.

    Per sample: F = `frames` latent frames (references + shots, one latent frame each), S = `tokens_per_frame`
    video tokens per frame (T = F·S in all), L = `text_len` text tokens per frame (F·L in all).
    """

    frames: int
    tokens_per_frame: int
    text_len: int
    # Noised shots: the targets of the role-attention capture.
    target_frames: int
    micro_batch: int = 1
    checkpointing: bool = True
    # Per-token timesteps (clean references at t = 0) give every frame its own modulation, broadcast over the
    # frame's tokens; global: one per sample.
    per_token_timestep: bool = True
    # Bytes per activation value (2 for bf16 compute, 4 for float32).
    activation_bytes: int = 2
    # Role-attention capture: blocks captured (0: RACL off) and |Q|, the query rows of one capture chunk.
    racl_blocks: int = 0
    racl_queries: int = 0
    # Context-parallel degree N: the sample's tokens are split over N GPUs (dreamshot/models/wan/context_parallel.py).
    context_parallel: int = 1
    # Its self-attention: ulysses | ring (ring under checkpointing keeps its tensors through the forward).
    context_parallel_attention: str = "ulysses"

    @property
    def tokens(self) -> int:
        """T: video tokens per sample."""
        return self.frames * self.tokens_per_frame

    @property
    def text_tokens(self) -> int:
        """F·L: text tokens per sample (every frame attends to its own L)."""
        return self.frames * self.text_len

    @property
    def rank_tokens(self) -> int:
        """The video tokens one GPU of the CP group holds: ⌈T / N⌉ (the sequence padded to a multiple of N)."""
        return -(-self.tokens // self.context_parallel)

    @property
    def rank_text_tokens(self) -> int:
        """The text tokens one GPU reads: the texts of the frames its tokens touch (one more than its share of
        frames when its tokens start inside a frame), at most all F·L."""
        if self.context_parallel == 1:
            return self.text_tokens
        return min(self.frames, -(-self.rank_tokens // self.tokens_per_frame) + 1) * self.text_len

    @property
    def rank_racl_queries(self) -> int:
        """|Q| rows of one capture chunk on one GPU: each scores its own source tokens."""
        return -(-self.racl_queries // self.context_parallel)


@dataclass(frozen=True)
class Training:
    """How the step is spread over GPUs and what precision its state is kept in."""

    world_size: int = 1
    # DeepSpeed ZeRO stage: 0 (none: DDP), 1 (optimiser state sharded), 2 (+ gradients), 3 (+ weights).
    zero_stage: int = 0
    accumulate: int = 1
    # Bytes per frozen weight of model.dtype (unless DeepSpeed casts them).
    model_bytes: int = 2
    # trainer.precision is 16-bit: under DeepSpeed the whole module, LoRA and encoders included, is cast to bf16;
    # without DeepSpeed Lightning runs the forward under bf16 autocast ("bf16-mixed"; the config refuses "-true"
    # there, `config.schema._check_half_weights`).
    half_precision: bool = True
    # optim.ema_decay is on: `LoraEma` keeps a float32 average of the LoRA beside it.
    ema: bool = False

    @property
    def deepspeed_half(self) -> bool:
        """DeepSpeed's bf16 mode (ZeRO with 16-bit precision): its engine casts every parameter to bf16."""
        return self.zero_stage >= 1 and self.half_precision

    @property
    def autocast(self) -> bool:
        """16-bit precision without DeepSpeed: the forward runs under torch.autocast (Lightning: no weight cache)."""
        return self.half_precision and not self.deepspeed_half

    @property
    def lora_bytes(self) -> int:
        """Bytes per LoRA weight and gradient: float32, as `apply_lora` keeps them, unless DeepSpeed's bf16 mode
        casts them back to bf16."""
        return 2 if self.deepspeed_half else 4


def tokens_per_frame(height: int, width: int, source: str) -> int:
    """(H/16)·(W/16) tokens for an H×W image; `source` names the setting in the error."""
    if height <= 0 or width <= 0 or height % PIXELS_PER_TOKEN or width % PIXELS_PER_TOKEN:
        raise ConfigError(f"{source}: {height}x{width} is not a positive multiple of {PIXELS_PER_TOKEN} on both sides")
    return (height // PIXELS_PER_TOKEN) * (width // PIXELS_PER_TOKEN)


def parse_resolution(text: str) -> tuple[int, int]:
    """ "480x832" -> (480, 832); "192p" / "480p" are DESIGN's named sizes."""
    if text in NAMED_RESOLUTIONS:
        return NAMED_RESOLUTIONS[text]
    match = re.fullmatch(r"(\d+)[x×](\d+)", text.strip())
    if match is None:
        raise ConfigError(f"--resolution: {text!r} is not HEIGHTxWIDTH or one of {', '.join(NAMED_RESOLUTIONS)}")
    height, width = int(match[1]), int(match[2])
    tokens_per_frame(height, width, "--resolution")
    return height, width


def zero_stage(strategy: str) -> int:
    """The ZeRO stage of a Lightning strategy name: deepspeed_stage_N -> N, anything else -> 0."""
    match = re.match(r"deepspeed_stage_(\d)", strategy)
    return int(match[1]) if match else 0
