"""What a results folder holds and what drew it: a run is resumed story by story, never mixed.

- `<out>/run.json` (`RUN_RECORD`) names what the folder is the results of (`identity`: the command, the
  benchmark and its data, the mode, the folder scored) and what drew its shots (`fingerprint`). A folder of
  another benchmark, mode or scored folder is refused with one line before anything is written; one drawn with
  another fingerprint too, unless `--redraw` asks to replace its stories. A run that writes another fingerprint
  removes the folder's results.json / results.csv first: they scored the old drawing. results.json records the
  fingerprint it scored too, so a reader tells results of another drawing from the record's
  (`dreamshot.report.runs`).
- `<story folder>/generation.json` (`STORY_RECORD`, written last, atomically, after every shot file) records
  the drawing fingerprint, the digest of the story's inputs and the SHA-256 of every file drawn. A story is
  complete when its record has this run's fingerprint and story digest and every file still has its hash;
  otherwise it is drawn again, after its record and old shots are removed (a rank killed mid-story leaves
  whole shot files without a record: they are drawn again, never taken for the story's shots).

The fingerprint is everything that shapes the pixels: the model config (its LoRA rank, alpha and targets come
from the weights), the SHA-256 of the LoRA weights (`base` without), the backbone's seed (a backbone without
pretrained weights is drawn from it), the storyboard layout and negative prompt, the timestep mode, every
inference setting (the steps after `eval.steps`), the shot size and the mode. Not in it: the code version.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from dreamshot.config.schema import Config
from dreamshot.eval.report import RESULTS_CSV, RESULTS_JSON
from dreamshot.inference.outputs import RECORD_FILE, SHEET_FILE, shot_index
from dreamshot.utils.errors import DataError
from dreamshot.utils.io import atomic_write_text, remove_stale_temporaries

RUN_RECORD = "run.json"
STORY_RECORD = RECORD_FILE
RESUME_KEY = "resume"
# The drawing's fingerprint, in run.json and in results.json (what the results scored; None: a folder read).
FINGERPRINT_KEY = "fingerprint"
# The results of a run (results.json, the completion mark a report reads, first), removed before a run of another
# drawing writes its record.
SUPERSEDED_RESULTS = (RESULTS_JSON, RESULTS_CSV)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def weights_sha256(weights: Path | None) -> str:
    """SHA-256 of a LoRA file, or of every file of a LoRA folder (peft, DeepSpeed) with its relative name;
    `base` for none."""
    if weights is None:
        return "base"
    if weights.is_file():
        return file_sha256(weights)
    digest = hashlib.sha256()
    for path in sorted(p for p in weights.rglob("*") if p.is_file()):
        digest.update(f"{path.relative_to(weights).as_posix()}\0{file_sha256(path)}\0".encode())
    return digest.hexdigest()


def drawing_fingerprint(cfg: Config, weights: Path | None, size: tuple[int, int], steps: int, mode: str) -> dict:
    """What shapes the drawn pixels (module docstring); `mode` is `story file` for `dreamshot generate`."""
    model = OmegaConf.to_container(OmegaConf.structured(cfg.model), resolve=True)
    model.pop("lora")
    storyboard = cfg.storyboard
    inference = {**OmegaConf.to_container(OmegaConf.structured(cfg.inference), resolve=True), "steps": steps}
    if cfg.inference.second_lora is not None:  # its content, not only its path
        inference["second_lora_sha256"] = weights_sha256(Path(cfg.inference.second_lora))
    return {
        "model": model,
        "backbone_seed": cfg.seed,
        "lora_sha256": weights_sha256(weights),
        "storyboard": {
            "layout": storyboard.layout,
            "phase": storyboard.phase,
            "neg_offset": storyboard.neg_offset,
            "negative_prompt": storyboard.negative_prompt,
        },
        "timestep_mode": cfg.diffusion.timestep_mode,
        "inference": inference,
        "size": list(size),
        "mode": mode,
    }


def eval_identity(cfg: Config, outputs: Path | None) -> dict:
    """What an evaluation's results folder is the results of."""
    ev = cfg.eval
    if ev.benchmark == "toy":
        data: Any = OmegaConf.to_container(OmegaConf.structured(ev.toy))
    else:
        data = str(Path(ev.data).absolute()) if ev.data else None
    identity = {"command": "eval", "benchmark": ev.benchmark, "data": data, "mode": ev.mode}
    if ev.benchmark == "vistorybench":
        identity["split"] = ev.split
    identity["scored"] = str(outputs.absolute()) if outputs is not None else "drawn"
    return identity


def story_digest(inputs: Any, images: Iterable[Path]) -> str:
    """SHA-256 of a story's inputs: its JSON-able texts and settings, and the bytes of its images."""
    digest = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode())
    for image in images:
        digest.update(file_sha256(image).encode())
    return digest.hexdigest()


