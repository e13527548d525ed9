"""The comparison table of a group: one row per run, its swept values, its final metrics, and the relative
improvement of every metric over a baseline run (paper Fig. 9 and Fig. 12), as markdown and CSV."""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from dataclasses import dataclass, field
from typing import Any

from dreamshot.eval.report import is_cosine
from dreamshot.inference.loading import RUN_CONFIG
from dreamshot.report.runs import PHASE_MARK, TRAINING_METRICS, UNSWEPT, RunRecord
from dreamshot.utils.errors import ConfigError

# Metrics where a smaller value is better; every evaluation metric (CIDS, CSD, AES, Alignment, toy proxies) and
# the in-mask attention share grow with quality.
LOWER_IS_BETTER = frozenset({"train/loss", "train/loss_fm", "train/loss_racl", "val/loss", "val/racl_confusion"})


def higher_is_better(metric: str) -> bool:
    return training_diagnostic(metric) not in LOWER_IS_BETTER


def training_diagnostic(metric: str) -> str:
    """The diagnostic a metric reads (`val/loss@phase1` -> `val/loss`)."""
    return metric.split(PHASE_MARK, 1)[0]


# A baseline this close to 0 (absolutely, or against the metric's largest value among the runs) has no meaningful
# relative change: a value of 0 against a baseline of 1e-9 is not "-100%".
NEAR_ZERO_ABSOLUTE = 1e-6
NEAR_ZERO_RELATIVE = 1e-3
# A NaN value (results.json, a validation): the metric could not be computed, e.g. no story had a value of it.
NOT_COMPUTED = "not computed"
# The config key whose runs a report also summarises over (`ComparisonTable.across_seeds`).
SEED_KEY = "seed"


def relative_improvement(value: float, baseline: float, higher_better: bool, scale: float = 0.0) -> float:
    """100 * (value - baseline) / |baseline|, sign-flipped for lower-is-better metrics (positive = better).
    NaN when the baseline is near 0: within NEAR_ZERO_ABSOLUTE, or NEAR_ZERO_RELATIVE of `scale` (the metric's
    largest magnitude among the compared runs)."""
    if abs(baseline) <= max(NEAR_ZERO_ABSOLUTE, NEAR_ZERO_RELATIVE * scale):
        return math.nan
    change = 100 * (value - baseline) / abs(baseline)
    return change if higher_better else -change


