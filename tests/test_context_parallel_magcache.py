"""MagCache calibration (`inference.cache=mag`, `cache_options.calibrate: true`) under context parallelism: two
gloo processes sharing one storyboard print the ratios one process prints, once."""

from __future__ import annotations

import ast
import contextlib
import io
import re

import pytest
import torch
from cp_support import run_group, sampling_adapter

from dreamshot.config.schema import Config
from dreamshot.inference.pipeline import StoryboardPipeline, StoryboardRequest
from dreamshot.models.wan.context_parallel import ContextParallel

SIZE = (48, 80)  # 15 tokens per frame, 5 frames: degree 2 pads the sequence
PRINTED = re.compile(r"\[MagCache\] Calibration Complete.*\n(\[.*\])")


def printed_calibrations(cp: ContextParallel) -> dict[str, str]:
    """What this rank prints while calibrating one r2s storyboard alone (degree 1) and with its group."""
    cfg = Config()
    cfg.inference.steps = 3
    cfg.inference.cache = "mag"
    cfg.inference.cache_options = {"calibrate": True}
    g = torch.Generator().manual_seed(3)
    adapter = sampling_adapter(cfg, g)
    references = torch.rand(2, 3, *SIZE, generator=g) * 2 - 1
    request = StoryboardRequest(["a", "b", "c"], SIZE, references, ["role 1", "role 2"])
    printed = {}
    for name, group in (("alone", ContextParallel()), ("shared", cp)):
        adapter.context_parallel = group
        with contextlib.redirect_stdout(io.StringIO()) as out:
            StoryboardPipeline(adapter, cfg)(request, seed=0, progress=False)
        printed[name] = out.getvalue()
    return printed


def ratios(printed: str) -> list[list[float]]:
    return [ast.literal_eval(match) for match in PRINTED.findall(printed)]


@pytest.mark.slow  # two spawned processes, each sampling twice: about 40 s on 2 cores
def test_two_processes_calibrate_the_ratios_of_one_printed_once():
    first, second = run_group(printed_calibrations, 2)
    alone = ratios(first["alone"])
    assert len(alone) == 2 and all(len(kind) == 3 for kind in alone)  # the guided pair and v_u, 3 steps each
    assert ratios(second["alone"]) == alone
    assert any(abs(ratio - 1.0) > 1e-3 for kind in alone for ratio in kind), "nothing to compare"
    shared = ratios(first["shared"])
    assert len(shared) == len(alone)
    for kind, twin in zip(shared, alone, strict=True):
        torch.testing.assert_close(torch.tensor(kind), torch.tensor(twin), atol=1e-5, rtol=0)
    assert "MagCache" not in second["shared"]