class ResultsFolder:
    """The results folder `out` of a run with `identity` whose shots are drawn with `fingerprint` (None: the
    shots are read from a folder, not drawn)."""

    def __init__(self, out: Path, identity: dict, fingerprint: dict | None) -> None:
        self.out, self.identity, self.fingerprint = out, identity, fingerprint

    @property
    def record_path(self) -> Path:
        return self.out / RUN_RECORD

    def check(self, redraw: bool) -> None:
        """Refuse (one-line DataError, nothing written) a folder holding the results of something else."""
        record = self._read()
        if record is None:
            self._check_results_file()
            return
        theirs = record.get("identity", {})
        if theirs != self.identity:
            key = first_difference(theirs, self.identity)
            raise DataError(
                f"{self.record_path}: a results folder of {_describe(theirs)}, not of {_describe(self.identity)} "
                f"({key}: {_value(theirs, key)} there, {_value(self.identity, key)} here): choose another --out"
            )
        drawn = record.get(FINGERPRINT_KEY)
        if self.fingerprint is not None and drawn != self.fingerprint and not redraw:
            key = first_difference(drawn or {}, self.fingerprint)
            raise DataError(
                f"{self.record_path}: its shots were drawn with {key}={_value(drawn or {}, key)}, this run draws "
                f"with {_value(self.fingerprint, key)}: --redraw draws them again, or choose another --out"
            )

    def write(self) -> None:
        """The run record, after the results of another drawing are removed (`--redraw`, or results without a
        record): removed first, a kill in between leaves no results beside the new record that they did not
        score; the new results are written at the end of the run."""
        self.out.mkdir(parents=True, exist_ok=True)
        record = {"identity": self.identity, FINGERPRINT_KEY: self.fingerprint}
        held = self._read()
        if held is None or held.get(FINGERPRINT_KEY) != self.fingerprint:
            for name in SUPERSEDED_RESULTS:
                (self.out / name).unlink(missing_ok=True)
        atomic_write_text(self.record_path, json.dumps(record, indent=2))

    def _read(self) -> dict | None:
        try:
            record = json.loads(self.record_path.read_text())
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise DataError(f"{self.record_path}: not a run record (invalid JSON): choose another --out") from None
        if not isinstance(record, dict):
            raise DataError(f"{self.record_path}: not a run record: choose another --out")
        return record

    def _check_results_file(self) -> None:
        """A folder with results but no run record (written before run records existed) must be the same
        benchmark and mode."""
        path = self.out / RESULTS_JSON
        try:
            results = json.loads(path.read_text())
        except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
            return
        ours = (self.identity.get("benchmark"), self.identity.get("mode"))
        theirs = (results.get("benchmark"), results.get("mode")) if isinstance(results, dict) else (None, None)
        if theirs != ours:
            raise DataError(
                f"{path}: the results of {theirs[0]} / {theirs[1]}, not of {ours[0]} / {ours[1]}: choose another --out"
            )


def story_complete(folder: Path, fingerprint: dict, digest: str) -> bool | None:
    """True when `folder` holds the story drawn with `fingerprint` from inputs `digest`, every file intact;
    False when it holds a record of another drawing; None when it holds no record."""
    try:
        record = json.loads((folder / STORY_RECORD).read_text())
        resume = record[RESUME_KEY]
        files = resume["files"]
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        return False
    if resume.get("fingerprint") != fingerprint or resume.get("story") != digest:
        return False
    return all((folder / name).is_file() and file_sha256(folder / name) == sha for name, sha in files.items())


def clear_story(folder: Path) -> None:
    """Remove a story's record first (a kill after it leaves no record claiming the old files), then its shot
    files, contact sheet and a killed writer's temporaries."""
    (folder / STORY_RECORD).unlink(missing_ok=True)
    if not folder.is_dir():
        return
    for path in folder.iterdir():
        if path.is_file() and shot_index(path) is not None:
            path.unlink()
    (folder / SHEET_FILE).unlink(missing_ok=True)
    for where in (folder, (folder / SHEET_FILE).parent):
        if where.is_dir():
            remove_stale_temporaries(where)


def write_story_record(folder: Path, record: dict, fingerprint: dict, digest: str, files: Iterable[str]) -> None:
    """`record` with the resume fields, written last: it marks the story complete."""
    hashes = {name: file_sha256(folder / name) for name in files}
    body = {**record, RESUME_KEY: {"fingerprint": fingerprint, "story": digest, "files": hashes}}
    atomic_write_text(folder / STORY_RECORD, json.dumps(body, indent=2))


def first_difference(a: Mapping, b: Mapping, prefix: str = "") -> str:
    """The first dotted key whose value differs between two nested mappings, in `b`'s order."""
    for key in list(b) + [k for k in a if k not in b]:
        path = f"{prefix}{key}"
        left, right = a.get(key), b.get(key)
        if isinstance(left, Mapping) and isinstance(right, Mapping):
            if left != right:
                return first_difference(left, right, f"{path}.")
        elif left != right:
            return path
    return prefix.rstrip(".")


def _value(tree: Mapping, dotted: str) -> str:
    node: Any = tree
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, Mapping) else None
    return json.dumps(node) if isinstance(node, (dict, list)) or node is None else str(node)


def _describe(identity: Mapping) -> str:
    if identity.get("command") == "generate":
        return f"generate {identity.get('stories')}"
    scored = identity.get("scored")
    source = "drawn shots" if scored == "drawn" else f"the shots of {scored}"
    return f"{identity.get('command')} {identity.get('benchmark')} / {identity.get('mode')} ({source})"
