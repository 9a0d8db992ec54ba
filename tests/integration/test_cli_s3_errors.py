"""`cpmv run` against a real S3 server (SeaweedFS) when the output or the credentials are wrong.

Each case ends before any work (no Ray starts) with one `cpmv: ...` line and its exit status, and
no credential reaches stderr, also with `-v` (botocore logs every signed request at DEBUG).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import exits

ROOT = Path(__file__).resolve().parents[2]

JOB = """
name: s3err
input: {{uris: ["s3://{bucket}/corpus/"]}}
output: {{uri: "{out}"}}
model: {{name: tiny, family: minicpmv4_6}}
"""


def cpmv(tmp_path: Path, env: dict[str, str], bucket: str, out: str, *args: str) -> subprocess.CompletedProcess:
    job = tmp_path / "job.yaml"
    job.write_text(JOB.format(bucket=bucket, out=out))
    base = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") and k != "RAY_ADDRESS"}
    return subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(job), *args], capture_output=True,
                          text=True, env={**base, "PYTHONPATH": str(ROOT), **env}, timeout=120, cwd=ROOT)


def one_line(proc: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("cpmv: ")]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


def test_wrong_and_absent_credentials(tmp_path, s3_server, s3_bucket):
    env = s3_server.env()
    wrong = {**env, "AWS_SECRET_ACCESS_KEY": "not-the-secret-0123456789"}
    proc = cpmv(tmp_path, wrong, s3_bucket, f"s3://{s3_bucket}/out")
    assert proc.returncode == exits.STORAGE
    line = one_line(proc)
    assert "credentials" in line and s3_bucket in line
    assert env["AWS_ACCESS_KEY_ID"] not in proc.stderr and "not-the-secret" not in proc.stderr
    absent = {k: v for k, v in env.items() if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    proc = cpmv(tmp_path, absent, s3_bucket, f"s3://{s3_bucket}/out")
    assert proc.returncode == exits.STORAGE and "no S3 credentials" in one_line(proc)


def test_missing_bucket_is_refused_unless_the_job_creates_it(tmp_path, s3_server):
    missing = f"absent-{os.urandom(4).hex()}"
    proc = cpmv(tmp_path, s3_server.env(), missing, f"s3://{missing}/out")
    assert proc.returncode == exits.USAGE
    assert "does not exist" in one_line(proc) and "create_bucket" in proc.stderr
    assert not s3_server.client().exists(missing)  # nothing was written, so nothing was created
    proc = cpmv(tmp_path, s3_server.env(), missing, f"s3://{missing}/out", "--set", "output.create_bucket=true")
    # The bucket is made; the run then stops at its (missing) inputs.
    assert proc.returncode == exits.INPUTS, proc.stderr[-3000:]
    assert s3_server.client().exists(missing)


def test_dot_segments_are_refused_before_any_request(tmp_path, s3_server, s3_bucket):
    proc = cpmv(tmp_path, s3_server.env(), s3_bucket, f"s3://{s3_bucket}/a/../x")
    assert proc.returncode == exits.USAGE and "'..'" in one_line(proc)
    assert not s3_server.client().exists(f"{s3_bucket}/a")


def test_verbose_log_holds_no_credentials(tmp_path, s3_server, s3_bucket):
    """-v logs botocore's signed requests (HEAD bucket, the lock PUT, the listing); the key id and the
    secret appear nowhere, and the Authorization header is there with its credential masked."""
    env = s3_server.env()
    proc = cpmv(tmp_path, env, s3_bucket, f"s3://{s3_bucket}/out", "-v")
    assert proc.returncode == exits.INPUTS, proc.stderr[-3000:]
    assert "botocore" in proc.stderr and "Credential=***" in proc.stderr  # the debug log is really there
    assert env["AWS_ACCESS_KEY_ID"] not in proc.stderr
    assert env["AWS_SECRET_ACCESS_KEY"] not in proc.stderr
    one_line(proc)
