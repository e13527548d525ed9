"""Typed configuration of a DreamShot run.

Every field has a default and a docstring-like comment; yaml files in `conf/` and `experiments/` only override.
The structured schema makes omegaconf reject unknown keys and wrong types; cross-field rules are checked in
`Config.validate` (called by the loader), so a bad combination fails at load time, not at step 5,000.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from dreamshot.config.values import RULES, TOY_WORLD_RULES, check_values
from dreamshot.data.sources import SOURCES, toy_world_sources
from dreamshot.utils.errors import ConfigError
from dreamshot.utils.secrets import check_endpoint, check_key_variable


@dataclass
class TransformerConfig:
    """Dimensions of diffusers' `WanTransformer3DModel` (used when no pretrained path is given)."""

    num_layers: int = 2
    num_attention_heads: int = 2
    # Wan splits a head into temporal / height / width RoPE parts: t = d - 4*(d//6), h = w = 2*(d//6).
    attention_head_dim: int = 24
    ffn_dim: int = 96
    text_dim: int = 32
    freq_dim: int = 32
    in_channels: int = 16
    rope_max_seq_len: int = 1024


@dataclass
class VaeConfig:
    """Dimensions of diffusers' `AutoencoderKLWan` (8x spatial, 4x temporal compression)."""

    base_dim: int = 8
    z_dim: int = 16
    num_res_blocks: int = 1


@dataclass
class TextEncoderConfig:
    """Dimensions of transformers' `UMT5EncoderModel`; the tiny one uses a byte-level tokenizer."""

    d_model: int = 32
    d_kv: int = 8
    d_ff: int = 64
    num_layers: int = 2
    num_heads: int = 4
    vocab_size: int = 384


@dataclass
class LoraConfig:
    """LoRA on the DiT (peft). Only these parameters train."""

    rank: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    # Attention and FFN linears of every Wan block (paper: rank 256 on attention and FFN).
    target_modules: list[str] = field(
        default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2"]
    )
    # A LoRA to fine-tune from (any file `--lora` reads). Its rank, alpha and modules become the run's: rank,
    # alpha and target_modules left at their defaults are taken from it, other values must agree with it.
    init_from: str | None = None


@dataclass
class ModelConfig:
    """The Wan backbone: built tiny from the dimensions below, or loaded from local weights."""

    # tiny | wan1_3b | wan14b: a label for logs and the planner.
    name: str = "tiny"
    # Local diffusers-format Wan2.1 directory (transformer/ vae/ text_encoder/ tokenizer/). None: random init.
    pretrained_path: str | None = None
    # Train or draw a full-size model (wan1_3b, wan14b, any DiT over ~100M parameters) from random weights on
    # purpose (benchmarks); otherwise such a model without pretrained_path is refused before anything is built.
    random_init: bool = False
    # Tokens per text (shot annotation or role prompt), zero-padded. Wan2.1 was trained with 512 and attends to
    # the padding (unmasked), so with pretrained weights a shorter text_len is cheaper but changes the outputs:
    # model=wan1_3b / wan14b keep 512.
    text_len: int = 32
    # Parameter dtype of the frozen parts: float32 | bfloat16.
    dtype: str = "float32"
    transformer: TransformerConfig = field(default_factory=TransformerConfig)
    vae: VaeConfig = field(default_factory=VaeConfig)
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class ToyWorldConfig:
    """The procedural storyboard set written when `data.manifest` is not given. Its limits (TOY_WORLD_RULES in
    values.py, `check_toy_world`) hold wherever a toy world is made: data.toy, eval.toy, `dreamshot toyworld`."""

    groups: int = 48
    seed: int = 0
    # Pixel size of the generated images (height, width), each at least TOY_MIN_SIDE (16).
    image_size: list[int] = field(default_factory=lambda: [96, 160])
    min_shots: int = 2
    max_shots: int = 6
    # At most TOY_MAX_ROLES (9): a group's roles have distinct colours.
    max_roles: int = 3
    # Share of groups labelled `real` (the rest `synthetic`), for data.sources ablations. The toy world has no
    # camera: a real group is drawn like any other, then its images get sensor noise (its masks stay exact).
    real_share: float = 0.0


@dataclass
class DataConfig:
    """Storyboard data: a JSONL manifest (DESIGN §4) or the toy world."""

    # Path to a manifest.jsonl. None: the toy world is generated into `<output_dir>/toyworld`.
    manifest: str | None = None
    toy: ToyWorldConfig = field(default_factory=ToyWorldConfig)
    # Training resolution (height, width); sides are multiples of 16. Other aspects become buckets of equal area.
    resolution: list[int] = field(default_factory=lambda: [64, 112])
    # Use aspect-ratio buckets of about the area of `resolution` (False: every group at `resolution`).
    aspect_buckets: bool = False
    # Longer storyboards are cut to a random window of this many consecutive shots (with trainer.context_parallel
    # on: of the most shots that fit trainer.device_memory_gib, as the planner predicts).
    max_shots: int = 12
    batch_size: int = 1
    num_workers: int = 0
    # Groups held out for validation (taken from the end of the manifest).
    val_groups: int = 4
    # Train only on groups from these sources (real / synthetic, dreamshot/data/sources.py); None: all; checked at
    # load (against data.toy.real_share without a manifest). Validation keeps every source, so runs that differ
    # only here (the data-source ablation) are validated on the same groups.
    sources: list[str] | None = None
    # Folder of precomputed VAE latents and umT5 embeddings (`dreamshot cache EXP` writes it). Set: training
    # reads every batch from it and fails if it is incomplete or was built differently. None: encode on the fly.
    cache_dir: str | None = None
    # Storyboards per cache shard (one safetensors file, written atomically; the unit of resume).
    cache_shard_size: int = 64


