"""Sampling speed and drift of DreamShot's sampler settings, with diffusers' `WanPipeline` beside them.

One r2s storyboard (K references + N shots, a random LoRA on the DiT) is drawn with every setting, the same seed,
the settings interleaved (peers.py's `interleaved`: one warm-up round, then rounds in alternating order). Seconds
are the process's CPU time on the CPU (other processes on a shared machine do not inflate it) and wall time with
the device drained on a GPU. Columns:
  s/board     one whole `StoryboardPipeline` call: encoding the request, the steps, decoding (median of the rounds);
  s/step      mean step of a call, the first step dropped (lower order, allocations), median of the rounds;
  ×per-step   per-step speed-up over `per_step` (the sampler before this work's exact savings); ×exact: over `exact`;
  fwd/step    DiT forwards per step; blocks/step: block evaluations per step (FFN calls: what a cache hook skips);
  drift       ||z − z_exact|| / ||z_exact|| of the final latents against `exact`, same seed.
Settings (`--settings`, comma list; `inference` keys in dreamshot/config/schema.py):
  per_step      text keys/values projected and the LoRA branch run in every forward (cache_text=false,
                merge_lora=false). The RoPE is computed once per storyboard here too, so ×per-step understates the
                saving against the code before it by the RoPE's share (2.8% of a tiny step in the profile below);
  exact         the defaults: text keys/values once per storyboard (shared by the branches), the LoRA folded in;
  compiled      exact with the blocks compiled (inference.compile); its first call, with compilation, is printed;
  fbc_005, fbc_01   diffusers' FirstBlockCache at threshold 0.05 / 0.1 (inference.cache=first_block);
  taylorseer    diffusers' TaylorSeer, a full step every 3 after 3 (inference.cache=taylorseer);
  guide_half    guidance on the first half of the steps, v_c alone after (inference.guidance_fraction=0.5);
  fast          `--preset fast` (dreamshot/inference/presets.py);
  few_step      a second LoRA (random, rank 4, written in ComfyUI's format and read back) stacked on ours, 4 UniPC
                steps at shift 5 (before the shift: 1, 0.75, 0.5, 0.25, lightx2v's step list), no guidance. Its
                drift is against the exact sampler (`--steps` steps) with the same two LoRAs: with random weights
                it measures nothing about quality, only that the setting runs;
  diffusers     `WanPipeline` (peers.py's `diffusers_sampling`) on a video of the same K + N latent frames, guidance
                on (cond + uncond), its LoRA fused as ours is (`fuse_lora`): the ratio is per token of all forwards
                (ours 2(K+N)+N frames a step, its 2(K+N)).

What a profile of one step showed recomputed every step although it does not change (`--profile DIR` writes the
operator tables; tiny Wan, 3 + 8 frames at 96×160, before this work), and what became of it:
  - the text: the condition embedder's projection of every frame text (4096 → D → D for the 1.3B) and each
    block's cross-attention K/V projections and K norm, over the 2(K+N)+N frame texts of a step: 5% of the
    1.3B-shaped step (2 blocks), 4.6% of the tiny one. Now once per storyboard for the K+N+1 distinct texts
    (`CrossAttentionText`), each forward selecting its rows;
  - the LoRA branches: two skinny matmuls (and, in bf16, an fp32 cast of the input) per adapted linear per
    forward, 12-18% of the tiny step at rank 8. Now folded into the weights once (inference.merge_lora);
  - the RoPE cos/sin tables (float64 angles over all tokens): 2.8% of the tiny step. Now once per layout;
  - the time embedding: already once per distinct timestep and frame (per-frame modulation, forward.py);
  - left as they are: the patch embedding of the clean condition frames (a 1×2×2 convolution, 1.8% of the tiny
    step with the targets) and the output head on the condition frames (0.6%): splitting them from the targets
    costs more copies than it saves, and the condition frames' hidden states change every step anyway (joint
    self-attention), so nothing after the patch embedding can be reused.

    python benchmarks/sampling.py                                # tiny Wan, CPU, 50 steps
    python benchmarks/sampling.py --shape wan1_3b --steps 10 --settings per_step,exact,fbc_01,guide_half,few_step
    python benchmarks/sampling.py --device cuda --shape wan1_3b  # GPU: all 30 blocks at 480p (gpu_checks.sh)
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import types
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from omegaconf import OmegaConf
from peers import Row, bench_config, clock, diffusers_sampling, interleaved, work_of
from peers import parse_args as peer_arguments
from safetensors.torch import save_file
from train_throughput import profile_step

import dreamshot.inference.pipeline as pipeline_module
from dreamshot.config.load import apply_overrides
from dreamshot.config.schema import Config
from dreamshot.inference.loading import build_adapter, prepare_sampling, read_lora
from dreamshot.inference.pipeline import StoryboardPipeline, StoryboardRequest, initial_noise
from dreamshot.inference.presets import PRESETS
from dreamshot.models.wan.build import build_transformer_on_meta
from dreamshot.models.wan.lora import apply_lora, lora_state_dict
from dreamshot.models.wan.lora_formats import to_comfyui

SETTINGS = {
    "per_step": ["inference.cache_text=false", "inference.merge_lora=false"],
    "exact": [],
    "compiled": ["inference.compile=true"],
    "fbc_005": ["inference.cache=first_block", "inference.cache_options={threshold: 0.05}"],
    "fbc_01": ["inference.cache=first_block", "inference.cache_options={threshold: 0.1}"],
    "taylorseer": [
        "inference.cache=taylorseer",
        "inference.cache_options={cache_interval: 3, disable_cache_before_step: 3, taylor_factors_dtype: float32}",
    ],
    "guide_half": ["inference.guidance_fraction=0.5"],
    "fast": PRESETS["fast"],
    "few_step": ["inference.steps=4", "inference.shift=5.0", "inference.guidance_fraction=0.0"],
}
DEFAULT_SETTINGS = "per_step,exact,compiled,fbc_005,fbc_01,taylorseer,guide_half,fast,few_step"
# Goals of issue 19: exact savings per step (drift at most EXACT_DRIFT), some opt-in setting, our exact step per
# token against WanPipeline's.
GOALS = {"exact": 1.2, "opt_in": 2.0, "diffusers": 1.0}
EXACT_DRIFT = 1e-5
LORA_SCALE = 0.05  # of the random LoRA weights: large enough that a wrong merge or stack shows in the drift
SECOND_RANK = 4


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="tiny", choices=("tiny", "wan1_3b", "wan14b"), help="conf/model option")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--resolution", help="HEIGHTxWIDTH or 480p (default: 480p on a GPU, 96x160 on the CPU)")
    parser.add_argument("--layers", type=int, help="DiT blocks (default: all; 2 for a full-width shape on the CPU)")
    parser.add_argument("--steps", type=int, default=50, help="sampler steps of the exact settings")
    parser.add_argument("--rounds", type=int, default=2, help="timed rounds after the warm-up round")
    parser.add_argument("--settings", default=DEFAULT_SETTINGS, help=f"comma list of: {', '.join(SETTINGS)}")
    parser.add_argument("--no-diffusers", action="store_true", help="leave out the WanPipeline side")
    parser.add_argument("--profile", type=Path, help="folder: one step of per_step and of exact, by operator")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/logs"), help="folder for the second LoRA file")
    args = parser.parse_args(argv)
    args.settings = [name.strip() for name in args.settings.split(",") if name.strip()]
    unknown = [name for name in args.settings if name not in SETTINGS]
    if unknown:
        parser.error(f"unknown setting {unknown[0]!r} (settings: {', '.join(SETTINGS)})")
    return args


def base_config(args: argparse.Namespace) -> tuple[Config, argparse.Namespace]:
    """peers.py's config and workload at this shape (its CPU defaults: 96×160, 20 text tokens, 2 blocks of a
    full-width model; the experiment's LoRA rank: 8 tiny, 256 otherwise), random weights, `--steps` UniPC steps."""
    peer = peer_arguments(
        ["--shape", args.shape, "--device", args.device]
        + (["--resolution", args.resolution] if args.resolution else [])
        + (["--layers", str(args.layers)] if args.layers else [])
    )
    cfg = bench_config(peer)
    return dataclasses.replace(
        cfg,
        model=dataclasses.replace(cfg.model, random_init=True),  # random weights on purpose
        inference=dataclasses.replace(cfg.inference, steps=args.steps),
    ), peer


