"""`dreamshot report`: reading run folders (CSV logs, results.json), the comparison table, the plots as files,
missing data shown as such, and the W&B logging of a report. Run folders are written here in the formats training and
evaluation write (the sweep test in test_sweeps.py makes real ones)."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import socket
import time
from pathlib import Path

import pytest
from PIL import Image

from dreamshot.cli import main
from dreamshot.config.load import load_config, sweep_members, to_yaml
from dreamshot.eval.report import EvalResults, write_results
from dreamshot.eval.resume import FINGERPRINT_KEY, file_sha256
from dreamshot.report.build import read_report, write_report
from dreamshot.report.history import read_curves
from dreamshot.report.plots import guidance_grid_figure, loss_curves_figure
from dreamshot.report.runs import RunRecord, find_runs, read_run, read_runs
from dreamshot.report.table import ComparisonTable, build_table, missing_data, relative_improvement
from dreamshot.report.wandb_log import log_report, wandb_setting
from dreamshot.utils.errors import DataError

CSV_COLUMNS = ["epoch", "step", "train/loss", "train/loss_fm", "val/loss", "val/racl_in_mask", "val/racl_confusion"]


def write_metrics(run: Path, version: int, rows: list[dict]) -> None:
    path = run / "csv" / f"version_{version}" / "metrics.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, CSV_COLUMNS)
        writer.writeheader()
        writer.writerows({"epoch": 0, **row} for row in rows)


def write_eval(
    folder: Path, values: dict[str, float], story_shots: dict[str, int], fingerprint: dict | None = None
) -> None:
    """results.json as `dreamshot eval` writes it, naming the drawing it scored (None: shots read from a folder)."""
    per_story = {story: {name: value + 0.01 * n for name, value in values.items()} for story, n in story_shots.items()}
    extra = {FINGERPRINT_KEY: fingerprint}
    results = EvalResults("toy", "r2s", folder.name, values, {"aes": "not set"}, per_story, story_shots, extra)
    write_results(folder, results)


def settled(read, size: int, timeout: float = 20.0):
    """`read()` once it holds `size` items: W&B's service process finishes writing a run's files after
    `finish()` returns."""
    deadline = time.monotonic() + timeout
    while len(value := read()) < size and time.monotonic() < deadline:
        time.sleep(0.2)
    return value


def make_run(group: Path, member: str, final: dict[str, float], toy_identity: float) -> Path:
    """A finished toy_racl_ablation member: config.yaml, summary.json, CSV logs, one toy evaluation."""
    run = group / member
    cfg = load_config("toy_racl_ablation", [f"output_dir={run}"], member)
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(to_yaml(cfg))
    (run / "summary.json").write_text('{"steps": 4}')
    rows = [{"step": s, "train/loss": 1.6 - 0.1 * s, "train/loss_fm": 1.5 - 0.1 * s} for s in range(4)]
    rows.append({"step": 3, **final})
    write_metrics(run, 0, rows)
    write_eval(run / "eval" / "toy-r2s", {"toy_identity_cross": toy_identity}, {"story-a": 2, "story-b": 4})
    return run


@pytest.fixture
def sweep_group(tmp_path: Path) -> Path:
    group = tmp_path / "outputs" / "toy_racl_ablation"
    make_run(group, "with_racl", {"val/loss": 0.9, "val/racl_in_mask": 0.6, "val/racl_confusion": 0.1}, 0.4)
    make_run(group, "without_racl", {"val/loss": 1.0, "val/racl_in_mask": 0.3, "val/racl_confusion": 0.2}, 0.2)
    return group


def test_a_resumed_runs_later_log_wins_and_diagnostics_without_value_are_dropped(tmp_path: Path):
    write_metrics(tmp_path, 0, [{"step": s, "train/loss": 10.0 + s} for s in range(4)])
    # Resumed from step 2: steps 2 and 3 are trained (and logged) again.
    write_metrics(tmp_path, 1, [{"step": s, "train/loss": float(s)} for s in (2, 3, 4)])
    write_metrics(tmp_path, 10, [{"step": 4, "val/racl_in_mask": "nan"}, {"step": 5, "val/racl_in_mask": 0.5}])
    curves = read_curves(tmp_path)
    assert curves["train/loss"] == {0: 10.0, 1: 11.0, 2: 2.0, 3: 3.0, 4: 4.0}
    assert curves["val/racl_in_mask"] == {5: 0.5}


def test_a_run_folder_gives_its_config_final_metrics_and_evaluations(sweep_group: Path):
    run = read_run(sweep_group / "with_racl")
    assert run.name == "with_racl" and run.steps == 4
    assert run.config["racl.weight"] == 0.1 and run.config["logger.group"] == "toy_racl_ablation"
    (record,) = run.evals
    assert record.label == "toy-r2s" and record.story_shots == {"story-a": 2, "story-b": 4}
    assert record.per_story["story-b"]["toy_identity_cross"] == pytest.approx(0.44)
    assert "aes" not in record.values  # reported missing, not a value
    assert run.metrics() == {
        "toy_identity_cross": 0.4,
        "val/loss": 0.9,
        "val/racl_in_mask": 0.6,
        "val/racl_confusion": 0.1,
    }


def test_run_files_are_read_by_the_text_rule(sweep_group: Path, capsys):
    """A config.yaml saved as UTF-16 by a Windows editor and a results.json with a UTF-8 byte-order mark are read;
    a key written twice is an error naming the file, not the last value silently."""
    run = sweep_group / "with_racl"
    config = run / "config.yaml"
    config.write_bytes(config.read_text().encode("utf-16"))
    results = run / "eval" / "toy-r2s" / "results.json"
    results.write_bytes(results.read_text().encode("utf-8-sig"))
    record = read_run(run)
    assert record.config["racl.weight"] == 0.1 and record.evals[0].story_shots == {"story-a": 2, "story-b": 4}
    config.write_text("name: toy_racl_ablation/with_racl\nseed: 0\nseed: 1\n")
    assert main(["report", str(sweep_group)]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "with_racl/config.yaml" in err and "duplicate key 'seed', line 3" in err
    config.write_bytes("seed: 0 # café\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"config.yaml: run config is not UTF-8 text \(byte 13\)"):
        read_run(run)


def test_relative_improvement_is_positive_when_better_in_either_direction():
    assert relative_improvement(1.1, 1.0, higher_better=True) == pytest.approx(10.0)
    assert relative_improvement(0.9, 1.0, higher_better=False) == pytest.approx(10.0)
    assert relative_improvement(1.2, -2.0, higher_better=True) == pytest.approx(160.0)
    assert math.isnan(relative_improvement(0.5, 0.0, higher_better=True))


def test_a_change_against_a_baseline_near_zero_is_not_a_percentage():
    # 0 against 1e-9 would be "-100%" (and "+100%" for a lower-is-better metric): the baseline is noise.
    assert math.isnan(relative_improvement(0.0, 1e-9, higher_better=False))
    # Near 0 for the metric's own scale: 0.0004 against the largest value 0.9 of the runs.
    assert math.isnan(relative_improvement(0.9, 0.0004, higher_better=True, scale=0.9))
    assert relative_improvement(0.9, 0.3, higher_better=True, scale=0.9) == pytest.approx(200.0)


def test_the_table_marks_a_near_zero_baseline_n_a(sweep_group: Path):
    runs = read_runs(find_runs(sweep_group))
    runs[1].evals[0].values["toy_identity_cross"] = 1e-9
    table = build_table("toy_racl_ablation", runs, baseline="without_racl")
    assert math.isnan(table.relative()["with_racl"]["toy_identity_cross"])
    relative_rows = table.to_markdown().split("Relative improvement")[1]
    # Not "+4e+10": the other metrics keep their changes.
    assert "| with_racl | 0.1 | n/a | +10 | +100 | +50 |" in relative_rows


def test_table_finds_the_swept_key_and_compares_against_the_baseline(sweep_group: Path):
    runs = read_runs(find_runs(sweep_group))
    table = build_table("toy_racl_ablation", runs, baseline="without_racl")
    assert table.swept_keys == ["racl.weight"]
    assert table.metrics == ["toy_identity_cross", "val/loss", "val/racl_in_mask", "val/racl_confusion"]
    gains = table.relative()["with_racl"]
    assert gains == pytest.approx(
        {"toy_identity_cross": 100.0, "val/loss": 10.0, "val/racl_in_mask": 100.0, "val/racl_confusion": 50.0}
    )
    rows = list(csv.DictReader(io.StringIO(table.to_csv())))
    assert [r["run"] for r in rows] == ["with_racl", "without_racl"]
    assert float(rows[0]["val/racl_confusion vs without_racl (%)"]) == pytest.approx(50.0)
    assert rows[1]["val/loss vs without_racl (%)"] == ""


def test_report_command_writes_tables_and_plots_of_a_sweep(sweep_group: Path, capsys):
    root = sweep_group.parent
    assert main(["report", "toy_racl_ablation", "--root", str(root)]) == 0
    out = sweep_group / "report"
    markdown = (out / "report.md").read_text()
    # Runs in the sweep's member order; the baseline is its first member.
    assert markdown.index("| with_racl |") < markdown.index("| without_racl |")
    assert "baseline: with_racl" in markdown and "swept: racl.weight" in markdown
    plots = {"relative_improvement", "shot_count", "loss_curves"}
    for name in plots:
        assert f"(plots/{name}.png)" in markdown
        with Image.open(out / "plots" / f"{name}.png") as image:
            assert image.format == "PNG" and image.width > 400
    table, read_plots = read_report(out)
    assert set(read_plots) == plots and table.baseline == "with_racl"
    assert table.rows["without_racl"]["val/racl_in_mask"] == 0.3
    assert "| without_racl | 0.0 |" in capsys.readouterr().out


def test_evaluation_only_members_get_their_swept_values_and_the_guidance_grid(tmp_path: Path):
    group = tmp_path / "toy_guidance"
    members = sweep_members("toy_guidance")
    for i, member in enumerate(["w1_0-w2_1", "w1_0-w2_5", "w1_4-w2_1", "w1_4-w2_5"]):
        write_eval(group / member, {"toy_identity_cross": 0.1 * i, "toy_style_self": 0.5}, {"s": 3})
    runs = read_runs(find_runs(group), members)
    report = write_report("toy_guidance", runs, tmp_path / "report", baseline="w1_0-w2_1")
    assert report.table.swept_keys == ["inference.omega1", "inference.omega2"]
    assert report.table.swept["w1_4-w2_5"] == {"inference.omega1": 4, "inference.omega2": 5}
    assert {"guidance_grid", "relative_improvement"} <= set(report.plots)
    # Nothing was trained here, and one story of 3 shots has no trend over the shot count.
    assert not {"loss_curves", "shot_count"} & set(report.plots)


def test_report_errors_name_the_folder_and_the_baseline(tmp_path: Path, sweep_group: Path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    assert "empty: no run folders" in capsys.readouterr().err
    assert main(["report", "toy_racl_ablatoin", "--root", str(tmp_path)]) == 2
    assert "toy_racl_ablatoin: not found (GROUP is an experiment" in capsys.readouterr().err
    assert main(["report", "toy_racl_ablation", "--root", str(sweep_group.parent), "--baseline", "nope"]) == 2
    assert "baseline 'nope' is not a run of toy_racl_ablation" in capsys.readouterr().err


def test_wandb_setting_follows_the_runs_and_the_environment(sweep_group: Path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    runs = read_runs(find_runs(sweep_group))
    assert wandb_setting(runs) == ("dreamshot", "offline")
    monkeypatch.setenv("WANDB_MODE", "online")
    assert wandb_setting(runs) == ("dreamshot", "online")
    for run in runs:
        run.config["logger.backend"] = "csv"
    monkeypatch.delenv("WANDB_MODE")
    assert wandb_setting(runs)[1] == "disabled"


def test_the_environment_does_not_turn_w_and_b_on_for_runs_that_never_used_it(sweep_group: Path, monkeypatch):
    runs = read_runs(find_runs(sweep_group))
    for run in runs:
        run.config["logger.backend"] = "csv"
    monkeypatch.setenv("WANDB_MODE", "online")
    assert wandb_setting(runs)[1] == "disabled"


def test_a_logged_report_holds_its_plots(sweep_group: Path, tmp_path: Path):
    report = write_report("toy_racl_ablation", read_runs(find_runs(sweep_group)), tmp_path / "report", "with_racl")
    log_report(report, "dreamshot-test", "offline", tmp_path)
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    media = run_dir / "files" / "media"
    logged = settled(lambda: {path.name.split("_")[0] for path in (media / "images" / "report").glob("*.png")}, 3)
    assert logged == {"relative", "shot", "loss"}
    assert list((media / "table" / "report").glob("table_*.table.json"))


def test_runs_of_one_experiment_with_other_settings_are_named_by_what_differs(tmp_path: Path, capsys):
    for seed in (1, 2):
        run = tmp_path / f"run{seed}"
        run.mkdir()
        (run / "config.yaml").write_text(to_yaml(load_config("smoke", [f"seed={seed}", f"output_dir={run}"])))
        write_metrics(run, 0, [{"step": 4, "val/loss": 1.0 + seed}])
    runs = read_runs([tmp_path / "run1", tmp_path / "run2"])
    assert [run.name for run in runs] == ["smoke (seed=1)", "smoke (seed=2)"]
    assert main(["report", "smokes", str(tmp_path / "run1"), str(tmp_path / "run2"), "--out", str(tmp_path / "r")]) == 0
    assert "| smoke (seed=2) | 2 | 3 |" in capsys.readouterr().out


def test_a_member_without_data_is_a_warning_and_a_note_not_an_empty_row(sweep_group: Path, capsys):
    # without_racl never ran: its folder is gone; an extra run folder holds a config but logged nothing.
    for path in sorted((sweep_group / "without_racl").rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    (sweep_group / "without_racl").rmdir()
    empty = sweep_group / "crashed"
    empty.mkdir()
    (empty / "config.yaml").write_text(to_yaml(load_config("toy_racl_ablation", [f"output_dir={empty}"], "with_racl")))
    (empty / "config.yaml").write_text((empty / "config.yaml").read_text().replace("with_racl", "crashed"))
    notes = missing_data(read_runs(find_runs(sweep_group)), ["with_racl", "without_racl"])
    assert notes[0].startswith("member without_racl: no run folder") and notes[1].startswith("crashed: no metrics")
    assert main(["report", "toy_racl_ablation", "--root", str(sweep_group.parent)]) == 0
    err = capsys.readouterr().err
    assert "warning: member without_racl: no run folder" in err and "warning: crashed: no metrics" in err
    markdown = (sweep_group / "report" / "report.md").read_text()
    assert "Missing data:" in markdown and "- member without_racl: no run folder" in markdown


def test_the_shot_count_plot_needs_stories_of_two_shot_counts(sweep_group: Path, tmp_path: Path):
    runs = read_runs(find_runs(sweep_group))
    assert "shot_count" in write_report("g", runs, tmp_path / "two", "with_racl").plots
    for run in runs:
        run.evals[0].story_shots = {story: 3 for story in run.evals[0].story_shots}
    assert "shot_count" not in write_report("g", runs, tmp_path / "one", "with_racl").plots
    # Written again where the first report drew it, the figure it no longer has is not left behind as its own.
    assert not write_report("g", runs, tmp_path / "two", "with_racl").plots.keys() & {"shot_count"}
    assert not (tmp_path / "two" / "plots" / "shot_count.png").exists()


def seeded_run(setting: str, seed: int, weight: float, in_mask: float, loss: float) -> RunRecord:
    curves = {"val/racl_in_mask": {100: in_mask}, "val/loss": {100: loss}}
    config = {"seed": seed, "racl.weight": weight, "output_dir": f"outputs/s{seed}/{setting}"}
    return RunRecord(f"{setting} (seed={seed})", Path(f"s{seed}/{setting}"), config, curves, setting=setting)


def test_runs_of_one_setting_with_other_seeds_are_summarised_and_paired_against_the_baseline():
    runs = [
        seeded_run("without", 0, 0.0, 0.10, 0.80),
        seeded_run("without", 1, 0.0, 0.12, 0.90),
        seeded_run("without", 2, 0.0, 0.14, 0.70),
        seeded_run("with", 0, 0.1, 0.15, 0.85),
        seeded_run("with", 1, 0.1, 0.11, 0.95),
        seeded_run("with", 2, 0.1, 0.19, 0.75),
    ]
    table = build_table("g", runs, baseline="without (seed=0)")
    assert table.seed_groups() == {"without": [r.name for r in runs[:3]], "with": [r.name for r in runs[3:]]}
    mean, sd, seeds = table.across_seeds()["with"]["val/racl_in_mask"]
    assert (mean, seeds) == (pytest.approx(0.15), 3) and sd == pytest.approx(0.04)
    gain, better, pairs = table.paired_over_seeds()["with"]["val/racl_in_mask"]
    assert gain == pytest.approx(25.0) and (better, pairs) == (2, 3)  # seed 1: 0.11 < 0.12
    gain, better, pairs = table.paired_over_seeds()["with"]["val/loss"]
    assert gain == pytest.approx(-100 * 0.05 / 0.8) and (better, pairs) == (0, 3)  # lower is better: worse in all
    text = table.to_markdown()
    assert "| with | 3 | 0.85 ± 0.1 | 0.15 ± 0.04 |" in text and "| with | 3 | -6.25 (0/3) | +25 (2/3) |" in text


def test_no_seed_summary_without_two_seeds_of_one_setting():
    runs = [seeded_run("without", 0, 0.0, 0.10, 0.80), seeded_run("with", 1, 0.1, 0.15, 0.85)]
    table = build_table("g", runs, baseline="without (seed=0)")
    assert table.seed_groups() == {} and "Across seeds" not in table.to_markdown()


def test_the_diagnostics_are_also_read_where_each_curriculum_phase_ends():
    # Two phases of 10 and 5 steps: validations at steps 4 and 9 fall in phase 1 (RACL), 14 in phase 2.
    curves = {
        "val/racl_in_mask": {4: 0.2, 9: 0.3, 14: 0.25},
        "val/loss": {4: 1.0, 9: 0.9, 14: 0.8},
        "train/loss": {s: 1.0 for s in range(15)},
    }
    curriculum = [{"steps": 10, "resolution": [64, 112], "use_racl": True}, {"steps": 5, "use_racl": False}]
    run = RunRecord("r", Path("r"), {"curriculum": curriculum}, curves)
    metrics = run.metrics()
    assert metrics["val/racl_in_mask@phase1"] == 0.3 and metrics["val/loss@phase1"] == 0.9
    assert metrics["val/racl_in_mask"] == 0.25 and "val/racl_confusion@phase1" not in metrics
    assert "val/racl_in_mask@phase2" not in metrics  # the last phase's end is the final value
    stopped_in_phase_1 = RunRecord("s", Path("s"), {"curriculum": curriculum}, {"val/loss": {4: 1.0, 9: 0.9}})
    assert "val/loss@phase1" not in stopped_in_phase_1.metrics()
    table = build_table("g", [run, stopped_in_phase_1], baseline="r")
    assert table.metrics == ["val/loss@phase1", "val/racl_in_mask@phase1", "val/loss", "val/racl_in_mask"]
    assert "val/loss@phase1 ↓" in table.to_markdown()  # lower is better, as val/loss


def test_the_training_curves_show_the_racl_loss_and_the_phase_ends():
    curriculum = [{"steps": 10, "use_racl": True}, {"steps": 5, "use_racl": False}]
    curves = {"train/loss_fm": {s: 1.0 for s in range(15)}, "train/loss_racl": {s: 0.9 for s in range(10)}}
    figure = loss_curves_figure([RunRecord("r", Path("r"), {"curriculum": curriculum}, curves)], "g")
    titles = [ax.get_title() for ax in figure.axes]
    assert titles == ["train/loss_fm (EMA 0.9) ↓", "train/loss_racl (EMA 0.9) ↓"]
    for ax in figure.axes:  # the end of phase 1, a vertical line at step 10
        assert any(list(line.get_xdata()) == [10, 10] for line in ax.get_lines())


def write_eval_in_mode(folder: Path, mode: str, values: dict[str, float]) -> None:
    read_shots = {FINGERPRINT_KEY: None}
    write_results(folder, EvalResults("toy", mode, folder.name, values, {}, {"s": values}, {"s": 3}, read_shots))


def test_evaluations_of_other_modes_are_never_one_column(tmp_path: Path):
    """A run scored in r2s and one scored in t2s: their values are not comparable, so they are two columns (and no
    relative change between them), as they are for a run holding both."""
    write_eval_in_mode(tmp_path / "a", "r2s", {"toy_identity_cross": 0.4})
    write_eval_in_mode(tmp_path / "b", "t2s", {"toy_identity_cross": 0.2})
    table = build_table("g", read_runs([tmp_path / "a", tmp_path / "b"]), baseline="a")
    assert table.metrics == ["toy-r2s/toy_identity_cross", "toy-t2s/toy_identity_cross"]
    assert table.rows["b"] == {"toy-t2s/toy_identity_cross": 0.2}
    assert table.relative() == {"b": {}}


def test_two_evaluations_of_a_run_in_one_mode_are_named_by_their_folders(tmp_path: Path):
    run = tmp_path / "run"
    write_eval_in_mode(run / "eval" / "toy-r2s", "r2s", {"toy_identity_cross": 0.4})
    write_eval_in_mode(run / "eval" / "toy-r2s-steps10", "r2s", {"toy_identity_cross": 0.3})
    assert read_run(run).metrics() == {"toy-r2s/toy_identity_cross": 0.4, "toy-r2s-steps10/toy_identity_cross": 0.3}


def test_what_a_resumed_run_trains_again_replaces_every_later_step_of_the_launch_before(tmp_path: Path):
    """Killed at step 9 with its last checkpoint at step 5, resumed and killed again at step 7: the first launch's
    steps 6-9 (its validation at 9 among them) are not of the run as it stands, so its final val/loss is step 4's."""
    validations = [{"step": 4, "val/loss": 4.0}, {"step": 9, "val/loss": 9.0}]
    write_metrics(tmp_path, 0, [{"step": s, "train/loss": 10.0 + s} for s in range(10)] + validations)
    write_metrics(tmp_path, 1, [{"step": s, "train/loss": float(s)} for s in (5, 6, 7)])
    curves = read_curves(tmp_path)
    assert curves["train/loss"] == {0: 10.0, 1: 11.0, 2: 12.0, 3: 13.0, 4: 14.0, 5: 5.0, 6: 6.0, 7: 7.0}
    assert curves["val/loss"] == {4: 4.0}


