"""End to end through the vLLM engine on CPU: `python -m pipeline.cli run` with engine.kind vllm.

Runs from the vLLM environment (scripts/setup_vllm_env.sh; `make test` runs it), like
tests/integration/test_e2e_s3.py runs the transformers path: the CLI in a subprocess with its own Ray
temp dir and local 2-CPU Ray cluster, over the demo corpus on local disk (the S3 path is covered by the
main suite). Tiny MiniCPM-V 4.5 (vLLM's `minicpmv` + our remote code) and 4.6 (native) checkpoints,
real engine and processors, random weights (`load_format: dummy`).

Also the error cases the engine stage must survive: a prompt longer than max_model_len (an error row
from the guard, never an engine call) and **fault injection**: the engine actor's process is killed
with SIGKILL while the job runs; Ray restarts the actor and retries its task, and every row must
still be present exactly once.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

pytest.importorskip("vllm")

import pyarrow.parquet as pq  # noqa: E402

from pipeline.samples import make_demo_corpus  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]

JOB = """
name: vllm-e2e
input:
  uris: ["{corpus}/"]
output:
  uri: {out}
model:
  name: tiny
  family: {family}
  trust_remote_code: {trust}
  max_slice_nums: {slices}
  cache_dir: {cache}
tasks:
{tasks}
video: {{clip_seconds: 2, fps: 2, max_frames_per_clip: 3}}
engine:
  kind: vllm
  batch_size: 4
  max_retries: 1
  vllm: {{load_format: dummy, enforce_eager: true, max_model_len: {max_model_len}, cpu_kvcache_space_gib: 1}}