def with_overrides(cfg: Config, overrides: list[str]) -> Config:
    """`cfg` with dotlist overrides, checked as the loader checks a command line."""
    node = apply_overrides(OmegaConf.structured(cfg), overrides)
    result: Config = OmegaConf.to_object(node)
    result.validate()
    return result


def lora_shapes(cfg: Config) -> dict[str, torch.Size]:
    """The shapes of the run's LoRA weights (peft names), from a transformer built on the meta device."""
    transformer = build_transformer_on_meta(cfg.model)
    apply_lora(transformer, cfg.model.lora)
    return {key: value.shape for key, value in lora_state_dict(transformer).items()}


def random_lora(shapes: dict[str, torch.Size], seed: int, rank: int | None = None) -> dict[str, torch.Tensor]:
    """N(0, LORA_SCALE²) LoRA weights of `shapes` (at `rank` instead of theirs when given), drawn on the CPU."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in shapes.items():
        shape = list(shape)
        if rank is not None:
            shape[0 if ".lora_A." in key else 1] = rank
        state[key] = torch.randn(shape, generator=generator) * LORA_SCALE
    return state


def second_lora_file(shapes: dict[str, torch.Size], folder: Path) -> Path:
    """A random rank-4 LoRA on the same linears, written in ComfyUI's format (what a public Wan LoRA looks like)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "second_lora_comfyui.safetensors"
    written = to_comfyui(random_lora(shapes, seed=7, rank=SECOND_RANK), alpha=float(SECOND_RANK))
    save_file(written.tensors, path, written.metadata)
    return path