@dataclass
class DiffusionConfig:
    """Flow matching as in Wan (DESIGN §2, Eq. 3-4)."""

    # Timestep shift s: t <- s*t / (1 + (s-1)*t).
    shift: float = 3.0
    # per_token: clean frames carry timestep 0 (diffusers per-token timestep); global: one t per sample.
    timestep_mode: str = "per_token"


@dataclass
class ModeMixConfig:
    """Probability of each training mode per batch (DESIGN §2 "Modes"); they must sum to 1. Inference refuses a
    condition set the mix never trains (dreamshot/diffusion/conditioning.py: `check_trained`)."""

    t2s: float = 0.2
    r2s: float = 0.5
    s2s: float = 0.15
    # References and the first m shots together: a story with references and previous shots, or a re-roll of
    # shots of an r2s storyboard (`dreamshot generate --regenerate`), conditions on both.
    r2s_s2s: float = 0.15


# Storyboard RoPE layouts (paper Tab. 3), built by dreamshot/models/layout.py.
POSITION_MODES = ("refs_first", "phase", "neg", "last")


@dataclass
class StoryboardConfig:
    """How a storyboard becomes one DiT sequence: positions, training modes, condition dropout."""

    # refs_first | phase | neg | last (paper Tab. 3; dreamshot/models/layout.py).
    layout: str = "refs_first"
    # `phase` layout: angle (radians) added to reference tokens' temporal rotation (the paper does not give it).
    phase: float = 1.5707963267948966
    # `neg` layout (Neg-Pos, "shifts the effective positional index backward"): shots keep their story positions
    # 0..N-1 and the K references take -K-g..-1-g, g = this gap of empty positions. g = 0 would be `refs_first`
    # moved by -K, which RoPE cannot tell apart (it sees only differences). The paper does not give g; 4 keeps
    # the farthest reference-to-shot distance of the longest training storyboards (4 references, 12 shots: 19)
    # inside the 21 latent frames of Wan2.1's 81-frame pretraining clips.
    neg_offset: float = 4.0
    modes: ModeMixConfig = field(default_factory=ModeMixConfig)
    # Probability that a batch drops every condition frame and every shot text together (negative prompt): it
    # trains v_u of Eq. 9. With the default mix, 0.08 gives v_u about 10% of the samples (t2s batches whose texts
    # are dropped add ~2.5%), the share of usual classifier-free guidance training.
    drop_joint: float = 0.08
    # Probability that a batch with references trains without them, shot texts kept (r2s as t2s, r2s_s2s as s2s).
    drop_refs: float = 0.1
    # Probability that a sample's shot texts are replaced by the negative prompt (the v_r branch of Eq. 9).
    drop_text: float = 0.1
    negative_prompt: str = ""


@dataclass
class RaclConfig:
    """Role-Attention Consistency Loss (DESIGN §2, Eq. 5-8)."""

    # λ in L = L_FM + λ·L_RACL; 0 captures nothing in training. Curriculum phases switch it on or off.
    weight: float = 0.0
    # DiT blocks whose self-attention is captured (negative indices count from the end), at least one, each block
    # once. None: the middle half.
    blocks: list[int] | None = None
    # A token belongs to a role where the role's mask covers at least this share of its 16x16 pixel cell.
    mask_threshold: float = 0.5
    # Shots where a role is absent push the role's attention mass on them (softmax over all keys) towards zero, by
    # BCE against 0; the max-scaled map of the other terms cannot approach an all-zero label.
    absent_negative: bool = False
    # Log the role-attention diagnostic (in-mask share, confusion) in validation, whatever the weight.
    diagnostic: bool = True


@dataclass
class PhaseConfig:
    """One curriculum phase (DESIGN §2 "Curriculum")."""

    steps: int = 10000
    resolution: list[int] = field(default_factory=lambda: [192, 336])
    # Train with L_FM + racl.weight·L_RACL in this phase (False: L_FM only).
    use_racl: bool = True


@dataclass
class OptimConfig:
    """AdamW over the LoRA parameters."""

    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    warmup_steps: int = 0
    # Learning rate after the warm-up: constant | linear | cosine, the last two decaying from lr to
    # min_lr_ratio·lr at trainer.max_steps.
    schedule: str = "constant"
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0
    # Exponential moving average of the LoRA weights, updated every optimizer step (0: off; e.g. 0.999). On, the
    # run's LoRA files hold the averaged weights; checkpoints keep both (resume continues the average).
    # Under DeepSpeed it averages the fp32 master weights, each rank its own fragment of them (ZeRO-2 and 3).
    ema_decay: float = 0.0


@dataclass
class SampleConfig:
    """A storyboard drawn during training with the weights being trained: a contact sheet under
    `<output_dir>/samples/`, logged to W&B as `samples/storyboard`."""

    # Every n optimizer steps (0: never).
    every_n_steps: int = 0
    # Story file to draw (the format of `dreamshot generate`). None: the first validation storyboard, from its
    # references and annotations (r2s), drawn above its ground-truth shots.
    story: str | None = None
    # Sampler steps (few: it runs inside training).
    steps: int = 8


