"""Evaluation at benchmark scale on CPU: the shard planner's balance, two gloo processes (torchrun) against one
process, a rank killed with SIGKILL mid-story and the rerun, config changes, the feature cache, an OOM.

The two-process runs execute this file under torchrun (`python -m torch.distributed.run --standalone
--nproc-per-node 2 tests/test_eval_sharding.py ARGS`): its `__main__` registers the tiny open_clip architecture
of tests/data/vistorybench, records every story each rank starts and finishes drawing (and, with HANG_AT=n,
makes rank 1 stop forever after drawing its n-th story's shots, before its record), then runs `dreamshot eval`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch

from dreamshot.cli import main
from dreamshot.config.load import load_config
from dreamshot.eval import drawing, runner
from dreamshot.eval.benchmarks import load_benchmark
from dreamshot.eval.benchmarks.types import BenchCharacter, Benchmark, BenchShot, BenchStory
from dreamshot.eval.cost import story_costs
from dreamshot.eval.drawing import DrawJob
from dreamshot.eval.extractors import ImageEncoder
from dreamshot.eval.progress import LOGS_DIR, Progress
from dreamshot.eval.resume import RUN_RECORD, STORY_RECORD
from dreamshot.eval.sharding import Ranks, assign, balance
from dreamshot.models.wan.adapter import WanAdapter
from dreamshot.planner.sampling import DrawingCost, drawing_cost, gpu_hours
from dreamshot.planner.shape import model_shape
from dreamshot.utils.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
WEIGHTS = REPO / "tests" / "data" / "vistorybench" / "weights"
ARCH = "vistorybench-fixture-vit"
BASE = [
    "data.resolution=[32,48]",
    "inference.steps=2",
    "eval.toy.groups=5",
    "eval.toy.image_size=[32,48]",
    "eval.toy.max_shots=3",
    "logger.backend=csv",
]
# CIDS (CLIP on the toy's role masks), CSD and AES with tiny random encoders of the real classes, and the proxies.
ENCODERS = [
    f"eval.clip.arch={ARCH}",
    f"eval.clip.weights={WEIGHTS / 'clip.safetensors'}",
    f"eval.csd.arch={ARCH}",
    f"eval.csd.weights={WEIGHTS / 'csd.safetensors'}",
    f"eval.aes.siglip={WEIGHTS / 'siglip'}",
    f"eval.aes.head={WEIGHTS / 'aes_head.safetensors'}",
    "eval.metrics=[cids,csd,aes,toy_proxy]",
]
SCORED = {"cids_cross", "cids_self", "csd_cross", "csd_self", "aes", "toy_identity_cross", "toy_style_self"}
PROXY = [*BASE, "eval.metrics=[toy_proxy]"]

open_clip.add_model_config(WEIGHTS)


def _eval(out: Path, overrides: list[str], *flags: str) -> int:
    return main(["eval", "toy", *overrides, "--base", "--out", str(out), *flags])


def _results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


def _shares(tmp_path: Path, overrides: list[str], ranks: int) -> list[list[str]]:
    """The stories each rank draws in a fresh run, as the shard planner assigns them."""
    cfg = load_config(None, overrides)
    bench = load_benchmark(cfg.eval, tmp_path / "plan")
    costs = story_costs(model_shape(cfg.model, count_encoders=False), cfg, bench, "r2s", (32, 48), 2)
    return assign({story: float(cost.flops) for story, cost in costs.items()}, ranks)


def _events(folder: Path) -> list[dict]:
    return [json.loads(line) for path in sorted(folder.glob("rank*.jsonl")) for line in path.read_text().splitlines()]


def _torchrun(out: Path, draws: Path, hang_at: int | None = None, ranks: int = 2) -> subprocess.Popen:
    """`ranks` ranks of `dreamshot eval` on `out` (this file's `__main__`); their output goes to `<draws>.log`."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "WANDB_MODE": "disabled",
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        "DRAW_LOG": str(draws),
        "HANG_AT": str(hang_at or ""),
    }
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks), __file__]
    args = ["eval", "toy", *BASE, *ENCODERS, "--base", "--out", str(out)]
    with open(f"{draws}.log", "w") as log:
        return subprocess.Popen([*command, *args], env=env, stdout=log, stderr=subprocess.STDOUT)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    """The twin: one rank under torchrun, with the two ranks' thread count (another count sums in another order,
    and a rounding flipped in one pixel of a saved shot moves CSD by 1e-4)."""
    tmp = tmp_path_factory.mktemp("one")
    out = tmp / "eval"
    log = Path(f"{tmp / 'draws'}.log")
    assert _torchrun(out, tmp / "draws", ranks=1).wait(timeout=300) == 0, log.read_text()[-3000:]
    return out


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory) -> dict:
    """Two ranks; rank 1 is killed (SIGKILL) after writing its second story's shots, before the record, once rank
    0 has drawn its share; then two ranks again on the same folder."""
    tmp = tmp_path_factory.mktemp("sharded")
    out, first, second = tmp / "eval", tmp / "draws1", tmp / "draws2"
    shares = _shares(tmp, [*BASE, *ENCODERS], 2)
    assert len(shares[1]) >= 2, shares  # rank 1 has a second story to die in
    process = _torchrun(out, first, hang_at=2)
    marker = first / "hanging"
    intact = shares[0] + shares[1][:1]
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        if marker.exists() and all((out / "shots" / s / STORY_RECORD).exists() for s in intact):
            break
        time.sleep(0.1)
    if not marker.exists():
        process.kill()
        process.wait()
        pytest.fail(f"rank 1 never reached its second story:\n{Path(f'{first}.log').read_text()[-3000:]}")
    os.kill(int(marker.read_text()), signal.SIGKILL)
    assert process.wait(timeout=120) != 0
    killed_log = Path(f"{first}.log").read_text()
    after_kill = {s: (out / "shots" / s / STORY_RECORD).exists() for s in shares[0] + shares[1]}
    partial = sorted(p.name for p in (out / "shots" / shares[1][1]).iterdir())
    resumed = _torchrun(out, second)
    assert resumed.wait(timeout=300) == 0, Path(f"{second}.log").read_text()[-3000:]
    return {"out": out, "shares": shares, "first": _events(first), "second": _events(second), "after_kill": after_kill,
            "partial": partial, "killed_log": killed_log}  # fmt: skip