@dataclass
class Setting:
    name: str
    pipeline: StoryboardPipeline
    first_call: float = 0.0
    forwards: float | None = None
    blocks: float | None = None
    latents: torch.Tensor | None = None


def build_setting(name: str, overrides: list[str], base: Config, device: torch.device) -> Setting:
    """The model and sampler of one setting: the base model with our random LoRA, then set up as `load_model` sets
    a model up for sampling (second LoRA, scales, merge, compile)."""
    cfg = with_overrides(base, overrides)
    with device:
        adapter = build_adapter(cfg, device)
    adapter.load_lora_state_dict(random_lora(lora_shapes(cfg), seed=1))
    second = read_lora(Path(cfg.inference.second_lora)) if cfg.inference.second_lora else None
    prepare_sampling(adapter, cfg, second)
    return Setting(name, StoryboardPipeline(adapter, cfg))


def request_of(work, seed: int) -> StoryboardRequest:
    generator = torch.Generator().manual_seed(seed)
    references = torch.rand(work.refs, 3, *work.image_size, generator=generator) * 2 - 1
    return StoryboardRequest(["shot"] * work.shots, work.image_size, references, ["role"] * work.refs)


def counted_call(setting: Setting, request: StoryboardRequest, seed: int, device: torch.device) -> None:
    """One untimed call (compilation, warm-up) that counts DiT forwards and block evaluations and keeps the
    final latents for the drift."""
    transformer = setting.pipeline.adapter.transformer
    counts = {"forwards": 0, "blocks": 0}
    # Counting hooks inside compiled blocks would be guarded on and recompile them: a compiled setting does the work
    # of its eager twin and is not counted.
    counted = not setting.pipeline.config.inference.compile

    def count(key):
        def hook(module, inputs, output):
            counts[key] += 1

        return hook

    handles = [transformer.condition_embedder.register_forward_hook(count("forwards"))] if counted else []
    handles += [block.ffn.net[2].register_forward_hook(count("blocks")) for block in transformer.blocks if counted]
    start = clock(device)
    try:
        result = setting.pipeline(request, seed=seed, progress=False)
    finally:
        for handle in handles:
            handle.remove()
    setting.first_call = clock(device) - start
    steps = len(result.step_seconds)
    if counted:
        setting.forwards, setting.blocks = counts["forwards"] / steps, counts["blocks"] / steps
    setting.latents = result.latents.float().cpu()