def test_a_run_started_over_in_its_folder_shows_none_of_the_run_before(tmp_path: Path):
    """`trainer.overwrite=true` keeps the folder's csv/ logs: the new run's version starts at step 0 and replaces
    them, so a 2-step run is not reported with the old run's validation."""
    write_metrics(
        tmp_path, 0, [{"step": s, "train/loss": 10.0 + s} for s in range(10)] + [{"step": 9, "val/loss": 9.0}]
    )
    write_metrics(tmp_path, 1, [{"step": s, "train/loss": float(s)} for s in (0, 1)])
    assert read_curves(tmp_path) == {"train/loss": {0: 0.0, 1: 1.0}}


def test_an_evaluation_of_weights_the_run_no_longer_has_is_left_out_and_noted(sweep_group: Path, capsys):
    """with_racl was scored, then trained on (its LoRA changed): the old score is not the run's."""
    run = sweep_group / "with_racl"
    lora = run / "lora.safetensors"
    lora.write_bytes(b"weights of step 4")
    eval_dir = run / "eval" / "toy-r2s"
    drawing = {"lora_sha256": file_sha256(lora)}
    write_eval(eval_dir, {"toy_identity_cross": 0.4}, {"story-a": 2, "story-b": 4}, drawing)
    (eval_dir / "run.json").write_text(json.dumps({"identity": {}, "fingerprint": drawing}))
    assert read_run(run).metrics()["toy_identity_cross"] == 0.4
    lora.write_bytes(b"weights of step 8")
    record = read_run(run)
    assert "toy_identity_cross" not in record.metrics() and [e.path.parent for e in record.outdated] == [eval_dir]
    assert main(["report", "toy_racl_ablation", "--root", str(sweep_group.parent)]) == 0
    assert f"warning: with_racl: toy-r2s in {eval_dir} left out: its shots were drawn with other weights" in (
        capsys.readouterr().err
    )
    table, _ = read_report(sweep_group / "report")
    assert "toy_identity_cross" not in table.rows["with_racl"] and "toy_identity_cross" in table.rows["without_racl"]
    lora.unlink()  # started over, no weights yet: every drawn evaluation is of the run before
    assert read_run(run).outdated and not read_run(run).evals