# Lightning strategies a run can use (dreamshot/training/strategy.py builds them).
STRATEGIES = ("auto", "ddp", "ddp_spawn", "deepspeed_stage_2", "deepspeed_stage_3")
ACCELERATORS = ("cpu", "gpu", "cuda", "mps", "auto")
PRECISIONS = ("32-true", "16-mixed", "bf16-mixed", "16-true", "bf16-true", "64-true")
LOGGER_MODES = ("offline", "online", "disabled")
# The strategies whose process groups a context-parallel mesh can be built on (one process per device).
CONTEXT_PARALLEL_STRATEGIES = ("ddp", "ddp_spawn", "deepspeed_stage_2", "deepspeed_stage_3")
CONTEXT_PARALLEL_ATTENTION = ("ulysses", "ring")


@dataclass
class ContextParallelConfig:
    """Context parallelism: one storyboard's tokens split over a group of processes (GPUs), in training and in
    sampling (dreamshot/models/wan/context_parallel.py, docs/multinode.md)."""

    # Processes per storyboard; 1: off. Must divide the world size (training: trainer.devices x trainer.num_nodes;
    # sampling: the torchrun processes, all in one group) and, with ulysses, the attention heads (14B: 40, 1.3B: 12).
    degree: int = 1
    # ulysses: all-to-all, each process attends every token for degree-th of the heads (any attention kernel,
    # CPU too); a sequence the degree does not divide is padded and the padding masked out. ring: key/value
    # chunks passed around the group (no rule on the heads), GPU kernels that return the log-sum-exp only, and
    # the degree must divide the tokens per frame (ring attention cannot mask padding; so no data.aspect_buckets,
    # and in sampling the story's size must give such frames).
    attention: str = "ulysses"


@dataclass
class TrainerConfig:
    """Lightning Trainer settings."""

    max_steps: int = 100
    # cpu | gpu | cuda | mps | auto (Lightning's accelerators).
    accelerator: str = "cpu"
    devices: int = 1
    num_nodes: int = 1
    # auto | ddp | ddp_spawn | deepspeed_stage_2 | deepspeed_stage_3 (DeepSpeed ZeRO-2 / ZeRO-3, GPUs only);
    # built by dreamshot/training/strategy.py.
    strategy: str = "auto"
    # One of PRECISIONS (Lightning's names): 32-true | 16-mixed | bf16-mixed | 16-true | bf16-true | 64-true.
    # 16-true / bf16-true need a deepspeed strategy (fp32 masters), where they mean bf16-mixed (`_check_half_weights`).
    precision: str = "32-true"
    gradient_checkpointing: bool = False
    # torch.compile the DiT blocks (a block capturing role attention runs eagerly for that call): fuses their
    # elementwise work; the first steps pay the compilation, and a new storyboard shape may compile once more.
    compile_blocks: bool = False
    # Log metrics every n optimizer steps; when stdout is not a terminal, also print a progress line.
    log_every_n_steps: int = 10
    # Save a checkpoint every n optimizer steps (and at the end).
    checkpoint_every_n_steps: int = 50
    # Keep only the newest n step checkpoints (`last.ckpt` is kept too). None: keep every one.
    keep_last_checkpoints: int | None = None
    # Validate every n optimizer steps.
    val_check_interval: int = 50
    accumulate_grad_batches: int = 1
    # Resume from this checkpoint (a file or DeepSpeed folder written by a run): `last` is the output_dir's own
    # checkpoints/last.ckpt when it has one (else the run starts fresh). Only RESUME_SAFE_KEYS may differ from
    # the checkpoint's config (training/resume.py; trainer.max_steps only under optim.schedule=constant);
    # output_dir then holds `resumes.jsonl`, a line per resume.
    ckpt_path: str | None = None
    # Start over in an output_dir that holds another run: its checkpoints, LoRA files and summary are deleted
    # first. Without it such a folder is refused (resume it with ckpt_path=last, or pick another output_dir).
    overwrite: bool = False
    # Steps with a non-finite loss or gradient that may be skipped (no update) before the run stops. Under
    # precision=16-mixed, overflowing gradients are left to the GradScaler, which skips those steps itself.
    max_nonfinite_steps: int = 0
    sample: SampleConfig = field(default_factory=SampleConfig)
    # Split one storyboard's sequence over a group of processes (needs a strategy in CONTEXT_PARALLEL_STRATEGIES).
    # Data and per-step randomness then follow the data-parallel rank: the degree processes of a group train on
    # the same storyboard.
    context_parallel: ContextParallelConfig = field(default_factory=ContextParallelConfig)
    # GiB per device that a storyboard must fit in, as `dreamshot plan` predicts: with context parallelism on,
    # storyboards longer than data.max_shots train whole when they fit, else in windows of the longest that fits.
    device_memory_gib: float = 80.0


@dataclass
class LoggerConfig:
    """Experiment tracking: W&B (offline by default, WANDB_MODE respected) or CSV."""

    # wandb | csv
    backend: str = "wandb"
    project: str = "dreamshot"
    group: str | None = None
    # offline | online | disabled (the WANDB_MODE environment variable wins when set).
    mode: str = "offline"


