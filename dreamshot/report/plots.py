"""The report's figures, drawn like the paper's: relative improvement per metric over a baseline (Fig. 9, Fig. 12),
a metric against the storyboard's shot count (Fig. 13), the ω1 / ω2 guidance grid (Fig. 8), and loss curves.

Every function returns a matplotlib `Figure` (object API, no pyplot state: safe in scripts, tests and notebooks).
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from dreamshot.report.attention import RoleAttention
from dreamshot.report.runs import RunRecord
from dreamshot.report.table import SEED_KEY, ComparisonTable, higher_is_better

# The flow-matching part of the training loss: the total adds λ·L_RACL, so it is not comparable across λ.
CURVE_KEYS = ("train/loss_fm", "train/loss_racl", "val/loss", "val/racl_in_mask", "val/racl_confusion")
OMEGA_KEYS = ("inference.omega1", "inference.omega2")
# Exponential moving average of the noisy per-step training loss (the raw values are drawn faintly behind it).
SMOOTHING = 0.9


def relative_improvement_figure(table: ComparisonTable) -> Figure:
    """Grouped bars: for each metric, each run's relative improvement (%) over the baseline."""
    relative = table.relative()
    runs = list(relative)
    metrics = [m for m in table.metrics if any(m in relative[run] for run in runs)]
    fig = Figure(figsize=(max(6.0, 1.3 * len(metrics) * max(1, len(runs)) ** 0.5 + 2), 4.5), layout="constrained")
    ax = fig.add_subplot()
    width = 0.8 / max(len(runs), 1)
    positions = np.arange(len(metrics))
    for i, run in enumerate(runs):
        gains = np.array([relative[run].get(m, math.nan) for m in metrics])
        offsets = positions + (i - (len(runs) - 1) / 2) * width
        bars = ax.bar(offsets, np.nan_to_num(gains), width, label=run)
        labels = [_gain_label(relative[run].get(m)) for m in metrics]
        ax.bar_label(bars, labels=labels, fontsize=7, padding=2)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(positions, [m if higher_is_better(m) else f"{m} ↓" for m in metrics], rotation=20, ha="right")
    ax.set_ylabel(f"change vs {table.compared_against()} (%, positive = better)")
    ax.set_title(
        f"{table.group}: relative improvement over {table.compared_against()}\n"
        "(↓: lower is better, sign flipped; n/a: the baseline is 0 or near it; no data: a run lacks the metric)",
        fontsize=10,
    )
    ax.legend(title="run", fontsize=8)
    ax.margins(y=0.15)
    return fig


def loss_curves_figure(runs: list[RunRecord], group: str, keys: tuple[str, ...] = CURVE_KEYS) -> Figure | None:
    """One panel per logged key (training losses smoothed, validation metrics as logged), one line per run, and
    dotted in the run's colour each curriculum phase end that the line crosses (not a phase the run never reached,
    nor one outside the steps the panel plots). None when no run logged any of `keys`."""
    keys = tuple(key for key in keys if any(run.curves.get(key) for run in runs))
    if not keys:
        return None
    fig = Figure(figsize=(4.2 * len(keys), 3.8), layout="constrained")
    axes = fig.subplots(1, len(keys), squeeze=False)[0]
    colours = _colours(len(runs))
    for ax, key in zip(axes, keys, strict=True):
        for run, colour in zip(runs, colours, strict=True):
            curve = run.curves.get(key)
            if not curve:
                continue
            for end in run.crossed_phase_ends(key):
                ax.axvline(end, color=colour, linestyle=":", linewidth=1)
            steps, values = np.array(list(curve)), np.array(list(curve.values()))
            if key.startswith("train/"):
                ax.plot(steps, values, color=colour, alpha=0.25, linewidth=0.8)
                values = _smooth(values)
            ax.plot(steps, values, color=colour, label=run.name, marker="o" if len(steps) < 20 else None, markersize=3)
        smoothed = f" (EMA {SMOOTHING})" if key.startswith("train/") else ""
        ax.set_title(f"{key}{smoothed}" + ("" if higher_is_better(key) else " ↓"))
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    axes[0].legend(title="run", fontsize=8)
    fig.suptitle(f"{group}: training curves")
    return fig