def test_a_sweep_run_with_seeds_keeps_its_member_order_and_its_first_member_as_the_baseline(tmp_path: Path, capsys):
    """The runs named on the line last member first: the report still lists with_racl first and measures against
    it, as it does for the sweep's own folders, though every run is named `member (seed=S)`."""
    folders = []
    for member in ("without_racl", "with_racl"):
        for seed in (0, 1):
            run = tmp_path / f"seed{seed}" / member
            run.mkdir(parents=True)
            (run / "config.yaml").write_text(
                to_yaml(load_config("toy_racl_ablation", [f"seed={seed}", f"output_dir={run}"], member))
            )
            write_metrics(run, 0, [{"step": 4, "val/loss": 1.0 + seed}])
            folders.append(str(run))
    assert main(["report", "toy_racl_ablation", *folders, "--out", str(tmp_path / "report")]) == 0
    table, _ = read_report(tmp_path / "report")
    assert table.baseline == "with_racl (seed=0)"
    assert [table.settings[run] for run in table.runs] == ["with_racl", "with_racl", "without_racl", "without_racl"]
    # --baseline names the member: its runs are the baselines, each for its seed.
    assert (
        main(["report", "toy_racl_ablation", *folders, "--out", str(tmp_path / "r2"), "--baseline", "without_racl"])
        == 0
    )
    table, _ = read_report(tmp_path / "r2")
    assert table.baseline == "without_racl (seed=0)" and set(table.relative()) == {
        "with_racl (seed=0)",
        "with_racl (seed=1)",
    }