def test_the_planner_balances_drawing_cost_not_story_count():
    # A ViStoryBench-shaped list: 80 stories of 4-30 shots, 2-6 characters (seeded).
    rng = np.random.default_rng(0)
    shape = model_shape(load_config("dreamshot", []).model, count_encoders=False)
    costs = {}
    for index in range(80):
        characters, shots = int(rng.integers(2, 7)), int(rng.integers(4, 31))
        costs[f"{index:02d}"] = float(drawing_cost(shape, characters, shots, 30 * 52, 512, 50).flops)
    shares = assign(costs, 8)
    assert sorted(s for share in shares for s in share) == sorted(costs)
    assert balance(costs, shares) < 1.01
    # Ten stories per rank in benchmark order (the count split) leaves the busiest rank far above the mean.
    by_count = [sorted(costs)[i::8] for i in range(8)]
    assert balance(costs, by_count) > balance(costs, shares) + 0.05
    # The same costs in another order give the same assignment: every rank computes it alone.
    assert assign(dict(reversed(list(costs.items()))), 8) == shares


def test_drawing_cost_counts_shots_tokens_and_branches():
    shape = model_shape(load_config("dreamshot", []).model, count_encoders=False)
    short, long = (drawing_cost(shape, 3, shots, 1560, 512, 50) for shots in (4, 30))
    assert long.flops > 10 * short.flops  # longer sequences: attention grows with the square of the tokens
    assert (short.forwards, short.samples, short.tokens) == (100, 150, 7 * 1560)
    t2s = drawing_cost(shape, 0, 4, 1560, 512, 50)
    assert (t2s.forwards, t2s.samples) == (50, 100) and t2s.flops < short.flops


