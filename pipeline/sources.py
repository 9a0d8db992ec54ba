"""Source discovery: expand input URIs, globs and a manifest into a sorted list of files with ids.

Sizes, etags and modification times come from listings (`find`, `glob`, `ls`), not from one
request per file. Anything the job names that matches nothing is an error before any work starts.
"""

from __future__ import annotations

import hashlib
import posixpath
from collections import defaultdict
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from pipeline import storage as st
from pipeline.config import InputConfig, StorageConfig

_GLOB_CHARS = ("*", "?", "[")
_COMPRESSION_SUFFIXES = (".gz", ".bz2", ".xz", ".zst")
# Manifest entries sharing a parent directory: from this many on, one listing of the directory
# is cheaper than one HEAD per entry.
_LIST_PARENT_FROM = 8


class NoMatchError(FileNotFoundError):
    """An input URI, glob or manifest entry that names no file."""


@dataclass(frozen=True)
class Source:
    """One input file: canonical URI, stable id and what the listing said about it."""

    uri: str
    source_id: str
    size: int | None
    etag: str | None
    mtime: str | None
    # the first manifest row naming it (per-row prompt, pass-through columns); not part of the file's identity
    manifest_row: int | None = field(default=None, compare=False)
    parts: tuple[str, ...] = ()  # a multi-image manifest row: its image URIs (input.manifest_images_column)


def source_id(uri: str, etag: str | None, size: int | None, mtime: str | None) -> str:
    """Stable 32-hex-char id: same object, same id across runs; a changed object, a new id.

    The etag identifies content on object stores; without one (local files), size and mtime do.
    """
    version = f"etag={etag}" if etag else f"size={size};mtime={mtime}"
    return hashlib.sha256(f"{uri}\n{version}".encode()).hexdigest()[:32]


def discover(cfg: InputConfig, storage: StorageConfig, manifest: pa.Table | None = None) -> list[Source]:
    """Every source named by `cfg.uris` and `cfg.manifest`, deduplicated, sorted, capped.

    `manifest`: the manifest's table when the caller has read it already (`read_manifest_table`).
    A source named by a manifest row carries that row's index (`manifest_row`; the first row naming
    it; every file under a directory/prefix entry carries the entry's row).
    """
    found: dict[str, Source] = {}
    for entry in cfg.uris:
        for src in expand(entry, storage):
            found.setdefault(src.uri, src)
    if cfg.manifest and cfg.manifest_images_column:
        # one source per row, in row order: the row index carries its prompt and pass-through columns
        groups = read_manifest_groups(cfg.manifest, cfg.manifest_images_column, storage)
        for i, src in enumerate(image_groups(groups, storage)):
            if src.uri not in found or found[src.uri].manifest_row is None:
                found[src.uri] = replace(src, manifest_row=i)
    elif cfg.manifest:
        table = manifest if manifest is not None else read_manifest_table(cfg.manifest, storage)
        uris = manifest_uris(table, cfg.manifest, cfg.manifest_column)
        first: dict[str, int] = {}
        for i, u in enumerate(uris):
            first.setdefault(u, i)
        for entry, src in _resolve_entries(uris, storage):
            if src.uri not in found or found[src.uri].manifest_row is None:
                found[src.uri] = replace(src, manifest_row=first[entry])
    sources = [found[uri] for uri in sorted(found)]
    return sources[: cfg.max_sources] if cfg.max_sources else sources


def expand(entry: str, storage: StorageConfig, exact: bool = False) -> list[Source]:
    """The files one input names: itself, every file under a directory/prefix, or a glob's matches.

    A name is a pattern only when nothing has that literal name: `scan [1].png` is that file when
    it exists, a glob (`*`, `?`, `[...]`) otherwise. `exact` (manifest entries) never globs: the
    entry is an object name, and one that names nothing is an error, not an empty pattern.
    """
    fs, path = st.get_fs(entry, storage)
    try:
        if exact:
            listing, what = _file_or_tree(fs, path), "directory/prefix holds no files"
        elif any(c in path for c in _GLOB_CHARS):
            if fs.exists(path):  # an existing literal name wins over the pattern it looks like
                listing, what = _file_or_tree(fs, path), "directory/prefix holds no files"
            else:
                listing, what = fs.glob(path, detail=True), "glob matches no files"
        elif entry.endswith("/"):  # explicitly a directory/prefix: skip the info request
            listing = fs.find(path, detail=True)
            what = "directory/prefix holds no files"
        else:
            listing, what = _file_or_tree(fs, path), "directory/prefix holds no files"
    except FileNotFoundError:
        raise NoMatchError(f"input {st.redact(entry)!r}: no such file, directory or prefix") from None
    except OSError as err:  # permissions, network: name the input, never the credentials
        raise _with_message(err, f"input {st.redact(entry)!r}: {st.redact(err)}") from None
    sources = [_source(fs, p, i) for p, i in listing.items() if _is_file(p, i)]
    if not sources:
        raise NoMatchError(f"input {st.redact(entry)!r}: {what}")
    return sources


