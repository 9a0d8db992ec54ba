"""`cpmv eval` (pipeline/evaluate.py): perfect predictions, and wrong ones whose figures are worked by hand."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import pyarrow.parquet as pq
import pytest

from pipeline.cli import main
from pipeline.evaluate import evaluate
from schemas.records import RESULTS_SCHEMA, SCHEMA_VERSION, to_table

NOW = datetime(2026, 11, 30, tzinfo=timezone.utc)
TABLE = "| A | B |\n|---|---|\n| 1 | 2 |\n| 3 | 4 |"
RECORD = {"name": "Ann", "age": 30, "tags": ["a", "b"]}


def res(uri, unit, task, text, status="ok", tile=None):
    return {"schema_version": SCHEMA_VERSION, "run_id": "r", "source_uri": uri, "source_id": uri, "unit_index": unit,
            "unit_kind": "page", "tile_index": tile, "task": task, "status": status, "text": text, "model": "m",
            "prompt_version": "v", "fingerprint": "f", "created_at": NOW}


def truth(uri, unit, task, expected):
    return {"source_uri": uri, "unit_index": unit, "task": task, "expected": expected}


GT = [truth("a.pdf", 0, "ocr", "hello world"), truth("a.pdf", 1, "table", TABLE),
      truth("b.png", 0, "caption", json.dumps(RECORD))]


def test_perfect_predictions_score_zero_cer_and_full_f1():
    results = [res("a.pdf", 0, "ocr", "hello\nworld"),  # a line break for a space is no error
               res("a.pdf", 1, "table", "<table><tr><th>A</th><th>B</th></tr><tr><td>1</td><td>2</td></tr>"
                   "<tr><td>3</td><td>4</td></tr></table>"),  # HTML compares with markdown alike
               res("b.png", 0, "caption", "```json\n" + json.dumps(RECORD) + "\n```")]
    o = evaluate(results, GT)["overall"]
    assert o["text"]["cer"] == 0.0 and o["text"]["wer"] == 0.0
    assert o["table"]["precision"] == o["table"]["recall"] == o["table"]["f1"] == 1.0
    assert o["json"]["exact_match"] == 1.0 and o["json"]["field_accuracy"] == 1.0
    assert (o["units"], o["missing"], o["failed"]) == (3, 0, 0)


def test_known_wrong_predictions_score_what_is_computed_by_hand():
    results = [res("a.pdf", 0, "ocr", "helo world!"),
               res("a.pdf", 1, "table", "| A | B |\n|---|---|\n| 1 | 9 |"),
               res("b.png", 0, "caption", json.dumps({"name": "Ann", "age": 31, "tags": ["a"]}))]
    report = evaluate(results, GT)
    o = report["overall"]
    # "hello world" -> "helo world!": 1 deletion + 1 insertion over 11 reference characters
    assert o["text"]["cer"] == pytest.approx(2 / 11, abs=1e-6) and o["text"]["char_errors"] == 2
    assert o["text"]["wer"] == 1.0  # both words differ
    # cells A B 1 2 3 4 expected; A B 1 9 predicted; A B 1 correct: P 3/4, R 3/6, F1 0.6
    t = o["table"]
    assert (t["precision"], t["recall"], t["f1"]) == (0.75, 0.5, 0.6)
    # leaves name, age, tags.0, tags.1: name and tags.0 right
    assert o["json"] == {"units": 1, "exact_match": 0.0, "field_accuracy": 0.5}
    assert report["documents"]["a.pdf"]["text"]["cer"] == pytest.approx(2 / 11, abs=1e-6)
    assert "json" not in report["documents"]["a.pdf"] and report["documents"]["b.png"]["json"]["units"] == 1


def test_missing_and_failed_rows_count_as_empty_predictions_and_tiles_join():
    gt = [truth("a.pdf", 0, "ocr", "top half bottom half"), truth("a.pdf", 1, "ocr", "abcd"),
          truth("a.pdf", 2, "ocr", "efgh")]
    results = [res("a.pdf", 0, "ocr", "bottom half", tile=1), res("a.pdf", 0, "ocr", "top half", tile=0),
               res("a.pdf", 1, "ocr", "| loop | loop", status="error")]  # a failed reply kept for inspection
    o = evaluate(results, gt)["overall"]
    assert (o["missing"], o["failed"]) == (1, 1)
    # unit 0 perfect (tiles in order), units 1 and 2: 4 deletions each; 8 errors over 20 + 4 + 4 characters
    assert o["text"]["cer"] == pytest.approx(8 / 28, abs=1e-6)


def test_cli_writes_json_and_a_summary(tmp_path, capsys):
    (tmp_path / "out" / "results").mkdir(parents=True)
    pq.write_table(to_table([res("a.pdf", 0, "ocr", "helo world!")], RESULTS_SCHEMA),
                   tmp_path / "out" / "results" / "w1.parquet")
    gt = tmp_path / "truth.jsonl"
    gt.write_text(json.dumps(truth("a.pdf", 0, "ocr", "hello world")) + "\n")
    assert main(["eval", str(tmp_path / "out"), str(gt), "--out", str(tmp_path / "eval.json")]) == 0
    figures = json.loads((tmp_path / "eval.json").read_text())
    assert figures["overall"]["text"]["cer"] == pytest.approx(0.181818, abs=1e-6)
    out = capsys.readouterr().out
    assert "overall    1 units; CER 18.2% WER 100.0%" in out and "a.pdf" in out
    csv = tmp_path / "truth.csv"
    csv.write_text("source_uri,unit_index,task,expected\na.pdf,0,ocr,hello world\n")
    assert main(["eval", str(tmp_path / "out" / "results" / "w1.parquet"), str(csv),
                 "--out", str(tmp_path / "e2.json")]) == 0
    bad = tmp_path / "bad.csv"
    bad.write_text("uri,expected\nx,y\n")
    assert main(["eval", str(tmp_path / "out"), str(bad), "--out", str(tmp_path / "e3.json")]) == 2
    assert "missing source_uri, unit_index, task" in capsys.readouterr().err