@dataclass
class InferenceConfig:
    """Storyboard sampling (DESIGN §2 "Reference-free CFG"). The negative prompt is `storyboard.negative_prompt`,
    the one the guidance branches were trained with (condition dropout)."""

    # Sampler steps (Wan uses 50).
    steps: int = 50
    # unipc (Wan's default flow-matching solver) | euler (on the same sigmas as unipc).
    scheduler: str = "unipc"
    # The sampler's timestep shift (Wan: 3.0 at 480p, 5.0 at 720p); training's shift is `diffusion.shift`.
    shift: float = 3.0
    # Eq. 9: weight of the condition frames (references, given shots) against no conditions.
    omega1: float = 4.0
    # Eq. 9: weight of the shot prompts against the negative prompt (the CFG scale in t2s).
    omega2: float = 5.0
    # Seed of the initial noise (a story file's `seed` and `dreamshot generate --seed` take precedence).
    seed: int = 0
    # Exact (the same output within float rounding; speed in benchmarks/RESULTS.md "Sampling"):
    # Project every distinct frame text to each block's cross-attention keys and values once per storyboard instead
    # of in every forward of every step. Costs 2·U·L·D values per block for U distinct texts (14B at 480p, 8 shots +
    # 3 references, L = 512: 4.7 GiB in bf16); false computes them per forward.
    cache_text: bool = True
    # Fold the LoRA (both, with `second_lora`) into the base weights when a model is loaded for generate / eval, so a
    # forward runs no LoRA branch. Exact in float32; in bfloat16 the merged weights are rounded to bfloat16 once.
    merge_lora: bool = True
    # torch.compile every DiT block for sampling (as trainer.compile_blocks for training): compiles on the first
    # storyboard (seconds to minutes), then fuses the blocks' elementwise work; pays off over many storyboards.
    compile: bool = False
    # Opt-in, approximate (off by default; speed-up and drift in docs/sampling.md, benchmarks/RESULTS.md "Sampling"):
    # A diffusers cache hook on the DiT's blocks (diffusers.hooks): none | first_block (FirstBlockCache: skip the
    # other blocks while the first block's output changes little) | taylorseer (TaylorSeer: predict the attention
    # and FFN outputs from earlier steps between full steps; keeps those outputs: ~24 GiB for the 1.3B at 480p, too
    # much for the 14B without use_lite_mode) | mag (MagCache: skip steps by the model's calibrated residual
    # magnitudes). Faster the more it skips; the output drifts from the exact sampler's.
    cache: str = "none"
    # Options of that diffusers config (FirstBlockCacheConfig, TaylorSeerCacheConfig, MagCacheConfig), by field name,
    # e.g. {threshold: 0.1} for first_block; mag needs {mag_ratios: [...]} from a {calibrate: true} run. Checked
    # against the diffusers class when a sampler starts.
    cache_options: dict[str, Any] = field(default_factory=dict)
    # Share of the steps, from the first, that apply guidance (Eq. 9: two or three branches a step); the rest use v_c
    # alone (one forward, Eq. 9 with ω1 = ω2 = 1). 1: every step (exact); 0.5: about 1.5x faster per step (a guided
    # r2s step costs 2.7x an unguided one), the late steps unguided; 0: none, for a guidance-distilled second LoRA.
    guidance_fraction: float = 1.0
    # Scale of the run's own LoRA (1: as trained).
    lora_weight: float = 1.0
    # A second LoRA stacked on the run's for generate / eval (any format docs/lora.md reads, e.g. a step-distilled
    # Wan LoRA for a few-step schedule: steps=4, shift=5, guidance_fraction=0); its own rank and alpha. None: none.
    second_lora: str | None = None
    # Scale of `second_lora`.
    second_lora_weight: float = 1.0
    # Sample one storyboard on a group of processes started by torchrun (degree = --nproc-per-node).
    context_parallel: ContextParallelConfig = field(default_factory=ContextParallelConfig)


@dataclass
class ClipEncoderConfig:
    """An open_clip image tower: CIDS's encoder for non-human and unrealistic-human characters."""

    # open_clip architecture name (ViT-L-14-quickgelu is OpenAI's CLIP ViT-L/14).
    arch: str = "ViT-L-14-quickgelu"
    # Local open_clip checkpoint of OpenAI CLIP ViT-L/14 (.safetensors or .bin). None: CIDS is reported missing.
    weights: str | None = None


@dataclass
class CsdConfig:
    """The CSD style tower: CLIP ViT-L/14 visual tower whose projection is CSD's style head."""

    arch: str = "ViT-L-14-quickgelu"
    # Local CSD checkpoint (backbone.* and last_layer_style keys, e.g. csd_vit-large.pth). None: CSD missing.
    weights: str | None = None


@dataclass
class AestheticConfig:
    """Aesthetic Predictor v2.5: SigLIP so400m vision tower and the v2.5 scoring head."""

    # Local transformers folder of google/siglip-so400m-patch14-384. None: AES is reported missing.
    siglip: str | None = None
    # Local head weights (aesthetic_predictor_v2_5.pth). None: AES is reported missing.
    head: str | None = None


@dataclass
class FaceConfig:
    """ONNX face models for `realistic_human` characters (CIDS). Every configured recognition model is in the
    ensemble (the mean of their cosines); the published numbers average ArcFace, AdaFace IR-101 and FaceNet."""

    # Face detector with five landmarks (antelopev2's scrfd_10g_bnkps.onnx). None: CIDS missing on human stories.
    detector: str | None = None
    # ArcFace-style recognition models, read by insightface (antelopev2's glintr100.onnx).
    recognizers: list[str] = field(default_factory=list)
    # ONNX export of AdaFace IR-101 (adaface_ir101_webface12m.ckpt; docs/evaluation.md). None: not in the ensemble.
    adaface: str | None = None
    # ONNX export of FaceNet (InceptionResnetV1, VGGFace2 weights; docs/evaluation.md). None: not in the ensemble.
    facenet: str | None = None
    # Square detector input side in pixels.
    det_size: int = 640


