"""benchmarks/sampling.py on the tiny Wan at a tiny size: every setting runs, the table has its columns, and the
exact savings draw what the step-by-step sampler draws."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def sampling(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    return runpy.run_path(str(BENCHMARKS / "sampling.py"), run_name="sampling")


def test_the_sampling_benchmark_measures_every_setting(sampling, tmp_path, capsys):
    settings = "per_step,exact,fbc_01,guide_half,few_step"
    argv = ["--resolution", "32x48", "--steps", "3", "--rounds", "1", "--settings", settings, "--out", str(tmp_path)]
    sampling["main"](argv)
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line.split() for line in lines if line.split() and line.split()[0] in settings}
    assert list(rows) == settings.split(",")
    # s/board, s/step, ×per-step, ×exact, forwards and block evaluations per step, drift
    assert rows["exact"][5:7] == ["2.0", "4.0"] and rows["guide_half"][5] == "1.7"  # 2 guided steps of 3
    assert rows["few_step"][5:7] == ["1.0", "2.0"]  # no guidance: v_c alone, 2 blocks
    assert float(rows["per_step"][-1]) <= 1e-5 and float(rows["exact"][-1]) == 0
    assert any(line.startswith("WanPipeline step") and "exact" in line for line in lines)
    assert any(line.startswith("goal, exact savings: ") and "drift" in line for line in lines)
    assert any(line.startswith("goal, fastest opt-in: ") for line in lines)
    assert (tmp_path / "second_lora_comfyui.safetensors").is_file()


def test_the_goal_lines_judge_speed_and_drift(sampling):
    import torch

    exact = torch.ones(4, dtype=torch.float64)
    settings = {
        name: sampling["Setting"](name, None, latents=exact + offset)
        for name, offset in (("per_step", 1e-7), ("exact", 0.0), ("fbc_01", 0.1), ("few_step", 0.5))
    }
    references = {name: exact for name in settings}
    steps = {"per_step": 0.13, "exact": 0.1, "fbc_01": 0.06, "few_step": 0.1}
    totals = {"exact": [5.0], "fbc_01": [3.0], "few_step": [2.0]}
    per_step, opt_in = sampling["goal_lines"](settings, steps, totals, references)
    assert per_step.startswith(
        "goal, exact savings: 1.30× per step over per_step, drift 1.0e-07"
    ) and per_step.endswith(": met")
    assert opt_in.startswith("goal, fastest opt-in: few_step, 2.50× per storyboard over exact, drift 5.0e-01")
    assert opt_in.endswith(": met")
    settings["per_step"].latents = exact + 1e-3  # as fast, but not exact
    assert sampling["goal_lines"](settings, steps, totals, references)[0].endswith(": not met")