def test_a_setting_is_set_against_the_baseline_over_the_seeds_both_have():
    """with's seed 2 has no in-mask share (its validation never ran): its mean over seeds 0 and 1 is set against the
    baseline's over seeds 0 and 1, where it is better in both, not against a mean lifted by the baseline's seed 2."""
    runs = [
        seeded_run("without", 0, 0.0, 0.10, 0.80),
        seeded_run("without", 1, 0.0, 0.12, 0.90),
        seeded_run("without", 2, 0.0, 0.30, 0.70),
        seeded_run("with", 0, 0.1, 0.11, 0.85),
        seeded_run("with", 1, 0.1, 0.13, 0.95),
        seeded_run("with", 2, 0.1, 0.0, 0.75),
    ]
    del runs[-1].curves["val/racl_in_mask"]
    table = build_table("g", runs, baseline="without (seed=0)")
    gain, better, pairs = table.paired_over_seeds()["with"]["val/racl_in_mask"]
    assert gain == pytest.approx(100 * 0.01 / 0.11) and (better, pairs) == (2, 2)
    assert table.across_seeds()["with"]["val/racl_in_mask"][2] == 2
    assert "| with | 3 | 0.85 ± 0.1 | 0.12 ± 0.014 (n=2) |" in table.to_markdown()


