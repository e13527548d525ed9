"""Sweeps: every experiment's launch lines (training members, evaluation-time members), the evaluation settings
an evaluation-time member hands to `dreamshot eval`, and a 2-member toy sweep run end to end, then reported."""

from __future__ import annotations

import csv
import shlex
from pathlib import Path

import pytest
import torch
from PIL import Image

from dreamshot.cli import main as cli_main
from dreamshot.config import load
from dreamshot.config.load import available_experiments, load_config, load_runs, sweep_members, to_yaml
from dreamshot.inference.loading import RUN_CONFIG
from dreamshot.report import sweep
from dreamshot.report.build import read_report
from dreamshot.report.runs import read_run
from dreamshot.report.sweep import EVAL_TIME_TAG, is_eval_time, main, sweep_commands
from dreamshot.training.callbacks import LORA_FILE
from dreamshot.utils.errors import ConfigError, Interrupted

PROG = "python -m dreamshot.report.sweep"
DATA = ["data.manifest=/data/storyboards/manifest.jsonl"]
# A training line is refused without the recipe's data and weights (nothing is read while printing).
INPUTS = [*DATA, "model.pretrained_path=/data/Wan2.1-T2V-14B-Diffusers"]
EVAL_TIME = [e for e in available_experiments() if is_eval_time(load_runs(e, DATA)[0])]
# The tiny Wan for two steps on three 32x48 toy storyboards, scored on two toy stories with one sampler step.
TINY = [
    "curriculum=[]",
    "trainer.max_steps=2",
    "trainer.val_check_interval=2",
    "trainer.checkpoint_every_n_steps=2",
    "trainer.log_every_n_steps=1",
    "data.toy.groups=3",
    "data.val_groups=1",
    "data.resolution=[32,48]",
    "data.toy.image_size=[32,48]",
    "logger.backend=csv",
    "eval.toy.groups=2",
    "eval.toy.image_size=[32,48]",
    "eval.steps=1",
    "eval.metrics=[toy_proxy]",
]


@pytest.fixture
def trained(tmp_path: Path) -> Path:
    """A run folder as training leaves it, as far as a sweep looks: its config and its LoRA file."""
    run = tmp_path / "trained"
    run.mkdir()
    (run / RUN_CONFIG).write_text(to_yaml(load_config("toy_dreamshot")))
    (run / LORA_FILE).write_bytes(b"")
    return run


def test_the_studies_of_the_paper_are_shipped_at_both_scales():
    for prefix in ("", "toy_"):
        assert {f"{prefix}{name}" for name in ("guidance", "shot_count")} <= set(EVAL_TIME)
        assert [m.split("_")[1] for m in sweep_members(f"{prefix}lambda_sweep")] == ["0", "0.05", "0.1", "0.2", "0.5"]
        assert list(sweep_members(f"{prefix}data_sources")) == ["both", "real", "synthetic"]
        assert len(sweep_members(f"{prefix}lora_rank")) == 4
    assert [m.split("_")[1] for m in sweep_members("lora_rank")] == ["32", "64", "128", "256"]
    real, synthetic = (load_config("data_sources", DATA, m).data.sources for m in ("real", "synthetic"))
    assert (real, synthetic) == (["real"], ["synthetic"])


@pytest.mark.parametrize("experiment", sorted(set(available_experiments()) - set(EVAL_TIME)))
def test_training_experiments_launch_one_train_line_per_member(experiment):
    members = list(sweep_members(experiment))
    commands = sweep_commands(experiment, INPUTS)
    assert [c[:2] for c in commands] == [["train", experiment]] * max(len(members), 1)
    assert [c[c.index("--member") + 1] for c in commands if "--member" in c] == members


@pytest.mark.parametrize("experiment", EVAL_TIME)
def test_eval_time_experiments_score_a_trained_run_once_per_member(experiment, trained):
    with pytest.raises(ConfigError, match="--run"):
        sweep_commands(experiment, DATA)
    commands = sweep_commands(experiment, [], run_dir=trained)
    members = list(sweep_members(experiment)) or [experiment]
    assert len(commands) == len(members)
    for argv, member in zip(commands, members, strict=True):
        cfg = load_config(experiment, [], member if sweep_members(experiment) else None)
        assert argv[:2] == ["eval", cfg.eval.benchmark]
        assert argv[argv.index("--run") + 1] == str(trained)
        assert argv[argv.index("--out") + 1] == cfg.output_dir
        assert argv[argv.index("--label") + 1] == member


