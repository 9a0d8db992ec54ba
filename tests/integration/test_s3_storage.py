"""storage.py and sources.py against a real S3 server (SeaweedFS, credentials required)."""

from __future__ import annotations

import urllib.error
import urllib.request

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import SecretStr

from pipeline import storage as st
from pipeline.config import InputConfig, S3Config, StorageConfig
from pipeline.sources import NoMatchError, discover, source_id
from tests.s3server import S3Server

FILES = {
    "docs/a.pdf": b"%PDF-1.7 a",
    "docs/empty.pdf": b"",
    "docs/sub/b.pdf": b"%PDF-1.7 bb",
    "docs/sub/c.png": b"\x89PNG c",
    "other/d.pdf": b"%PDF d",
}


@pytest.fixture
def storage(s3_server: S3Server) -> StorageConfig:
    return StorageConfig(s3=S3Config(
        endpoint_url=s3_server.endpoint_url, access_key_id=SecretStr(s3_server.access_key),
        secret_access_key=SecretStr(s3_server.secret_key)))


@pytest.fixture
def bucket(s3_server: S3Server, s3_bucket: str) -> str:
    fs = s3_server.client()
    for key, data in FILES.items():
        fs.pipe(f"{s3_bucket}/{key}", data)
    fs.pipe(f"{s3_bucket}/docs/folder-marker/", b"")  # what consoles create for "folders"
    return s3_bucket


def _uris(sources) -> list[str]:
    return [s.uri for s in sources]


def test_discover_prefix_recursively(bucket: str, storage: StorageConfig) -> None:
    found = discover(InputConfig(uris=[f"s3://{bucket}/docs/"]), storage)
    assert _uris(found) == [f"s3://{bucket}/{k}" for k in ["docs/a.pdf", "docs/empty.pdf", "docs/sub/b.pdf", "docs/sub/c.png"]]
    by_key = {s.uri.split("/", 3)[3]: s for s in found}
    assert by_key["docs/empty.pdf"].size == 0  # kept: it becomes an error row downstream
    assert by_key["docs/sub/b.pdf"].size == len(FILES["docs/sub/b.pdf"])
    assert all(s.mtime and s.mtime.endswith("+00:00") for s in found)
    # The same prefix without the trailing slash, and the whole bucket, list the same way.
    assert discover(InputConfig(uris=[f"s3://{bucket}/docs"]), storage) == found
    assert len(discover(InputConfig(uris=[f"s3://{bucket}"]), storage)) == len(FILES)


def test_discover_globs_and_single_files(bucket: str, storage: StorageConfig) -> None:
    pdfs = discover(InputConfig(uris=[f"s3://{bucket}/**/*.pdf"]), storage)
    assert _uris(pdfs) == sorted(f"s3://{bucket}/{k}" for k in FILES if k.endswith(".pdf"))
    one = discover(InputConfig(uris=[f"s3a://{bucket}/docs/sub/?.png"]), storage)
    assert _uris(one) == [f"s3://{bucket}/docs/sub/c.png"]
    assert _uris(discover(InputConfig(uris=[f"s3://{bucket}/other/d.pdf"]), storage)) == [f"s3://{bucket}/other/d.pdf"]


def test_discover_manifest_on_s3(bucket: str, storage: StorageConfig, s3_server: S3Server) -> None:
    rows = [f"s3://{bucket}/other/d.pdf", f"s3://{bucket}/docs/sub/c.png"]
    s3_server.client().pipe(f"{bucket}/m.jsonl", "".join(f'{{"u": "{r}"}}\n' for r in rows).encode())
    found = discover(InputConfig(manifest=f"s3://{bucket}/m.jsonl", manifest_column="u"), storage)
    assert _uris(found) == [f"s3://{bucket}/docs/sub/c.png", f"s3://{bucket}/other/d.pdf"]


def test_literal_keys_with_glob_characters_on_s3(bucket: str, storage: StorageConfig, s3_server: S3Server) -> None:
    fs = s3_server.client()
    for key in ("lit/scan [1].png", "lit/scan 1.png", "lit/a*b.png", "lit/axb.png"):
        fs.pipe(f"{bucket}/{key}", b"x")
    # input.uris: an existing literal key wins over the pattern it looks like; otherwise it is a pattern.
    for key in ("lit/scan [1].png", "lit/a*b.png"):
        assert _uris(discover(InputConfig(uris=[f"s3://{bucket}/{key}"]), storage)) == [f"s3://{bucket}/{key}"]
    assert _uris(discover(InputConfig(uris=[f"s3://{bucket}/lit/scan [12].png"]), storage)) == [
        f"s3://{bucket}/lit/scan 1.png"]
    # Manifest entries are exact keys.
    rows = [f"s3://{bucket}/lit/scan [1].png", f"s3://{bucket}/lit/a*b.png"]
    fs.pipe(f"{bucket}/lit.jsonl", "".join(f'{{"u": "{r}"}}\n' for r in rows).encode())
    found = discover(InputConfig(manifest=f"s3://{bucket}/lit.jsonl", manifest_column="u"), storage)
    assert _uris(found) == sorted(rows)
    fs.pipe(f"{bucket}/lit2.jsonl", f'{{"u": "s3://{bucket}/lit/scan [12].png"}}\n'.encode())
    with pytest.raises(NoMatchError):
        discover(InputConfig(manifest=f"s3://{bucket}/lit2.jsonl", manifest_column="u"), storage)