def test_with_seeds_each_run_is_measured_against_the_baseline_settings_run_of_its_own_seed(tmp_path: Path):
    """Against `without (seed=0)` alone, `without (seed=1)` would show a change that is only seed noise, and every
    `with` run of seed 1 or 2 would carry it; the baseline setting's runs are the baselines, each for its seed."""
    runs = [
        seeded_run("without", 0, 0.0, 0.10, 0.80),
        seeded_run("without", 1, 0.0, 0.20, 0.90),
        seeded_run("with", 0, 0.1, 0.11, 0.80),
        seeded_run("with", 1, 0.1, 0.22, 0.90),
        seeded_run("with", 2, 0.1, 0.30, 0.90),
    ]
    table = build_table("g", runs, baseline="without (seed=0)")
    assert table.relative()["with (seed=1)"]["val/racl_in_mask"] == pytest.approx(10.0)  # not +120% against seed 0
    assert table.compared_runs() == {"with (seed=0)": "without (seed=0)", "with (seed=1)": "without (seed=1)"}
    text = table.to_markdown()
    assert "Relative improvement over `without (same seed)`" in text
    assert "Not measured (no run of `without (same seed)`): with (seed=2)" in text
    assert "val/racl_in_mask vs without (same seed) (%)" in table.to_csv()
    report = write_report("g", runs, tmp_path, "without (seed=0)")
    assert "relative_improvement" in report.plots


