"""`cpmv eval`: compare a results table with ground truth, per document and overall.

Ground truth is a Parquet, CSV or JSONL file with columns `source_uri, unit_index, task, expected`
(one row per unit and task). Results are a run's output prefix (its `results/` Parquet files) or a
Parquet file or directory. A ground-truth row is paired with the result rows of the same
(source_uri, unit_index, task); the tiles of a tiled unit are joined in reading order. A missing or
failed result counts as an empty prediction (so quality falls when rows fail), and both are counted.

Metrics, by what `expected` holds:

* **JSON** (`expected` parses as a JSON object, e.g. a custom extraction prompt): exact match of the
  parsed objects, and field accuracy = expected leaf fields (dotted key paths) whose value the
  prediction has equal. A prediction inside a ```json fence is unwrapped.
* **Tables** (task `table`): cell precision, recall and F1 over non-empty cells, a cell being correct
  when the prediction has the same text (whitespace collapsed) at the same table, row and column
  (tables parsed by pipeline/tables.py, so markdown and HTML compare alike).
* **Text** (every other task: ocr, caption, video_caption): character and word error rates with
  jiwer (edit operations / reference length), whitespace runs collapsed first (a line break where
  the reference has a space is not an OCR error). Overall and per document rates are pooled (total
  edits / total reference length), not averages of per-unit rates.

Writes `eval.json` (the figures) and prints a short text summary.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

KEY_COLUMNS = ("source_uri", "unit_index", "task", "expected")
_FENCE = re.compile(r"^\s*```(?:json)?\s*(.*?)\s*```\s*$", re.S)


def register(sub: Any) -> None:
    """Add the `eval` subcommand to the CLI's subparsers."""
    p = sub.add_parser("eval", help="score a results table against ground truth (CER/WER, table cell F1, JSON match)")
    p.add_argument("results", help="a run's output prefix (its results/), or a results Parquet file or directory")
    p.add_argument("truth", help="ground truth: Parquet, CSV or JSONL with source_uri, unit_index, task, expected")
    p.add_argument("--out", default="eval.json", help="where to write the figures as JSON (default eval.json)")
    p.set_defaults(func=_cmd)


def _cmd(args: argparse.Namespace) -> int:
    try:
        report = evaluate(read_results(args.results), read_truth(args.truth))
    except (OSError, ValueError, KeyError) as err:
        print(f"cpmv eval: {err}", file=sys.stderr)
        return 2
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(render(report))
    print(f"  written    {args.out}")
    return 0


# -- reading ------------------------------------------------------------------------------------


def _read(uri: str) -> Any:
    import pyarrow.csv as pcsv
    import pyarrow.json as pjson
    import pyarrow.parquet as pq

    from pipeline import storage
    from pipeline.config import StorageConfig

    fs, path = storage.pyarrow_fs(uri, StorageConfig())
    if uri.endswith(".csv"):
        with fs.open_input_stream(path) as f:
            return pcsv.read_csv(f)
    if uri.endswith((".jsonl", ".json")):
        with fs.open_input_stream(path) as f:
            return pjson.read_json(f)
    return pq.read_table(path, filesystem=fs)


def read_truth(uri: str) -> list[dict[str, Any]]:
    """Ground-truth rows; a file without the four columns fails naming what is missing."""
    table = _read(uri)
    missing = [c for c in KEY_COLUMNS if c not in table.column_names]
    if missing:
        raise ValueError(f"{uri}: ground truth needs columns {', '.join(KEY_COLUMNS)}; missing {', '.join(missing)}")
    return table.select(list(KEY_COLUMNS)).to_pylist()


def read_results(uri: str) -> list[dict[str, Any]]:
    """Result rows of an output prefix (`<uri>/results/`) or of a Parquet file or directory."""
    from pipeline import storage
    from pipeline.config import StorageConfig

    if not uri.endswith(".parquet") and storage.exists(storage.safe_join(uri, "results"), StorageConfig()):
        uri = storage.safe_join(uri, "results")
    cols = ["source_uri", "unit_index", "tile_index", "task", "status", "text"]
    return _read(uri).select(cols).to_pylist()


# -- scoring ------------------------------------------------------------------------------------


def evaluate(results: list[dict[str, Any]], truth: list[dict[str, Any]]) -> dict[str, Any]:
    """Figures overall and by document (module docstring for the metrics)."""
    predicted: dict[tuple[str, int, str], list[tuple[int, str | None, str]]] = defaultdict(list)
    for r in results:
        predicted[(r["source_uri"], int(r["unit_index"]), r["task"])].append(
            (r["tile_index"] if r["tile_index"] is not None else -1, r["text"], r["status"]))
    overall, docs = _Tally(), defaultdict(_Tally)
    for t in truth:
        key = (t["source_uri"], int(t["unit_index"]), t["task"])
        rows = sorted(predicted.get(key, []), key=lambda x: x[0])
        if not rows:
            state = "missing"
        elif any(s != "ok" for _, _, s in rows):
            state = "failed"
        else:
            state = "ok"
        pred = "\n".join(text or "" for _, text, _ in rows) if state == "ok" else ""
        for tally in (overall, docs[t["source_uri"]]):
            tally.add(t["task"], str(t["expected"] if t["expected"] is not None else ""), pred, state)
    return {"overall": overall.figures(), "documents": {uri: d.figures() for uri, d in sorted(docs.items())}}


