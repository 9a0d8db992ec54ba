"""Every shipped job file runs locally as shipped, with only its data, model and output moved.

`cpmv run jobs/X.yaml` on a machine without a cluster must start a local Ray (no `ray.address`
baked in), fit the job's engine pool into it and finish. Each job runs through the real CLI in a
subprocess on the demo corpus with a tiny random model of the job's family; the overrides below
are the only changes: where data lives, and the size of the work (generation length, slices per
image, frames per clip: a 36-slice Letter page is ~9,000 visual tokens, minutes for a tiny model on
2 CPU cores), never the job's tasks, limits, PDF settings or engine kind.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from pipeline.samples import make_demo_corpus, write_demo_manifest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
JOBS = sorted((ROOT / "jobs").glob("*.yaml"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("corpus")
    make_demo_corpus(out)
    return out


def _overrides(job: dict, corpus: Path, tmp: Path) -> list[str]:
    """Point the job at the demo corpus, a tiny model and a temp output; shorten generations."""
    family = "minicpm_ocr" if "OCR" in job.get("model", {}).get("name", "") else "minicpmv4_6"
    sets = [f"output.uri={tmp / 'out'}", "model.name=tiny", f"model.family={family}",
            f"model.cache_dir={tmp / 'cache'}", "ray.num_cpus=2"]
    if job["input"].get("pass_through"):
        # The job's own manifest, as `cpmv samples --manifest` writes it (its catalogue columns).
        sets.append(f"input.manifest={write_demo_manifest(corpus, tmp / 'manifest.parquet')}")
    elif job["input"].get("manifest"):
        manifest = tmp / "manifest.parquet"
        pq.write_table(pa.table({job["input"].get("manifest_column", "uri"):
                                 [str(p) for p in sorted(corpus.iterdir())]}), manifest)
        sets.append(f"input.manifest={manifest}")
    else:
        # Keep each job's file filter (`**/*.pdf`, `**/*.mp4`): only the bucket part moves.
        uris = [f"{corpus}/{u.split('/', 4)[-1].split('**/')[-1]}" if "*" in u else f"{corpus}/"
                for u in job["input"]["uris"]]
        sets.append(f"input.uris=[{', '.join(uris)}]")
    for i, task in enumerate(job.get("tasks", [])):  # few-shot images: the same files, in the test's corpus
        for j, ex in enumerate(task.get("examples") or []):
            sets.append(f"tasks.{i}.examples.{j}.image={corpus / Path(ex['image']).name}")
    sets += [f"tasks.{i}.max_new_tokens=4" for i in range(len(job.get("tasks", [])))]
    sets.append("model.max_slice_nums=1")
    # 4-token replies of a random model always reach the cap: reply checks (their own tests) off here,
    # where the job's plumbing is under test.
    sets.append("checks.enabled=false")
    if job.get("video"):
        sets.append("video.max_frames_per_clip=4")  # tiny model on 2 CPU cores: fewer frames, same path
    return sets


@pytest.mark.parametrize("path", JOBS, ids=lambda p: p.stem)
def test_shipped_job_runs_locally(path, corpus, tmp_path):
    job = yaml.safe_load(path.read_text())
    assert "address" not in (job.get("ray") or {}), "a shipped job must not pin a cluster; use RAY_ADDRESS"
    ray_tmp = tempfile.mkdtemp(prefix="cpmv-ray-", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") and k != "RAY_ADDRESS"}
    env.update(PYTHONPATH=str(ROOT), RAY_TMPDIR=ray_tmp, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", HF_HUB_OFFLINE="1",
               AWS_EC2_METADATA_DISABLED="true")
    argv = [sys.executable, "-m", "pipeline.cli", "run", str(path)]
    for s in _overrides(job, corpus, tmp_path):
        argv += ["--set", s]
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, f"{proc.stdout[-2000:]}\n{proc.stderr[-5000:]}"
    assert ": complete" in proc.stdout.splitlines()[0], proc.stdout
    docs = pq.read_table(tmp_path / "out" / "documents").to_pylist()
    results = pq.read_table(tmp_path / "out" / "results").to_pylist()
    assert docs and results
    tasks = {t.get("id") or t["name"] for t in job["tasks"]}  # a task's name in outputs: its id, else its name
    assert {r["task"] for r in results} <= tasks
    assert any(r["status"] == "ok" for r in results), [(r["source_uri"], r["error_type"]) for r in results]
    for name in job["input"].get("pass_through") or []:  # every row carries its file's catalogue values
        assert all(r[name] is not None for r in results + docs), name
