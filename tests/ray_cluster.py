"""A 3-node local Ray cluster in its own process, for tests about distribution (node loss).

`python -m tests.ray_cluster DIR` starts a head (no CPUs: it schedules nothing) and two worker
nodes of 2 CPUs each, all on 127.0.0.1, writes the GCS address to DIR/address, and then obeys
files: DIR/kill-engine-node removes the worker node whose raylet owns the engine actor's process
(`ray::MapWorker(MapBatches(InferStage))`), writing DIR/killed; DIR/stop shuts everything down.
Run apart from the test process so that its Ray state never mixes with the test's.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # every node on 127.0.0.1 (see pipeline/resources.py)


def _engine_pid() -> int | None:
    import psutil

    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if "MapBatches(InferStage)" in cmd and "ray::" in cmd:
            return p.info["pid"]
    return None


def _node_of(pid: int, nodes: list) -> object | None:
    import psutil

    proc = psutil.Process(pid)
    chain = {p.pid for p in proc.parents()}
    for node in nodes:
        raylets = node.all_processes.get("raylet", [])
        if any(info.process.pid in chain for info in raylets):
            return node
    return None


def main(d: Path) -> None:
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "node_ip_address": "127.0.0.1",
                                                              "include_dashboard": False})
    workers = [cluster.add_node(num_cpus=2, node_ip_address="127.0.0.1") for _ in range(2)]
    cluster.wait_for_nodes()
    (d / "address").write_text(cluster.address)
    try:
        while not (d / "stop").exists():
            if (d / "kill-engine-node").exists() and not (d / "killed").exists():
                pid = _engine_pid()
                node = _node_of(pid, workers) if pid else None
                if node is not None:
                    cluster.remove_node(node, allow_graceful=False)
                    (d / "killed").write_text(str(pid))
            time.sleep(0.2)
    finally:
        cluster.shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
