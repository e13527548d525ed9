"""benchmarks/rope.py: one RoPE rotation, the eager complex form against the compiled blocks' real form."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def rope_benchmark(monkeypatch):
    """The script's namespace (its sibling modules importable as it imports them when run from benchmarks/)."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    return runpy.run_path(str(BENCHMARKS / "rope.py"), run_name="rope_benchmark")


def test_rope_benchmark_times_both_forms_forward_and_backward_on_a_tiny_query(rope_benchmark, capsys):
    rope_benchmark["main"](["--shape", "2,12,3,16", "--frames", "4", "--calls", "2", "--rounds", "1"])
    out = capsys.readouterr().out
    assert "one rotation of a (2, 12, 3, 16) float32 query (4 frames)" in out
    times = {line[:26].strip(): float(line[26:].split()[0]) for line in out.splitlines() if line.endswith(" ms")}
    assert set(times) == {
        f"{form} {pass_}" for form in ("complex", "real") for pass_ in ("forward", "forward+backward")
    }
    assert all(seconds > 0 for seconds in times.values())
    # The two forms rotate alike, to float32 rounding.
    assert float(out.rsplit("max |complex − real|: ", 1)[1]) < 1e-5


def test_rope_benchmark_refuses_tokens_that_do_not_split_into_frames(rope_benchmark):
    with pytest.raises(SystemExit, match="13 tokens, not a multiple of --frames 4"):
        rope_benchmark["main"](["--shape", "1,13,2,8", "--frames", "4"])