@dataclass
class DetectorConfig:
    """Open-vocabulary character detector (GroundingDINO through transformers) that crops characters."""

    # Local transformers folder of IDEA-Research/grounding-dino-tiny. None: detector crops are unavailable.
    weights: str | None = None
    prompt: str = "character"
    box_threshold: float = 0.25
    text_threshold: float = 0.25


@dataclass
class JudgeConfig:
    """The vision-language judge of the Alignment score (any OpenAI-compatible chat-completions endpoint)."""

    # Base URL ending before /chat/completions, e.g. https://api.openai.com/v1 (no user, password or key in it:
    # refused, see utils/secrets.py). None: Alignment is missing.
    endpoint: str | None = None
    model: str = "gpt-4.1"
    # Environment variable holding the API key (the key itself never goes into a config or a log: a value that
    # looks like a key is refused).
    api_key_env: str = "OPENAI_API_KEY"
    temperature: float = 0.0
    seed: int = 123
    max_tokens: int = 512
    # Attempts per question; each failed attempt raises the temperature by 0.1; 0 when every answer that arrived
    # fails to parse (a judge that gives no answer makes Alignment missing, never 0).
    max_retries: int = 10
    # Seconds to wait after a failed attempt (an HTTP error about that request, a malformed reply).
    retry_wait_s: float = 10.0
    # Requests in flight at once, at most, per judge (shared by every thread that asks it).
    max_concurrency: int = 4
    # HTTP 429 / 5xx answers and an unreachable server are asked again at the same temperature (not attempts):
    # the n-th wait is the server's Retry-After when it sends one, else drawn uniformly from [0,
    # min(backoff_max_s, backoff_base_s * 2**n)]. A request whose next wait would end backoff_total_s after its
    # first try makes the judge unavailable (Alignment missing with the reason).
    backoff_base_s: float = 1.0
    backoff_max_s: float = 60.0
    backoff_total_s: float = 300.0
    timeout_s: float = 120.0
    # Side of the square JPEG the judge sees.
    image_size: int = 512
    # Answer cache (JSON lines). None: `<eval output>/judge_cache.jsonl`.
    cache: str | None = None
    # Folder of <dimension>.txt prompts replacing the built-in ones (e.g. the published prompt files).
    prompt_dir: str | None = None


@dataclass
class EvalCallbackConfig:
    """Storyboard metrics on a small fixed subset of `eval.benchmark` during training."""

    enabled: bool = False
    every_n_steps: int = 100
    # First stories of the benchmark.
    stories: int = 2
    # Sampler steps per storyboard (few: it runs inside training).
    steps: int = 4