@dataclass
class ComparisonTable:
    """rows: run name -> metric -> value (a run may lack a metric); swept: run name -> swept key -> value;
    notes: what the table cannot show (runs or sweep members without data); settings: run name -> its setting
    (`RunRecord.setting`), which the runs of one setting with other seeds share."""

    group: str
    runs: list[str]
    swept_keys: list[str]
    swept: dict[str, dict[str, Any]]
    metrics: list[str]
    rows: dict[str, dict[str, float]]
    baseline: str | None
    notes: list[str] = field(default_factory=list)
    settings: dict[str, str] = field(default_factory=dict)

    def relative(self) -> dict[str, dict[str, float]]:
        """run -> metric -> relative improvement (%) over the run it is measured against (`compared_runs`) (NaN
        where that run's value is near 0; a metric either run lacks, or has as NaN, is left out: a NaN is a value
        that could not be computed, not a baseline near 0)."""
        finite = {run: {m: v for m, v in values.items() if not math.isnan(v)} for run, values in self.rows.items()}
        scale = {
            m: max((abs(values[m]) for values in finite.values() if m in values), default=0.0) for m in self.metrics
        }
        return {
            run: {
                m: relative_improvement(finite[run][m], finite[base][m], higher_is_better(m), scale[m])
                for m in self.metrics
                if m in finite[run] and m in finite[base]
            }
            for run, base in self.compared_runs().items()
        }

    def compared_runs(self) -> dict[str, str]:
        """run -> the run its relative improvement is measured against: the baseline, for every run but it; when
        the baseline's setting ran with several seeds, the baseline setting's run of the run's own seed, for the
        runs of the other settings (a change against another seed's run would be seed noise)."""
        if self.baseline is None:
            return {}
        groups = self.seed_groups()
        base = self._baseline_setting(groups)
        if base is None:
            return {run: self.baseline for run in self.runs if run != self.baseline}
        by_seed = {self.swept[run][SEED_KEY]: run for run in groups[base]}
        others = [run for run in self.runs if run not in groups[base]]
        return {run: by_seed[self.swept[run][SEED_KEY]] for run in others if self.swept[run][SEED_KEY] in by_seed}

    def compared_against(self) -> str:
        """What `relative` measures against: the baseline, or `<its setting> (same seed)`."""
        base = self._baseline_setting(self.seed_groups())
        return f"{self.baseline}" if base is None else f"{base} (same seed)"

    def to_markdown(self) -> str:
        """The metric table, then (with a baseline) the relative-improvement table."""
        headers = ["run", *self.swept_keys, *(_arrow(m) for m in self.metrics)]
        shown = ["run", *self.swept_keys, *(_arrow(m) + (" ×100" if _scale(m) != 1 else "") for m in self.metrics)]
        scaled = {run: {m: v * _scale(m) for m, v in self.rows[run].items()} for run in self.runs}
        text = [_markdown(shown, [self._row(run, scaled[run], _number) for run in self.runs])]
        relative = self.relative()
        if relative:
            text.append(
                f"\nRelative improvement over `{self.compared_against()}` (%; positive is better, "
                "so lower-is-better metrics ↓ are sign-flipped):\n"
            )
            text.append(_markdown(headers, [self._row(run, relative[run], _percent) for run in relative]))
            text.append(
                f"\n(-: no value for the run or the baseline, or one {NOT_COMPUTED}; n/a: the baseline is 0 or near it)"
            )
        unpaired = [run for run in self.runs if run not in relative and run not in self.compared_runs().values()]
        if relative and unpaired:
            text.append(f"\nNot measured (no run of `{self.compared_against()}`): {', '.join(unpaired)}")
        text += self._seeds_markdown()
        if self.notes:
            text.append("\nMissing data:\n")
            text += [f"- {note}" for note in self.notes]
        return "\n".join(text)

    def to_csv(self) -> str:
        """One row per run: swept values, metric values, and `<metric> vs baseline (%)` columns with a baseline."""
        relative = self.relative()
        relative_columns = [f"{m} vs {self.compared_against()} (%)" for m in self.metrics] if relative else []
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(["run", *self.swept_keys, *self.metrics, *relative_columns])
        for run in self.runs:
            values = [_raw(self.rows[run].get(m)) for m in self.metrics]
            gains = [_raw(relative.get(run, {}).get(m)) for m in self.metrics] if relative else []
            writer.writerow([run, *self._swept_cells(run), *values, *gains])
        return buffer.getvalue()

    def seed_groups(self) -> dict[str, list[str]]:
        """Setting -> its runs, when runs differ in `seed` and some setting ran with two seeds or more (the runs of
        one setting agree on every swept value but the seed); empty otherwise."""
        if SEED_KEY not in self.swept_keys:
            return {}
        others = [key for key in self.swept_keys if key != SEED_KEY]
        groups: dict[tuple, list[str]] = {}
        for run in self.runs:
            same = (self.settings.get(run, run), *(_cell(self.swept[run].get(key)) for key in others))
            groups.setdefault(same, []).append(run)
        if max(map(len, groups.values())) < 2:
            return {}
        names = [same[0] for same in groups]
        return {
            same[0] if names.count(same[0]) == 1 else f"{same[0]} ({', '.join(map(str, same[1:]))})": runs
            for same, runs in groups.items()
        }

    def across_seeds(self) -> dict[str, dict[str, tuple[float, float, int]]]:
        """Setting -> metric -> (mean, sample standard deviation (NaN for one seed), seeds) over its runs."""
        summary = {}
        for setting, runs in self.seed_groups().items():
            summary[setting] = {}
            for metric in self.metrics:
                values = [self.rows[run][metric] for run in runs if metric in self.rows[run]]
                if values:
                    summary[setting][metric] = (statistics.fmean(values), _sd(values), len(values))
        return summary

    def paired_over_seeds(self) -> dict[str, dict[str, tuple[float, int, int]]]:
        """Setting -> metric -> (relative improvement of its mean over the baseline setting's mean, both over the
        seeds that both have the metric for, seeds where it does better than the baseline setting's run of the same
        seed, those seeds), for every setting but the baseline's. Means over other seeds would set seed noise
        against the change: a setting missing its worst seed would gain by it."""
        groups = self.seed_groups()
        base = self._baseline_setting(groups)
        if base is None:
            return {}
        base_runs = {self.swept[run][SEED_KEY]: run for run in groups[base]}
        paired = {}
        for setting, runs in groups.items():
            if setting == base:
                continue
            pairs = [
                (run, base_runs[self.swept[run][SEED_KEY]]) for run in runs if self.swept[run][SEED_KEY] in base_runs
            ]
            paired[setting] = {}
            for metric in self.metrics:
                both = [(run, other) for run, other in pairs if metric in self.rows[run] and metric in self.rows[other]]
                if both:
                    mean = statistics.fmean(self.rows[run][metric] for run, _ in both)
                    against = statistics.fmean(self.rows[other][metric] for _, other in both)
                    gain = relative_improvement(mean, against, higher_is_better(metric))
                    paired[setting][metric] = (gain, sum(self._better(metric, *pair) for pair in both), len(both))
        return paired

    def _baseline_setting(self, groups: dict[str, list[str]]) -> str | None:
        return next((setting for setting, runs in groups.items() if self.baseline in runs), None)

    def _better(self, metric: str, run: str, other: str) -> bool:
        """Whether `run` has a better value of `metric` than `other` (False when either lacks it)."""
        if metric not in self.rows[run] or metric not in self.rows[other]:
            return False
        value, against = self.rows[run][metric], self.rows[other][metric]
        return value > against if higher_is_better(metric) else value < against

    def _seeds_markdown(self) -> list[str]:
        summary = self.across_seeds()
        if not summary:
            return []
        groups = self.seed_groups()
        headers = ["setting", "seeds", *(_arrow(m) for m in self.metrics)]
        shown = ["setting", "seeds", *(_arrow(m) + (" ×100" if _scale(m) != 1 else "") for m in self.metrics)]
        rows = [
            [
                setting,
                str(len(groups[setting])),
                *(_spread(values.get(m), len(groups[setting]), _scale(m)) for m in self.metrics),
            ]
            for setting, values in summary.items()
        ]
        text = [
            "\nAcross seeds (mean ± sample standard deviation over each setting's seeds; (n=k): over the k of them that"
            " have the metric):\n",
            _markdown(shown, rows),
        ]
        paired = self.paired_over_seeds()
        if paired:
            text.append(
                f"\nThe mean over the seeds against `{self._baseline_setting(groups)}`'s over the same seeds (%; "
                "positive is better), and in how many of those seeds the setting does better than the baseline's run "
                "of the same seed:\n"
            )
            rows = [
                [
                    setting,
                    str(max((n for _, _, n in values.values()), default=0)),
                    *map(_paired, map(values.get, self.metrics)),
                ]
                for setting, values in paired.items()
            ]
            text.append(_markdown(headers, rows))
        return text

    def _row(self, run: str, values: dict[str, float], number) -> list[str]:
        return [run, *self._swept_cells(run), *(number(values.get(m)) for m in self.metrics)]

    def _swept_cells(self, run: str) -> list[str]:
        return [_cell(self.swept[run].get(key)) for key in self.swept_keys]


