"""One run at a time per output prefix: a live holder refuses a second run; a dead one does not."""

import json
import socket
import subprocess
import sys
import time

import pytest

from pipeline import lease
from pipeline.config import StorageConfig
from pipeline.sink import Layout


def test_a_second_run_is_refused_while_the_first_holds_the_prefix(tmp_path):
    layout = Layout(str(tmp_path / "out"), StorageConfig())
    with lease.Lease(layout, "first"):
        with pytest.raises(lease.PrefixBusy) as err:
            lease.Lease(layout, "second").acquire()
        msg = str(err.value)
        assert "in use by run first" in msg and "_lock.json" in msg and "wait for it" in msg
    assert not (tmp_path / "out" / "_lock.json").exists()  # released
    with lease.Lease(layout, "second"):
        pass


def test_a_dead_holder_on_this_host_frees_the_prefix_at_once(tmp_path):
    layout = Layout(str(tmp_path / "out"), StorageConfig())
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "_lock.json").write_text(json.dumps(
        {"attempt": "killed", "host": socket.gethostname(), "pid": int(dead.stdout), "heartbeat": time.time()}))
    with lease.Lease(layout, "next"):
        assert json.loads((tmp_path / "out" / "_lock.json").read_text())["attempt"] == "next"


def test_a_stale_heartbeat_frees_the_prefix(tmp_path):
    stale = {"attempt": "gone", "host": "another-node", "pid": 1, "heartbeat": time.time() - lease.STALE_S - 1}
    fresh = {**stale, "heartbeat": time.time()}
    assert not lease.holder_is_live(stale) and lease.holder_is_live(fresh)