def test_a_killed_rank_leaves_the_other_ranks_stories_intact(killed_and_resumed):
    run = killed_and_resumed
    shares, dead = run["shares"], run["shares"][1][1]
    assert {s for s, drawn in run["after_kill"].items() if drawn} == set(shares[0] + shares[1][:1])
    # The story rank 1 died in: its shots and a half-written temporary on disk, no record (so not complete).
    assert "shot_01.png" in run["partial"] and STORY_RECORD not in run["partial"]
    assert any(name.endswith(".tmp") for name in run["partial"]), run["partial"]
    assert dead not in {e["story"] for e in run["first"] if e["event"] == "done"}


def test_the_rerun_draws_only_what_is_missing(killed_and_resumed):
    run = killed_and_resumed
    done_before = {e["story"] for e in run["first"] if e["event"] == "done"}
    started_again = [e["story"] for e in run["second"] if e["event"] == "start"]
    assert sorted(started_again) == sorted(set(s for share in run["shares"] for s in share) - done_before)
    assert len(started_again) == len(set(started_again))  # nothing drawn twice
    folder = run["out"] / "shots" / run["shares"][1][1]
    assert (folder / STORY_RECORD).is_file() and not list(folder.glob(".*.tmp"))


def test_two_ranks_merge_to_the_one_process_result(killed_and_resumed, one_process):
    ours, single = _results(killed_and_resumed["out"]), _results(one_process)
    values = {name: m["value"] for name, m in ours["metrics"].items() if "value" in m}
    expected = {name: m["value"] for name, m in single["metrics"].items() if "value" in m}
    assert set(values) == set(expected) >= SCORED
    for name in expected:
        assert values[name] == pytest.approx(expected[name], abs=1e-6), name
    assert list(ours["per_story"]) == list(single["per_story"]) and ours["story_shots"] == single["story_shots"]
    for story, story_values in single["per_story"].items():
        for name, value in story_values.items():
            assert ours["per_story"][story][name] == pytest.approx(value, abs=1e-6), (story, name)


def test_each_rank_logs_the_stories_it_drew(killed_and_resumed):
    run = killed_and_resumed
    logs = {rank: (run["out"] / "logs" / f"rank{rank}.log").read_text() for rank in (0, 1)}
    for event in run["second"]:
        if event["event"] == "done":
            assert f"story {event['story']}: " in logs[event["rank"]]
    assert "drawing" in run["killed_log"]


def test_each_rank_logs_the_stories_it_scored(killed_and_resumed):
    """Scoring (hours, with the judge) leaves a line per story in the rank's log: its bar shows on a terminal only."""
    run = killed_and_resumed
    logs = "".join((run["out"] / "logs" / f"rank{rank}.log").read_text() for rank in (0, 1))
    for story in {s for share in run["shares"] for s in share}:
        assert len(re.findall(rf"story {re.escape(story)}: \d+ shots scored in", logs)) == 1, story


def test_a_rescore_runs_no_encoder_and_loads_no_model(one_process, tmp_path, monkeypatch):
    out = tmp_path / "eval"
    subprocess.run(["cp", "-r", str(one_process), str(out)], check=True)
    calls = []
    forward = ImageEncoder.forward
    monkeypatch.setattr(ImageEncoder, "forward", lambda self, images: calls.append(type(self)) or forward(self, images))

    def no_model(*args, **kwargs):
        raise AssertionError("a rescore built the model")

    monkeypatch.setattr("dreamshot.commands.eval.load_model", no_model)
    assert _eval(out, [*BASE, *ENCODERS]) == 0
    assert calls == []
    assert _results(out)["metrics"] == _results(one_process)["metrics"]


def _record_draws(monkeypatch) -> list[str]:
    drawn: list[str] = []
    original = runner._draw

    def draw(pipeline, story, job, cfg, size, label):
        drawn.append(story.id)
        return original(pipeline, story, job, cfg, size, label)

    monkeypatch.setattr(runner, "_draw", draw)
    return drawn