def build_table(
    group: str, runs: list[RunRecord], baseline: str | None = None, notes: list[str] | None = None
) -> ComparisonTable:
    """The table of `runs`. `baseline` must name one of them; None: no relative improvement. `notes` name what
    is missing (`missing_data`)."""
    names = [run.name for run in runs]
    if baseline is not None and baseline not in names:
        raise ConfigError(f"baseline {baseline!r} is not a run of {group} (runs: {', '.join(names)})")
    labelled = evaluations_labelled(runs)
    rows = {run.name: run.metrics(labelled) for run in runs}
    keys = swept_keys(runs)
    return ComparisonTable(
        group=group,
        runs=names,
        swept_keys=keys,
        swept={run.name: {key: run.config.get(key) for key in keys} for run in runs},
        metrics=_metric_order(rows),
        rows=rows,
        baseline=baseline,
        notes=list(notes or []),
        settings={run.name: run.setting for run in runs},
    )


def evaluations_labelled(runs: list[RunRecord]) -> bool:
    """Whether the runs' evaluation values are named `<benchmark>-<mode>/<value>` (`RunRecord.metrics`): one column
    holds the values of one benchmark and mode, so runs scored in other modes (r2s, t2s) or on other benchmarks are
    labelled apart, never averaged or compared in one column."""
    return len({record.label for run in runs for record in run.evals}) > 1