class _Tally:
    """Pooled counts of one scope (the whole set or one document)."""

    def __init__(self) -> None:
        self.n: dict[str, int] = defaultdict(int)  # units, missing, failed
        self.text = {"char_errors": 0, "chars": 0, "word_errors": 0, "words": 0, "units": 0}
        self.table = {"correct": 0, "predicted": 0, "expected": 0, "units": 0}
        self.json = {"exact": 0, "fields_ok": 0, "fields": 0, "units": 0}

    def add(self, task: str, expected: str, predicted: str, state: str) -> None:
        self.n["units"] += 1
        if state != "ok":
            self.n[state] += 1
        obj = _json_object(expected)
        if obj is not None:
            got = _json_object(predicted)
            exp_fields, got_fields = _leaves(obj), _leaves(got) if got is not None else {}
            self.json["units"] += 1
            self.json["exact"] += int(got == obj)
            self.json["fields"] += len(exp_fields)
            self.json["fields_ok"] += sum(1 for k, v in exp_fields.items() if k in got_fields and got_fields[k] == v)
        elif task == "table":
            exp, got = _cells(expected), _cells(predicted)
            self.table["units"] += 1
            self.table["expected"] += len(exp)
            self.table["predicted"] += len(got)
            self.table["correct"] += sum(1 for pos, text in got.items() if exp.get(pos) == text)
        else:
            exp_flat, pred_flat = " ".join(expected.split()), " ".join(predicted.split())
            c_err, c_len = _edits(exp_flat, pred_flat, chars=True)
            w_err, w_len = _edits(exp_flat, pred_flat, chars=False)
            t = self.text
            t["units"] += 1
            t["char_errors"] += c_err
            t["chars"] += c_len
            t["word_errors"] += w_err
            t["words"] += w_len

    def figures(self) -> dict[str, Any]:
        out: dict[str, Any] = {"units": self.n["units"], "missing": self.n["missing"], "failed": self.n["failed"]}
        t, b, j = self.text, self.table, self.json
        if t["units"]:
            out["text"] = {"units": t["units"], "cer": _ratio(t["char_errors"], t["chars"]),
                           "wer": _ratio(t["word_errors"], t["words"]),
                           "char_errors": t["char_errors"], "chars": t["chars"]}
        if b["units"]:
            p, r = _ratio(b["correct"], b["predicted"], 0.0), _ratio(b["correct"], b["expected"], 0.0)
            out["table"] = {"units": b["units"], "precision": p, "recall": r,
                            "f1": 0.0 if not p or not r else round(2 * p * r / (p + r), 6),
                            "cells_correct": b["correct"], "cells_predicted": b["predicted"],
                            "cells_expected": b["expected"]}
        if j["units"]:
            out["json"] = {"units": j["units"], "exact_match": _ratio(j["exact"], j["units"]),
                           "field_accuracy": _ratio(j["fields_ok"], j["fields"])}
        return out


def _ratio(a: int, b: int, empty: float | None = None) -> float | None:
    return round(a / b, 6) if b else empty


def _edits(reference: str, hypothesis: str, chars: bool) -> tuple[int, int]:
    """(substitutions + deletions + insertions, reference length) in characters or words, via jiwer."""
    import jiwer

    ref_len = len(reference) if chars else len(reference.split())
    if not reference.strip():  # jiwer needs a reference: every predicted token is an insertion
        return (len(hypothesis) if chars else len(hypothesis.split())), 0
    if not hypothesis.strip():
        return ref_len, ref_len
    out = (jiwer.process_characters if chars else jiwer.process_words)([reference], [hypothesis])
    return out.substitutions + out.deletions + out.insertions, out.substitutions + out.deletions + out.hits


def _cells(text: str) -> dict[tuple[int, int, int], str]:
    """Non-empty cells by (table, row, column), text with whitespace collapsed."""
    from pipeline.tables import parse

    tables, _ = parse(text)
    return {(ti, ri, ci): " ".join(cell.split())
            for ti, t in enumerate(tables) for ri, row in enumerate(t["rows"])
            for ci, cell in enumerate(row["cells"]) if cell.strip()}


def _json_object(text: str) -> dict[str, Any] | None:
    m = _FENCE.match(text or "")
    try:
        value = json.loads(m.group(1) if m else text)
    except (TypeError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _leaves(value: Any, prefix: str = "") -> dict[str, Any]:
    """Leaf values by dotted key path (list items by index): {"a": {"b": [1]}} -> {"a.b.0": 1}."""
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list):
        items = ((str(i), v) for i, v in enumerate(value))
    else:
        return {prefix: value}
    out: dict[str, Any] = {}
    for k, v in items:
        out.update(_leaves(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def render(report: dict[str, Any]) -> str:
    """The short text summary: overall figures, then one line per document."""
    def line(f: dict[str, Any]) -> str:
        parts = [f"{f['units']} units" + (f" ({f['missing']} missing, {f['failed']} failed)"
                                          if f["missing"] or f["failed"] else "")]
        if "text" in f:
            parts.append(f"CER {_pct(f['text']['cer'])} WER {_pct(f['text']['wer'])}")
        if "table" in f:
            tb = f["table"]
            parts.append(f"table cells P {tb['precision']:.3f} R {tb['recall']:.3f} F1 {tb['f1']:.3f}")
        if "json" in f:
            parts.append(f"JSON exact {_pct(f['json']['exact_match'])} fields {_pct(f['json']['field_accuracy'])}")
        return "; ".join(parts)

    lines = ["cpmv eval", f"  overall    {line(report['overall'])}"]
    docs = report["documents"]
    width = max((len(u) for u in docs), default=0)
    for uri, f in list(docs.items())[:50]:
        lines.append(f"    {uri:<{width}}  {line(f)}")
    if len(docs) > 50:
        lines.append(f"    ... {len(docs) - 50} more documents in the JSON")
    return "\n".join(lines)


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"
