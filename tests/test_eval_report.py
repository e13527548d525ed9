"""The results: the side-by-side table with the paper's published rows, results.json / results.csv, W&B tables."""

from __future__ import annotations

import csv
import json

import pytest

from dreamshot.eval.published import PUBLISHED
from dreamshot.eval.report import EvalResults, comparison, describe, log_tables, missing_line, write_results


def _results(benchmark: str = "vistorybench", mode: str = "r2s") -> EvalResults:
    return EvalResults(
        benchmark=benchmark,
        mode=mode,
        label="ours (run)",
        values={"cids_self": 0.6197, "cids_cross": 0.4846, "csd_self": 0.6017, "aes": 5.2316},
        missing={"csd_cross": "eval.csd.weights is not set", "alignment": "eval.judge.endpoint is not set"},
        per_story={"01": {"cids_self": 0.6, "cids_cross": 0.5, "aes": 5.0}, "08": {"cids_self": 0.6394}},
        story_shots={"01": 5, "08": 4},
    )


def test_side_by_side_table_prints_the_published_rows_and_ours():
    text = describe(_results())
    lines = text.splitlines()
    assert "paper Tab. 2 (ViStoryBench, Reference-to-Shot)" in lines[0] and "2 stories, 9 shots" in lines[0]
    assert lines[1].split() == [
        "method",
        "CIDS",
        "self",
        "CIDS",
        "cross",
        "CSD",
        "self",
        "CSD",
        "cross",
        "AES",
        "Alignment",
    ]
    rows = {line.split("  ")[0].strip(): line.split() for line in lines[3:] if not line.startswith("missing")}
    assert rows["UNO"][-6:] == ["62.0", "48.5", "60.2", "39.1", "5.23", "3.01"]
    assert rows["DreamShot"][-6:] == ["65.6", "60.2", "61.8", "43.9", "5.40", "3.37"]
    # Ours: cosines x100, AES on its scale, missing values marked and explained.
    assert rows["ours (run)"][-6:] == ["62.0", "48.5", "60.2", "missing", "5.23", "missing"]
    # Every missing value on one line, grouped by reason.
    assert lines[-1] == "missing: csd_cross (eval.csd.weights is not set); alignment (eval.judge.endpoint is not set)"
    assert sum(line.startswith("missing") for line in lines) == 1


def test_a_run_on_other_stories_than_the_published_rows_says_so():
    """ViStoryBench's lite split (20 stories) printed beside Tab. 2, measured on the full 80: not comparable."""
    lite = _results()
    lite.story_shots = {f"{i:02d}": 10 for i in range(20)}
    assert "note: the published rows score 80 stories, this run 20: not the same stories" in describe(lite)
    full = _results()
    full.story_shots = {f"{i:02d}": 10 for i in range(80)}
    assert "published rows score" not in describe(full)
    assert "published rows score" not in describe(_results("toy"))  # no published rows, nothing to compare with


def test_a_value_averaging_fewer_stories_than_were_scored_says_over_how_many():
    """A story whose references give no feature has no CIDS (as ViStoryBench): the table says the mean is of fewer."""
    results = _results()
    results.values = {"cids_self": 0.62, "cids_cross": 0.5, "aes": 5.1, "alignment": 3.0}
    results.missing = {}
    results.per_story = {"01": {"cids_self": 0.6, "cids_cross": 0.5, "aes": 5.0}, "08": {"aes": 5.2}}
    text = describe(results)
    assert "note: of the 2 stories, these values average only cids_self 1, cids_cross 1 (the others" in text
    metrics = results.to_json()["metrics"]
    assert (metrics["cids_cross"]["stories"], metrics["aes"]["stories"]) == (1, 2)
    assert metrics["alignment"] == {"value": 3.0}  # the mean of the dimensions' means, not of stories
    results.per_story["08"].update(cids_self=0.64, cids_cross=0.4)
    assert "average only" not in describe(results)


def test_missing_values_sharing_a_reason_are_listed_together():
    reasons = {"cids_cross": "eval.clip.weights is not set", "cids_self": "eval.clip.weights is not set", "aes": "x"}
    assert missing_line(reasons) == "missing: cids_cross, cids_self (eval.clip.weights is not set); aes (x)"


@pytest.mark.parametrize("key", sorted(PUBLISHED))
def test_every_published_table_is_printed_in_full(key):
    table = PUBLISHED[key]
    headers, rows = comparison(_results(*key))
    assert len(headers) == len(table.columns) + 1
    assert [row[0] for row in rows] == [*table.rows, "ours (run)"]
    for row, values in zip(rows, table.rows.values(), strict=False):
        assert [float(cell) for cell in row[1:]] == list(values)


def test_published_rows_match_eval_md():
    assert PUBLISHED[("dreamshot_test", "r2s")].rows["DreamShot"] == (48.7, 51.6, 64.5, 45.1, 5.50, 3.39)
    assert PUBLISHED[("dreamshot_test", "t2s")].rows["Story2Board"] == (44.4, 62.6, 5.27, 2.95)
    assert PUBLISHED[("dreamshot_test", "s2s")].rows["UNO"] == (36.7, 55.8, 5.12, 3.28)
    assert PUBLISHED[("dreamshot_test", "r2s")].rows["w/o RACL (Tab. 3)"] == (46.7, 48.3, 64.2, 43.7, 5.49, 3.26)
    assert PUBLISHED[("vistorybench", "r2s")].rows["SEED-Story"] == (58.7, 28.7, 74.8, 22.7, 3.82, 1.23)


def test_toy_table_has_no_published_rows_but_all_our_values():
    results = _results("toy")
    results.values["toy_identity_cross"] = 0.854
    headers, rows = comparison(results)
    assert headers[-1] == "toy_identity_cross" and rows[-1][-1] == "85.4" and len(rows) == 1
    assert "no published rows for toy / r2s" in describe(results)


def test_results_files(tmp_path):
    json_path, csv_path = write_results(tmp_path, _results())
    body = json.loads(json_path.read_text())
    assert body["metrics"]["cids_cross"] == {"value": 0.4846, "stories": 1}
    assert body["metrics"]["alignment"] == {"status": "missing", "reason": "eval.judge.endpoint is not set"}
    assert (body["stories"], body["shots"], body["mode"]) == (2, 9, "r2s")
    rows = list(csv.reader(csv_path.open()))
    assert rows[0] == ["story", "cids_self", "cids_cross", "csd_self", "aes", "csd_cross", "alignment"]
    assert rows[2] == ["08", "0.6394", "", "", "", "", ""]
    assert rows[3][0] == "mean" and rows[3][-2:] == ["missing", "missing"]


def test_wandb_tables_are_logged():
    logged = {}

    class Run:
        def log(self, data):
            logged.update(data)

    log_tables(Run(), _results())
    comparison_table = logged["eval/comparison"]
    assert comparison_table.columns[0] == "method" and comparison_table.data[-1][0] == "ours (run)"
    assert len(comparison_table.data) == len(PUBLISHED[("vistorybench", "r2s")].rows) + 1
    assert logged["eval/per_story"].columns == ["story", "cids_self", "cids_cross", "csd_self", "aes"]
    assert logged["eval/cids_cross"] == 0.4846
