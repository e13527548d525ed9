"""Benchmark loaders: `toy`, `dreamshot_test` and `vistorybench`, each giving a `Benchmark` of `BenchStory`s."""

from __future__ import annotations

from pathlib import Path

from dreamshot.config.schema import EvalConfig
from dreamshot.eval.benchmarks.dreamshot_test import load_dreamshot_test
from dreamshot.eval.benchmarks.toy import load_toy
from dreamshot.eval.benchmarks.types import BenchCharacter, Benchmark, BenchShot, BenchStory
from dreamshot.eval.benchmarks.vistorybench import load_vistorybench
from dreamshot.utils.errors import ConfigError

__all__ = ["BenchCharacter", "BenchShot", "BenchStory", "Benchmark", "load_benchmark"]


def load_benchmark(cfg: EvalConfig, work_dir: str | Path) -> Benchmark:
    """The benchmark `cfg.benchmark`; the toy one is written under `work_dir`."""
    if cfg.benchmark == "toy":
        return load_toy(cfg.toy, Path(work_dir) / "toy_benchmark")
    if cfg.data is None:
        raise ConfigError(f"eval.data: set the path of the {cfg.benchmark} data (see docs/evaluation.md)")
    if cfg.benchmark == "vistorybench":
        return load_vistorybench(cfg.data, cfg.split)
    return load_dreamshot_test(cfg.data)