def guidance_grid_figure(table: ComparisonTable) -> Figure | None:
    """Paper Fig. 8: one heat map per metric over the (ω1, ω2) values of the runs; a cell several runs share (the
    same setting with other seeds) holds their mean, marked with their count. None without both swept, or when
    runs that share a cell are not told apart by their seed alone (two trained runs' grids: one cell would mix
    them)."""
    if not all(key in table.swept_keys for key in OMEGA_KEYS):
        return None
    cells = _guidance_cells(table)
    if cells is None:
        return None
    omega1 = sorted({w1 for w1, _ in cells})
    omega2 = sorted({w2 for _, w2 in cells})
    fig, axes = _panels(len(table.metrics), (4.4, 3.8))
    for ax, metric in zip(axes, table.metrics, strict=True):
        grid = np.full((len(omega2), len(omega1)), np.nan)
        counts = np.zeros_like(grid, dtype=int)
        for (w1, w2), runs in cells.items():
            values = [table.rows[run][metric] for run in runs if metric in table.rows[run]]
            if values:
                grid[omega2.index(w2), omega1.index(w1)] = np.mean(values)
                counts[omega2.index(w2), omega1.index(w1)] = len(values)
        image = ax.imshow(grid, origin="lower", cmap="viridis" if higher_is_better(metric) else "viridis_r")
        for (r, c), value in np.ndenumerate(grid):
            if not np.isnan(value):
                text = f"{value:.3g}" + (f"\n(n={counts[r, c]})" if counts[r, c] > 1 else "")
                ax.text(c, r, text, ha="center", va="center", color=_ink(image, value), fontsize=8)
        ax.set_xticks(range(len(omega1)), [f"{w:g}" for w in omega1])
        ax.set_yticks(range(len(omega2)), [f"{w:g}" for w in omega2])
        ax.set_xlabel("ω1 (reference guidance)")
        ax.set_ylabel("ω2 (text guidance)")
        ax.set_title(metric if higher_is_better(metric) else f"{metric} ↓")
        fig.colorbar(image, ax=ax, shrink=0.8)
    fig.suptitle(f"{table.group}: metrics over the guidance weights (Eq. 9)")
    return fig


def _guidance_cells(table: ComparisonTable) -> dict[tuple[float, float], list[str]] | None:
    """(ω1, ω2) -> the runs there; None when two runs of a cell differ in anything but their seed, or not in it."""
    cells: dict[tuple[float, float], list[str]] = defaultdict(list)
    for run in table.runs:
        cells[tuple(table.swept[run][key] for key in OMEGA_KEYS)].append(run)
    rest = [key for key in table.swept_keys if key not in (*OMEGA_KEYS, SEED_KEY)]
    for runs in cells.values():
        seeds = [table.swept[run].get(SEED_KEY) for run in runs]
        settings = {tuple(str(table.swept[run].get(key)) for key in rest) for run in runs}
        if len(runs) > 1 and (None in seeds or len(set(seeds)) < len(runs) or len(settings) > 1):
            return None
    return dict(cells)


def _ink(image, value: float) -> str:
    """Black text on a light cell of the colour map, white on a dark one (by the cell's luminance, so a reversed
    map gets it right too)."""
    red, green, blue, _ = image.cmap(image.norm(value))
    return "black" if 0.299 * red + 0.587 * green + 0.114 * blue > 0.5 else "white"


def shot_count_figure(runs: list[RunRecord], group: str) -> Figure | None:
    """Paper Fig. 13: each per-story metric, averaged over the stories of each shot count, against the shot count;
    one line per run (and evaluation). None when no evaluation has stories of two shot counts or more (a single
    count would draw dots, not the trend the figure shows)."""
    series = _shot_count_series(runs)
    metrics = sorted({metric for lines in series.values() for metric, (counts, _) in lines.items() if len(counts) > 1})
    if not metrics:
        return None
    fig, axes = _panels(len(metrics), (4.4, 3.6))
    for ax, metric in zip(axes, metrics, strict=True):
        for label, lines in series.items():
            if metric in lines:
                counts, means = lines[metric]
                ax.plot(counts, means, marker="o", label=label)
        ax.set_title(metric)
        ax.set_xlabel("shots per storyboard")
        ax.set_ylabel("mean over the stories")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{group}: metrics against the storyboard's shot count")
    return fig


