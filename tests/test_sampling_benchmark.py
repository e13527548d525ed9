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
    assert (tmp_path / "second_lora_comfyui.safetensors").is_file()