@dataclass
class EvalConfig:
    """Evaluation (DESIGN §3, EVAL.md): benchmarks, metric weights, the judge. Weight paths belong in
    conf/local.yaml; a metric whose weights are not set is reported as missing."""

    # toy | dreamshot_test | vistorybench
    benchmark: str = "toy"
    # r2s | t2s | s2s
    mode: str = "r2s"
    # ViStoryBench split: full | lite.
    split: str = "full"
    # vistorybench: the dataset folder (holding ViStory/); dreamshot_test: the test file (.jsonl).
    data: str | None = None
    # Where character crops come from: detector | masks (the benchmark's role masks, drawn on its true shots) |
    # auto (masks on the toy benchmark, else the detector).
    crops: str = "auto"
    # Metrics to compute: cids, csd, aes, alignment, toy_proxy (weight-free, toy benchmark only).
    metrics: list[str] = field(default_factory=lambda: ["cids", "csd", "aes", "alignment", "toy_proxy"])
    # Torch device of the extractors. None: cuda when available, else cpu.
    device: str | None = None
    # Sampler steps when generating (None: inference.steps).
    steps: int | None = None
    # The toy benchmark: a toy world drawn with its own seed, so it is not the training set.
    toy: ToyWorldConfig = field(default_factory=lambda: ToyWorldConfig(groups=8, seed=1000))
    clip: ClipEncoderConfig = field(default_factory=ClipEncoderConfig)
    csd: CsdConfig = field(default_factory=CsdConfig)
    aes: AestheticConfig = field(default_factory=AestheticConfig)
    face: FaceConfig = field(default_factory=FaceConfig)
    detector: DetectorConfig = field(default_factory=DetectorConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    callback: EvalCallbackConfig = field(default_factory=EvalCallbackConfig)


@dataclass
class Config:
    """A DreamShot run."""

    # Run name; the experiment file's name when loaded from `experiments/`.
    name: str = "run"
    tags: list[str] = field(default_factory=list)
    seed: int = 0
    # Run outputs: checkpoints, LoRA, logs, toy data. Relative paths are relative to the working directory. A sweep
    # member writes into `<output_dir>/<member>` unless output_dir names it already (`${name}`, as the default
    # does, or a last folder named after the member).
    output_dir: str = "outputs/${name}"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    storyboard: StoryboardConfig = field(default_factory=StoryboardConfig)
    racl: RaclConfig = field(default_factory=RaclConfig)
    # Training phases run in order inside one run. Empty: one phase, data.resolution, racl.weight, trainer.max_steps.
    # With phases, `trainer.max_steps=N` on the command line scales every phase to N steps in all (each keeps its
    # share), and `curriculum.0.steps=N` alone sets trainer.max_steps to the new total; files must agree.
    curriculum: list[PhaseConfig] = field(default_factory=list)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def phases(self) -> list[PhaseConfig]:
        """The training phases: the curriculum, or one phase made of the flat settings."""
        if self.curriculum:
            return list(self.curriculum)
        return [PhaseConfig(self.trainer.max_steps, list(self.data.resolution), use_racl=True)]

    def racl_weight(self, phase: int) -> float:
        """λ in phase `phase` (0 where the phase trains L_FM only)."""
        phases = self.phases()
        return self.racl.weight if phases[min(phase, len(phases) - 1)].use_racl else 0.0

    def racl_blocks(self) -> list[int]:
        """Captured block indices, non-negative and sorted."""
        layers = self.model.transformer.num_layers
        if self.racl.blocks is None:
            return list(range(layers // 4, max(3 * layers // 4, layers // 4 + 1)))
        return sorted(i % layers for i in self.racl.blocks)

    def validate(self) -> None:
        """Value ranges (`check_values`) and cross-field rules; raises ConfigError naming the keys."""
        check_values(self, RULES)
        if len(self.optim.betas) != 2 or not all(0 <= b < 1 for b in self.optim.betas):
            raise ConfigError(
                f"optim.betas must be [beta1, beta2], each in [0, 1), got {list(self.optim.betas)}", key="optim.betas"
            )
        if not self.model.lora.target_modules:
            raise ConfigError(
                "model.lora.target_modules must name at least one module", key="model.lora.target_modules"
            )
        if self.model.pretrained_path is None:
            check_model_dims(self.model)
        _check_sizes(self.data.resolution, "data.resolution", multiple=16)
        check_toy_world(self.data.toy, "data.toy.")
        check_toy_world(self.eval.toy, "eval.toy.")
        _check_choice(self.diffusion.timestep_mode, ("per_token", "global"), "diffusion.timestep_mode")
        _check_choice(self.logger.backend, ("wandb", "csv"), "logger.backend")
        _check_choice(self.logger.mode, LOGGER_MODES, "logger.mode")
        _check_choice(self.model.dtype, ("float32", "bfloat16"), "model.dtype")
        _check_choice(self.storyboard.layout, POSITION_MODES, "storyboard.layout")
        _check_probabilities(self.storyboard)
        _check_inference(self.inference)
        _check_eval(self.eval)
        _check_racl(self)
        if self.data.manifest is None and self.data.val_groups >= self.data.toy.groups:
            raise ConfigError(
                f"data.val_groups={self.data.val_groups} leaves no training group of the "
                f"data.toy.groups={self.data.toy.groups} toy storyboards"
            )
        _check_sources(self.data)
        _check_curriculum(self)
        _check_trainer(self.trainer)
        _check_context_parallel(self)
        _check_schedule_and_samples(self)
        head_dim = self.model.transformer.attention_head_dim
        if head_dim % 2 or head_dim < 6:
            raise ConfigError(
                f"model.transformer.attention_head_dim must be even and >= 6, got {head_dim}",
                key="model.transformer.attention_head_dim",
            )


def _check_trainer(trainer: TrainerConfig) -> None:
    _check_choice(trainer.strategy, STRATEGIES, "trainer.strategy")
    _check_choice(trainer.accelerator, ACCELERATORS, "trainer.accelerator")
    _check_choice(trainer.precision, PRECISIONS, "trainer.precision")
    _check_half_weights(trainer)
    if trainer.strategy.startswith("deepspeed") and trainer.accelerator not in ("gpu", "cuda"):
        raise ConfigError(
            f"trainer.strategy={trainer.strategy} runs on CUDA GPUs only: set trainer.accelerator=gpu "
            f"(got {trainer.accelerator!r}), or use trainer.strategy=ddp on CPU"
        )
    if trainer.overwrite and trainer.ckpt_path:
        raise ConfigError(
            "trainer.overwrite starts a run over, trainer.ckpt_path resumes one: set only one of them",
            key="trainer.overwrite",
        )
    if trainer.compile_blocks and trainer.strategy == "deepspeed_stage_3":
        # ZeRO-3 gathers every weight through module hooks inside the blocks, which dynamo cannot compile through.
        raise ConfigError(
            "trainer.compile_blocks is not supported with trainer.strategy=deepspeed_stage_3: "
            "set trainer.compile_blocks=false (trainer=zero3 does)"
        )


def _check_half_weights(trainer: TrainerConfig) -> None:
    """Refuse `16-true` / `bf16-true` without DeepSpeed.

    There Lightning's HalfPrecision casts the whole module and every float tensor of each batch to 16 bits, and
    AdamW updates the LoRA weights in place with no fp32 master: an update under half a weight's bf16 spacing is
    rounded away, and AdamW moves a weight by about lr (1e-4) a step, the spacing of a bf16 weight of 0.02 (8e-5),
    so many updates are lost and the EMA averages rounded weights. It would also round the cached float32 latents
    z_0 the loss regresses, and cast the frozen VAE and umT5 that the latent cache and sampling run in float32.
    It saves nothing a run needs: the frozen backbone is already stored in `model.dtype`, and `bf16-mixed` runs
    the matmuls in bf16 too (autocast) with the LoRA in fp32. DeepSpeed's bf16 mode casts the module either way
    and keeps fp32 masters in its optimiser, so there `-true` trains as `-mixed` does.
    """
    if trainer.precision in ("16-true", "bf16-true") and not trainer.strategy.startswith("deepspeed"):
        mixed = trainer.precision.replace("true", "mixed")
        raise ConfigError(
            f"trainer.precision={trainer.precision} with trainer.strategy={trainer.strategy} trains the LoRA in "
            f"16 bits with no fp32 master weights: use trainer.precision={mixed} (model.dtype=bfloat16 keeps the "
            "frozen backbone in bf16), or a deepspeed strategy",
            key="trainer.precision",
        )


def _check_context_parallel(cfg: Config) -> None:
    heads = cfg.model.transformer.num_attention_heads
    for key, cp in (("trainer", cfg.trainer.context_parallel), ("inference", cfg.inference.context_parallel)):
        key = f"{key}.context_parallel"
        _check_choice(cp.attention, CONTEXT_PARALLEL_ATTENTION, f"{key}.attention")
        if cp.degree < 1:
            raise ConfigError(f"{key}.degree must be >= 1, got {cp.degree}")
        if cp.degree > 1 and cp.attention == "ulysses" and heads % cp.degree:
            raise ConfigError(
                f"{key}.degree={cp.degree} does not divide the {heads} attention heads "
                "(model.transformer.num_attention_heads) that ulysses splits; choose a divisor or attention=ring"
            )
    trainer, cp = cfg.trainer, cfg.trainer.context_parallel
    if trainer.device_memory_gib <= 0:
        raise ConfigError(f"trainer.device_memory_gib must be > 0, got {trainer.device_memory_gib}")
    if cp.degree == 1:
        return
    if trainer.strategy not in CONTEXT_PARALLEL_STRATEGIES:
        raise ConfigError(
            f"trainer.context_parallel.degree={cp.degree} needs a strategy with one process per device to build "
            f"its groups on (trainer.strategy={' or '.join(CONTEXT_PARALLEL_STRATEGIES)}); "
            f"trainer.strategy={trainer.strategy} cannot host it"
        )
    world = trainer.devices * trainer.num_nodes
    if world % cp.degree:
        raise ConfigError(
            f"trainer.context_parallel.degree={cp.degree} does not divide the world size {world} "
            f"(trainer.devices={trainer.devices} x trainer.num_nodes={trainer.num_nodes})"
        )
    if cp.attention == "ring":
        if trainer.accelerator not in ("gpu", "cuda"):
            raise ConfigError(
                "trainer.context_parallel.attention=ring needs GPU attention kernels that return the log-sum-exp "
                f"(got trainer.accelerator={trainer.accelerator!r}); use attention=ulysses on CPU"
            )
        if cfg.data.aspect_buckets:
            raise ConfigError(
                "trainer.context_parallel.attention=ring cannot pad, and data.aspect_buckets makes frames of other "
                "sizes than the resolution's, whose tokens the degree need not divide: set data.aspect_buckets=false "
                "or use attention=ulysses"
            )
        for i, phase in enumerate(cfg.phases()):
            tokens = (phase.resolution[0] // 16) * (phase.resolution[1] // 16)
            if tokens % cp.degree:
                where = f"curriculum[{i}].resolution" if cfg.curriculum else "data.resolution"
                raise ConfigError(
                    f"trainer.context_parallel.attention=ring cannot pad: degree {cp.degree} must divide the "
                    f"{tokens} tokens per frame of {where}={list(phase.resolution)}; use attention=ulysses"
                )


def _check_schedule_and_samples(cfg: Config) -> None:
    optim, trainer, sample = cfg.optim, cfg.trainer, cfg.trainer.sample
    _check_choice(optim.schedule, ("constant", "linear", "cosine"), "optim.schedule")
    if sample.every_n_steps and sample.story is None and cfg.data.val_groups < 1:
        raise ConfigError("trainer.sample draws the first validation storyboard: set data.val_groups >= 1 or a story")
    if trainer.strategy == "deepspeed_stage_3":
        # A forward drawn by rank 0's group alone (a sample, the storyboard metrics) would wait for the other ranks
        # to gather the weights.
        drawn = (
            ("trainer.sample.every_n_steps", sample.every_n_steps),
            ("eval.callback.enabled", cfg.eval.callback.enabled),
        )
        for key, on in drawn:
            if on:
                raise ConfigError(f"{key} is not supported with trainer.strategy=deepspeed_stage_3")


def check_model_dims(model: ModelConfig) -> None:
    """The DiT's inputs fit the VAE's latents and umT5's embeddings: the rule of a model built from these
    dimensions (random init, the planner's meta model); loaded weights bring their own."""
    if model.transformer.text_dim != model.text_encoder.d_model:
        raise ConfigError(
            f"model.transformer.text_dim ({model.transformer.text_dim}) must equal "
            f"model.text_encoder.d_model ({model.text_encoder.d_model})",
            key="model.transformer.text_dim",
        )
    if model.transformer.in_channels != model.vae.z_dim:
        raise ConfigError(
            f"model.transformer.in_channels ({model.transformer.in_channels}) must equal "
            f"model.vae.z_dim ({model.vae.z_dim})",
            key="model.transformer.in_channels",
        )


def _check_sizes(size: list[int], key: str, multiple: int) -> None:
    if len(size) != 2 or any(s <= 0 or s % multiple for s in size):
        raise ConfigError(f"{key} must be [height, width], positive multiples of {multiple}; got {list(size)}", key=key)


def _check_choice(value: str, choices: tuple[str, ...], key: str) -> None:
    if value not in choices:
        raise ConfigError(f"{key} must be one of {', '.join(choices)}; got {value!r}", key=key)


def _check_sources(data: DataConfig) -> None:
    sources = data.sources
    if sources is not None and not sources:
        raise ConfigError(
            f"data.sources is empty: name one of {', '.join(SOURCES)} at least (null: all)", key="data.sources"
        )
    for source in sources or ():
        _check_choice(source, SOURCES, "data.sources")
    if data.manifest is not None or not sources:
        return
    # Known before the toy world is written: its labels are the first draws of the training groups' generators.
    toy = data.toy
    drawn = toy_world_sources(toy.real_share, toy.seed, toy.groups - data.val_groups)
    if not set(sources) & set(drawn):
        raise ConfigError(
            f"data.sources=[{','.join(sources)}] keeps no training group: every training group of the toy world "
            f"(data.toy.real_share={toy.real_share}, data.toy.seed={toy.seed}, data.toy.groups={toy.groups} less "
            f"data.val_groups={data.val_groups}) is {drawn[0]}",
            key="data.sources",
        )


def _check_probabilities(storyboard: StoryboardConfig) -> None:
    weights = asdict(storyboard.modes)
    if any(p < 0 for p in weights.values()) or abs(sum(weights.values()) - 1) > 1e-6:
        raise ConfigError(f"storyboard.modes must be non-negative and sum to 1, got {weights}")


def check_toy_world(toy: ToyWorldConfig, prefix: str = "") -> None:
    """Raise ConfigError at the first value of `toy` the toy world cannot draw (TOY_WORLD_RULES, then the shot
    counts' order); `prefix` names where `toy` sits in the run config ("data.toy."), "" outside one."""
    _check_sizes(toy.image_size, f"{prefix}image_size", multiple=1)
    check_values(toy, TOY_WORLD_RULES, prefix)
    if toy.min_shots > toy.max_shots:
        raise ConfigError(
            f"need {prefix}min_shots <= {prefix}max_shots, got {toy.min_shots} > {toy.max_shots}",
            key=f"{prefix}min_shots",
        )


def _check_racl(cfg: Config) -> None:
    layers, blocks = cfg.model.transformer.num_layers, cfg.racl.blocks
    if blocks is None:
        return
    if not blocks:
        raise ConfigError("racl.blocks is empty: name at least one block (null: the middle half)", key="racl.blocks")
    named: dict[int, int] = {}  # block -> the entry that named it first
    for index in blocks:
        if not -layers <= index < layers:
            raise ConfigError(f"racl.blocks: block {index} does not exist in a {layers}-layer model", key="racl.blocks")
        block = index % layers
        if block in named:
            raise ConfigError(
                f"racl.blocks: {named[block]} and {index} both name block {block} of the {layers}-layer model",
                key="racl.blocks",
            )
        named[block] = index


def _check_curriculum(cfg: Config) -> None:
    for i, phase in enumerate(cfg.curriculum):
        _check_sizes(phase.resolution, f"curriculum[{i}].resolution", multiple=16)
    total = sum(phase.steps for phase in cfg.curriculum)
    if cfg.curriculum and total != cfg.trainer.max_steps:
        raise ConfigError(
            f"trainer.max_steps ({cfg.trainer.max_steps}) must equal the curriculum's total steps ({total})"
        )


# inference.cache: diffusers' cache hooks the sampler can apply (dreamshot/models/wan/block_cache.py).
BLOCK_CACHES = ("none", "first_block", "taylorseer", "mag")


def _check_inference(inference: InferenceConfig) -> None:
    _check_choice(inference.scheduler, ("unipc", "euler"), "inference.scheduler")
    _check_choice(inference.cache, BLOCK_CACHES, "inference.cache")
    if inference.cache == "none" and inference.cache_options:
        raise ConfigError(f"inference.cache_options {sorted(inference.cache_options)} set, but inference.cache=none")
    if inference.cache == "mag" and inference.guidance_fraction < 1:
        # MagCache indexes its calibrated ratios by the calls of each kind of forward, which guidance_fraction splits.
        raise ConfigError(
            "inference.cache=mag counts steps per kind of forward: it needs inference.guidance_fraction=1"
        )
    if inference.cache == "first_block" and inference.context_parallel.degree > 1:
        # Each rank would decide from its own tokens whether to skip the blocks, and a rank that skips them leaves
        # the others waiting in the attention's all-to-all.
        raise ConfigError(
            "inference.cache=first_block decides per rank from its tokens: it cannot run with "
            f"inference.context_parallel.degree={inference.context_parallel.degree} (taylorseer and mag can)"
        )


EVAL_BENCHMARKS = ("toy", "dreamshot_test", "vistorybench")
EVAL_MODES = ("r2s", "t2s", "s2s")
EVAL_METRICS = ("cids", "csd", "aes", "alignment", "toy_proxy")


def _check_eval(ev: EvalConfig) -> None:
    _check_choice(ev.benchmark, EVAL_BENCHMARKS, "eval.benchmark")
    _check_choice(ev.mode, EVAL_MODES, "eval.mode")
    _check_choice(ev.split, ("full", "lite"), "eval.split")
    _check_choice(ev.crops, ("auto", "detector", "masks"), "eval.crops")
    for name in ev.metrics:
        _check_choice(name, EVAL_METRICS, "eval.metrics")
    if ev.callback.enabled and ev.benchmark != "toy" and ev.data is None:
        raise ConfigError(f"eval.callback.enabled: the {ev.benchmark} benchmark needs eval.data")
    check_endpoint(ev.judge.endpoint, "eval.judge.endpoint", "eval.judge.api_key_env")
    check_key_variable(ev.judge.api_key_env, "eval.judge.api_key_env")
