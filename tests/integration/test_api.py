"""The Python API: `from pipeline import load_job, run_job, process_dataset` on a real local Ray with
a tiny MiniCPM-V 4.6 (transformers engine)."""

from __future__ import annotations

import tempfile

import pyarrow.parquet as pq
import pytest

from pipeline.samples import make_demo_corpus

pytestmark = pytest.mark.slow


@pytest.fixture
def local_ray(monkeypatch):
    monkeypatch.setenv("RAY_TMPDIR", tempfile.mkdtemp(prefix="cpmv-ray-", dir="/tmp"))
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    import ray

    yield ray
    ray.shutdown()


def test_api_runs_a_job_and_a_users_dataset(local_ray, tmp_path):
    from pipeline import load_job_data, process_dataset, run_job

    corpus = make_demo_corpus(tmp_path / "corpus")
    job = load_job_data({
        "name": "api", "input": {"uris": [str(tmp_path / "corpus")]}, "output": {"uri": str(tmp_path / "out")},
        "model": {"name": "tiny", "max_slice_nums": 1, "cache_dir": str(tmp_path / "cache")},
        "checks": {"enabled": False},  # 3-token replies always reach the cap
        "tasks": [{"name": "caption", "max_new_tokens": 3}], "ray": {"num_cpus": 2},
    })
    ds = local_ray.data.from_items([{"uri": str(p)} for p in corpus if p.suffix in (".png", ".jpg")]
                                   + [{"uri": str(tmp_path / "missing.png")}])
    rows = process_dataset(ds, job).take_all()
    by_name = {r["source_uri"].rsplit("/", 1)[-1]: r for r in rows}
    assert by_name["logo.png"]["status"] == "ok" and by_name["photo.jpg"]["status"] == "ok"
    assert by_name["missing.png"]["status"] == "error"  # an unreadable URI is a row, not an exception
    assert all(r["task"] == "caption" and "_expected_rows" not in r for r in rows)

    summary = run_job(job)  # the same Ray session
    assert summary.status == "complete" and summary.counts["sources"] == len(corpus)
    assert pq.read_table(tmp_path / "out" / "documents").num_rows == len(corpus)
