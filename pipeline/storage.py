"""The one fsspec wrapper: every read, write, listing and move of the pipeline goes through here.

Filesystems are created lazily (never at import time) and cached per process by protocol, options
and the AWS environment, so a Ray worker builds its S3 client once. Secrets never appear in the
cache key's text form, in logs or in error messages: use `redact()` on anything that may hold them.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import re
import threading
import uuid
from typing import Any

import fsspec
import pyarrow.fs as pafs
from fsspec.implementations.local import LocalFileSystem

from pipeline.config import SECRET_OPTION_NAME, StorageConfig

# Environment variables botocore reads itself; they are part of the cache key (a change of
# credentials in-process must give a new client) and their secret values are redacted.
_AWS_ENV = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_PROFILE",
)
_SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN")
# Option names whose values are credentials, in any protocol's storage options (config.py).
_SECRET_OPTION = SECRET_OPTION_NAME
_MIN_SECRET_LEN = 4  # shorter values would redact ordinary words; no real credential is that short

_cache: dict[tuple[str, str], fsspec.AbstractFileSystem] = {}
_cache_lock = threading.Lock()
_known_secrets: set[str] = set()


class ObjectTooLargeError(ValueError):
    """A file is larger than the byte limit it was read under."""

    def __init__(self, uri: str, size: int, limit: int) -> None:
        super().__init__(f"{uri} is {size} bytes, over the limit of {limit} bytes (limits.max_bytes)")
        self.uri, self.size, self.limit = uri, size, limit


# ---------------------------------------------------------------------------------------------
# Secrets


def _remember_secret(value: str | None) -> None:
    if value and len(value) >= _MIN_SECRET_LEN:
        _known_secrets.add(value)


def _secrets(storage: StorageConfig | None) -> set[str]:
    found = set(_known_secrets)
    found.update(v for k in _SECRET_ENV if (v := os.environ.get(k)) and len(v) >= _MIN_SECRET_LEN)
    if storage is not None:
        for secret in (storage.s3.access_key_id, storage.s3.secret_access_key):
            if secret is not None and len(secret.get_secret_value()) >= _MIN_SECRET_LEN:
                found.add(secret.get_secret_value())
        found.update(_secret_option_values(storage.options))
    return found


def _secret_option_values(options: Any, secret: bool = False) -> set[str]:
    """Values stored under credential-like keys, at any depth of a storage-options mapping (every
    string inside such a value, e.g. a service-account token given as a mapping)."""
    found: set[str] = set()
    if isinstance(options, dict):
        for key, value in options.items():
            found |= _secret_option_values(value, secret or bool(_SECRET_OPTION.search(str(key))))
    elif isinstance(options, (list, tuple)):
        for value in options:
            found |= _secret_option_values(value, secret)
    elif secret and isinstance(options, str) and len(options) >= _MIN_SECRET_LEN:
        found.add(options)
    return found


# Signed-URL parameters and URL user-info can carry credentials inside otherwise harmless text.
_SECRET_PATTERNS = (
    (re.compile(r"(X-Amz-(?:Credential|Signature|Security-Token)=)[^&\s'\"]+", re.IGNORECASE), r"\1***"),
    (re.compile(r"(Signature=)[^&,\s'\"]+"), r"\1***"),
    # botocore's DEBUG log of a signed request: `Authorization: AWS4-HMAC-SHA256 Credential=<key id>/...`
    # and the session token header, as `'X-Amz-Security-Token': b'...'` or `X-Amz-Security-Token: ...`.
    (re.compile(r"(Credential=)[^/&,\s'\"]+"), r"\1***"),
    (re.compile(r"(X-Amz-Security-Token['\"]?\s*:\s*b?['\"]?)[^'\"\s,}]+", re.IGNORECASE), r"\1***"),
    (re.compile(r"(://)[^/@\s:]+:[^/@\s]+@"), r"\1***@"),
)


def redact(text: object, storage: StorageConfig | None = None) -> str:
    """`text` as a string with every known credential replaced by `***`.

    Known credentials: the AWS key/secret/token environment variables, keys seen by `fs_options`
    in this process, and those of `storage` when given.
    """
    out = str(text)
    # Longest first, so a secret that contains another is not left half-visible.
    for secret in sorted(_secrets(storage), key=len, reverse=True):
        out = out.replace(secret, "***")
    for pattern, repl in _SECRET_PATTERNS:
        out = pattern.sub(repl, out)
    return out


# ---------------------------------------------------------------------------------------------
# Filesystems


def split_uri(uri: str) -> tuple[str, str]:
    """(canonical protocol, the URI without it); local paths give `file`."""
    protocol, rest = fsspec.core.split_protocol(uri)
    if protocol is None:
        return "file", rest
    cls = fsspec.get_filesystem_class(protocol)
    # Aliases (s3a -> s3, local -> file) share one cache entry and one set of options.
    protos = (cls.protocol,) if isinstance(cls.protocol, str) else tuple(cls.protocol)
    return protos[0], rest


def fs_options(storage: StorageConfig, protocol: str) -> dict[str, Any]:
    """fsspec storage options for `protocol`: the job's s3 settings, then `storage.options[protocol]`.

    Unset s3 fields are left out so botocore applies the standard AWS chain itself
    (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION, profiles).
    """
    opts: dict[str, Any] = _s3_options(storage) if protocol == "s3" else {}
    return _merge(opts, storage.options.get(protocol, {}))


def _s3_options(storage: StorageConfig) -> dict[str, Any]:
    s3 = storage.s3
    # Workers write while the driver lists (resume, commit): a cached listing would be stale.
    opts: dict[str, Any] = {"use_listings_cache": False}
    client_kwargs: dict[str, Any] = {}
    if s3.endpoint_url:
        client_kwargs["endpoint_url"] = s3.endpoint_url
    # region_name only when asked for: sent to servers that reject a location constraint
    # (moto, some S3 clones), it breaks bucket creation. botocore itself reads only
    # AWS_DEFAULT_REGION, so AWS_REGION is honoured here.
    region = s3.region or os.environ.get("AWS_REGION")
    if region:
        client_kwargs["region_name"] = region
    if client_kwargs:
        opts["client_kwargs"] = client_kwargs
    if s3.access_key_id is not None:
        opts["key"] = s3.access_key_id.get_secret_value()
        _remember_secret(opts["key"])
    if s3.secret_access_key is not None:
        opts["secret"] = s3.secret_access_key.get_secret_value()
        _remember_secret(opts["secret"])
    if s3.anon:
        opts["anon"] = True
    return opts


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge; `extra` wins (so client_kwargs from both sides are combined)."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    for value in _secret_option_values(extra):
        _remember_secret(value)
    return out


def _cache_key(protocol: str, options: dict[str, Any]) -> tuple[str, str]:
    env = {k: os.environ.get(k) for k in _AWS_ENV} if protocol == "s3" else {}
    blob = json.dumps([options, env], sort_keys=True, default=str)
    # Hashed so credentials do not sit in plain text in a long-lived dict key.
    return protocol, hashlib.sha256(blob.encode()).hexdigest()


def get_fs(uri: str, storage: StorageConfig) -> tuple[fsspec.AbstractFileSystem, str]:
    """The (cached) filesystem for `uri` and the path of `uri` within it."""
    protocol, _ = split_uri(uri)
    options = fs_options(storage, protocol)
    key = _cache_key(protocol, options)
    with _cache_lock:
        fs = _cache.get(key)
        if fs is None:
            # skip_instance_cache: fsspec's own cache ignores environment changes; ours does not.
            fs = fsspec.filesystem(protocol, skip_instance_cache=True, **options)
            _cache[key] = fs
    return fs, fs._strip_protocol(uri)


def clear_cache() -> None:
    """Forget cached filesystems (tests; after credentials rotate)."""
    with _cache_lock:
        _cache.clear()


def to_uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """Canonical URI of `path` on `fs`: `s3://bucket/key`, or an absolute local path."""
    if isinstance(fs, LocalFileSystem):
        return path
    return fs.unstrip_protocol(path)


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    """True for the local filesystem (where rename is atomic and directories are real)."""
    return isinstance(fs, LocalFileSystem)


def pyarrow_fs(uri: str, storage: StorageConfig) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and path for `uri` (Ray Data and Parquet writers).

    Local paths get pyarrow's native LocalFileSystem. Everything else wraps the same fsspec
    filesystem, so one set of options (endpoint, credentials, extra options) applies everywhere.
    """
    fs, path = get_fs(uri, storage)
    if is_local(fs):
        return pafs.LocalFileSystem(), path
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