@pytest.mark.parametrize(("experiment", "overrides"), [("lambda_sweep", INPUTS), ("guidance", [])])
def test_each_member_config_is_composed_once(experiment, overrides, trained, monkeypatch):
    composed, merge_one = [], load.merge_layer  # the run of every composition that merges a member's layer

    def merge_layer(cfg, body, source):
        if str(source).startswith("sweep member"):
            composed.append(body["name"])
        return merge_one(cfg, body, source)

    monkeypatch.setattr(load, "merge_layer", merge_layer)
    sweep_commands(experiment, overrides, run_dir=trained if experiment == "guidance" else None)
    assert composed == [f"{experiment}/{member}" for member in sweep_members(experiment)]


def test_an_eval_member_changes_only_the_evaluation_settings_of_the_run(trained: Path):
    run = load_config("toy_dreamshot", [f"output_dir={trained}", "inference.omega2=7"])
    (trained / RUN_CONFIG).write_text(to_yaml(run))
    (argv,) = sweep_commands("toy_guidance", ["eval.toy.groups=3"], member="w1_8-w2_5", run_dir=trained)
    overrides = argv[2 : argv.index("--run")]
    scored = load_config(trained / RUN_CONFIG, overrides)
    # The member's ω2 = 5 is the schema default, and still beats the run's 7.
    assert (scored.inference.omega1, scored.inference.omega2) == (8.0, 5.0)
    assert scored.eval.steps == 20 and scored.eval.toy.groups == 3
    assert scored.name == "toy_guidance/w1_8-w2_5" and scored.logger.group == "toy_guidance"
    assert scored.tags == ["toy", "ablation", "guidance", EVAL_TIME_TAG, "w1_8-w2_5"]
    assert (scored.model, scored.seed, scored.racl, scored.storyboard) == (
        run.model,
        run.seed,
        run.racl,
        run.storyboard,
    )


def test_an_eval_time_run_refuses_training_overrides(tmp_path: Path, trained):
    experiment = tmp_path / "bad_eval.yaml"
    experiment.write_text(f"extends: toy_dreamshot\ntags: [{EVAL_TIME_TAG}]\nsweep:\n  a: [racl.weight=0]\n")
    with pytest.raises(ConfigError, match="not 'racl.weight=0'"):
        sweep_commands(str(experiment), run_dir=trained)
    with pytest.raises(ConfigError, match="not 'seed=1'"):
        sweep_commands("toy_guidance", ["seed=1"], run_dir=trained)


