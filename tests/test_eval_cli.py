"""`make eval BENCH=toy` and `dreamshot eval` end to end on the tiny model; scoring a folder of outputs; faults
as one-line errors; the validation callback logs metrics and the storyboard image."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from safetensors.torch import save_file

from dreamshot.cli import main
from dreamshot.commands import eval as eval_command
from dreamshot.config.load import load_config, to_yaml
from dreamshot.data.toyworld import toyworld_bytes
from dreamshot.eval import runner
from dreamshot.eval.benchmarks import load_benchmark
from dreamshot.eval.callback import CALLBACK_DIR, StoryboardMetrics
from dreamshot.eval.runner import evaluation_bytes
from dreamshot.eval.suite import MetricSuite
from dreamshot.inference.loading import build_adapter
from dreamshot.inference.outputs import SHEET_FILE
from dreamshot.training.module import DreamShotModule
from dreamshot.training.train import build_trainer
from dreamshot.utils.errors import ConfigError
from dreamshot.utils.io import folder_bytes

REPO = Path(__file__).resolve().parents[1]
# Small and fast: two toy stories of at most three shots, two sampler steps, 32 x 48 shots, CSV logs.
SMALL = [
    "data.resolution=[32,48]",
    "inference.steps=2",
    "eval.toy.groups=2",
    "eval.toy.image_size=[32,48]",
    "eval.toy.max_shots=3",
    "logger.backend=csv",
]
TOY_VALUES = {"toy_identity_cross", "toy_identity_self", "toy_style_cross", "toy_style_self"}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A run folder as training leaves it: config.yaml and a (random, non-zero) LoRA."""
    run = tmp_path_factory.mktemp("run")
    cfg = load_config(None, SMALL)
    (run / "config.yaml").write_text(to_yaml(cfg))
    generator = torch.Generator().manual_seed(0)
    lora = build_adapter(cfg).lora_state_dict()
    save_file(
        {k: torch.randn(v.shape, generator=generator) * 0.1 for k, v in lora.items()}, str(run / "lora.safetensors")
    )
    return run


def test_make_eval_toy_end_to_end(run_dir, tmp_path):
    out = tmp_path / "eval"
    # -o: never rebuild the environment from inside a test (the suite runs offline).
    command = ["make", "-s", "-o", ".venv/.installed", "eval", "BENCH=toy", f"CKPT={run_dir}", f"EVAL_OUT={out}"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    body = json.loads((out / "results.json").read_text())
    assert (body["benchmark"], body["mode"], body["stories"]) == ("toy", "r2s", 2)
    assert {k for k, v in body["metrics"].items() if "value" in v} >= TOY_VALUES
    assert body["metrics"]["cids_cross"] == {"status": "missing", "reason": "eval.clip.weights not set"}
    assert body["metrics"]["aes"]["status"] == "missing"
    for story in body["per_story"]:
        assert (out / "shots" / story / "shot_01.png").is_file() and (out / "shots" / story / SHEET_FILE).is_file()
    assert (out / "results.csv").read_text().splitlines()[-1].startswith("mean,")
    assert "ours (run" in result.stdout and "no published rows for toy / r2s" in result.stdout


def test_scoring_the_ground_truth_folder_beats_the_drawn_shots(run_dir, tmp_path):
    drawn, truth = tmp_path / "drawn", tmp_path / "truth"
    # s2s: the first toy shot is given, the others are drawn and scored.
    assert main(["eval", "toy", *SMALL, "--run", str(run_dir), "--out", str(drawn), "--mode", "s2s"]) == 0
    drawn_body = json.loads((drawn / "results.json").read_text())
    assert drawn_body["mode"] == "s2s" and not (drawn / "shots" / "toy-00000" / "shot_01.png").exists()
    toyworld = drawn / "toy_benchmark" / "toyworld"
    only_proxy = [*SMALL, "eval.metrics=[toy_proxy]"]
    assert main(["eval", "toy", *only_proxy, "--outputs", str(toyworld), "--out", str(truth), "--mode", "s2s"]) == 0
    truth_body = json.loads((truth / "results.json").read_text())
    assert truth_body["label"] == "toyworld" and set(truth_body["metrics"]) == TOY_VALUES
    # Shots scored per story (s2s: all but the first), also when scoring a folder: the shot-count plot's x axis.
    assert truth_body["story_shots"] == drawn_body["story_shots"]
    assert sum(truth_body["story_shots"].values()) == truth_body["shots"] and all(truth_body["story_shots"].values())
    # The toy characters' colours are found in their own ground-truth shots, not in the untrained model's.
    identity = truth_body["metrics"]["toy_identity_cross"]["value"]
    assert identity > 0.5 and identity > drawn_body["metrics"]["toy_identity_cross"]["value"] + 0.2
    # The free-space estimates checked before it began cover what it wrote.
    toy = load_config(None, SMALL).eval.toy
    benchmark = folder_bytes(drawn / "toy_benchmark")
    assert benchmark <= toyworld_bytes(toy.groups, (32, 48), toy.max_shots, toy.max_roles)
    bench = load_benchmark(load_config(None, SMALL).eval, drawn)
    assert folder_bytes(drawn) - benchmark <= evaluation_bytes(bench, "s2s", (32, 48), drawing=True)
    assert folder_bytes(truth) <= evaluation_bytes(bench, "s2s", (32, 48), drawing=False)


def test_too_little_space_is_reported_before_a_model_is_built(run_dir, tmp_path, capsys, monkeypatch):
    toy = load_config(None, SMALL).eval.toy
    free = toyworld_bytes(toy.groups, (32, 48), toy.max_shots, toy.max_roles)  # room for the benchmark alone
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(2 * free, free, free))
    monkeypatch.setattr(runner, "build_suite", lambda *a: pytest.fail("an extractor was built"))
    monkeypatch.setattr(eval_command, "load_model", lambda *a: pytest.fail("the model was built"))
    assert main(["eval", "toy", *SMALL, "--run", str(run_dir), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "GiB free, the shots, contact sheets and results need about" in err
    assert not (tmp_path / "out" / "shots").exists() and not (tmp_path / "out" / "run.json").exists()


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("eval.mode=x2s", "eval.mode"),
        ("eval.metrics=[fid]", "eval.metrics"),
        ("eval.crops=boxes", "eval.crops"),
        ("eval.callback.enabled=true", "eval.callback.enabled"),  # vistorybench without eval.data
    ],
)
def test_eval_config_faults_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, ["eval.benchmark=vistorybench", override])


