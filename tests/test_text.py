"""One encoding rule for every text file users write, a folder named where a file belongs, and YAML mappings
that may not repeat a key: the same behaviour for configs, story files, manifests and ViStoryBench's story.json."""

from __future__ import annotations

import codecs
import json
from pathlib import Path

import pytest

from dreamshot.config.load import load_config
from dreamshot.data.manifest import load_manifest
from dreamshot.eval.benchmarks.vistorybench import load_vistorybench
from dreamshot.inference.story import load_story
from dreamshot.utils.errors import ConfigError, DataError
from dreamshot.utils.text import parse_yaml, read_text

FAULTS = Path(__file__).parent / "faults"
ACCEPTED = {
    "utf-8": lambda text: text.encode("utf-8"),
    "utf-8 with BOM": lambda text: codecs.BOM_UTF8 + text.encode("utf-8"),
    "utf-16 (Windows)": lambda text: text.encode("utf-16"),
    "utf-16-be with BOM": lambda text: codecs.BOM_UTF16_BE + text.encode("utf-16-be"),
    "utf-32 with BOM": lambda text: text.encode("utf-32"),
}


@pytest.mark.parametrize("encoding", ACCEPTED)
def test_every_reader_accepts_the_same_encodings(encoding, tmp_path):
    encode = ACCEPTED[encoding]
    experiment = tmp_path / "exp.yaml"
    experiment.write_bytes(encode("# café\ntrainer: {max_steps: 3}\ntags: [naïve]\n"))
    assert load_config(experiment).trainer.max_steps == 3

    story = tmp_path / "story.yaml"
    story.write_bytes(encode("shots:\n  - {annotation: 'Close-up: Zoë smiles.'}\n"))
    assert load_story(story).shots[0].annotation == "Close-up: Zoë smiles."

    manifest = tmp_path / "manifest.jsonl"
    valid = (FAULTS / "data" / "valid.jsonl").read_text()
    for name in ("ref.png", "ref_mask.png", "shot1.png", "shot1_mask.png", "shot2.png"):
        (tmp_path / name).write_bytes((FAULTS / "data" / name).read_bytes())
    manifest.write_bytes(encode(valid.replace("a red box", "a red box, très rouge")))
    assert load_manifest(manifest)[0].references[0].prompt.endswith("très rouge")

    root = tmp_path / "vistory"
    source = FAULTS / "bench" / "vistory" / "valid" / "ViStory" / "01"
    (root / "ViStory" / "01" / "image" / "lily").mkdir(parents=True)
    (root / "ViStory" / "01" / "image" / "lily" / "00.png").write_bytes((source / "image/lily/00.png").read_bytes())
    (root / "ViStory" / "01" / "story.json").write_bytes(encode((source / "story.json").read_text()))
    assert [story.id for story in load_vistorybench(root).stories] == ["01"]


def test_other_encodings_are_one_line_naming_file_and_byte(tmp_path):
    latin1 = tmp_path / "exp.yaml"
    latin1.write_bytes("tags: [café]\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"exp\.yaml: config file is not UTF-8 text \(byte 10\); save it as UTF-8"):
        load_config(latin1)
    no_mark = tmp_path / "story.yaml"
    no_mark.write_bytes("shots: []\n".encode("utf-16-le"))
    with pytest.raises(DataError, match=r"story\.yaml: story file holds NUL characters \(UTF-16 without a byte"):
        load_story(no_mark)


def test_a_folder_where_a_file_belongs_is_named(tmp_path):
    folder = tmp_path / "story.yaml"
    folder.mkdir()
    with pytest.raises(DataError, match=r"story\.yaml: is a folder, expected a story file"):
        load_story(folder)
    with pytest.raises(ConfigError, match=r"story\.yaml: is a folder, expected a config file"):
        load_config(folder)


def test_duplicate_yaml_keys_are_refused_naming_key_and_line(tmp_path):
    experiment = tmp_path / "exp.yaml"
    experiment.write_text("optim:\n  lr: 1.0e-4\n  lr: 1.0e-3\n")
    with pytest.raises(ConfigError, match=r"exp\.yaml: not valid yaml \(duplicate key 'lr', line 3\)"):
        load_config(experiment)
    # The same key in two mappings, and a merge key overridden, are not duplicates.
    assert parse_yaml("a: {x: 1}\nb: {x: 2}\nbase: &b {y: 1}\nc: {<<: *b, y: 2}\n", "t.yaml")["c"] == {"y": 2}


def test_read_text_keeps_the_text_of_a_bom_file_whole(tmp_path):
    path = tmp_path / "f.json"
    path.write_bytes(codecs.BOM_UTF8 + json.dumps({"k": "é"}).encode())
    assert json.loads(read_text(path, "record")) == {"k": "é"}
