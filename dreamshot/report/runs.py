"""The runs a report compares, read from their folders.

A run folder is a training run (`config.yaml`, `summary.json`, CSV or offline W&B logs, written by
`dreamshot train`) or an evaluation (`results.json`, written by `dreamshot eval`); a training run's own
evaluations are looked for in `<run>/eval/*/results.json`; one whose shots were drawn with other weights than the
run's own (`run.json`'s fingerprint: the run trained on, or started over, since) is not the run's and is set apart
(`RunRecord.outdated`); results.json scoring another drawing than its folder's run.json records (an interrupted
`--redraw`) are set apart too (`RunRecord.stale`). results.json written before results named their drawing are
shown, marked as of an unknown drawing (`EvalRecord.drawing_known`). A training run's steps are its summary.json's
when that summary is of the run as it stands (written at the end of its latest launch); a run still training,
stopped before its end or resumed since its summary gets the steps its CSV logs show instead, marked
(`RunRecord.training`). A group is a folder of run folders: a sweep's members land in
`outputs/<experiment>/<member>`. Its files are read by the rule of every text file a user may have edited
(`dreamshot.utils.text`: encodings, duplicate YAML keys).
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dreamshot.eval.report import RESULTS_JSON
from dreamshot.eval.resume import FINGERPRINT_KEY, RUN_RECORD, weights_sha256
from dreamshot.inference.loading import RUN_CONFIG, run_weights
from dreamshot.report.history import last_value, latest_launch, launch_number, logged_steps, read_curves
from dreamshot.training.callbacks import SUMMARY_FILE
from dreamshot.training.run_folder import RunLock
from dreamshot.utils.errors import ConfigError, DataError, DreamShotError
from dreamshot.utils.text import read_text, read_yaml_file

EVAL_DIR = "eval"
# `RunRecord.training` of a training run that has not finished: a live run holds its folder, or none does.
IN_PROGRESS = "in progress"
UNFINISHED = "unfinished"
# Training diagnostics a report compares when a run has no evaluation results (DESIGN §2, RACL).
TRAINING_METRICS = ("val/loss", "val/racl_in_mask", "val/racl_confusion")
# `<diagnostic>@phase<i>`: the diagnostic's last validation in curriculum phase i (1-based) of a run with several
# phases; RACL trains in some phases only, and its effect is read where its phase ends.
PHASE_MARK = "@phase"
# Config keys that name or place a run (or only watch it) rather than change what it computes.
UNSWEPT = (
    "name",
    "tags",
    "output_dir",
    "logger.",
    "trainer.ckpt_path",
    "trainer.checkpoint_every_n_steps",
    "trainer.keep_last_checkpoints",
    "trainer.log_every_n_steps",
    "trainer.sample.",
    "data.cache_dir",
)


@dataclass
class EvalRecord:
    """One `results.json`: dataset-level values, each story's values, and each story's scored shot count (the
    benchmark story's shots that the mode draws and scores: `Story.scored_shots`, written by `dreamshot eval`
    whether the shots were drawn by it or read from another folder). `weights_sha256`: the SHA-256 of the LoRA
    weights its shots were drawn with (`base` for none; the fingerprint results.json records, else its folder's
    `run.json`'s), None when unknown."""

    path: Path
    benchmark: str
    mode: str
    values: dict[str, float]
    per_story: dict[str, dict[str, float]]
    story_shots: dict[str, int]
    weights_sha256: str | None = None
    # Its results.json scored another drawing than its folder's run.json records: an evaluation that drew anew
    # (`--redraw`) stopped before its results, or results copied in from elsewhere.
    stale: bool = False
    # False: its results.json was written before results named the drawing they scored, so whether it scored the
    # shots its folder's run.json records (an older `--redraw` left results of the drawing before) cannot be told.
    # Its values are shown, as of the record's drawing (its weights), and marked.
    drawing_known: bool = True

    @property
    def label(self) -> str:
        return f"{self.benchmark}-{self.mode}"

    def described(self) -> str:
        """Its label, marked when its drawing is unknown."""
        return self.label if self.drawing_known else f"{self.label} (drawing unknown)"


@dataclass
class RunRecord:
    """A run as the report sees it. `config` holds dotted keys (`racl.weight`): the run's config.yaml, or for an
    evaluation-only folder the overrides of its sweep member. `setting` is its name before `read_runs` tells
    apart the runs that share one (the same member run with other seeds keeps its setting). `outdated`: the
    evaluations in its folder of other weights than its own, `stale`: those whose results scored another drawing
    than their run.json records (`EvalRecord.stale`); none of its values come from either. `steps`: the optimizer
    steps it trained, `training`: "" when it finished (or trained nothing), `IN_PROGRESS` or `UNFINISHED` when its
    steps are the ones its logs show so far."""

    name: str
    path: Path
    config: dict[str, Any] = field(default_factory=dict)
    curves: dict[str, dict[int, float]] = field(default_factory=dict)
    evals: list[EvalRecord] = field(default_factory=list)
    steps: int | None = None
    setting: str = ""
    outdated: list[EvalRecord] = field(default_factory=list)
    stale: list[EvalRecord] = field(default_factory=list)
    training: str = ""

    def __post_init__(self) -> None:
        self.setting = self.setting or self.name

    def described_steps(self) -> str:
        """The steps as the report shows them: `1800`, `700 of 1800, in progress`, `-` unknown."""
        steps = "-" if self.steps is None else str(self.steps)
        if not self.training:
            return steps
        planned = self.config.get("trainer.max_steps")
        return f"{steps} of {planned}, {self.training}" if planned is not None else f"{steps}, {self.training}"

    def metrics(self, labelled: bool = False) -> dict[str, float]:
        """Final values: every evaluation value (named `<benchmark>-<mode>/<value>` when `labelled` or the run has
        several evaluations, and by the evaluation's folder where two of the run's share a benchmark and mode),
        each of `TRAINING_METRICS` at the end of every curriculum phase but the last (`val/loss@phase1`), then the
        last logged value of each of `TRAINING_METRICS`."""
        values = {}
        for prefix, record in self._prefixed_evals(labelled):
            values.update({prefix + name: value for name, value in record.values.items()})
        for phase, end in enumerate(self.phase_ends(), start=1):
            for key in TRAINING_METRICS:
                before = {step: v for step, v in self.curves.get(key, {}).items() if step < end}
                if before:
                    values[f"{key}{PHASE_MARK}{phase}"] = last_value(before)
        values.update({key: last_value(self.curves[key]) for key in TRAINING_METRICS if self.curves.get(key)})
        return values

    def scored_stories(self, labelled: bool = False) -> dict[str, frozenset[str]]:
        """Evaluation value (named as in `metrics`) -> the stories its dataset-level mean is over: those with a
        finite value of it (a story whose references give no identity feature has no CIDS, one the judge could not
        score no alignment)."""
        stories = {}
        for prefix, record in self._prefixed_evals(labelled):
            for name in record.values if record.per_story else ():  # results written without per-story values
                scored = (story for story, values in record.per_story.items() if _finite(values.get(name)))
                stories[prefix + name] = frozenset(scored)
        return stories

    def _prefixed_evals(self, labelled: bool) -> list[tuple[str, EvalRecord]]:
        """(prefix of its value names, evaluation) for each evaluation: `<benchmark>-<mode>/` when `labelled` or
        the run has several, the evaluation's folder instead where two of the run's share a benchmark and mode."""
        labels = [record.label for record in self.evals]
        prefixed = []
        for record in self.evals:
            label = record.label if labels.count(record.label) == 1 else record.path.parent.name
            prefixed.append((f"{label}/" if labelled or len(self.evals) > 1 else "", record))
        return prefixed

    def phase_ends(self) -> list[int]:
        """The optimizer steps at which each curriculum phase the run trained past ends (a logged step below a
        phase's end was taken in it)."""
        last_logged = max((max(curve) for curve in self.curves.values() if curve), default=-1)
        return [end for end in self._curriculum_ends() if last_logged >= end]

    def crossed_phase_ends(self, key: str) -> list[int]:
        """Of `phase_ends`, those within the steps the run's curve of `key` spans: a value logged at step s is of
        the (s + 1)-th optimizer step, so a curve logged from a to b spans the steps after a through b + 1 (a RACL
        loss logged up to its phase's last step reaches that phase's end)."""
        curve = self.curves.get(key)
        if not curve:
            return []
        return [end for end in self.phase_ends() if min(curve) < end <= max(curve) + 1]

    def _curriculum_ends(self) -> list[int]:
        """The cumulative `curriculum.N.steps` of the run's config, but the last (the run's end)."""
        phases = self.config.get("curriculum") or []
        return list(itertools.accumulate(int(phase["steps"]) for phase in phases))[:-1]


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def is_run(folder: Path) -> bool:
    return (folder / RUN_CONFIG).is_file() or (folder / RESULTS_JSON).is_file()


def find_runs(folder: Path) -> list[Path]:
    """The run folders of a group folder (or the folder itself when it is one run)."""
    if is_run(folder):
        return [folder]
    if not folder.is_dir():
        # A typo in an experiment's name, or a sweep not run yet (nor written under another --root).
        what = "not a folder" if folder.exists() else "not found"
        raise ConfigError(
            f"{folder}: {what} (GROUP is an experiment whose runs are in <root>/GROUP, or a folder of runs)"
        )
    runs = sorted(child for child in folder.iterdir() if child.is_dir() and is_run(child))
    if not runs:
        raise ConfigError(f"{folder}: no run folders in it (a run folder holds {RUN_CONFIG} or {RESULTS_JSON})")
    return runs


def read_run(folder: Path, member_overrides: dict[str, list[str]] | None = None) -> RunRecord:
    """Read one run folder. `member_overrides` (a sweep's members) gives an evaluation-only folder, named after
    its member, the values its member set."""
    config = _read_config(folder / RUN_CONFIG)
    name = str(config["name"]).rsplit("/", 1)[-1] if "name" in config else folder.name
    if not config and member_overrides and name in member_overrides:
        config = parse_overrides(member_overrides[name])
    curves = read_curves(folder)
    trained = (folder / RUN_CONFIG).is_file()
    steps, training = _training_progress(folder, curves) if trained else (None, "")
    read = [_read_eval(path) for path in _results_files(folder)]
    evals, stale = [r for r in read if not r.stale], [r for r in read if r.stale]
    evals, outdated = _by_weights(folder, evals) if trained else (evals, [])
    return RunRecord(name, folder, config, curves, evals, steps, outdated=outdated, stale=stale, training=training)


def _training_progress(folder: Path, curves: dict[str, dict[int, float]]) -> tuple[int | None, str]:
    """(optimizer steps, `RunRecord.training`) of a training run. summary.json is written at the end of a launch
    and names that launch's CSV log: it is the run's own unless a later launch logged since (a resumed run's stays
    from the launch before; one without the name is the run's while the logs go no further than its steps).
    Otherwise, and while a live run holds the folder, the steps are the ones the logs show (flushed every 100
    steps, so a run in progress may be further)."""
    logged = logged_steps(curves)
    if RunLock(folder).held():
        return logged, IN_PROGRESS
    summary = folder / SUMMARY_FILE
    if summary.is_file():
        steps, launch = _read_summary(summary)
        if _summary_current(steps, launch, latest_launch(folder), logged):
            return steps, ""
    return logged, UNFINISHED


def _summary_current(steps: int, launch: int | None, latest: int | None, logged: int | None) -> bool:
    if launch is not None and latest is not None:
        return launch >= latest  # a launch that resumed a finished run and ended at once logged nothing
    return logged is None or logged <= steps


def read_runs(folders: list[Path], member_overrides: dict[str, list[str]] | None = None) -> list[RunRecord]:
    """Read every folder. Names label the table's rows, so runs that share one (the same experiment run with
    different settings) are named by what differs: `smoke (seed=1)`, else by their folder."""
    runs = [read_run(folder, member_overrides) for folder in folders]
    for name in {run.name for run in runs}:
        same = [run for run in runs if run.name == name]
        if len(same) > 1:
            for run, label in zip(same, _distinguishing_labels(same), strict=True):
                run.name = f"{name} ({label})"
    return runs


def _distinguishing_labels(runs: list[RunRecord]) -> list[str]:
    """`key=value, ...` of the computing config keys whose values differ among `runs`; the folders when none do
    (or when that leaves two alike)."""
    keys = sorted({key for run in runs for key in run.config if not key.startswith(UNSWEPT)})
    differing = [key for key in keys if len({_text(run.config.get(key)) for run in runs}) > 1]
    labels = [", ".join(f"{key}={_text(run.config.get(key))}" for key in differing) for run in runs]
    if not differing or len(set(labels)) < len(labels):
        labels = [str(run.path) for run in runs]
    return labels


def _text(value: Any) -> str:
    return json.dumps(value, separators=(",", ":")) if isinstance(value, list | dict) else str(value)


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """`key=value` overrides -> {key: value}, values read as yaml (as the config loader reads them)."""
    return {key: yaml.safe_load(value) for key, value in (item.split("=", 1) for item in overrides)}


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings -> dotted keys; lists stay values."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _read_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    body = read_yaml_file(path, "run config") or {}
    if not isinstance(body, dict):
        raise DataError(f"{path}: a run config is a mapping of config keys, got a {type(body).__name__}")
    return flatten(body)


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(read_text(path, what))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: {what} is not valid JSON ({e})") from None


def _read_summary(path: Path) -> tuple[int, int | None]:
    """(optimizer steps, N of the CSV log `csv/version_N` of the launch that wrote it, None when unnamed) of a run's
    summary.json."""
    body = _read_json(path, "run summary")
    try:
        metrics = body.get("metrics")
        return int(body["steps"]), launch_number(Path(metrics)) if isinstance(metrics, str) else None
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise DataError(f"{path}: not a run summary of `dreamshot train` ({type(e).__name__}: {e})") from None


def _results_files(folder: Path) -> list[Path]:
    own = [folder / RESULTS_JSON] if (folder / RESULTS_JSON).is_file() else []
    return own + sorted((folder / EVAL_DIR).glob(f"*/{RESULTS_JSON}"))


def _by_weights(run_dir: Path, evals: list[EvalRecord]) -> tuple[list[EvalRecord], list[EvalRecord]]:
    """A training run's evaluations: (of its weights, of other weights). Other: shots drawn with other LoRA weights
    than the ones `dreamshot eval --run` scores now (every drawn one when the run has none yet: it started over).
    One without a drawing record (shots read from a folder, or written before run records) cannot be told apart
    and counts as the run's."""
    drawn = [record.weights_sha256 for record in evals]
    if not any(drawn):
        return evals, []
    try:
        current = weights_sha256(run_weights(run_dir))
    except DreamShotError:
        current = None
    other = [sha not in (None, current) for sha in drawn]
    return [r for r, o in zip(evals, other, strict=True) if not o], [r for r, o in zip(evals, other, strict=True) if o]


def _recorded_drawing(eval_dir: Path) -> dict | None:
    """The fingerprint of the drawing an evaluation folder's `run.json` records (None: none, or shots read)."""
    try:
        fingerprint = json.loads(read_text(eval_dir / RUN_RECORD, "run record")).get(FINGERPRINT_KEY)
    except (DreamShotError, json.JSONDecodeError, AttributeError):
        return None
    return fingerprint if isinstance(fingerprint, dict) else None


def _lora_sha256(fingerprint: Any) -> str | None:
    return fingerprint.get("lora_sha256") if isinstance(fingerprint, dict) else None


def _read_eval(path: Path) -> EvalRecord:
    body = _read_json(path, "results file")
    try:
        values = {name: float(m["value"]) for name, m in body["metrics"].items() if "value" in m}
        per_story = {story: dict(v) for story, v in body.get("per_story", {}).items()}
        story_shots = {story: int(n) for story, n in body.get("story_shots", {}).items()}
        benchmark, mode = body["benchmark"], body["mode"]
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise DataError(f"{path}: not a results file of `dreamshot eval` ({type(e).__name__}: {e})") from None
    recorded = _recorded_drawing(path.parent)
    known = FINGERPRINT_KEY in body
    # Results written before they named their drawing: taken as of the record's, and marked.
    scored = body[FINGERPRINT_KEY] if known else recorded
    stale = scored != recorded
    return EvalRecord(path, benchmark, mode, values, per_story, story_shots, _lora_sha256(scored), stale, known)