def test_means_over_different_stories_are_a_note(tmp_path: Path, capsys):
    """b's identity value is a mean over one story of two (the other's references gave no feature): set against a's
    mean over both, the table must say so; its style value, over the same stories as a's, needs no note."""
    scored = {"s1": {"cids_cross": 0.5, "csd_cross": 0.4}, "s2": {"cids_cross": 0.1, "csd_cross": 0.4}}
    partial = {"s1": {"cids_cross": 0.5, "csd_cross": 0.4}, "s2": {"csd_cross": 0.4}}
    for name, per_story, cids in (("a", scored, 0.3), ("b", partial, 0.5)):
        values = {"cids_cross": cids, "csd_cross": 0.4}
        results = EvalResults("toy", "r2s", name, values, {}, per_story, {"s1": 3, "s2": 3}, {FINGERPRINT_KEY: None})
        write_results(tmp_path / name, results)
    notes = missing_data(read_runs([tmp_path / "a", tmp_path / "b"]), [])
    assert notes == ["cids_cross: means over different stories (a: 2, b: 1; 1 in all of them)"]
    assert main(["report", "g", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "r")]) == 0
    assert "warning: cids_cross: means over different stories" in capsys.readouterr().err


def guidance_run(w1: float, w2: float, seed: int, loss: float, folder: str = "") -> RunRecord:
    config = {"inference.omega1": w1, "inference.omega2": w2, "seed": seed}
    name = f"w1_{w1}-w2_{w2} (seed={seed}{folder})"
    return RunRecord(name, Path(name), config, {"val/loss": {10: loss}})


def test_the_guidance_grid_shows_the_mean_of_a_cell_several_seeds_share():
    runs = [guidance_run(w1, w2, seed, loss) for w1, w2, seed, loss in [(0, 1, 0, 0.8), (0, 1, 1, 0.6), (4, 5, 0, 0.2)]]
    figure = guidance_grid_figure(build_table("g", runs))
    texts = {text.get_text(): text.get_color() for text in figure.axes[0].texts}
    assert set(texts) == {"0.7\n(n=2)", "0.2"}  # not the last seed's 0.6
    # val/loss is lower-is-better: its best cell is the bright end of the reversed map, so its text is black.
    assert texts["0.2"] == "black" and texts["0.7\n(n=2)"] == "white"


def test_no_guidance_grid_when_runs_that_share_a_cell_are_not_told_apart_by_seed():
    """Two trained runs' guidance sweeps in one report: their cells would mix the two runs' values."""
    runs = [guidance_run(0, 1, 0, 0.8, " a"), guidance_run(0, 1, 0, 0.6, " b"), guidance_run(4, 5, 0, 0.2)]
    for run in runs:
        del run.config["seed"]
    assert guidance_grid_figure(build_table("g", runs)) is None


def test_a_log_line_still_being_written_is_not_read(tmp_path: Path):
    """A run in progress (or killed mid-write): its last row is cut, `0.4` of `0.45`; a file not written yet is
    no row, not an error."""
    path = tmp_path / "csv" / "version_0" / "metrics.csv"
    path.parent.mkdir(parents=True)
    path.write_text("epoch,step,val/loss\n0,9,0.5\n0,12,0.4")
    assert read_curves(tmp_path) == {"val/loss": {9: 0.5}}
    path.write_text("")
    assert read_curves(tmp_path) == {}


def test_the_markdown_tables_give_cosine_values_x100_as_eval_and_the_paper_do(sweep_group: Path):
    table = build_table("toy_racl_ablation", read_runs(find_runs(sweep_group)), baseline="without_racl")
    text = table.to_markdown()
    assert "| run | racl.weight | toy_identity_cross ×100 | val/loss ↓ |" in text
    assert "| with_racl | 0.1 | 40 | 0.9 |" in text  # the in-mask share is a share, not a cosine: as it is
    assert "| with_racl | 0.1 | +100 |" in text  # a relative change has no unit to scale
    assert next(csv.DictReader(io.StringIO(table.to_csv())))["toy_identity_cross"] == "0.4"


