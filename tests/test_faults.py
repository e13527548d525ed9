"""The bad-input corpus (tests/faults/cases.yaml) through the public CLI: exit 2, one line, nothing written."""

from pathlib import Path

import pytest
import yaml

from dreamshot.cli import main

FAULTS = Path(__file__).parent / "faults"
CASES = yaml.safe_load((FAULTS / "cases.yaml").read_text())["cases"]


def test_corpus_is_large_enough():
    assert len(CASES) >= 30 and len({case["name"] for case in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[case["name"] for case in CASES])
def test_bad_input_is_one_line_and_status_2(case, tmp_path, capsys):
    out = tmp_path / "out"
    words = [w for arg in case["argv"] for w in (arg if isinstance(arg, list) else [arg])]  # yaml aliases nest
    argv = [word.format(faults=FAULTS, out=out) for word in words]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    line = err.splitlines()[-1]
    assert err.count("error:") == 1 and line.startswith(f"dreamshot {argv[0]}: error: ")
    for expected in case["expect"]:
        assert expected in line, f"{expected!r} not in {line!r}"
    assert not out.exists() or not any(out.rglob("*")), f"partial output left in {out}"