ray: {{num_cpus: 2}}
checks: {{enabled: false}}  # dummy weights run to the cap; reply checks through vLLM: tests/vllm/test_async_stage.py
"""

DEFAULT_TASKS = """  - {name: ocr, max_new_tokens: 4}
  - {name: caption, max_new_tokens: 3}
  - {name: video_caption, max_new_tokens: 3}"""

EXPECTED_UNITS = {"report.pdf": 2, "scan.pdf": 1, "photo.jpg": 1, "logo.png": 1, "clip.mp4": 2}


def _write_job(tmp: Path, family: str, corpus: Path, *, slices: int = 2, max_model_len: int = 4096,
               tasks: str = DEFAULT_TASKS) -> Path:
    job = tmp / "job.yaml"
    job.write_text(JOB.format(corpus=corpus, out=tmp / "out", family=family,
                              trust=str(family == "minicpmv4_5").lower(), slices=slices, cache=tmp.parent / "cache",
                              tasks=tasks, max_model_len=max_model_len))
    return job


def _env(tmp: Path) -> dict[str, str]:
    # Ray's socket paths must stay under 107 bytes: pytest's tmp_path is too deep for them.
    ray_tmp = Path(tempfile.mkdtemp(prefix="cpmv-ray-", dir="/tmp"))
    _RAY_DIRS.append(ray_tmp)
    env = {**os.environ, "RAY_TMPDIR": str(ray_tmp), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    env.pop("RAY_ADDRESS", None)
    return env


_RAY_DIRS: list[Path] = []


@pytest.fixture(autouse=True)
def _remove_ray_dirs():
    yield
    while _RAY_DIRS:
        shutil.rmtree(_RAY_DIRS.pop(), ignore_errors=True)


def _start(job: Path, tmp: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", str(job)], env=_env(tmp), cwd=tmp,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen, timeout: float = 600) -> tuple[str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"cpmv timed out:\n{out[-3000:]}\n{err[-6000:]}")
    assert proc.returncode == 0, f"cpmv failed ({proc.returncode}):\n{out[-3000:]}\n{err[-6000:]}"
    return out, err


def _rows(tmp: Path) -> list[dict]:
    return pq.read_table(tmp / "out" / "results").to_pylist()


def _by_name(rows: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in rows:
        out.setdefault(r["source_uri"].rsplit("/", 1)[-1], []).append(r)
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus")
    make_demo_corpus(path)
    return path


def _assert_complete(rows: list[dict]) -> None:
    """One row per (source, unit, task): none lost, none duplicated."""
    keys = Counter((r["source_id"], r["unit_index"], r["task"]) for r in rows)
    assert max(keys.values()) == 1, [k for k, n in keys.items() if n > 1]
    by = _by_name(rows)
    for name, n_units in EXPECTED_UNITS.items():
        tasks = {"video_caption"} if name.endswith(".mp4") else {"ocr", "caption"}
        pairs = sorted((r["unit_index"], r["task"]) for r in by[name])
        assert pairs == sorted((i, t) for i in range(n_units) for t in tasks), name


@pytest.mark.parametrize("family", ["minicpmv4_5", "minicpmv4_6"])
def test_pipeline_runs_through_vllm(family, corpus, tmp_path):
    start = time.perf_counter()
    _finish(_start(_write_job(tmp_path, family, corpus), tmp_path))
    print(f"\n{family}: pipeline through vLLM in {time.perf_counter() - start:.1f}s")
    rows = _rows(tmp_path)
    _assert_complete(rows)
    assert all(r["status"] == "ok" for r in rows), [(r["source_uri"], r["error_message"]) for r in rows
                                                    if r["status"] != "ok"]
    assert {r["engine"] for r in rows} == {"vllm"}
    assert {r["model_family"] for r in rows} == {family}
    for r in rows:
        assert r["output_source"] == "model" and 1 <= r["completion_tokens"] <= 4
        # The images reached the model: an overview alone is 64 visual tokens, far more than the
        # few dozen tokens of the text-only prompt.
        assert r["prompt_tokens"] > 64 + 10, r


def test_overlong_prompt_is_an_error_row_and_the_job_completes(corpus, tmp_path):
    """max_model_len 512 with the text layer as a hint: the report's first page (a long text layer)
    cannot fit even unsliced, so it becomes a `prompt_too_long` row; the photo fits and runs."""
    small = tmp_path / "corpus"
    small.mkdir()
    for name in ("report.pdf", "photo.jpg"):
        (small / name).write_bytes((corpus / name).read_bytes())
    tasks = "  - {name: ocr, max_new_tokens: 4, text_layer: hint}"
    job = _write_job(tmp_path, "minicpmv4_6", small, slices=1, max_model_len=512, tasks=tasks)
    _finish(_start(job, tmp_path))
    by = _by_name(_rows(tmp_path))
    photo = by["photo.jpg"]
    assert [r["status"] for r in photo] == ["ok"], photo
    report = sorted(by["report.pdf"], key=lambda r: r["unit_index"])
    assert len(report) == 2
    too_long = [r for r in report if r["status"] == "error"]
    assert too_long, report
    for r in too_long:
        assert r["error_type"] == "prompt_too_long"
        assert "max_model_len 512" in r["error_message"] and "estimated prompt" in r["error_message"]
        assert r["completion_tokens"] is None or r["completion_tokens"] == 0


def _infer_actor_pids(busy: bool = False) -> set[int]:
    """Ray worker processes of the engine stage. Ray titles them `ray::MapWorker(MapBatches(InferStage))`,
    with `.__init__` while the actor starts and `.submit` while it runs a batch (`busy`)."""
    pids = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if b"InferStage" in cmdline and b"pytest" not in cmdline and (not busy or b".submit" in cmdline):
            pids.add(int(entry.name))
    return pids


def test_fault_injection_killed_engine_actor_is_restarted(corpus, tmp_path):
    """Real fault injection: SIGKILL the engine actor's process mid-job (as the OOM killer would)."""
    job = _write_job(tmp_path, "minicpmv4_6", corpus)
    proc = _start(job, tmp_path)
    killed: list[int] = []

    def killer() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            pids = _infer_actor_pids(busy=True)  # the engine is loaded and a batch is in flight
            if pids:
                for pid in pids:
                    try:
                        os.kill(pid, signal.SIGKILL)
                        killed.append(pid)
                    except ProcessLookupError:
                        pass
                if killed:
                    return
            time.sleep(0.2)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    out, err = _finish(proc)
    thread.join(timeout=5)
    assert killed, "the engine actor's process never appeared"
    # Ray saw the death (its raylet reports the killed worker) and the job still finished.
    assert re.search(r"(?i)worker died|was killed|actor died", out + err), err[-3000:]
    rows = _rows(tmp_path)
    _assert_complete(rows)
    assert all(r["status"] == "ok" for r in rows), [(r["source_uri"], r["error_message"]) for r in rows
                                                    if r["status"] != "ok"]