# ---------------------------------------------------------------------------------------------
# Paths


def join(prefix: str, *parts: str) -> str:
    """Join URI/path parts with single `/` separators (no normalisation)."""
    out = prefix
    for part in parts:
        if not part:
            continue
        out = out.rstrip("/") + "/" + part.lstrip("/") if out else part
    return out


def safe_join(prefix: str, relative: str) -> str:
    """`join(prefix, relative)`, refusing any `relative` that could land outside `prefix`."""
    if not relative or "\x00" in relative:
        raise ValueError(f"invalid relative path {relative!r}")
    if relative.startswith(("/", "\\", "~")) or "://" in relative or re.match(r"^[A-Za-z]:", relative):
        raise ValueError(f"relative path {relative!r} must not be absolute")
    # Backslashes count as separators here only: on Windows, or behind a server that maps them.
    if ".." in re.split(r"[/\\]", relative):
        raise ValueError(f"relative path {relative!r} must not contain '..'")
    clean = "/".join(p for p in relative.split("/") if p not in ("", "."))
    if not clean:
        raise ValueError(f"relative path {relative!r} names the prefix itself")
    return join(prefix, clean)


# ---------------------------------------------------------------------------------------------
# Operations


def info(uri: str, storage: StorageConfig) -> dict[str, Any]:
    """fsspec `info` of `uri` (FileNotFoundError when absent)."""
    fs, path = get_fs(uri, storage)
    return fs.info(path)


