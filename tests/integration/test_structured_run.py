"""A whole `cpmv run` with json_schema, choices and thinking tasks (tiny random MiniCPM-V 4.6, transformers
engine, local Ray): the results Parquet has the typed `json_<task>` struct column, the categorical
`label` and the `reasoning` column, and pandas and DuckDB read the results directory in one line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from pipeline.samples import make_demo_corpus
from pipeline.structured import arrow_type, validate_json

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["kind", "has_text", "pages"],
          "properties": {"kind": {"enum": ["photo", "scan", "drawing"]}, "has_text": {"type": "boolean"},
                         "pages": {"type": "integer", "minimum": 0, "maximum": 9}}}
LABELS = ["text", "photo", "chart"]


def _run(job: dict, tmp: Path) -> subprocess.CompletedProcess:
    path = tmp / "job.yaml"
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") and k != "RAY_ADDRESS"}
    env.update(PYTHONPATH=str(ROOT), RAY_TMPDIR=tempfile.mkdtemp(prefix="cpmv-ray-", dir="/tmp"),
               RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(path)], env=env, capture_output=True,
                          text=True, timeout=600, cwd=tmp)


def _job(tmp: Path, tasks: list[dict], family: str = "minicpmv4_6") -> dict:
    corpus = tmp / "corpus"
    if not corpus.exists():
        corpus.mkdir()
        for p in make_demo_corpus(tmp / "all"):
            if p.suffix in (".jpg", ".png"):
                p.rename(corpus / p.name)
    return {"name": "structured", "input": {"uris": [str(corpus)]}, "output": {"uri": str(tmp / "out")},
            "model": {"name": "tiny", "family": family, "max_slice_nums": 1, "cache_dir": str(tmp / "cache")},
            "engine": {"kind": "transformers", "batch_size": 4}, "ray": {"num_cpus": 2}, "tasks": tasks,
            # 6-token captions of a random model: cut and looping; the structured tasks are what is checked
            "checks": {"truncated": False, "repetition_min_share": 1.0}}


def test_structured_tasks_end_to_end(tmp_path: Path) -> None:
    tasks = [
        {"name": "custom", "id": "info", "prompt": "Describe.", "json_schema": SCHEMA, "max_new_tokens": 48,
         "retries": 0},
        {"name": "custom", "id": "content", "prompt": "What is it?", "choices": LABELS, "max_new_tokens": 8,
         "retries": 0},
        {"name": "caption", "max_new_tokens": 6, "retries": 0},
        {"name": "caption", "id": "caption_think", "thinking": True, "max_new_tokens": 6, "retries": 0},
    ]
    proc = _run(_job(tmp_path, tasks), tmp_path)
    assert proc.returncode == 0, f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    results = tmp_path / "out" / "results"

    table = pq.read_table(results)
    assert table.schema.field("json_info").type == arrow_type(SCHEMA)[0]
    assert table.schema.field("label").type == pa.dictionary(pa.int32(), pa.string())
    assert table.schema.names[-4:] == ["label", "reasoning", "validation_error", "json_info"]
    rows = table.to_pylist()
    by_task: dict[str, list[dict]] = {}
    for r in rows:
        by_task.setdefault(r["task"], []).append(r)
    assert {k: len(v) for k, v in by_task.items()} == {"info": 2, "content": 2, "caption": 2, "caption_think": 2}

    for r in by_task["info"]:  # constrained, validated, parsed into the struct column
        assert r["status"] == "ok" and r["validation_error"] is None, r["error_message"]
        value, why = validate_json(r["text"], json.dumps(SCHEMA))
        assert why is None and r["json_info"] == value
    for r in by_task["content"]:
        assert r["status"] == "ok" and r["label"] in LABELS and r["text"] == r["label"]
    for r in rows:
        if r["task"] != "info":
            assert r["json_info"] is None
        if r["task"] != "content":
            assert r["label"] is None
    for r in by_task["caption"]:  # thinking off: the reply is the answer, no reasoning
        assert r["status"] == "ok" and r["text"] and r["reasoning"] is None
    for r in by_task["caption_think"]:  # 6 tokens of thinking: all reasoning, cut before any answer
        assert r["status"] == "error" and r["error_type"] == "reply_truncated"
        assert r["reasoning"] and not r["text"]
        assert r["prompt_version"].endswith("+think")

    # One line per reader for the whole results directory.
    import duckdb
    import pandas as pd

    df = pd.read_parquet(results)
    assert isinstance(df["label"].dtype, pd.CategoricalDtype)
    assert set(df.loc[df.task == "info", "json_info"].map(lambda v: v["kind"])) <= {"photo", "scan", "drawing"}
    kinds = duckdb.sql(f"select json_info.kind from read_parquet('{results}/*.parquet') where task = 'info'").fetchall()
    assert len(kinds) == 2 and all(k in ("photo", "scan", "drawing") for (k,) in kinds)


def test_thinking_refused_at_start_for_a_generation_without_it(tmp_path: Path) -> None:
    proc = _run(_job(tmp_path, [{"name": "caption", "thinking": True}], family="minicpm_ocr"), tmp_path)
    assert proc.returncode != 0
    err = proc.stderr + proc.stdout
    assert "tasks[].thinking is set for task(s) caption, but MiniCPM-OCR 1.0 has no thinking mode" in err
    assert not (tmp_path / "out" / "results").exists()
