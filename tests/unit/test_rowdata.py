"""Per-row prompts and pass-through columns (pipeline/rowdata.py): real Parquet, CSV and JSONL manifests
on local disk, their types through the commit protocol and a resumed (re-published) window."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from pipeline import commit, rowdata, sink
from pipeline.collect import Complete, SourceWork
from pipeline.config import ConfigError, InputConfig, StorageConfig, load_job_data
from pipeline.sources import discover, read_manifest_table
from tests.commit_driver import rows_for

STORAGE = StorageConfig()
TS = pa.timestamp("us", tz="UTC")


def _files(tmp_path, n=3):
    paths = []
    for i in range(n):
        p = tmp_path / f"img{i}.png"
        p.write_bytes(b"not really a png %d" % i)
        paths.append(str(p))
    return paths


def _parquet_manifest(tmp_path, uris):
    table = pa.table({
        "uri": uris,
        "item_id": pa.array([10, 11, 12][: len(uris)], pa.int64()),
        "taken_at": pa.array([datetime(2026, 1, i + 1, tzinfo=timezone.utc) for i in range(len(uris))], TS),
        "label": ["cat", "dog", None][: len(uris)],
        "prompt": ["Describe the {label}.", "Plain prompt, braces {{kept}}.", "Name the {label}."][: len(uris)],
    })
    path = tmp_path / "m.parquet"
    pq.write_table(table, path)
    return path


def test_fill_template_fills_columns_and_refuses_what_it_cannot_fill():
    row = {"label": "cat", "n": 3, "empty": None}
    assert rowdata.fill_template("A {label} x{n} {{literal}}", row) == "A cat x3 {literal}"
    for bad, word in [("{missing}", "names no manifest column"), ("{empty}", "is null"),
                      ("{label.__class__}", "names no manifest column"), ("{}", "not supported"),
                      ("{label!r}", "not supported"), ("{label:>9}", "not supported"), ("{label", "malformed")]:
        with pytest.raises(rowdata.TemplateError, match=word):
            rowdata.fill_template(bad, row)


def test_parquet_manifest_prompts_types_and_rows(tmp_path):
    uris = _files(tmp_path)
    path = _parquet_manifest(tmp_path, uris)
    cfg = InputConfig(manifest=str(path), prompt_column="prompt", pass_through=["item_id", "taken_at"])
    table = read_manifest_table(str(path), STORAGE)
    sources = discover(cfg, STORAGE, manifest=table)
    assert [s.manifest_row for s in sources] == [0, 1, 2]
    data = rowdata.load(cfg, table)
    assert data.prompt(0) == ("Describe the cat.", None)
    assert data.prompt(1) == ("Plain prompt, braces {kept}.", None)
    prompt, error = data.prompt(2)  # {label} is null in row 2: that source's error row, not a job failure
    assert prompt is None and "{label} is null" in error
    assert data.prompt(None) == (None, None)
    assert [(f.name, f.type) for f in data.fields] == [("item_id", pa.int64()), ("taken_at", TS)]
    attached = data.attach(pa.table({"x": [1, 2, 3]}), [2, None, 0])
    assert attached.schema.field("item_id").type == pa.int64() and attached.schema.field("taken_at").type == TS
    assert attached.column("item_id").to_pylist() == [12, None, 10]


def test_csv_and_jsonl_manifests_keep_the_types_pyarrow_infers(tmp_path):
    uris = _files(tmp_path, 2)
    csv = tmp_path / "m.csv"
    pacsv.write_csv(pa.table({"uri": uris, "row_no": [1, 2], "when": ["2026-01-01 10:00:00", "2026-01-02 11:00:00"],
                              "score": [0.5, 1.5]}), csv)
    jsonl = tmp_path / "m.jsonl"
    jsonl.write_text("".join(json.dumps({"uri": u, "row_no": i, "tag": f"t{i}"}) + "\n" for i, u in enumerate(uris)))
    for path, cols in ((csv, ["row_no", "when", "score"]), (jsonl, ["row_no", "tag"])):
        cfg = InputConfig(manifest=str(path), pass_through=cols)
        table = read_manifest_table(str(path), STORAGE)
        fields = {f.name: f.type for f in rowdata.load(cfg, table).fields}
        assert fields == {c: table.schema.field(c).type for c in cols}
    assert {f.name: f.type for f in rowdata.load(InputConfig(manifest=str(csv), pass_through=["row_no", "when"]),
                                                  read_manifest_table(str(csv), STORAGE)).fields} == {
        "row_no": pa.int64(), "when": pa.timestamp("s")}


def test_bad_manifest_columns_fail_fast_naming_the_field(tmp_path):
    uris = _files(tmp_path)
    path = _parquet_manifest(tmp_path, uris)
    table = read_manifest_table(str(path), STORAGE)
    with pytest.raises(ValueError, match=r"input.pass_through: .* no column\(s\) 'nope'"):
        rowdata.load(InputConfig(manifest=str(path), pass_through=["nope"]), table)
    with pytest.raises(ValueError, match="input.prompt_column: .* no column 'question'"):
        rowdata.load(InputConfig(manifest=str(path), prompt_column="question"), table)
    with pytest.raises(ValueError, match="must hold text"):
        rowdata.load(InputConfig(manifest=str(path), prompt_column="item_id"), table)
    empty = pa.table({"uri": uris, "blank": pa.nulls(3)})
    with pytest.raises(ValueError, match="'blank' .* type is null"):
        rowdata.load(InputConfig(manifest=str(path), pass_through=["blank"]), empty)
    twice = pa.table({"uri": [uris[0], uris[0]], "k": [1, 2]})
    with pytest.raises(ValueError, match="rows 0 and 1 .* different"):
        rowdata.load(InputConfig(manifest=str(path), pass_through=["k"]), twice)
    rowdata.load(InputConfig(manifest=str(path), pass_through=["k"]), pa.table({"uri": [uris[0]] * 2, "k": [1, 1]}))


@pytest.mark.parametrize("name", ["status", "source_id", "text", "prompt", "dedup_of", "num_units", "_expected_rows"])
def test_pass_through_names_must_not_clash_with_ours(name):
    with pytest.raises(ConfigError, match=f"input.pass_through: '{name}' clash with the pipeline's own output columns"):
        load_job_data({"input": {"manifest": "m.csv", "pass_through": [name]}, "output": {"uri": "/tmp/o"}})
    with pytest.raises(ConfigError, match="set input.manifest"):
        load_job_data({"input": {"uris": ["a"], "pass_through": ["k"]}, "output": {"uri": "/tmp/o"}})


def test_per_row_prompt_is_other_work():
    assert rowdata.row_fingerprint("fp", None) == "fp"
    a, b = rowdata.row_fingerprint("fp", "Describe the cat."), rowdata.row_fingerprint("fp", "Describe the dog.")
    assert len({"fp", a, b}) == 3 and len(a) == 16
    assert rowdata.row_prompt_version("caption-v1", "x").startswith("caption-v1+row-")
    work = SourceWork("u", "s", 1, ("ocr",), prompt="x")
    assert work.fingerprints({"ocr": "fp"}) == {"ocr": rowdata.row_fingerprint("fp", "x")}


def test_published_files_keep_pass_through_types_across_a_republished_window(tmp_path):
    """Window 1 publishes two sources; a rerun redoes one task of source 0, which moves its rows to a
    new window and rewrites window 1 without them: every file keeps the pass-through columns and types."""
    uris = _files(tmp_path, 2)
    path = _parquet_manifest(tmp_path, uris)
    cfg = InputConfig(manifest=str(path), pass_through=["item_id", "taken_at"])
    data = rowdata.load(cfg, read_manifest_table(str(path), STORAGE))
    layout = sink.Layout(str(tmp_path / "out"), STORAGE)
    fps = {"ocr": "fp-ocr", "caption": "fp-caption"}
    sids = [f"{i:032x}" for i in range(2)]
    first = commit.Publisher(layout, "a1", "a1", fps, rows=data)
    first.publish([Complete(SourceWork(f"s3://in/{sid}.pdf", sid, 100, ("ocr", "caption"), manifest_row=i),
                            rows_for(sid, ("ocr", "caption"), "a1", False), 3) for i, sid in enumerate(sids)])
    state = sink.CommittedIndex.load(layout).lookup([sids[0]])[sids[0]]
    again = commit.Publisher(layout, "a2", "a2", {"ocr": "fp-ocr-2", "caption": "fp-caption"}, rows=data)
    work = SourceWork(f"s3://in/{sids[0]}.pdf", sids[0], 100, ("ocr",), sink.prior_of(state), manifest_row=0)
    again.publish([Complete(work, rows_for(sids[0], ("ocr",), "a2", False, {"ocr": "fp-ocr-2"}), 3)])
    for table in ("results", "documents"):
        files = sorted((tmp_path / "out" / table).iterdir())
        assert len(files) == 2
        schemas = [pq.read_schema(f) for f in files]
        assert all(s.field("item_id").type == pa.int64() and s.field("taken_at").type == TS for s in schemas)
        assert schemas[0].names == schemas[1].names and schemas[0].names[-2:] == ["item_id", "taken_at"]
        rows = pq.read_table(tmp_path / "out" / table).to_pylist()
        by_sid = {(r["source_id"], r.get("task")): r["item_id"] for r in rows}
        assert {v for (sid, _), v in by_sid.items() if sid == sids[0]} == {10}
        assert {v for (sid, _), v in by_sid.items() if sid == sids[1]} == {11}
    results = pq.read_table(tmp_path / "out" / "results").to_pylist()
    assert len(results) == 2 * 3 * 2  # no row lost or doubled by the move


def test_cpmv_schema_output_lists_a_jobs_pass_through_columns(tmp_path, capsys):
    from pipeline.cli import main

    uris = _files(tmp_path)
    path = _parquet_manifest(tmp_path, uris)
    job = tmp_path / "job.yaml"
    job.write_text(f"input: {{manifest: {path}, pass_through: [item_id, taken_at]}}\noutput: {{uri: {tmp_path}/out}}\n")
    assert main(["schema", "--output", "--job", str(job)]) == 0
    out = json.loads(capsys.readouterr().out)
    for table in ("results", "documents"):
        assert out["tables"][table][-2:] == [
            {"name": "item_id", "type": "int64", "nullable": True, "pass_through": True},
            {"name": "taken_at", "type": "timestamp[us, tz=UTC]", "nullable": True, "pass_through": True}]
    assert "input.pass_through" in out["pass_through"]
    assert main(["schema", "--output", "--job", str(job), "--set", "input.pass_through=[nope]"]) == 2
    assert "no column(s) 'nope'" in capsys.readouterr().err


@pytest.mark.parametrize("min_rows", [0, 100])
def test_pass_through_columns_in_partitioned_and_appended_files(tmp_path, min_rows):
    """Pass-through columns with `output.partition_by` (and `min_rows_per_file` appending windows to the
    open file set): every file holds them after our columns less the partition keys, a re-published
    source keeps its values, and a plain pandas read of the partitioned table sees each row once."""
    import pandas as pd

    uris = _files(tmp_path, 2)
    path = _parquet_manifest(tmp_path, uris)
    data = rowdata.load(InputConfig(manifest=str(path), pass_through=["item_id", "taken_at"]),
                        read_manifest_table(str(path), STORAGE))
    layout = sink.Layout(str(tmp_path / "out"), STORAGE, ("task", "status"))
    fps = {"ocr": "fp-ocr", "caption": "fp-caption"}
    sids = [f"{i:032x}" for i in range(2)]
    first = commit.Publisher(layout, "a1", "a1", fps, rows=data, min_rows_per_file=min_rows, rows_per_file=1000)
    for i, sid in enumerate(sids):  # two windows: with a minimum, the second is appended to the first's set
        first.publish([Complete(SourceWork(f"s3://in/{sid}.pdf", sid, 100, ("ocr", "caption"), manifest_row=i),
                                rows_for(sid, ("ocr", "caption"), "a1", False), 3)])
    state = sink.CommittedIndex.load(layout).lookup([sids[0]])[sids[0]]
    again = commit.Publisher(layout, "a2", "a2", {"ocr": "fp-ocr-2", "caption": "fp-caption"}, rows=data,
                             min_rows_per_file=min_rows, rows_per_file=1000)
    work = SourceWork(f"s3://in/{sids[0]}.pdf", sids[0], 100, ("ocr",), sink.prior_of(state), manifest_row=0)
    again.publish([Complete(work, rows_for(sids[0], ("ocr",), "a2", False, {"ocr": "fp-ocr-2"}), 3)])
    files = sorted((tmp_path / "out" / "results").rglob("*.parquet"))
    assert files and all("task=" in str(f) for f in files)
    for f in files:
        names = pq.read_schema(f).names
        assert names[-2:] == ["item_id", "taken_at"] and "task" not in names and "status" not in names
        assert pq.read_schema(f).field("taken_at").type == TS
    results = pd.read_parquet(tmp_path / "out" / "results")
    assert len(results) == 2 * 3 * 2  # no row lost or doubled
    assert results.groupby("source_id")["item_id"].agg(set).to_dict() == {sids[0]: {10}, sids[1]: {11}}
    assert set(results["task"]) == {"ocr", "caption"}
    docs = pd.read_parquet(tmp_path / "out" / "documents")
    assert sorted(docs["item_id"]) == [10, 11]