def read_bytes(uri: str, storage: StorageConfig, max_bytes: int, size: int | None = None) -> bytes:
    """The whole content of `uri`; ObjectTooLargeError when it exceeds `max_bytes`.

    The size is checked before reading (pass `size` from the listing to skip one request), and
    again after, in case the object grew in between.
    """
    fs, path = get_fs(uri, storage)
    if size is None:
        size = fs.size(path)
    if size is not None and size > max_bytes:
        raise ObjectTooLargeError(uri, size, max_bytes)
    if size is None:  # filesystems that cannot tell: read one byte past the limit to detect it
        with fs.open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    else:
        data = fs.cat_file(path)
    if len(data) > max_bytes:
        raise ObjectTooLargeError(uri, len(data), max_bytes)
    return data


def read_head(uri: str, storage: StorageConfig, n: int) -> bytes:
    """The first `n` bytes of `uri` (fewer if it is shorter); for sniffing file types."""
    fs, path = get_fs(uri, storage)
    # No read-ahead cache: s3fs would otherwise fetch a whole 50 MB block to return a few bytes.
    with fs.open(path, "rb", block_size=max(n, 1), cache_type="none") as f:
        return f.read(n)


def write_bytes(uri: str, data: bytes, storage: StorageConfig) -> None:
    """Write `data` to `uri`, whole or not at all (object PUTs are atomic; local goes via rename)."""
    fs, path = get_fs(uri, storage)
    if not is_local(fs):
        fs.pipe_file(path, data)
        return
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def exists(uri: str, storage: StorageConfig) -> bool:
    """Whether a file or directory/prefix exists at `uri`."""
    fs, path = get_fs(uri, storage)
    return fs.exists(path)


def list_files(prefix: str, storage: StorageConfig) -> list[str]:
    """Canonical URIs of every file under `prefix`, recursively, sorted (empty if none)."""
    fs, path = get_fs(prefix, storage)
    if not fs.exists(path):
        return []
    found = fs.find(path, detail=True)
    return sorted(to_uri(fs, p) for p, i in found.items() if i.get("type") == "file" and not p.endswith("/"))


def move(src: str, dst: str, storage: StorageConfig) -> None:
    """Move a file or a directory/prefix: rename on local disk, copy then delete on object stores."""
    fs, src_path = get_fs(src, storage)
    dst_fs, dst_path = get_fs(dst, storage)
    if dst_fs is not fs:
        raise ValueError(f"cannot move across filesystems: {redact(src)} -> {redact(dst)}")
    if is_local(fs):
        fs.makedirs(posixpath.dirname(dst_path), exist_ok=True)
        os.replace(src_path, dst_path)
        return
    if fs.isfile(src_path):
        fs.copy(src_path, dst_path)
        fs.rm(src_path)
        return
    files = [p for p, i in fs.find(src_path, detail=True).items() if i.get("type") == "file"]
    if not files:
        raise FileNotFoundError(f"nothing to move at {redact(src)}")
    # Copy everything before deleting anything: a failure leaves the source complete.
    for p in files:
        fs.copy(p, dst_path + p[len(src_path):])
    fs.rm(files)


def rm(uri: str, storage: StorageConfig, recursive: bool = False) -> None:
    """Delete `uri` (with `recursive`, a directory/prefix); a missing target is not an error."""
    fs, path = get_fs(uri, storage)
    try:
        fs.rm(path, recursive=recursive)
    except FileNotFoundError:
        pass
