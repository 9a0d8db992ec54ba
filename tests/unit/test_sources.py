"""Discovery, ids, manifests and path safety on the local filesystem."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from pydantic import SecretStr

from pipeline import storage as st
from pipeline.config import InputConfig, S3Config, StorageConfig
from pipeline.sources import NoMatchError, Source, discover, source_id

STORAGE = StorageConfig()


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    """root/{a.pdf, b.png, empty.pdf, sub/c.pdf, sub/deep/d.mp4, sub/deep/e.pdf}"""
    files = {"a.pdf": b"%PDF-a", "b.png": b"png", "empty.pdf": b"", "sub/c.pdf": b"%PDF-c",
             "sub/deep/d.mp4": b"mp4", "sub/deep/e.pdf": b"%PDF-e"}
    for rel, data in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(data)
    return tmp_path


def uris(sources: list[Source]) -> list[str]:
    return [s.uri for s in sources]


def run(*entries: str, **kw) -> list[Source]:
    return discover(InputConfig(uris=list(entries), **kw), STORAGE)


def test_directory_is_listed_recursively_sorted_and_keeps_empty_files(corpus: Path) -> None:
    found = run(str(corpus))
    assert uris(found) == sorted(str(corpus / p) for p in
                                 ["a.pdf", "b.png", "empty.pdf", "sub/c.pdf", "sub/deep/d.mp4", "sub/deep/e.pdf"])
    empty = next(s for s in found if s.uri.endswith("empty.pdf"))
    assert empty.size == 0 and empty.mtime and empty.etag is None


def test_single_file_relative_and_file_uri_are_canonical(corpus: Path, monkeypatch) -> None:
    monkeypatch.chdir(corpus)
    expected = [str(corpus / "sub/c.pdf")]
    assert uris(run("sub/c.pdf")) == expected
    assert uris(run(f"file://{corpus}/sub/c.pdf")) == expected
    assert uris(run(f"{corpus}/sub/")) == sorted(str(corpus / p) for p in ["sub/c.pdf", "sub/deep/d.mp4", "sub/deep/e.pdf"])


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        ("**/*.pdf", ["a.pdf", "empty.pdf", "sub/c.pdf", "sub/deep/e.pdf"]),
        ("*.pdf", ["a.pdf", "empty.pdf"]),
        ("sub/*/?.mp4", ["sub/deep/d.mp4"]),
        ("[ab].*", ["a.pdf", "b.png"]),
        ("**", ["a.pdf", "b.png", "empty.pdf", "sub/c.pdf", "sub/deep/d.mp4", "sub/deep/e.pdf"]),
    ],
)
def test_globs(corpus: Path, pattern: str, expected: list[str]) -> None:
    assert uris(run(f"{corpus}/{pattern}")) == [str(corpus / p) for p in expected]


def test_literal_name_with_glob_characters(tmp_path: Path) -> None:
    (tmp_path / "scan [1].pdf").write_bytes(b"x")
    assert uris(run(str(tmp_path / "scan [1].pdf"))) == [str(tmp_path / "scan [1].pdf")]


def test_existing_literal_name_wins_over_the_pattern_it_looks_like(tmp_path: Path) -> None:
    # "scan [1].png" as a glob would match "scan 1.png"; the file with the literal name exists, so it is read.
    for name in ("scan [1].png", "scan 1.png", "a*b.png", "axb.png", "q?.png", "qq.png"):
        (tmp_path / name).write_bytes(b"x")
    for literal in ("scan [1].png", "a*b.png", "q?.png"):
        assert uris(run(str(tmp_path / literal))) == [str(tmp_path / literal)]
    # Without such a file it is a pattern.
    assert uris(run(str(tmp_path / "scan [12].png"))) == [str(tmp_path / "scan 1.png")]


def test_manifest_entries_are_exact_names_never_patterns(tmp_path: Path) -> None:
    for name in ("scan [1].png", "scan 1.png", "scan 2.png", "x*.png", "xa.png"):
        (tmp_path / name).write_bytes(b"x")
    manifest = tmp_path / "m.csv"
    _write_manifest(manifest, [{"uri": str(tmp_path / "scan [1].png")}, {"uri": str(tmp_path / "x*.png")}])
    found = discover(InputConfig(manifest=str(manifest)), STORAGE)
    assert uris(found) == [str(tmp_path / "scan [1].png"), str(tmp_path / "x*.png")]
    # A listed name that does not exist is an error naming it, even where as a pattern it would match.
    _write_manifest(manifest, [{"uri": str(tmp_path / "scan [12].png")}])
    with pytest.raises(NoMatchError, match=r"scan \[12\]\.png"):
        discover(InputConfig(manifest=str(manifest)), STORAGE)
    # Many entries under one parent go through one listing: still exact.
    names = [f"p[{i}].png" for i in range(10)]
    for name in names:
        (tmp_path / name).write_bytes(b"y")
    _write_manifest(manifest, [{"uri": str(tmp_path / n)} for n in names])
    assert uris(discover(InputConfig(manifest=str(manifest)), STORAGE)) == sorted(str(tmp_path / n) for n in names)


def test_overlapping_inputs_are_deduplicated(corpus: Path) -> None:
    found = run(str(corpus), f"{corpus}/**/*.pdf", str(corpus / "a.pdf"))
    assert len(found) == 6 and len(set(uris(found))) == 6


def test_max_sources_caps_after_sorting(corpus: Path) -> None:
    assert uris(run(str(corpus), max_sources=2)) == [str(corpus / "a.pdf"), str(corpus / "b.png")]


@pytest.mark.parametrize("entry", ["missing.pdf", "missing-dir/", "*.nothing", "**/*.nothing"])
def test_no_match_is_an_error_naming_the_input(corpus: Path, entry: str) -> None:
    with pytest.raises(NoMatchError, match="input .*" + entry.split("*")[-1].replace(".", r"\.")):
        run(str(corpus / "a.pdf"), f"{corpus}/{entry}")


def test_empty_directory_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(NoMatchError, match="holds no files"):
        run(str(tmp_path / "empty"))


# --- manifests ----------------------------------------------------------------------------------


def _write_manifest(path: Path, rows: list[dict[str, str]]) -> None:
    table = pa.Table.from_pylist(rows)
    if path.suffix == ".parquet":
        pq.write_table(table, path)
    elif path.suffix == ".csv":
        pacsv.write_csv(table, path)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.mark.parametrize("suffix", [".parquet", ".csv", ".jsonl"])
def test_manifest_formats(corpus: Path, suffix: str) -> None:
    manifest = corpus.parent / f"manifest{suffix}"
    rows = [{"path": str(corpus / "sub/c.pdf"), "note": "x"}, {"path": str(corpus / "a.pdf"), "note": "y"},
            {"path": str(corpus / "sub/deep/d.mp4"), "note": "z"}, {"path": str(corpus / "a.pdf"), "note": "dup"}]
    _write_manifest(manifest, rows)
    found = discover(InputConfig(manifest=str(manifest), manifest_column="path"), STORAGE)
    assert uris(found) == [str(corpus / p) for p in ["a.pdf", "sub/c.pdf", "sub/deep/d.mp4"]]


def test_manifest_lists_a_shared_parent_once_and_matches_per_file_results(corpus: Path) -> None:
    for i in range(12):
        (corpus / f"many-{i:02d}.jpg").write_bytes(b"j" * i)
    manifest = corpus.parent / "many.csv"
    _write_manifest(manifest, [{"uri": str(corpus / f"many-{i:02d}.jpg")} for i in range(12)])
    via_manifest = discover(InputConfig(manifest=str(manifest)), STORAGE)
    via_uris = run(*(str(corpus / f"many-{i:02d}.jpg") for i in range(12)))
    assert via_manifest == via_uris and [s.size for s in via_manifest] == list(range(12))


def test_manifest_and_uris_are_merged(corpus: Path) -> None:
    manifest = corpus.parent / "m.jsonl"
    _write_manifest(manifest, [{"uri": str(corpus / "b.png")}])
    found = discover(InputConfig(uris=[str(corpus / "a.pdf")], manifest=str(manifest)), STORAGE)
    assert uris(found) == [str(corpus / "a.pdf"), str(corpus / "b.png")]


def test_manifest_missing_column_names_the_columns_present(corpus: Path) -> None:
    manifest = corpus.parent / "m.parquet"
    _write_manifest(manifest, [{"path": str(corpus / "a.pdf"), "lang": "en"}])
    with pytest.raises(ValueError, match=r"no column 'uri'.*columns are: path, lang"):
        discover(InputConfig(manifest=str(manifest)), STORAGE)


def test_manifest_entry_that_does_not_exist_fails_fast(corpus: Path) -> None:
    manifest = corpus.parent / "m.csv"
    _write_manifest(manifest, [{"uri": str(corpus / "a.pdf")}, {"uri": str(corpus / "gone.pdf")}])
    with pytest.raises(NoMatchError, match="gone.pdf"):
        discover(InputConfig(manifest=str(manifest)), STORAGE)


def test_missing_manifest_and_unknown_format(corpus: Path) -> None:
    with pytest.raises(NoMatchError, match="manifest"):
        discover(InputConfig(manifest=str(corpus / "nope.csv")), STORAGE)
    (corpus / "m.txt").write_text("x")
    with pytest.raises(ValueError, match="unknown format"):
        discover(InputConfig(manifest=str(corpus / "m.txt")), STORAGE)


# --- ids ----------------------------------------------------------------------------------------


def test_ids_are_stable_across_calls_and_change_with_the_file(corpus: Path) -> None:
    first = {s.uri: s.source_id for s in run(str(corpus))}
    assert first == {s.uri: s.source_id for s in run(str(corpus))}
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in first.values())
    assert len(set(first.values())) == len(first)

    target = corpus / "a.pdf"
    target.write_bytes(b"%PDF-a but longer")
    os.utime(target, (1_700_000_000, 1_700_000_000))
    second = {s.uri: s.source_id for s in run(str(corpus))}
    assert second[str(target)] != first[str(target)]
    assert {k: v for k, v in second.items() if k != str(target)} == {
        k: v for k, v in first.items() if k != str(target)}


def test_same_size_rewrite_with_new_mtime_gets_a_new_id(tmp_path: Path) -> None:
    f = tmp_path / "x.png"
    f.write_bytes(b"aaaa")
    os.utime(f, (1_700_000_000, 1_700_000_000))
    before = run(str(f))[0].source_id
    f.write_bytes(b"bbbb")
    os.utime(f, (1_700_000_001, 1_700_000_001))
    assert run(str(f))[0].source_id != before


def test_source_id_prefers_the_etag() -> None:
    a = source_id("s3://b/k", "abc", 10, "2026-01-01T00:00:00+00:00")
    assert a == source_id("s3://b/k", "abc", 99, "2030-01-01T00:00:00+00:00")
    assert a != source_id("s3://b/k", "abd", 10, "2026-01-01T00:00:00+00:00")
    assert a != source_id("s3://b/other", "abc", 10, "2026-01-01T00:00:00+00:00")
    assert source_id("/x", None, 1, "t1") != source_id("/x", None, 1, "t2")


# --- storage helpers ----------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["../x", "a/../../x", "a/..", "/etc/passwd", "\\x", "C:/x", "s3://b/k",
                                 "~/x", "a\\..\\x", "", ".", "./", "a\x00b"])
def test_safe_join_rejects_escapes(bad: str) -> None:
    with pytest.raises(ValueError):
        st.safe_join("s3://bucket/out", bad)


def test_safe_join_and_join() -> None:
    assert st.safe_join("s3://bucket/out/", "results/part-0.parquet") == "s3://bucket/out/results/part-0.parquet"
    assert st.safe_join("/data/out", "./a//b") == "/data/out/a/b"
    assert st.safe_join("/data/out", "a..b/c") == "/data/out/a..b/c"
    assert st.join("s3://b/", "/x/", "y") == "s3://b/x/y"
    assert st.join("/", "x") == "/x"


def test_redact_removes_configured_and_env_secrets(monkeypatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "envSecretValue123")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAENVKEY")
    storage = StorageConfig(
        s3=S3Config(access_key_id=SecretStr("AKIACONFIGKEY"), secret_access_key=SecretStr("cfgSecret/xyz+789")),
        options={"gcs": {"token": "gcsTokenValue"}},
    )
    text = ("auth AKIACONFIGKEY cfgSecret/xyz+789 envSecretValue123 AKIAENVKEY gcsTokenValue "
            "https://h/k?X-Amz-Credential=AKIAOTHER%2F2026&X-Amz-Signature=deadbeef http://user:pw@host/x")
    out = st.redact(text, storage)
    for secret in ("AKIACONFIGKEY", "cfgSecret", "envSecretValue123", "AKIAENVKEY", "gcsTokenValue",
                   "AKIAOTHER", "deadbeef", "user:pw"):
        assert secret not in out
    assert out.startswith("auth ***")


def test_redact_knows_keys_seen_by_fs_options_without_being_given_storage(monkeypatch) -> None:
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY", raising=False)
    st.fs_options(StorageConfig(s3=S3Config(secret_access_key=SecretStr("rememberedSecret42"))), "s3")
    assert st.redact("failed with rememberedSecret42") == "failed with ***"


def test_fs_options(monkeypatch) -> None:
    monkeypatch.delenv("AWS_REGION", raising=False)
    storage = StorageConfig(
        s3=S3Config(endpoint_url="http://127.0.0.1:9", access_key_id=SecretStr("k1234"),
                    secret_access_key=SecretStr("s1234")),
        options={"s3": {"client_kwargs": {"verify": False}, "default_block_size": 1024}},
    )
    opts = st.fs_options(storage, "s3")
    assert opts["key"] == "k1234" and opts["secret"] == "s1234" and opts["default_block_size"] == 1024
    # No region_name unless asked for: it makes bucket creation send a location constraint.
    assert opts["client_kwargs"] == {"endpoint_url": "http://127.0.0.1:9", "verify": False}
    assert "anon" not in opts
    assert st.fs_options(StorageConfig(s3=S3Config(region="eu-west-1", anon=True)), "s3")["client_kwargs"] == {
        "region_name": "eu-west-1"}
    # Unset fields are left to botocore's own environment chain.
    assert set(st.fs_options(StorageConfig(), "s3")) == {"use_listings_cache"}
    assert st.fs_options(StorageConfig(options={"gcs": {"project": "p"}}), "gcs") == {"project": "p"}


def test_filesystems_are_cached_per_options(tmp_path: Path) -> None:
    fs1, path = st.get_fs(str(tmp_path), STORAGE)
    fs2, _ = st.get_fs(f"file://{tmp_path}/x", STORAGE)
    assert fs1 is fs2 and path == str(tmp_path)


def test_local_read_write_move_rm(tmp_path: Path) -> None:
    uri = str(tmp_path / "out" / "deep" / "f.bin")
    st.write_bytes(uri, b"0123456789", STORAGE)
    assert st.exists(uri, STORAGE) and st.read_bytes(uri, STORAGE, max_bytes=10) == b"0123456789"
    assert st.read_head(uri, STORAGE, 4) == b"0123"
    with pytest.raises(st.ObjectTooLargeError, match="10 bytes, over the limit of 9"):
        st.read_bytes(uri, STORAGE, max_bytes=9)
    st.move(uri, str(tmp_path / "moved" / "g.bin"), STORAGE)
    assert not st.exists(uri, STORAGE)
    assert st.list_files(str(tmp_path), STORAGE) == [str(tmp_path / "moved" / "g.bin")]
    st.move(str(tmp_path / "moved"), str(tmp_path / "final"), STORAGE)
    assert st.list_files(str(tmp_path), STORAGE) == [str(tmp_path / "final" / "g.bin")]
    st.rm(str(tmp_path / "final"), STORAGE, recursive=True)
    st.rm(str(tmp_path / "final"), STORAGE, recursive=True)  # idempotent
    assert st.list_files(str(tmp_path), STORAGE) == []
    assert not list((tmp_path / "out").rglob("*.tmp-*"))


def test_pyarrow_fs_local_is_native(tmp_path: Path) -> None:
    fs, path = st.pyarrow_fs(str(tmp_path / "t.parquet"), STORAGE)
    pq.write_table(pa.table({"a": [1, 2]}), path, filesystem=fs)
    assert fs.type_name == "local" and pq.read_table(path, filesystem=fs).num_rows == 2
