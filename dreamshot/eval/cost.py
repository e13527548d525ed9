"""The drawing cost of a benchmark (`planner.sampling`), per story and per mode: what the shard planner balances
and what `dreamshot plan EXPERIMENT --eval BENCH` prints to size a job."""

from __future__ import annotations

from dreamshot.config.schema import EVAL_MODES, Config
from dreamshot.eval.benchmarks import Benchmark
from dreamshot.eval.sharding import assign, balance
from dreamshot.planner.report import flop_unit
from dreamshot.planner.sampling import DrawingCost, drawing_cost, gpu_hours
from dreamshot.planner.shape import ModelShape, model_shape
from dreamshot.planner.workload import tokens_per_frame


def story_costs(
    shape: ModelShape, cfg: Config, bench: Benchmark, mode: str, size: tuple[int, int], steps: int
) -> dict[str, DrawingCost]:
    """Each story's cost in `mode`: r2s conditions on every character with images, s2s on the given shots."""
    per_frame = tokens_per_frame(*size, "resolution")
    costs = {}
    for story in bench.stories:
        if mode == "r2s":
            conditions = sum(1 for character in story.characters.values() if character.images)
        else:
            conditions = story.previous if mode == "s2s" else 0
        targets = len(story.scored_shots(mode))
        costs[story.id] = drawing_cost(shape, conditions, targets, per_frame, cfg.model.text_len, steps)
    return costs


def benchmark_plan(
    cfg: Config, bench: Benchmark, size: tuple[int, int], steps: int, gpus: int, mfu: float, peak_tflops: float
) -> str:
    """The table of `dreamshot plan --eval`: per mode, the forwards, FLOPs, GPU-hours at `mfu` of `peak_tflops`,
    and the hours of the most loaded of `gpus` GPUs under the shard planner."""
    shape = model_shape(cfg.model, count_encoders=False)
    header = (
        f"Drawing {bench.name} ({len(bench.stories)} stories) with {cfg.model.name}: {size[0]}x{size[1]}, "
        f"{steps} steps, guidance with 3 branches (2 in t2s)"
    )
    columns = f"  {'mode':<6}{'shots':>7}{'forwards':>10}{'FLOPs':>16}{'GPU-hours':>11}{f'on {gpus} GPU(s)':>16}"
    lines = [header, columns + f"{'balance':>9}{'longest story':>22}"]
    for mode in EVAL_MODES:
        if mode == "s2s" and not any(story.previous for story in bench.stories):
            lines.append(f"  {mode:<6}not drawn: the benchmark gives no previous shots")
            continue
        costs = story_costs(shape, cfg, bench, mode, size, steps)
        flops = {story: float(cost.flops) for story, cost in costs.items()}
        shares = assign(flops, gpus)
        total = sum(costs.values(), DrawingCost(0, 0, 0, 0))
        unit, scale = flop_unit(total.flops)
        longest = max(costs, key=lambda story: costs[story].tokens)
        busiest = max(sum(flops[s] for s in share) for share in shares)
        shots = sum(len(story.scored_shots(mode)) for story in bench.stories)
        lines.append(
            f"  {mode:<6}{shots:>7,}{total.forwards:>10,}{total.flops / scale:>10.2f} {unit:<5}"
            f"{gpu_hours(total.flops, mfu, peak_tflops):>11.2f}{gpu_hours(busiest, mfu, peak_tflops):>14.2f} h"
            f"{balance(flops, shares):>9.3f}  {longest} ({costs[longest].tokens:,} tokens)"
        )
    lines.append(
        f"  GPU-hours at {mfu:.0%} MFU of {peak_tflops:g} TFLOPS (--mfu, --gpu-tflops); DiT matmuls only (VAE, umT5 "
        "and scoring not counted); balance: the most loaded GPU over the mean"
    )
    return "\n".join(lines) + "\n"