def missing_data(runs: list[RunRecord], members: list[str]) -> list[str]:
    """What a reader of the table must be told: sweep members with no run folder, evaluations left out as of other
    weights than their run's or of another drawing than their folder records, runs without any metric, runs whose
    training has not finished, evaluations that do not name the drawing they scored, and evaluation values whose
    means are over other stories in different runs (`story_mismatches`)."""
    names = {run.name for run in runs}
    notes = [f"member {m}: no run folder (not run yet, or written elsewhere)" for m in members if m not in names]
    notes += [
        f"{run.name}: {record.label} in {record.path.parent} left out: its shots were drawn with other weights than "
        "the run's (it trained on or started over since); score it again with dreamshot eval --redraw"
        for run in runs
        for record in run.outdated
    ]
    notes += [
        f"{run.name}: {record.label} in {record.path.parent} left out: its results.json scored another drawing than "
        "the folder's run.json records (an evaluation drawing anew stopped before its results); run it again"
        for run in runs
        for record in run.stale
    ]
    notes += [
        f"{run.name}: no metrics (no results.json, no validation in its csv/ logs) in {run.path}"
        for run in runs
        if not run.metrics()
    ]
    notes += [
        f"{run.name}: its training has not finished (steps: {run.described_steps()}): its values are the last it "
        "logged, not those of its end"
        for run in runs
        if run.training and run.metrics()
    ]
    notes += [
        f"{run.name}: {record.label} in {record.path.parent}: drawing unknown: its results.json, written by an older "
        "dreamshot eval, does not name the shots it scored, which may not be the ones its folder holds now; run the "
        "same dreamshot eval again to score and name them (complete stories are not drawn again)"
        for run in runs
        for record in run.evals
        if not record.drawing_known
    ]
    return notes + story_mismatches(runs) + (mixed_weights(runs) if members else [])


def mixed_weights(runs: list[RunRecord]) -> list[str]:
    """A note when an evaluation-time sweep's members (evaluation folders, no training of their own) scored other
    weights: the trained run changed between members, so their differences are not the swept settings' alone."""
    drawn = {
        run.name: run.evals[0].weights_sha256 for run in runs if not (run.path / RUN_CONFIG).is_file() and run.evals
    }
    by_weights: dict[str, list[str]] = {}
    for name, sha in drawn.items():
        if sha is not None:
            by_weights.setdefault(sha, []).append(name)
    if len(by_weights) < 2:
        return []
    groups = "; ".join(f"{', '.join(names)} with {sha[:12]}" for sha, names in by_weights.items())
    return [f"the members scored other LoRA weights (run.json's lora_sha256): {groups}"]