def drift(latents: torch.Tensor, reference: torch.Tensor) -> float:
    return float((latents - reference).norm() / reference.norm())


def timed_sides(settings: list[Setting], request: StoryboardRequest, seed: int, totals: dict[str, list[float]]):
    """Each setting as a side of `interleaved`: one call, the mean of its steps but the first; the call's total in
    `totals`."""

    def side(setting: Setting):
        def run() -> list[float]:
            result = setting.pipeline(request, seed=seed, progress=False)
            totals[setting.name].append(result.total_seconds)
            # The mean step: a setting's steps differ in cost (guided or not, cached or not).
            return [statistics.mean(result.step_seconds[1:])]

        return run

    return {setting.name: side(setting) for setting in settings}


def diffusers_side(cfg: Config, work, device: torch.device, lora: dict[str, torch.Tensor], steps: int):
    """WanPipeline on the K + N frames with the same LoRA weights as ours, fused as ours is merged."""
    run = diffusers_sampling(cfg, work, device, lora_state=lora, fuse_lora=True)
    return lambda: [statistics.mean(run(work.frames, steps)[1:])]


def profile_steps(settings: dict[str, Setting], request: StoryboardRequest, device: torch.device, folder: Path):
    """One guided step's velocity of `per_step` and of `exact`, by operator, into `folder`."""
    for name in ("per_step", "exact"):
        if name in settings:
            pipeline = settings[name].pipeline
            step = partial(
                pipeline.velocity,
                pipeline.encode(request),
                initial_noise(pipeline.latent_shape(request), 0).to(device),
                torch.tensor(500.0),
            )
            profile_step(step, device, folder / f"{name}.txt", shapes=True)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type != "cuda":
        # The pipeline's own step clock, as CPU time (see the docstring): the same clock for every setting.
        pipeline_module.time = types.SimpleNamespace(perf_counter=lambda: clock(device))
    base, peer = base_config(args)
    work = work_of(base, peer)
    torch.manual_seed(base.seed)
    shapes = lora_shapes(base)
    second = f"inference.second_lora={second_lora_file(shapes, args.out)}"
    settings = {
        name: build_setting(name, SETTINGS[name] + ([second] if name == "few_step" else []), base, device)
        for name in args.settings
    }
    request = request_of(work, base.seed)
    for setting in settings.values():
        counted_call(setting, request, base.seed, device)
    references = {name: settings["exact"].latents for name in settings if "exact" in settings}
    if "few_step" in settings:  # against the exact sampler with the same two LoRAs
        stacked = build_setting("stacked exact", [second], base, device)
        counted_call(stacked, request, base.seed, device)
        references["few_step"] = stacked.latents

    totals = {name: [] for name in settings}
    sides = timed_sides(list(settings.values()), request, base.seed, totals)
    if not args.no_diffusers:
        sides["diffusers"] = diffusers_side(base, work, device, random_lora(shapes, seed=1), args.steps)
    steps = interleaved(sides, args.rounds)
    if args.profile:
        profile_steps(settings, request, device, args.profile)
    report(args, base, work, settings, steps, totals, references)


