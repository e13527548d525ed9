"""The `toy` benchmark: a toy world (DESIGN §4) drawn with the eval seed, in the DreamShot test format.

Its role masks are exact, so characters are cropped from them instead of detected (identity is exact: crop k
is character k), and every character is tagged non_human (CLIP for CIDS). In s2s the first shot is given.
"""

from __future__ import annotations

from pathlib import Path

from dreamshot.config.schema import ToyWorldConfig
from dreamshot.data.toyworld import ensure_toyworld
from dreamshot.eval.benchmarks.dreamshot_test import load_dreamshot_test, manifest_to_test
from dreamshot.eval.benchmarks.types import Benchmark

TEST_FILE = "toy_test.jsonl"


def load_toy(cfg: ToyWorldConfig, folder: str | Path) -> Benchmark:
    """The toy benchmark of `cfg`, written into `folder` (the toy world is reused when already there)."""
    folder = Path(folder)
    manifest = ensure_toyworld(cfg, folder / "toyworld")
    test_file = manifest_to_test(manifest, folder / TEST_FILE, tag="non_human", previous=1)
    return load_dreamshot_test(test_file, name="toy")