def story_mismatches(runs: list[RunRecord]) -> list[str]:
    """One note per set of evaluation values whose dataset-level means are not over the same stories in every run
    that has them (a story one run could not score): the runs and their story counts, and the stories they share."""
    by_value: dict[str, dict[str, frozenset[str]]] = {}
    for run in runs:
        for value, stories in run.scored_stories(evaluations_labelled(runs)).items():
            by_value.setdefault(value, {})[run.name] = stories
    grouped: dict[tuple, list[str]] = {}
    for value, stories in by_value.items():
        if len(set(stories.values())) > 1:
            grouped.setdefault(tuple(stories.items()), []).append(value)
    notes = []
    for key, values in grouped.items():
        stories = dict(key)
        shared = len(frozenset.intersection(*stories.values()))
        counts = ", ".join(f"{run}: {len(scored)}" for run, scored in stories.items())
        notes.append(f"{', '.join(values)}: means over different stories ({counts}; {shared} in all of them)")
    return notes


def swept_keys(runs: list[RunRecord]) -> list[str]:
    """Config keys that every run has and that differ between runs (what the comparison varies)."""
    if len(runs) < 2:
        return []
    shared = set.intersection(*(set(run.config) for run in runs))
    keys = [key for key in runs[0].config if key in shared and not key.startswith(UNSWEPT)]
    return [key for key in keys if any(run.config[key] != runs[0].config[key] for run in runs[1:])]


def _metric_order(rows: dict[str, dict[str, float]]) -> list[str]:
    """Evaluation values in the order the runs report them, then the training diagnostics: at each phase's end,
    then final."""
    seen = list(dict.fromkeys(metric for values in rows.values() for metric in values))
    at_phase_ends = [m for m in seen if m not in TRAINING_METRICS and training_diagnostic(m) in TRAINING_METRICS]
    evaluation = [m for m in seen if training_diagnostic(m) not in TRAINING_METRICS]
    return evaluation + at_phase_ends + [m for m in TRAINING_METRICS if m in seen]


def _scale(metric: str) -> float:
    """What the markdown tables multiply a metric by: 100 for the cosine values (CIDS, CSD, the toy proxies), as
    `dreamshot eval` prints them and the paper's tables give them; the CSV and JSON keep every raw value."""
    diagnostic = training_diagnostic(metric) in TRAINING_METRICS
    return 100.0 if not diagnostic and is_cosine(metric.rsplit("/", 1)[-1]) else 1.0


def _arrow(metric: str) -> str:
    return metric if higher_is_better(metric) else f"{metric} ↓"


def _markdown(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(["---"] + ["---:"] * (len(headers) - 1)) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    return json.dumps(value, separators=(",", ":")) if isinstance(value, list | dict) else str(value)


def _number(value: float | None) -> str:
    if value is None:
        return "-"
    return NOT_COMPUTED if math.isnan(value) else f"{value:.4g}"


def _percent(value: float | None) -> str:
    if value is None:
        return "-"
    return "n/a" if math.isnan(value) else f"{value:+.3g}"


def _sd(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else math.nan


def _spread(summary: tuple[float, float, int] | None, seeds: int, scale: float = 1) -> str:
    """mean ± sd (times `scale`), and the count of seeds it is over when some of the `seeds` lack the metric."""
    if summary is None:
        return "-"
    mean, sd, count = summary
    mean, sd = mean * scale, sd * scale
    text = _number(mean) if math.isnan(sd) else f"{_number(mean)} ± {sd:.2g}"
    return text if count == seeds else f"{text} (n={count})"


def _paired(summary: tuple[float, int, int] | None) -> str:
    if summary is None:
        return "-"
    gain, better, seeds = summary
    return f"{_percent(gain)} ({better}/{seeds})"


def _raw(value: float | None) -> str:
    return "" if value is None or math.isnan(value) else f"{value:.6g}"