def _with_message(err: OSError, message: str) -> OSError:
    try:
        return type(err)(message)
    except Exception:  # subclasses with other constructors
        return OSError(message)


def _file_or_tree(fs: fsspec.AbstractFileSystem, path: str) -> dict[str, dict[str, Any]]:
    info = fs.info(path)
    if info.get("type") == "directory":
        return fs.find(path, detail=True)
    return {path: info}


def _is_file(path: str, info: dict[str, Any]) -> bool:
    # Zero-byte "dir/" keys are folder markers made by consoles and tools, not inputs. Zero-byte
    # files are kept: they must become error rows downstream, not vanish.
    return info.get("type") == "file" and not path.endswith("/") and not str(info.get("Key", "")).endswith("/")


def _source(fs: fsspec.AbstractFileSystem, path: str, info: dict[str, Any]) -> Source:
    uri = st.to_uri(fs, path)
    size = info.get("size")
    size = int(size) if size is not None else None
    etag, mtime = _etag(info), _mtime(info)
    return Source(uri=uri, source_id=source_id(uri, etag, size, mtime), size=size, etag=etag, mtime=mtime)


def _etag(info: dict[str, Any]) -> str | None:
    for key in ("ETag", "etag", "md5Hash"):
        if info.get(key):
            return str(info[key]).strip('"')
    return None


def _mtime(info: dict[str, Any]) -> str | None:
    """Modification time as ISO 8601 UTC, whatever form the filesystem reports it in."""
    for key in ("LastModified", "mtime", "updated", "last_modified", "modified"):
        value = info.get(key)
        if value is None:
            continue
        if isinstance(value, (int, float)):
            value = datetime.fromtimestamp(value, tz=timezone.utc)
        if isinstance(value, datetime):
            if value.tzinfo is None:
                value = value.replace(tzinfo=timezone.utc)
            return value.astimezone(timezone.utc).isoformat()
        return str(value)
    return None


# ---------------------------------------------------------------------------------------------
# Manifest


def read_manifest(uri: str, column: str, storage: StorageConfig) -> list[str]:
    """The URIs in column `column` of a Parquet, CSV or JSONL manifest (optionally compressed)."""
    return manifest_uris(read_manifest_table(uri, storage), uri, column)


def read_manifest_table(uri: str, storage: StorageConfig) -> pa.Table:
    """The whole manifest as read (Parquet types as stored; CSV/JSONL types as pyarrow infers them)."""
    fs, path = st.get_fs(uri, storage)
    if not fs.exists(path):
        raise NoMatchError(f"manifest {st.redact(uri)!r} does not exist")
    return _read_table(fs, path, uri)


def manifest_uris(table: pa.Table, uri: str, column: str) -> list[str]:
    """The URIs in column `column` of a manifest's table, one per row (stripped; blanks are an error)."""
    if column not in table.column_names:
        raise ValueError(
            f"manifest {st.redact(uri)!r} has no column {column!r} (input.manifest_column); "
            f"its columns are: {', '.join(table.column_names) or '(none)'}"
        )
    values = table.column(column)
    if not (pa.types.is_string(values.type) or pa.types.is_large_string(values.type)):
        raise ValueError(f"manifest {st.redact(uri)!r}: column {column!r} must hold strings, not {values.type}")
    uris = [(v or "").strip() for v in values.to_pylist()]
    blank = [i for i, v in enumerate(uris) if not v]
    if blank:
        raise ValueError(f"manifest {st.redact(uri)!r}: empty {column!r} in row(s) {blank[:10]} (0-based)")
    return uris


def _read_table(fs: fsspec.AbstractFileSystem, path: str, uri: str) -> pa.Table:
    name = path.lower()
    base = next((name[: -len(s)] for s in _COMPRESSION_SUFFIXES if name.endswith(s)), name)
    if base.endswith((".parquet", ".pq")):
        with fs.open(path, "rb") as f:
            return pq.read_table(f)
    # Text formats may be compressed; "infer" picks the codec from the suffix.
    with fs.open(path, "rb", compression="infer") as f:
        if base.endswith(".csv"):
            return pacsv.read_csv(f)
        if base.endswith((".jsonl", ".ndjson", ".json")):
            return pajson.read_json(f)
    raise ValueError(f"manifest {st.redact(uri)!r}: unknown format (use .parquet, .csv or .jsonl)")