def test_an_evaluation_time_sweep_whose_members_scored_other_weights_is_noted(tmp_path: Path):
    """The trained run was trained on between two members' evaluations: the grid's cells differ by more than ω."""
    group = tmp_path / "toy_guidance"
    members = sweep_members("toy_guidance")
    for member, sha in (("w1_0-w2_1", "a" * 64), ("w1_0-w2_5", "a" * 64), ("w1_4-w2_1", "b" * 64)):
        write_eval(group / member, {"toy_identity_cross": 0.1}, {"s": 3}, {"lora_sha256": sha})
        (group / member / "run.json").write_text(json.dumps({"identity": {}, "fingerprint": {"lora_sha256": sha}}))
    notes = missing_data(read_runs(find_runs(group), members), list(members))
    assert notes[-1] == (
        "the members scored other LoRA weights (run.json's lora_sha256): w1_0-w2_1, w1_0-w2_5 with aaaaaaaaaaaa; "
        "w1_4-w2_1 with bbbbbbbbbbbb"
    )


def test_results_of_another_drawing_than_their_folders_run_json_are_left_out_and_noted(tmp_path: Path):
    """An evaluation-only member re-scored with --redraw and stopped before its results: run.json names the new
    drawing, results.json (which records the drawing it scored) the old one; its values are not of the record."""
    group = tmp_path / "toy_guidance"
    members = sweep_members("toy_guidance")
    for member, scored in (("w1_0-w2_1", "a" * 64), ("w1_0-w2_5", "b" * 64)):
        results = EvalResults("toy", "r2s", member, {"toy_identity_cross": 0.1}, {}, {"s": {}}, {"s": 3})
        results.extra["fingerprint"] = {"lora_sha256": scored}
        write_results(group / member, results)
        (group / member / "run.json").write_text(json.dumps({"identity": {}, "fingerprint": {"lora_sha256": "a" * 64}}))
    runs = {run.name: run for run in read_runs(find_runs(group), members)}
    assert runs["w1_0-w2_1"].evals[0].weights_sha256 == "a" * 64 and not runs["w1_0-w2_1"].stale
    stale = runs["w1_0-w2_5"]
    assert not stale.evals and [record.path.parent for record in stale.stale] == [group / "w1_0-w2_5"]
    assert (
        f"w1_0-w2_5: toy-r2s in {group / 'w1_0-w2_5'} left out: its results.json scored another drawing than the "
        "folder's run.json records (an evaluation drawing anew stopped before its results); run it again"
    ) in missing_data(list(runs.values()), list(members))


def test_a_metric_that_could_not_be_computed_reads_so_not_as_a_baseline_near_0(sweep_group: Path):
    """A NaN in results.json (no story had a value of it) is neither `nan` in the table nor an `n/a` change."""
    nan = {"toy_identity_cross": math.nan}
    write_eval(sweep_group / "without_racl" / "eval" / "toy-r2s", nan, {"story-a": 2, "story-b": 4})
    table = build_table("toy_racl_ablation", read_runs(find_runs(sweep_group)), baseline="without_racl")
    text = table.to_markdown()
    assert "| nan |" not in text and "| without_racl | 0.0 | not computed |" in text
    assert "toy_identity_cross" not in table.relative()["with_racl"]
    assert "| with_racl | 0.1 | - |" in text and "or one not computed; n/a: the baseline is 0 or near it" in text


def test_a_runs_steps_are_its_summarys_only_while_no_later_launch_logged(sweep_group: Path):
    """summary.json is written at the end of a launch: resumed since (to train a longer curriculum), the run's steps
    are the ones its logs show, marked unfinished; a run a live process trains is in progress, whatever its folder
    holds; a summary without its launch's name counts while the logs go no further than its steps."""
    run = sweep_group / "with_racl"
    planned = load_config(run / "config.yaml").trainer.max_steps
    (run / "summary.json").write_text(json.dumps({"steps": 4, "metrics": str(run / "csv/version_0/metrics.csv")}))
    write_metrics(run, 1, [{"step": s, "train/loss": 1.0} for s in range(4, 8)])
    resumed = read_run(run)
    assert resumed.steps == 8 and resumed.training == "unfinished"
    assert resumed.described_steps() == f"8 of {planned}, unfinished"
    assert main(["report", "toy_racl_ablation", "--root", str(sweep_group.parent)]) == 0
    markdown = (sweep_group / "report" / "report.md").read_text()
    assert f"| 8 of {planned}, unfinished | toy-r2s |" in markdown
    assert f"with_racl: its training has not finished (steps: 8 of {planned}, unfinished)" in markdown
    # The resumed launch finished: its summary names it.
    (run / "summary.json").write_text(json.dumps({"steps": 8, "metrics": str(run / "csv/version_1/metrics.csv")}))
    assert (read_run(run).steps, read_run(run).training) == (8, "")
    # Resumed again once it had finished, it ended at once and logged nothing: still finished.
    (run / "summary.json").write_text(json.dumps({"steps": 8, "metrics": str(run / "csv/version_2/metrics.csv")}))
    assert (read_run(run).steps, read_run(run).training) == (8, "")
    lock = {"pid": os.getpid(), "host": socket.gethostname(), "started": "now"}
    (run / "run.lock").write_text(json.dumps(lock))
    assert (read_run(run).steps, read_run(run).training) == (8, "in progress")
    (run / "run.lock").unlink()
    (run / "summary.json").write_text('{"steps": 4}')
    assert (read_run(run).steps, read_run(run).training) == (8, "unfinished")
    (run / "summary.json").unlink()  # killed before its first end: no summary at all
    assert (read_run(run).steps, read_run(run).training) == (8, "unfinished")