def test_print_commands_gives_shell_lines_and_errors_exit_2(capsys):
    assert main(["toy_reproduction", "--eval", "toy", "--print-commands"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [shlex.split(line)[1] for line in lines] == ["train", "eval", "train", "eval"]
    assert lines[0] == "dreamshot train toy_reproduction trainer.ckpt_path=last --member without_racl"
    # A usage error and a config error are led alike, as `dreamshot COMMAND: error: ` leads both of its own.
    assert main(["toy_lambda_sweep", "--member", "lambda_9", "--print-commands"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"{PROG}: error: experiment 'toy_lambda_sweep' has no sweep member 'lambda_9'"
    ]
    with pytest.raises(SystemExit) as usage:
        main(["toy_lambda_sweep", "--eval", "toys"])
    assert usage.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"{PROG}: error: argument --eval: invalid choice: 'toys' (choose from 'toy', 'dreamshot_test', 'vistorybench')"
    ]


def test_a_sweep_stopped_by_ctrl_c_is_one_line_and_status_130(capsys, monkeypatch):
    def interrupted(*args):
        raise KeyboardInterrupt  # while the members' configs are composed, before any member runs

    monkeypatch.setattr(sweep, "sweep_commands", interrupted)
    assert main(["toy_lambda_sweep"]) == Interrupted.exit_status
    assert capsys.readouterr().err.splitlines() == [f"{PROG}: interrupted; finished work is kept, rerun to continue"]


@pytest.mark.parametrize(
    ("folder", "fault"),
    [
        ("missing", "not a run folder (no config.yaml)"),
        ("untrained", "neither lora.safetensors nor checkpoints/last.ckpt found (has the run trained?)"),
    ],
)
def test_an_eval_time_sweep_refuses_a_run_folder_that_is_not_trained_before_printing(folder, fault, tmp_path, capsys):
    run = tmp_path / folder
    if folder == "untrained":  # a run folder whose training has not saved weights yet
        run.mkdir()
        (run / RUN_CONFIG).write_text(to_yaml(load_config("toy_dreamshot")))
    assert main(["toy_guidance", "--run", str(run), "--print-commands"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.splitlines() == [f"{PROG}: error: --run {run}: {fault}"]


@pytest.fixture
def one_thread():
    """One torch thread: on cores other jobs share, torch's spinning threads make a few tiny steps many times
    slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_a_two_member_toy_sweep_trains_scores_and_reports(tmp_path: Path, monkeypatch, one_thread):
    """Each member in one process: its own W&B run, its own folder, its own row in the report."""
    monkeypatch.chdir(tmp_path)
    tiny_wandb = [item for item in TINY if item != "logger.backend=csv"]
    assert main(["toy_racl_ablation", *tiny_wandb, "--eval", "toy"]) == 0
    group = tmp_path / "outputs" / "toy_racl_ablation"
    run_ids, own_val_loss = set(), {}
    for member in ("with_racl", "without_racl"):
        run = load_config(group / member / "config.yaml")
        assert run.logger.group == "toy_racl_ablation" and member in run.tags
        assert (group / member / "lora.safetensors").is_file()
        assert (group / member / "eval" / "toy-r2s" / "results.json").is_file()
        # The member's own offline W&B run, whose id its folder records.
        (wandb_run,) = (group / member / "wandb").glob("offline-run-*")
        run_id = (group / member / "wandb_run_id").read_text().strip()
        assert wandb_run.name.endswith(f"-{run_id}")
        run_ids.add(run_id)
        with open(group / member / "csv" / "version_0" / "metrics.csv") as f:
            own_val_loss[member] = [float(row["val/loss"]) for row in csv.DictReader(f) if row["val/loss"]][-1]
    assert len(run_ids) == 2
    assert cli_main(["report", "toy_racl_ablation"]) == 0
    markdown = (group / "report" / "report.md").read_text()
    assert "| with_racl | 0.1 |" in markdown and "| without_racl | 0.0 |" in markdown
    assert "toy_identity_cross" in markdown and "val/racl_in_mask" in markdown
    table, _ = read_report(group / "report")
    assert own_val_loss["with_racl"] != own_val_loss["without_racl"]
    assert {member: table.rows[member]["val/loss"] for member in own_val_loss} == own_val_loss
    for name in ("relative_improvement", "loss_curves", "shot_count"):
        with Image.open(group / "report" / "plots" / f"{name}.png") as image:
            assert image.format == "PNG"
    # Run again (after a member failed, say), the sweep continues: finished members train no further.
    lora = (group / "with_racl" / "lora.safetensors").read_bytes()
    assert main(["toy_racl_ablation", *tiny_wandb, "--eval", "toy"]) == 0
    assert (group / "with_racl" / "lora.safetensors").read_bytes() == lora
    # Their resumed launches ended at once: the runs are still finished, at the steps they trained.
    assert cli_main(["report", "toy_racl_ablation"]) == 0
    steps = {run: read_run(group / run).steps for run in own_val_loss}
    assert steps == {run: load_config(group / run / "config.yaml").trainer.max_steps for run in own_val_loss}
    assert "unfinished" not in (group / "report" / "report.md").read_text()


def test_a_sweep_resumes_its_members_unless_the_command_line_says_how_to_start():
    assert all("trainer.ckpt_path=last" in argv for argv in sweep_commands("toy_racl_ablation"))
    for start in ("trainer.overwrite=true", "trainer.ckpt_path=/runs/a/checkpoints/step000010.ckpt"):
        commands = sweep_commands("toy_racl_ablation", [start])
        assert [argv.count(start) for argv in commands] == [1, 1]
        assert not any("trainer.ckpt_path=last" in argv for argv in commands)