def _shot_count_series(runs: list[RunRecord]) -> dict[str, dict[str, tuple[list[int], list[float]]]]:
    """label -> metric -> (shot counts, mean per-story value at each count)."""
    series = {}
    for run in runs:
        for record in run.evals:
            by_count: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
            for story, values in record.per_story.items():
                for metric, value in values.items():
                    if story in record.story_shots and math.isfinite(value):
                        by_count[metric][record.story_shots[story]].append(value)
            label = run.name if len(run.evals) == 1 else f"{run.name} ({record.label})"
            series[label] = {
                metric: (sorted(counts), [float(np.mean(counts[n])) for n in sorted(counts)])
                for metric, counts in by_count.items()
            }
    return series


def _panels(count: int, size: tuple[float, float]) -> tuple[Figure, list]:
    """A figure of `count` panels of `size` inches, up to three a row; the axes in reading order."""
    columns = min(3, count)
    rows = math.ceil(count / columns)
    fig = Figure(figsize=(size[0] * columns, size[1] * rows), layout="constrained")
    axes = fig.subplots(rows, columns, squeeze=False).ravel()
    for ax in axes[count:]:
        ax.set_visible(False)
    return fig, list(axes[:count])


def _gain_label(gain: float | None) -> str:
    if gain is None:
        return "no data"
    return "n/a" if math.isnan(gain) else f"{gain:+.3g}"


def _smooth(values: np.ndarray) -> np.ndarray:
    out = np.empty_like(values, dtype=float)
    running = values[0]
    for i, value in enumerate(values):
        running = SMOOTHING * running + (1 - SMOOTHING) * value
        out[i] = running
    return out


def _colours(count: int) -> list:
    cmap = colormaps["tab10" if count <= 10 else "viridis"]
    return [cmap(i if count <= 10 else i / max(count - 1, 1)) for i in range(count)]


def attention_figure(attention: RoleAttention, title: str) -> Figure:
    """Paper Fig. 7: one row per reference role — its reference image, then its attention over every shot drawn
    as a heat map on the shot image (each map scaled to its maximum, as RACL compares it), with the role's true
    mask outlined and the share of attention inside it."""
    roles, shots = len(attention.roles), attention.shots.shape[0]
    height, width = attention.shots.shape[-2:]
    fig = Figure(figsize=(max(6.5, 1.9 * (shots + 1) + 1), 1.5 * roles + 1.1), layout="constrained")
    axes = fig.subplots(roles, shots + 1, squeeze=False)
    for row, role in enumerate(attention.roles):
        ref_ax = axes[row, 0]
        ref_ax.imshow(_image(attention.refs[role]))
        ref_ax.set_title(_clip(attention.ref_texts[role]), fontsize=7)
        ref_ax.set_ylabel(f"role {role + 1}", fontsize=9)
        for n in range(shots):
            ax = axes[row, n + 1]
            ax.imshow(_image(attention.shots[n]))
            heat = attention.maps[row, n] / attention.maps[row, n].max().clamp_min(1e-12)
            image = ax.imshow(heat, extent=(0, width, height, 0), cmap="inferno", alpha=0.6, vmin=0, vmax=1)
            mask = attention.shot_masks[n, role]
            if mask.any():
                ax.contour(mask, levels=[0.5], colors="white", linewidths=0.8, linestyles="dashed")
            share = attention.in_mask[row, n]
            ax.set_title(f"shot {n + 1}: " + ("absent" if share.isnan() else f"{share:.0%} in mask"), fontsize=7)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(image, ax=axes[:, 1:], shrink=0.8, label="attention / its max")
    fig.suptitle(
        f"{title}\nreference-role attention over the shots (t = {attention.t:g}; dashed: the role's mask)", fontsize=10
    )
    return fig


def _image(tensor) -> np.ndarray:
    """(3, H, W) in [-1, 1] -> (H, W, 3) in [0, 1]."""
    return ((tensor.float().clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy()


def _clip(text: str, length: int = 28) -> str:
    return text if len(text) <= length else text[: length - 1] + "…"