def test_a_report_is_replaced_whole_or_not_at_all_and_keeps_the_folders_other_files(
    sweep_group: Path, tmp_path: Path, monkeypatch
):
    runs = read_runs(find_runs(sweep_group))
    out = tmp_path / "report"
    write_report("g", runs, out, "with_racl")
    before = {path: path.read_bytes() for path in out.rglob("*") if path.is_file()}
    (out / "wandb" / "run-1").mkdir(parents=True)
    (out / "wandb" / "run-1" / "run.wandb").write_text("a logged report")
    (out / "notes.txt").write_text("mine")

    def fail(self):
        raise OSError("disk full")

    # The table and the plots are drawn, and the csv cannot be written: nothing of the new report is in place.
    monkeypatch.setattr(ComparisonTable, "to_csv", fail)
    with pytest.raises(OSError, match="disk full"):
        write_report("g", runs, out, "without_racl")
    assert {path: path.read_bytes() for path in before} == before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["outputs", "report"]  # no partial folder left
    monkeypatch.undo()
    for run in runs:
        run.evals[0].story_shots = {story: 3 for story in run.evals[0].story_shots}  # no shot-count plot now
    report = write_report("g", runs, out, "without_racl")
    assert "baseline: without_racl" in report.markdown.read_text()
    assert not (out / "plots" / "shot_count.png").exists() and (out / "plots" / "loss_curves.png").is_file()
    assert (out / "notes.txt").read_text() == "mine"
    assert (out / "wandb" / "run-1" / "run.wandb").read_text() == "a logged report"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["outputs", "report"]


def test_the_training_curves_mark_only_the_phase_ends_each_plotted_run_crossed():
    """Phases of 10, 5 and 5 steps: `long` trained all three, `short` stopped in the second; `long`'s validation
    was logged from step 12 on only."""
    curriculum = [{"steps": 10}, {"steps": 5}, {"steps": 5}]
    long = RunRecord(
        "long",
        Path("long"),
        {"curriculum": curriculum},
        {"train/loss_fm": {s: 1.0 for s in range(20)}, "val/loss": {12: 0.9, 19: 0.8}},
    )
    short = RunRecord(
        "short", Path("short"), {"curriculum": curriculum}, {"train/loss_fm": {s: 1.0 for s in range(12)}}
    )
    figure = loss_curves_figure([long, short], "g")
    train, val = figure.axes[:2]

    def phase_ends(ax) -> list[tuple[float, str]]:
        colours = {line.get_label(): line.get_color() for line in ax.get_lines()}
        names = {colour: name for name, colour in colours.items() if name in ("long", "short")}
        vertical = [line for line in ax.get_lines() if len(set(line.get_xdata())) == 1 and len(line.get_xdata()) == 2]
        return sorted((line.get_xdata()[0], names.get(line.get_color(), line.get_color())) for line in vertical)

    assert phase_ends(train) == [(10, "long"), (10, "short"), (15, "long")]
    assert phase_ends(val) == [(15, "long")]  # step 10 is before its first point


def test_results_that_do_not_name_their_drawing_are_shown_marked_and_noted(sweep_group: Path, capsys):
    """A results.json of an older `dreamshot eval` (no fingerprint in it) beside the run.json of a drawing: whether it
    scored that drawing cannot be told (an older --redraw left the results before it), so its values stay in the
    table, as of the record's weights, but the report says what is not known."""
    eval_dir = sweep_group / "with_racl" / "eval" / "toy-r2s"
    results = eval_dir / "results.json"
    body = json.loads(results.read_text())
    del body[FINGERPRINT_KEY]
    results.write_text(json.dumps(body))
    lora = sweep_group / "with_racl" / "lora.safetensors"
    lora.write_bytes(b"weights of step 4")
    (eval_dir / "run.json").write_text(json.dumps({"identity": {}, "fingerprint": {"lora_sha256": file_sha256(lora)}}))
    assert main(["report", "toy_racl_ablation", "--root", str(sweep_group.parent)]) == 0
    assert f"warning: with_racl: toy-r2s in {eval_dir}: drawing unknown: its results.json" in capsys.readouterr().err
    markdown = (sweep_group / "report" / "report.md").read_text()
    assert "| 4 | toy-r2s (drawing unknown) |" in markdown and "| 4 | toy-r2s |" in markdown  # without_racl's
    table, _ = read_report(sweep_group / "report")
    assert table.rows["with_racl"]["toy_identity_cross"] == 0.4
    (record,) = read_run(sweep_group / "with_racl").evals
    assert not record.drawing_known and record.weights_sha256 == file_sha256(lora)


@pytest.mark.parametrize("where", ["group", "root", "run"])
def test_a_report_folder_holding_a_run_is_refused_before_anything_moves(sweep_group: Path, where, capsys):
    """The report folder is replaced whole: `--out` naming the group folder (or a folder above it, or a run's own)
    would move the runs, one maybe still training, out from under their processes."""
    out = {"group": sweep_group, "root": sweep_group.parent, "run": sweep_group / "with_racl"}[where]
    before = sorted(path for path in sweep_group.parent.rglob("*"))
    assert main(["report", str(sweep_group), "--out", str(out)]) == 2
    assert "the report folder holds the run folder" in capsys.readouterr().err
    assert sorted(path for path in sweep_group.parent.rglob("*")) == before