def report(args, cfg: Config, work, settings: dict[str, Setting], steps, totals, references) -> None:
    dims, lora = cfg.model.transformer, cfg.model.lora
    print(
        f"{cfg.model.name} shape: {dims.num_layers} blocks, {dims.num_attention_heads} heads × "
        f"{dims.attention_head_dim}, LoRA rank {lora.rank}; {cfg.model.dtype}; {args.device}, "
        f"{torch.get_num_threads()} threads; r2s, {work.refs} references + {work.shots} shots at "
        f"{work.image_size[0]}×{work.image_size[1]} ({work.tokens_per_frame} tokens a frame), {work.text_len} text "
        f"tokens; {args.steps} steps unless the setting sets them; medians of {args.rounds} rounds after a "
        "warm-up, interleaved"
    )
    print(
        f"{'setting':<12}{'s/board':>9}{'s/step':>9}{'×per-step':>10}{'×exact':>8}{'fwd/step':>9}{'blocks/step':>12}"
        f"{'drift':>10}"
    )
    for name, setting in settings.items():
        speed = [f"{steps[other] / steps[name]:.2f}×" if other in steps else "" for other in ("per_step", "exact")]
        shown = f"{drift(setting.latents, references[name]):.2e}" if name in references else ""
        counts = [f"{value:.1f}" if value is not None else "—" for value in (setting.forwards, setting.blocks)]
        print(
            f"{name:<12}{statistics.median(totals[name]):>9.3f}{steps[name]:>9.4f}{speed[0]:>10}{speed[1]:>8}"
            f"{counts[0]:>9}{counts[1]:>12}{shown:>10}"
        )
        if name == "compiled":
            print(f"{'':<12}its first call, compiling: {setting.first_call:.1f} s")
    for line in goal_lines(settings, steps, totals, references):
        print(line)
    if "diffusers" in steps:
        ours = (2 * work.frames + work.shots) * work.tokens_per_frame
        theirs = 2 * work.frames * work.tokens_per_frame
        for name in ("exact", "per_step"):
            if name in steps:
                ratio = Row(name, "diffusers", steps[name], steps["diffusers"], ours, theirs).ratio
                print(
                    f"WanPipeline step {steps['diffusers']:.4f} s ({theirs:,} tokens, LoRA fused); {name} "
                    f"({ours:,} tokens) per token / its: {ratio:.2f}× (goal ≤ {GOALS['diffusers']:.1f}×)"
                )


def goal_lines(settings: dict[str, Setting], steps: dict[str, float], totals, references) -> list[str]:
    """Issue 19's goals for the sampler, read off this run: the exact savings (`exact` against `per_step`, the
    sampler before them, per step) and the fastest opt-in setting against `exact` (per storyboard: some change the
    step count), each with its drift."""
    lines = []
    if "exact" in steps and "per_step" in steps:
        speedup, gap = steps["per_step"] / steps["exact"], drift(settings["per_step"].latents, references["per_step"])
        met = speedup >= GOALS["exact"] and gap <= EXACT_DRIFT
        lines.append(
            f"goal, exact savings: {speedup:.2f}× per step over per_step, drift {gap:.1e} "
            f"(goal ≥ {GOALS['exact']:.1f}× with drift ≤ {EXACT_DRIFT:.0e}): {'met' if met else 'not met'}"
        )
    opt_in = [name for name in steps if name not in ("per_step", "exact", "compiled", "diffusers")]
    if "exact" in steps and opt_in:
        board = {name: statistics.median(totals[name]) for name in ("exact", *opt_in)}
        fastest = min(opt_in, key=board.__getitem__)
        speedup = board["exact"] / board[fastest]
        shown = f", drift {drift(settings[fastest].latents, references[fastest]):.1e}" if fastest in references else ""
        lines.append(
            f"goal, fastest opt-in: {fastest}, {speedup:.2f}× per storyboard over exact{shown} "
            f"(goal ≥ {GOALS['opt_in']:.1f}×): {'met' if speedup >= GOALS['opt_in'] else 'not met'}"
        )
    return lines


if __name__ == "__main__":
    main()
