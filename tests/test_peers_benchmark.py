"""benchmarks/peers.py: DreamShot's training and sampling steps side by side with DiffSynth-Studio and diffusers.

The end-to-end run needs the bench extra (`pip install -e '.[bench]'`) and is skipped without it; the timing
helper needs nothing beyond the project's own dependencies.
"""

from __future__ import annotations

import runpy
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def peers(monkeypatch):
    """The script's namespace (its sibling modules importable as it imports them when run from benchmarks/)."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    return runpy.run_path(str(BENCHMARKS / "peers.py"), run_name="peers")


def test_interleaved_alternates_the_order_and_drops_the_warm_up_round(peers):
    calls = []

    def side(name, seconds):
        def run():
            calls.append(name)
            return [seconds[len([c for c in calls if c == name]) - 1]]

        return run

    medians = peers["interleaved"]({"a": side("a", [9.0, 1.0, 2.0, 3.0]), "b": side("b", [9.0, 5.0, 7.0, 6.0])}, 3)
    assert calls == ["a", "b", "b", "a", "a", "b", "b", "a"]
    assert medians == {"a": 2.0, "b": 6.0}


def test_a_gpu_peak_is_what_the_step_adds_to_both_resident_models(peers, monkeypatch):
    # Both DiTs and their optimiser states stay allocated through a row: 5 GiB before the step, which at its peak
    # holds 300 MiB more and keeps 40 MiB (gradients); the CPU's profiler counts from the step's start too.
    mib, allocator = 2**20, {"now": 5120 * 2**20, "peak": 0}

    def step():
        allocator["peak"] = max(allocator["peak"], allocator["now"] + 300 * mib)
        allocator["now"] += 40 * mib

    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device: allocator.update(peak=allocator["now"]))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: allocator["now"])
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: allocator["peak"])
    assert peers["peak_step_mib"](step, torch.device("cuda")) == 300
    assert peers["peak_step_mib"](step, torch.device("cuda")) == 300  # the peak of the step before is reset


def profiled(run):
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        run()
    return prof


def test_profile_summary_splits_self_time_by_text_rows_and_counts_every_aten_op(peers):
    # 3 + 8 frames of 20 text tokens: 220 storyboard text rows; 2 heads of 8 channels, RoPE pairs (…, 2, 4).
    work, dims = peers["Work"](3, 8, (2, 2), 20, (16, 16)), SimpleNamespace(num_attention_heads=2, attention_head_dim=8)
    text, prompt, pairs = torch.randn(1, 220, 256), torch.randn(20, 256), torch.randn(1, 600, 2, 4)
    weight = torch.randn(256, 256)

    def ours():
        torch.nn.functional.linear(text, weight)
        torch.cat([weight, weight])
        pairs * pairs

    ours, peer = profiled(ours), profiled(lambda: prompt @ weight.T)
    split = peers["self_cpu_split"](ours, work, dims)
    assert split["on 220-token rows"] > 0 and split["on 20-token rows"] == 0
    assert split["cat"] > 0 and split["RoPE mul"] > 0
    assert split["total"] >= split["on 220-token rows"] + split["cat"] + split["RoPE mul"]
    split = peers["self_cpu_split"](peer, work, dims)
    assert split["on 20-token rows"] > 0 and split["on 220-token rows"] == split["cat"] == split["RoPE mul"] == 0

    summary = peers["profile_summary"]({"ours": ours, "DiffSynth": peer}, work, dims).splitlines()
    counts = {line.split()[0]: line.split()[1:] for line in summary if line.startswith("aten::")}
    assert counts["aten::cat"] == ["1", "0", "+1"] and counts["aten::mul"] == ["1", "0", "+1"]
    assert counts["aten::mm"][0] == counts["aten::mm"][1] and counts["aten::mm"][2] == "+0"
    total = next(line.split()[1:] for line in summary if line.startswith("all "))
    assert int(total[0]) == sum(int(values[0]) for values in counts.values())


def test_carries_rows_reads_matrices_both_ways_and_larger_tensors_on_the_sequence_axes(peers):
    carries = peers["carries_rows"]
    assert carries([220, 1536], 220) and carries([1536, 220], 220)
    assert carries([1, 220, 1536], 220) and carries([1, 12, 220, 128], 220)
    # a latent video (B, C, F, H, W) with W = 20 has no 20-token rows; nor a scalar or a vector
    assert not carries([1, 16, 11, 12, 20], 20) and not carries([], 20) and not carries([20], 20)


def test_our_training_step_captures_role_attention_only_when_racl_is_on(peers, monkeypatch):
    args = peers["parse_args"](["--resolution", "32x48"])
    cfg = peers["bench_config"](args)
    module, step = peers["our_training"](cfg, peers["work_of"](cfg, args), torch.device("cpu"), 0.1)
    captures = []
    role_capture = module._role_capture
    monkeypatch.setattr(module, "_role_capture", lambda composed: captures.append(1) or role_capture(composed))
    step(0.1)
    assert len(captures) == 1
    # An L_FM step after a RACL step on the same batch does not capture: the RACL step leaves the batch as it was.
    step(0.0)
    assert len(captures) == 1


@pytest.mark.slow
def test_peers_benchmark_runs_every_row_on_the_tiny_wan(peers, capsys):
    pytest.importorskip("diffsynth")
    argv = ["--shape", "tiny", "--resolution", "32x48", "--steps", "1", "--sample-calls", "1", "--sample-steps", "2"]
    peers["main"](argv)
    out = capsys.readouterr().out
    # The two DiTs are the same model: equal frozen and LoRA parameter counts (the script stops otherwise).
    assert "frozen DiT parameters 85,840 = 85,840" in out
    assert "LoRA parameters 16,896 = 16,896" in out
    assert "11 latent frames × 6 tokens" in out
    rows = {
        line.split()[0] + " " + line.split()[1]: line.split()
        for line in out.splitlines()
        if line[:6] in ("train ", "sample")
    }
    assert set(rows) == {"train fm", "train racl", "train fm·FL", "sample t2s", "sample r2s"}
    # The extra row gives DiffSynth the storyboard's 11 frames × 20 text tokens as one prompt, and no goal.
    assert "train fm·FL: DiffSynth's prompt is the storyboard's 220 text tokens" in out
    assert rows["train fm·FL"][5] == "66/66" and "no goal" in " ".join(rows["train fm·FL"])
    # Training: both sides process the same tokens; sampling r2s: our three branches against diffusers' two.
    assert rows["train fm"][5] == "66/66" and rows["sample t2s"][5] == "96/96" and rows["sample r2s"][5] == "180/132"
    for fields in rows.values():
        ours, peer, ratio = float(fields[3]), float(fields[4]), float(fields[6].rstrip("×"))
        assert ours > 0 and peer > 0 and ratio > 0