def test_the_extractors_wait_on_the_cpu_while_the_model_draws(tmp_path, monkeypatch):
    """CLIP, CSD, SigLIP and GroundingDINO (about 5 GB) are built before drawing, so that a wrong weight file stops
    the run at once, but reach the run's device only once the drawing is done: its GPU memory is the model's.
    (`cpu:0` stands for the run's GPU here: it differs from the `cpu` the extractors wait on.)"""
    events = []
    build, draw = runner.build_suite, runner._draw

    def recording_build(cfg, bench, work_dir, device, cache=None):
        suite = build(cfg, bench, work_dir, device, cache)
        events.append(("built on", device))
        monkeypatch.setattr(suite, "to", lambda to: events.append(("moved to", to)), raising=False)
        return suite

    monkeypatch.setattr(runner, "build_suite", recording_build)
    monkeypatch.setattr(runner, "_draw", lambda *args: events.append("draw") or draw(*args))
    assert _eval(tmp_path / "eval", [*BASE, *ENCODERS], "--device", "cpu:0") == 0
    last_draw = max(i for i, event in enumerate(events) if event == "draw")
    assert events[0] == ("built on", torch.device("cpu"))
    assert ("moved to", torch.device("cpu", 0)) in events[last_draw:]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_another_config_is_refused_then_redrawn_never_mixed(tmp_path, monkeypatch, capsys):
    out = tmp_path / "eval"
    drawn = _record_draws(monkeypatch)
    assert _eval(out, PROXY) == 0
    stories = list(drawn)
    before = _snapshot(out)
    capsys.readouterr()
    assert _eval(out, [*PROXY, "inference.steps=3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert str(out / RUN_RECORD) in err and "inference.steps=2" in err and "--redraw" in err
    assert _snapshot(out) == before and drawn == stories  # nothing drawn, nothing written
    assert _eval(out, [*PROXY, "inference.steps=3"], "--redraw") == 0
    assert drawn == stories * 2
    for story in stories:
        record = json.loads((out / "shots" / story / STORY_RECORD).read_text())
        assert record["resume"]["fingerprint"]["inference"]["steps"] == 3 and record["steps"] == 3
    fresh = tmp_path / "fresh"
    assert _eval(fresh, [*PROXY, "inference.steps=3"]) == 0
    assert _results(out)["per_story"] == _results(fresh)["per_story"]


def test_a_redraw_stopped_mid_way_leaves_no_results_of_the_old_drawing(tmp_path, monkeypatch):
    """results.json records the drawing it scored (run.json's fingerprint); a --redraw removes the old results
    before its record names the new drawing, so one stopped mid-way leaves no old values beside the new record."""
    out = tmp_path / "eval"
    assert _eval(out, PROXY) == 0
    assert _results(out)["fingerprint"] == json.loads((out / RUN_RECORD).read_text())["fingerprint"]
    original = runner._draw

    def stopped(*args):
        raise KeyboardInterrupt  # Ctrl-C while the first story of the new drawing is drawn

    monkeypatch.setattr(runner, "_draw", stopped)
    assert _eval(out, [*PROXY, "inference.steps=3"], "--redraw") == 130
    assert json.loads((out / RUN_RECORD).read_text())["fingerprint"]["inference"]["steps"] == 3
    assert not (out / "results.json").exists() and not (out / "results.csv").exists()
    monkeypatch.setattr(runner, "_draw", original)
    assert _eval(out, [*PROXY, "inference.steps=3"], "--redraw") == 0
    assert _results(out)["fingerprint"]["inference"]["steps"] == 3


def test_a_changed_or_unrecorded_story_is_drawn_again(tmp_path, monkeypatch):
    out = tmp_path / "eval"
    drawn = _record_draws(monkeypatch)
    assert _eval(out, PROXY) == 0
    first, second, third = drawn[:3]
    expected = _results(out)
    # A shot overwritten by something else, and a story whose record is gone (a rank killed before writing it).
    shot = out / "shots" / first / "shot_01.png"
    shot.write_bytes(shot.read_bytes() + b"\0")
    (out / "shots" / second / STORY_RECORD).unlink()
    drawn.clear()
    assert _eval(out, PROXY) == 0
    assert sorted(drawn) == sorted([first, second])
    assert third not in drawn and _results(out) == expected


class _CountedIds(list):
    """The ids of the stories left to draw, counting how often they are read through."""

    reads = 0

    def __iter__(self):
        self.reads += 1
        return super().__iter__()


def test_the_stories_left_to_draw_are_looked_up_once_not_once_per_story(tmp_path, monkeypatch):
    cost = DrawingCost(forwards=1, samples=1, flops=10, tokens=6)
    jobs = [DrawJob(f"s{i}", tmp_path / "shots" / f"s{i}", 1, cost, "digest") for i in range(50)]
    left_to_draw, decided = drawing._left_to_draw, []

    def counted(*args):
        ids, token = left_to_draw(*args)
        decided.append(_CountedIds(ids))
        return decided[-1], token

    monkeypatch.setattr(drawing, "_left_to_draw", counted)
    assert drawing.draw_stories(jobs, {}, Ranks(), tmp_path, object, lambda pipeline, job: ({}, [])) == len(jobs)
    assert decided[0].reads == 1  # a set of them built per story made the lookup quadratic in the stories


def test_a_story_out_of_gpu_memory_is_named_with_its_tokens(tmp_path, monkeypatch, capsys):
    out = tmp_path / "eval"
    cfg = load_config(None, PROXY)
    bench = load_benchmark(cfg.eval, tmp_path / "plan")
    costs = story_costs(model_shape(cfg.model, count_encoders=False), cfg, bench, "r2s", (32, 48), 2)
    longest = max(costs, key=lambda story: costs[story].tokens)
    frames = costs[longest].tokens // (2 * 3)  # tokens per frame at 32 x 48: 2 x 3
    predict = WanAdapter.predict_velocity

    def out_of_memory(self, sequence, *args, **kwargs):
        if sequence.shape[2] == frames:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")
        return predict(self, sequence, *args, **kwargs)

    monkeypatch.setattr(WanAdapter, "predict_velocity", out_of_memory)
    drawn = _record_draws(monkeypatch)
    assert sum(cost.tokens == costs[longest].tokens for cost in costs.values()) == 1
    capsys.readouterr()
    assert _eval(out, PROXY) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"story {longest}: out of GPU memory" in err and f"{costs[longest].tokens} video tokens" in err
    assert not (out / "results.json").exists()
    others = set(costs) - {longest}
    assert all((out / "shots" / story / STORY_RECORD).is_file() for story in others)
    monkeypatch.setattr(WanAdapter, "predict_velocity", predict)
    drawn.clear()
    assert _eval(out, PROXY) == 0
    assert drawn == [longest]
    assert "out of memory" in (out / "logs" / "rank0.log").read_text()


def test_a_results_folder_of_another_benchmark_is_refused(tmp_path, capsys):
    out = tmp_path / "eval"
    out.mkdir()
    (out / "results.json").write_text(json.dumps({"benchmark": "vistorybench", "mode": "r2s"}))
    assert _eval(out, PROXY) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "results.json: the results of vistorybench / r2s, not of toy / r2s" in err
    assert sorted(p.name for p in out.iterdir()) == ["results.json"]


def test_generate_draws_a_folder_of_stories_resumably(tmp_path, monkeypatch, capsys):
    stories = tmp_path / "stories"
    stories.mkdir()
    (stories / "ref.png").write_bytes((REPO / "tests" / "faults" / "data" / "ref.png").read_bytes())
    for name in ("a", "b"):
        (stories / f"{name}.yaml").write_text(
            "references:\n  - {role: r, image: ref.png, prompt: '<Role 1>: a red box'}\n"
            f"shots:\n  - {{annotation: 'Close-up: <Role 1> {name}.'}}\n  - {{annotation: 'Wide shot.'}}\n"
        )
    out, args = tmp_path / "out", ["data.resolution=[32,48]", "inference.steps=2"]
    assert main(["generate", str(stories), *args, "--base", "--out", str(out)]) == 0
    for name in ("a", "b"):
        record = json.loads((out / name / STORY_RECORD).read_text())
        assert record["drawn_shots"] == [1, 2] and set(record["resume"]["files"]) == {"shot_01.png", "shot_02.png"}
    first = (out / "a" / "shot_01.png").read_bytes()
    (stories / "b.yaml").write_text((stories / "b.yaml").read_text().replace("Wide shot.", "Wide shot, rain."))
    capsys.readouterr()
    assert main(["generate", str(stories), *args, "--base", "--out", str(out)]) == 0
    assert "1 of 2 stories drawn" in capsys.readouterr().out
    assert (out / "a" / "shot_01.png").read_bytes() == first
    assert main(["generate", str(stories), *args, "--base", "--out", str(out), "--regenerate", "1"]) == 2


def test_a_folder_of_stories_warns_of_unreferenced_roles_and_checks_the_space_first(tmp_path, monkeypatch, capsys):
    stories = tmp_path / "stories"
    stories.mkdir()
    (stories / "ref.png").write_bytes((REPO / "tests" / "faults" / "data" / "ref.png").read_bytes())
    (stories / "a.yaml").write_text(
        "references:\n  - {role: r, image: ref.png, prompt: '<Role 1>: a red box'}\n"
        "shots:\n  - {annotation: 'Close-up: <Role 2> waves.'}\n"
    )
    usage = shutil.disk_usage(tmp_path)._replace(free=1000)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage)
    out = tmp_path / "out"
    capsys.readouterr()
    assert main(["generate", str(stories), "data.resolution=[32,48]", "--base", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "a.yaml: shots[0].annotation names <Role 2>, which no reference shows" in err
    assert "--out" in err and "GiB free, the images of 1 storyboards need about" in err
    assert not out.exists()


def test_plan_prints_the_drawing_cost_of_a_benchmark(capsys):
    assert main(["plan", "smoke", "eval.toy.groups=3", "--eval", "toy", "--gpus", "2", "--mfu", "0.5"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("Drawing toy (3 stories) with tiny")
    rows = {line.split()[0]: line.split() for line in text.splitlines()[2:5]}
    assert set(rows) == {"r2s", "t2s", "s2s"} and "GPU-hours at 50% MFU" in text
    # r2s runs 2 forwards per step (v_r and v_c batched, v_u alone), t2s 1.
    assert int(rows["r2s"][2].replace(",", "")) == 2 * int(rows["t2s"][2].replace(",", ""))


def _vistorybench_shaped() -> Benchmark:
    """80 stories of 4-30 shots, 1,317 in all (ViStoryBench's counts), 2-6 characters each with an image (seeded)."""
    rng = np.random.default_rng(0)
    counts = rng.integers(4, 31, size=80)
    while counts.sum() != 1317:
        i, step = int(rng.integers(80)), 1 if counts.sum() < 1317 else -1
        counts[i] += step if 4 <= counts[i] + step <= 30 else 0
    stories = []
    for index, count in enumerate(counts):
        characters = {
            f"c{k}": BenchCharacter(f"c{k}", f"c{k}", "non_human", "p", (Path("00.jpg"),))
            for k in range(int(rng.integers(2, 7)))
        }
        shots = tuple(BenchShot(i + 1, "p", "s", "c", "a", ()) for i in range(int(count)))
        stories.append(BenchStory(f"{index + 1:02d}", characters, shots))
    return Benchmark("vistorybench", tuple(stories))


def test_vistorybench_shaped_stories_balance_on_eight_gpus():
    """The figures of docs/evaluation.md "Several GPUs": balance on 8 GPUs, and the 14B model's GPU-hours."""
    cfg = load_config("dreamshot", [])
    shape = model_shape(cfg.model, count_encoders=False)
    costs = story_costs(shape, cfg, _vistorybench_shaped(), "r2s", (480, 832), 50)
    flops = {story: float(cost.flops) for story, cost in costs.items()}
    shares = assign(flops, 8)
    assert balance(flops, shares) < 1.005
    assert balance(flops, [sorted(flops)[i::8] for i in range(8)]) > 1.15  # ten stories each, round robin
    # The estimate: about 15 hours of one GPU (at 40% MFU of 989 TFLOPS), under 2 hours on 8.
    assert 13 < gpu_hours(sum(flops.values())) < 16 and gpu_hours(max(map(sum, _loads(flops, shares)))) < 2


def _loads(flops: dict[str, float], shares: list[list[str]]) -> list[list[float]]:
    return [[flops[story] for story in share] for share in shares]


def test_the_bar_counts_every_rank_and_its_eta_follows_the_cost(tmp_path):
    two = Ranks(0, 2)
    with Progress(tmp_path, two, "run-1", stories=3, shots=12, flops=300.0, planned_seconds=90.0) as progress:
        assert progress.eta(progress.overall(), elapsed=30.0) == 60.0  # the planner's, before any story
        progress.story_done("a", shots=4, flops=100.0, seconds=1.0, tokens=24)
        # Rank 1's counts, and those a killed earlier run left under another token.
        logs = tmp_path / LOGS_DIR
        (logs / "rank1.progress.json").write_text(json.dumps({"token": "run-1", "stories": 1, "shots": 6, "flops": 50}))
        (logs / "rank2.progress.json").write_text(json.dumps({"token": "run-0", "stories": 9, "shots": 9, "flops": 9}))
        done = progress.overall()
        assert done == {"stories": 2, "shots": 10, "flops": 150.0}
        # Half the FLOPs in 20 s: 20 s left, whatever the shot counts.
        assert progress.eta(done, elapsed=20.0) == 20.0
    assert "story a: 4 shots drawn" in (tmp_path / LOGS_DIR / "rank0.log").read_text()


def _gpus(monkeypatch, count: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


def _torchrun_rank(monkeypatch, local_rank: int, local_world: int) -> Ranks:
    """The Ranks of a process torchrun started (its process group taken as joined)."""
    env = {"RANK": local_rank, "WORLD_SIZE": local_world, "LOCAL_RANK": local_rank, "LOCAL_WORLD_SIZE": local_world}
    for name, value in env.items():
        monkeypatch.setenv(name, str(value))
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    return Ranks.from_environment("cuda")


def test_a_gpu_index_for_every_process_of_a_node_is_refused(monkeypatch):
    """eval.device=cuda:0 under torchrun would put all eight processes on GPU 0 (each story then out of memory)."""
    _gpus(monkeypatch, 8)
    with pytest.raises(ConfigError, match="8 processes of this node would all use that one GPU"):
        _torchrun_rank(monkeypatch, 3, 8).device(torch.device("cuda:0"))
    assert _torchrun_rank(monkeypatch, 3, 8).device(torch.device("cuda")) == torch.device("cuda", 3)


def test_a_process_that_sees_one_gpu_takes_it(monkeypatch):
    """srun binding one GPU to each task: every process sees its GPU as cuda:0, whatever its LOCAL_RANK."""
    _gpus(monkeypatch, 1)
    ranks = _torchrun_rank(monkeypatch, 3, 8)
    assert ranks.device(torch.device("cuda")) == torch.device("cuda", 0)
    _gpus(monkeypatch, 2)
    with pytest.raises(ConfigError, match="LOCAL_RANK 3, but this process sees 2 CUDA device"):
        ranks.device(torch.device("cuda"))


if __name__ == "__main__":
    from dreamshot.utils.io import atomic_path

    draws, hang_at = Path(os.environ["DRAW_LOG"]), int(os.environ["HANG_AT"] or 0)
    draws.mkdir(parents=True, exist_ok=True)
    rank, original, count = int(os.environ.get("RANK", "0")), runner._draw, [0]

    def note(story: str, event: str) -> None:
        with open(draws / f"rank{rank}.jsonl", "a") as f:
            f.write(json.dumps({"story": story, "event": event, "rank": rank}) + "\n")

    def draw(pipeline, story, job, cfg, size, label):
        note(story.id, "start")
        count[0] += 1
        result = original(pipeline, story, job, cfg, size, label)
        if rank == 1 and count[0] == hang_at:
            # Killed here: the shots are written, a writer's temporary is half done, the record is not written.
            with atomic_path(job.folder / "shot_99.png") as tmp:
                tmp.write_bytes(b"\x89PNG half")
                (draws / "hanging").write_text(str(os.getpid()))
                time.sleep(3600)
        note(story.id, "done")
        return result

    runner._draw = draw
    sys.exit(main(sys.argv[1:]))
