"""`cpmv` as a user meets it: every user error ends with one `cpmv: ...` line and a documented status.

Runs the real CLI in a subprocess (`python -m pipeline.cli`); none of these start Ray or a server
(an unreachable cluster is a closed port, or a listening socket that never speaks gRPC).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline import exits

ROOT = Path(__file__).resolve().parents[2]


def cpmv(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    full_env.update(PYTHONPATH=str(ROOT), **(env or {}))
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True,
                          env=full_env, timeout=timeout, cwd=ROOT)


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    """The stderr of a failed command: exactly one `cpmv: ` line and no traceback."""
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("cpmv: ")]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def job(tmp_path: Path, body: str, name: str = "job.yaml") -> str:
    path = tmp_path / name
    path.write_text(body)
    return str(path)


def local_job(tmp_path: Path, input_line: str) -> str:
    return job(tmp_path, f"name: t\ninput: {input_line}\noutput: {{uri: {tmp_path / 'out'}}}\n"
                         "model: {name: tiny, family: minicpmv4_6}\n")


def test_missing_input_folder(tmp_path):
    proc = cpmv("run", local_job(tmp_path, f"{{uris: [{tmp_path / 'nope'}/]}}"))
    assert proc.returncode == exits.INPUTS
    assert "nope" in one_line_error(proc)


def test_missing_manifest(tmp_path):
    proc = cpmv("run", local_job(tmp_path, f"{{manifest: {tmp_path / 'm.parquet'}}}"))
    assert proc.returncode == exits.INPUTS
    assert "manifest" in one_line_error(proc) and "m.parquet" in proc.stderr


def test_yaml_error_names_the_file_and_line(tmp_path):
    path = job(tmp_path, "name: t\ninput: [\n", "broken.yaml")
    proc = cpmv("validate", path)
    assert proc.returncode == exits.USAGE
    line = one_line_error(proc)
    assert path in line and "line 3" in line and "<unicode string>" not in proc.stderr


def test_missing_job_file_and_bad_field(tmp_path):
    proc = cpmv("run", str(tmp_path / "absent.yaml"))
    assert proc.returncode == exits.USAGE and "does not exist" in one_line_error(proc)
    proc = cpmv("validate", local_job(tmp_path, "{uris: [x]}"), "--set", "engine.batchsize=3")
    assert proc.returncode == exits.USAGE and "engine.batchsize" in proc.stderr and "Traceback" not in proc.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_cluster_fails_in_seconds(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text("x")
    path = local_job(tmp_path, f"{{uris: [{tmp_path / 'in'}/]}}")
    t0 = time.monotonic()
    proc = cpmv("run", path, "--address", f"127.0.0.1:{_free_port()}")
    assert proc.returncode == exits.CLUSTER and "unreachable" in one_line_error(proc)
    assert time.monotonic() - t0 < 30  # the probe waits 5 s at most; the rest is interpreter start-up
    # A port that accepts but never answers as gRPC (a wrong service): Ray itself would hang for minutes.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        t0 = time.monotonic()
        proc = cpmv("run", path, "--set", f"ray.address=127.0.0.1:{silent.getsockname()[1]}")
    assert proc.returncode == exits.CLUSTER and "does not answer" in one_line_error(proc)
    assert time.monotonic() - t0 < 30
    # RAY_ADDRESS from the environment is used the same way.
    proc = cpmv("run", path, env={"RAY_ADDRESS": f"ray://127.0.0.1:{_free_port()}"})
    assert proc.returncode == exits.CLUSTER and "ray://127.0.0.1" in one_line_error(proc)


def test_version_and_global_flags_anywhere(tmp_path):
    proc = cpmv("--version")
    assert proc.returncode == 0 and proc.stdout.startswith("cpmv ")
    path = local_job(tmp_path, "{uris: [x]}")
    for argv in (["-v", "validate", path], ["validate", path, "-v"], ["validate", "--debug", path]):
        proc = cpmv(*argv)
        assert proc.returncode == 0, (argv, proc.stderr)
        assert '"name": "t"' in proc.stdout


def test_debug_shows_the_traceback(tmp_path):
    path = local_job(tmp_path, f"{{uris: [{tmp_path / 'nope'}/]}}")
    proc = cpmv("run", path, "--debug")
    assert proc.returncode == exits.INPUTS
    assert "Traceback" in proc.stderr and "NoMatchError" in proc.stderr
    assert proc.stderr.rstrip().splitlines()[-1].startswith("cpmv: ")


def test_ctrl_c_while_loading_is_one_line(tmp_path):
    """SIGINT at several moments of start-up (module imports, job loading): never a traceback.

    Not covered: the first tens of milliseconds (more on a loaded machine), before Python runs the
    first line of pipeline/cli.py.
    """
    path = local_job(tmp_path, f"{{uris: [{tmp_path / 'nope'}/]}}")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    seen = set()
    for delay in (0.3, 0.5, 0.8, 1.2):
        proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", path], env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        assert "Traceback" not in err, (delay, err)
        seen.add(proc.returncode)
        # Interrupted (130), or finished before the signal came (3: the missing input).
        assert proc.returncode in (exits.SIGINT, exits.INPUTS), (delay, proc.returncode, err)
        assert sum(line.startswith("cpmv: ") for line in err.splitlines()) == 1, err
    assert exits.SIGINT in seen


def test_describe_maps_storage_errors():
    """The mapping itself, for errors this machine cannot provoke without a server (see tests/integration
    for the real S3 ones)."""
    from botocore.exceptions import EndpointConnectionError, NoCredentialsError

    assert exits.describe(NoCredentialsError())[0] == exits.STORAGE
    assert "IRSA" in exits.describe(NoCredentialsError())[1]
    assert exits.describe(EndpointConnectionError(endpoint_url="http://x:1"))[0] == exits.STORAGE
    assert exits.describe(PermissionError("Forbidden"))[0] == exits.STORAGE
    assert exits.describe(ZeroDivisionError("x"))[0] == exits.INTERNAL
    wrapped = RuntimeError("Error calling __set_name__")
    wrapped.__cause__ = KeyboardInterrupt()
    assert exits.describe(wrapped)[0] == exits.SIGINT


def test_schema_output_lists_the_parquet_columns():
    import json

    from schemas.records import DOCUMENTS_SCHEMA, RESULTS_SCHEMA

    proc = cpmv("schema", "--output")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert [c["name"] for c in out["tables"]["results"]] == RESULTS_SCHEMA.names
    assert [c["name"] for c in out["tables"]["documents"]] == DOCUMENTS_SCHEMA.names
    status = next(c for c in out["tables"]["results"] if c["name"] == "status")
    assert status == {"name": "status", "type": "string", "nullable": False}
    # the layout: every partition key a job may name, per table
    from pipeline.config import PartitionKey
    from typing import get_args

    keys = out["layout"]["partition_keys"]
    assert set(keys["results"]) == set(get_args(PartitionKey)) and "task" not in keys["documents"]
