"""The notebooks execute on a 2-step tiny-Wan run: role attention (paper Fig. 7) and the results of a report."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
import torch
from nbclient import NotebookClient

from dreamshot.config.load import load_config
from dreamshot.report.build import write_report
from dreamshot.report.runs import read_runs
from dreamshot.training.train import train

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
TINY = [
    "curriculum=[]",
    "trainer.max_steps=2",
    "trainer.val_check_interval=2",
    "trainer.checkpoint_every_n_steps=2",
    "data.toy.groups=3",
    "data.val_groups=1",
    "logger.backend=csv",
]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "with_racl"
    # One torch thread: on cores other jobs share, torch's spinning threads make a few tiny steps many times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(load_config("toy_racl_ablation", [*TINY, f"output_dir={out}"], "with_racl"))
    finally:
        torch.set_num_threads(threads)
    return out


def execute(name: str, env: dict[str, str], monkeypatch) -> list[dict]:
    """Run a notebook (from notebooks/, as Jupyter would) with `env` set; returns every code cell output."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the kernel's torch: one thread, as in `trained_run`
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    notebook = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    client = NotebookClient(notebook, timeout=120, kernel_name="python3", resources={"metadata": {"path": NOTEBOOKS}})
    client.execute()
    return [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]


def printed(outputs: list[dict]) -> str:
    return "".join(o.get("text", "") for o in outputs if o["output_type"] == "stream" and o["name"] == "stdout")


def images(outputs: list[dict]) -> int:
    return sum("image/png" in o.get("data", {}) for o in outputs)


def test_role_attention_notebook_draws_each_runs_maps(trained_run: Path, monkeypatch):
    outputs = execute("role_attention", {"DREAMSHOT_RUNS": str(trained_run)}, monkeypatch)
    assert images(outputs) == 1
    assert f"{trained_run}: " in printed(outputs) and "inside its own mask" in printed(outputs)


def test_results_notebook_shows_a_reports_table_and_plots(trained_run: Path, tmp_path: Path, monkeypatch):
    report = write_report("toy_racl_ablation", read_runs([trained_run]), tmp_path / "report")
    outputs = execute("results", {"DREAMSHOT_REPORT": str(tmp_path / "report")}, monkeypatch)
    text = printed(outputs)
    assert "toy_racl_ablation: 1 runs" in text and "val/loss" in text and "best: with_racl" in text
    assert any("| with_racl |" in o.get("data", {}).get("text/markdown", "") for o in outputs)
    assert images(outputs) == len(report.plots) >= 1


def test_notebooks_are_committed_without_outputs():
    for path in NOTEBOOKS.glob("*.ipynb"):
        notebook = nbformat.read(path, as_version=4)
        nbformat.validate(notebook)
        assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code"), path.name