def test_faults_are_one_line_errors(tmp_path, capsys):
    assert main(["eval", "vistorybench", *SMALL, "--outputs", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "eval.data: set the path of the vistorybench data" in capsys.readouterr().err
    missing = tmp_path / "csd_vit-large.pth"
    args = ["eval", "toy", *SMALL, f"eval.csd.weights={missing}", "--outputs", str(tmp_path), "--out", str(tmp_path)]
    assert main(args) == 2
    # The last stderr line is the error (progress bars come before it).
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("dreamshot eval: error: ") and str(missing) in err and "eval.csd.weights" in err


def test_validation_callback_logs_metrics_and_storyboards(tmp_path, monkeypatch):
    callback_cfg = ["enabled=true", "every_n_steps=2", "steps=1", "stories=1"]
    cfg = load_config(None, [*SMALL, *(f"eval.callback.{item}" for item in callback_cfg)])  # fmt: skip
    logger = CSVLogger(tmp_path, name="csv", version=0)
    assert any(isinstance(c, StoryboardMetrics) for c in build_trainer(cfg, tmp_path, [logger]).callbacks)
    off = load_config(None, SMALL)
    assert not any(isinstance(c, StoryboardMetrics) for c in build_trainer(off, tmp_path, [logger]).callbacks)

    module = DreamShotModule(cfg)
    callback = StoryboardMetrics(cfg, tmp_path)
    logged, moves = [], []
    to = getattr(MetricSuite, "to", None)

    def record(suite, device):
        moves.append(device)
        to(suite, device)

    monkeypatch.setattr(MetricSuite, "to", record, raising=False)

    class Trainer:
        global_step = 1
        global_rank = 0
        loggers = []

    Trainer.loggers = [type("Recorder", (), {"log_metrics": lambda self, m, step: logged.append((step, m))})()]
    callback.on_train_batch_end(Trainer, module, None, None, 0)
    assert logged == []  # not a multiple of every_n_steps
    Trainer.global_step = 2
    module.adapter.train()
    callback.on_train_batch_end(Trainer, module, None, None, 0)
    callback.on_train_batch_end(Trainer, module, None, None, 1)  # same optimizer step (accumulation): once
    [(step, metrics)] = logged
    assert step == 2 and {f"eval/{name}" for name in TOY_VALUES} == set(metrics)
    assert (tmp_path / CALLBACK_DIR / "step000002.png").is_file()
    assert module.adapter.training  # put back in training mode
    # The extractors wait on the CPU and visit the training's device only to score (rank 0's memory is training's).
    assert moves == [module.device, torch.device("cpu")]


def test_the_default_results_folder_names_what_is_scored(tmp_path, monkeypatch):
    """A second checkpoint scored without --out does not overwrite the first's results."""
    from dreamshot.cli import build_parser, parse_with_overrides
    from dreamshot.commands.eval import scored_name

    cfg = load_config("toy_racl_ablation", [], "with_racl")
    parser = build_parser("eval")

    def name(*argv):
        return scored_name(parse_with_overrides(parser, ["eval", "toy", *argv]), cfg)

    assert name("--run", "outputs/toy_racl_ablation/with_racl") == "toy_racl_ablation-with_racl"
    assert name("--lora", "outputs/x/checkpoints/step000100.ckpt") == "toy_racl_ablation-with_racl-step000100"
    assert name("--lora", "outputs/x/lora.safetensors") == "toy_racl_ablation-with_racl"
    assert (name("--base"), name("--outputs", "theirs/shots")) == ("base", "shots")
    # Scoring the working folder (`--outputs .`) names it, not "" (outputs/eval/-toy-r2s, an empty table label).
    monkeypatch.chdir(tmp_path)
    assert name("--outputs", ".") == tmp_path.name
    # `make eval` leaves the folder to `dreamshot eval` unless EVAL_OUT says otherwise.
    # Under another make (CI runs `make test`) a sub-make prints "Entering/Leaving directory" lines of its own.
    dry = ["make", "-n", "--no-print-directory", "-o", ".venv/.installed", "eval", "BENCH=toy", "CKPT=outputs/demo"]
    line = subprocess.run(dry, cwd=REPO, capture_output=True, text=True, check=True).stdout.splitlines()[-1]
    assert "dreamshot eval toy" in line and "--out" not in line