def _resolve_many(uris: list[str], storage: StorageConfig) -> list[Source]:
    """Sources for many manifest URIs, listing a parent directory once where that saves requests.

    Entries are exact object names: `[`, `*` and `?` in them are characters, never patterns.
    """
    return [src for _, src in _resolve_entries(uris, storage)]


def _resolve_entries(uris: list[str], storage: StorageConfig) -> list[tuple[str, Source]]:
    """`_resolve_many` with the manifest entry that named each source: (entry, source) pairs."""
    by_parent: dict[tuple[int, str], list[tuple[str, str]]] = defaultdict(list)
    rest: list[str] = []
    for uri in dict.fromkeys(uris):  # dedupe, keep order
        fs, path = st.get_fs(uri, storage)
        if uri.endswith("/"):
            rest.append(uri)
        else:
            by_parent[(id(fs), posixpath.dirname(path))].append((uri, path))
    out: list[tuple[str, Source]] = []
    for (_, parent), entries in by_parent.items():
        if len(entries) < _LIST_PARENT_FROM:
            rest.extend(uri for uri, _ in entries)
            continue
        fs, _ = st.get_fs(entries[0][0], storage)
        listing = _list_dir(fs, parent)
        for uri, path in entries:
            info = listing.get(path)
            if info is not None and _is_file(path, info):
                out.append((uri, _source(fs, path, info)))
            else:
                rest.append(uri)  # a directory, or absent: expand() recurses or names it
    for uri in rest:
        out.extend((uri, src) for src in expand(uri, storage, exact=True))
    return out


def _list_dir(fs: fsspec.AbstractFileSystem, parent: str) -> dict[str, dict[str, Any]]:
    try:
        return {fs._strip_protocol(i["name"]): i for i in fs.ls(parent, detail=True)}
    except FileNotFoundError:
        return {}


# ---------------------------------------------------------------------------------------------
# Multi-image manifest rows (input.manifest_images_column)

#: Separator of the URIs of one multi-image row in a string column, and in its `source_uri`.
PARTS_SEPARATOR = "|"


def read_manifest_groups(uri: str, column: str, storage: StorageConfig) -> list[list[str]]:
    """Each row's image URIs from column `column`: a list of strings, or a `|`-separated string."""
    fs, path = st.get_fs(uri, storage)
    if not fs.exists(path):
        raise NoMatchError(f"manifest {st.redact(uri)!r} does not exist")
    table = _read_table(fs, path, uri)
    if column not in table.column_names:
        raise ValueError(f"manifest {st.redact(uri)!r} has no column {column!r} (input.manifest_images_column); "
                         f"its columns are: {', '.join(table.column_names) or '(none)'}")
    values = table.column(column)
    kind = values.type
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        rows = [[p.strip() for p in (v or "").split(PARTS_SEPARATOR)] for v in values.to_pylist()]
    elif (pa.types.is_list(kind) or pa.types.is_large_list(kind)) and pa.types.is_string(kind.value_type):
        rows = [[(p or "").strip() for p in (v or [])] for v in values.to_pylist()]
    else:
        raise ValueError(f"manifest {st.redact(uri)!r}: column {column!r} must hold lists of URIs or `|`-separated "
                         f"strings, not {kind}")
    bad = [i for i, parts in enumerate(rows) if not parts or not all(parts)]
    if bad:
        raise ValueError(f"manifest {st.redact(uri)!r}: empty URI(s) in {column!r} in row(s) {bad[:10]} (0-based)")
    return rows


def image_groups(rows: list[list[str]], storage: StorageConfig) -> list[Source]:
    """One source per row of image URIs: `source_uri` is the URIs joined by `|`, `source_id` changes
    when any image changes (it hashes the images' own ids), `size` is their total."""
    resolved = {s.uri: s for s in _resolve_many([u for row in rows for u in row], storage)}
    canonical: dict[str, Source] = {}
    for uri in {u for row in rows for u in row}:
        fs, path = st.get_fs(uri, storage)
        found = resolved.get(st.to_uri(fs, path))
        if found is None:
            raise NoMatchError(f"manifest image {st.redact(uri)!r} names a directory or no file: each URI of "
                               f"input.manifest_images_column must name one image file")
        canonical[uri] = found
    out = []
    for row in rows:
        parts = [canonical[u] for u in row]
        ids = "\n".join(p.source_id for p in parts)
        sizes = [p.size for p in parts]
        out.append(Source(uri=PARTS_SEPARATOR.join(p.uri for p in parts),
                          source_id=hashlib.sha256(f"parts\n{ids}".encode()).hexdigest()[:32],
                          size=None if None in sizes else sum(sizes), etag=None, mtime=None,
                          parts=tuple(p.uri for p in parts)))
    return out
