"""Where a checkpoint comes from: `tiny`, a local directory, an fsspec prefix (s3://) or a hub id.

The driver calls `check_model` before any work starts, so a job whose model cannot be loaded fails
in seconds with a message that says what to do; engine actors call `materialize` on their node,
which downloads a remote checkpoint once per node into a cache and reuses it afterwards.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from pipeline.config import ModelConfig, StorageConfig

TINY = "tiny"
DEFAULT_TINY_FAMILY = "minicpmv4_6"


class ModelUnavailable(RuntimeError):
    """The checkpoint cannot be found or fetched; the message says how to point at one."""


def _cache_root(cfg: ModelConfig) -> Path:
    root = cfg.cache_dir or os.environ.get("CPMV_CACHE") or Path.home() / ".cache" / "cpmv-batch"
    return Path(root).expanduser()


def _hint(name: str) -> str:
    return (
        f"Point model.name at a local directory or an s3:// prefix that holds the {name} checkpoint "
        f"(e.g. --set model.name=/models/MiniCPM-V-4.6 or --set model.name=s3://bucket/models/MiniCPM-V-4.6), "
        "or run `make demo MODEL=tiny` (or --set model.name=tiny) for an offline smoke run with a tiny random model."
    )


def _is_remote(name: str) -> bool:
    return "://" in name and not name.startswith("file://")


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~", "file://")) or Path(name).exists()


def check_model(cfg: ModelConfig, storage: StorageConfig) -> dict:
    """Fail fast: confirm the checkpoint exists and return its config.json (small reads only)."""
    name = cfg.name
    if name == TINY:
        return {"model_type": cfg.family if cfg.family != "auto" else DEFAULT_TINY_FAMILY}
    if _is_remote(name):
        from pipeline import storage as st

        uri = st.join(name, "config.json")
        try:
            return json.loads(st.read_bytes(uri, storage, max_bytes=10 * 2**20))
        except Exception as err:  # noqa: BLE001 - any failure here means "not usable"
            raise ModelUnavailable(
                f"model {name}: cannot read {uri} ({type(err).__name__}: {st.redact(str(err))}). {_hint(name)}"
            ) from None
    if _looks_like_path(name):
        path = Path(name.removeprefix("file://")).expanduser()
        if not (path / "config.json").is_file():
            raise ModelUnavailable(f"model {name}: {path}/config.json not found. {_hint(name)}")
        return json.loads((path / "config.json").read_text())
    return _hub_config(cfg)


def _hub_reachable(timeout_s: float = 3.0) -> str | None:
    """None when the hub endpoint accepts a TCP connection, else why not (one quick try, no retry storm)."""
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return "HF_HUB_OFFLINE is set"
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout_s).close()
    except OSError as err:
        return f"{url.hostname}:{port} unreachable: {err}"
    return None


def _hub_config(cfg: ModelConfig) -> dict:
    from huggingface_hub import hf_hub_download

    try:  # a checkpoint already in the local hub cache needs no network
        path = hf_hub_download(cfg.name, "config.json", revision=cfg.revision, cache_dir=_hub_cache(cfg),
                               local_files_only=True)
        return json.loads(Path(path).read_text())
    except Exception:  # noqa: BLE001 - not cached: ask the hub below
        pass
    # Without this probe, huggingface_hub retries an unreachable hub for ~25 s before failing.
    why = _hub_reachable()
    try:
        if why:
            raise ConnectionError(why)
        path = hf_hub_download(cfg.name, "config.json", revision=cfg.revision, cache_dir=_hub_cache(cfg))
    except Exception as err:  # noqa: BLE001 - offline, gated, missing: all mean "cannot load"
        raise ModelUnavailable(
            f"model {cfg.name}: its weights cannot be loaded from the Hugging Face Hub here "
            f"({type(err).__name__}: {err}). {_hint(cfg.name)}"
        ) from None
    return json.loads(Path(path).read_text())


def _hub_cache(cfg: ModelConfig) -> str | None:
    return str(_cache_root(cfg) / "hub") if cfg.cache_dir else None


def materialize(cfg: ModelConfig, storage: StorageConfig) -> Path:
    """Return a local directory holding the checkpoint, fetching or building it at most once per node."""
    name = cfg.name
    if name == TINY:
        family = cfg.family if cfg.family != "auto" else DEFAULT_TINY_FAMILY
        return _once(_cache_root(cfg) / f"tiny-{family}", lambda tmp: _build_tiny(family, tmp))
    if _is_remote(name):
        key = hashlib.sha256(f"{name}@{cfg.revision}".encode()).hexdigest()[:16]
        return _once(_cache_root(cfg) / "remote" / key, lambda tmp: _download(name, storage, tmp))
    if _looks_like_path(name):
        return Path(name.removeprefix("file://")).expanduser()
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(cfg.name, revision=cfg.revision, cache_dir=_hub_cache(cfg)))
    except Exception as err:  # noqa: BLE001
        raise ModelUnavailable(f"model {cfg.name}: download failed ({type(err).__name__}). {_hint(cfg.name)}") from None


def _build_tiny(family: str, out: Path) -> None:
    from pipeline.models import get_family

    spec = get_family(family)
    if spec.native_transformers:
        from pipeline.tiny import build_tiny

        build_tiny(family, out)
    else:  # 2.6-4.5: config, tokenizer and our own remote-code processor; weights only via load_format dummy
        from pipeline.tiny_legacy import build_tiny_legacy

        build_tiny_legacy(spec.version, out)


def _download(prefix: str, storage: StorageConfig, out: Path) -> None:
    from pipeline import storage as st

    fs, root = st.get_fs(prefix, storage)
    fs.get(root.rstrip("/") + "/", str(out) + "/", recursive=True)
    if not (out / "config.json").is_file():
        raise ModelUnavailable(f"model {prefix}: no config.json after download. {_hint(prefix)}")


def _once(target: Path, build) -> Path:
    """Build `target` once: concurrent actors on one node wait on a file lock; a crash leaves no half copy."""
    from filelock import FileLock

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / ".complete").exists():
            return target
        tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
        try:
            build(tmp)
            (tmp / ".complete").write_text("ok\n")
            if target.exists():
                shutil.rmtree(target)
            tmp.rename(target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target