def test_no_match_on_s3_fails_fast(bucket: str, storage: StorageConfig) -> None:
    for entry in [f"s3://{bucket}/nope/", f"s3://{bucket}/nope.pdf", f"s3://{bucket}/**/*.tiff"]:
        with pytest.raises(NoMatchError, match="input"):
            discover(InputConfig(uris=[entry]), storage)


def test_ids_use_the_etag(bucket: str, storage: StorageConfig, s3_server: S3Server) -> None:
    uri = f"s3://{bucket}/docs/a.pdf"
    src = discover(InputConfig(uris=[uri]), storage)[0]
    assert src.etag and src.source_id == source_id(uri, src.etag, None, None)
    assert discover(InputConfig(uris=[uri]), storage)[0].source_id == src.source_id
    s3_server.client().pipe(f"{bucket}/docs/a.pdf", b"%PDF-1.7 a, edited")
    changed = discover(InputConfig(uris=[uri]), storage)[0]
    assert changed.etag != src.etag and changed.source_id != src.source_id


def test_read_bytes_head_and_max_bytes(bucket: str, storage: StorageConfig) -> None:
    uri = f"s3://{bucket}/docs/sub/b.pdf"
    assert st.read_bytes(uri, storage, max_bytes=len(FILES["docs/sub/b.pdf"])) == FILES["docs/sub/b.pdf"]
    with pytest.raises(st.ObjectTooLargeError, match="over the limit of 5 bytes"):
        st.read_bytes(uri, storage, max_bytes=5)
    assert st.read_head(uri, storage, 4) == b"%PDF"
    assert st.read_head(f"s3://{bucket}/docs/empty.pdf", storage, 4) == b""
    assert st.read_bytes(f"s3://{bucket}/docs/empty.pdf", storage, max_bytes=1) == b""


def test_write_exists_list_move_rm(s3_bucket: str, storage: StorageConfig) -> None:
    base = f"s3://{s3_bucket}/run"
    st.write_bytes(st.safe_join(base, "tmp/part-0.bin"), b"zero", storage)
    st.write_bytes(st.safe_join(base, "tmp/sub/part-1.bin"), b"one", storage)
    assert st.exists(f"{base}/tmp/part-0.bin", storage)
    st.move(f"{base}/tmp", f"{base}/final", storage)  # a prefix: copy everything, then delete
    assert st.list_files(base, storage) == [f"{base}/final/part-0.bin", f"{base}/final/sub/part-1.bin"]
    st.move(f"{base}/final/part-0.bin", f"{base}/final/renamed.bin", storage)
    assert st.read_bytes(f"{base}/final/renamed.bin", storage, max_bytes=10) == b"zero"
    st.rm(f"{base}/final", storage, recursive=True)
    assert st.list_files(base, storage) == [] and not st.exists(f"{base}/final/renamed.bin", storage)


def test_pyarrow_fs_writes_and_reads_parquet(s3_bucket: str, storage: StorageConfig) -> None:
    uri = f"s3://{s3_bucket}/tables/results/part-0.parquet"
    fs, path = st.pyarrow_fs(uri, storage)
    table = pa.table({"source_id": ["a", "b"], "n": [1, 2]})
    pq.write_table(table, path, filesystem=fs)
    assert pq.read_table(path, filesystem=fs).equals(table)
    assert st.list_files(f"s3://{s3_bucket}/tables/", storage) == [uri]


def test_environment_credentials_are_used_when_config_is_empty(
    bucket: str, s3_server: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    found = discover(InputConfig(uris=[f"s3://{bucket}/other/"]), StorageConfig())
    assert _uris(found) == [f"s3://{bucket}/other/d.pdf"]


def test_anonymous_and_wrong_credentials_are_refused(bucket: str, s3_server: S3Server, monkeypatch) -> None:
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"{s3_server.endpoint_url}/{bucket}/docs/a.pdf", timeout=5)
    assert err.value.code == 403
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    anon = StorageConfig(s3=S3Config(endpoint_url=s3_server.endpoint_url, anon=True))
    with pytest.raises(PermissionError):
        st.read_bytes(f"s3://{bucket}/docs/a.pdf", anon, max_bytes=100)
    wrong = StorageConfig(s3=S3Config(endpoint_url=s3_server.endpoint_url, access_key_id=SecretStr(s3_server.access_key),
                                      secret_access_key=SecretStr("not-the-secret-at-all")))
    with pytest.raises(PermissionError) as denied:
        discover(InputConfig(uris=[f"s3://{bucket}/docs/"]), wrong)
    assert "not-the-secret-at-all" not in str(denied.value) and bucket in str(denied.value)
