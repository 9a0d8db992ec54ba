"""Stage 1 (CPU actors): read a source, identify it by its decoders, expand it into units with pixels
ready for the engine.

Every source yields at least one row: its units, or one `unit_index = -1` row saying why it has none.
Pixels travel as raw RGB bytes (no PNG/JPEG encode: encoding, not rendering, is the CPU cost: ~200
text pages/s rendered on one core, ~20 encoded as PNG, bench/preprocess_pdf.py) with their width and height.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from pipeline.config import JobConfig
from pipeline.media.base import MediaError, MediaUnit
from pipeline.watchdog import KINDS, SourceGuard, source_message

if TYPE_CHECKING:
    import pyarrow as pa

UNIT_KIND = {"pdf": "page", "document": "page", "image": "image", "video": "clip"}


def _source_row(src: dict[str, Any], media_type: str | None, **extra: Any) -> dict[str, Any]:
    row = {
        "source_uri": src["source_uri"],
        "source_id": src["source_id"],
        "size_bytes": src.get("size"),
        "media_type": media_type,
        "tasks": list(src["tasks"]),
        "unit_index": -1,
        "unit_kind": "source",
        "pixels": [],
        "width": None,
        "height": None,
        "num_frames": 0,
        "stack_frames": None,
        "tile_index": None,
        "num_tiles": None,
        "text_layer": None,
        "text_layer_quality": None,
        "start_s": None,
        "end_s": None,
        "flags": [],
        "error_type": None,
        "error_message": None,
        "preprocess_ms": None,
        "prompt": src.get("prompt"),
        "content_hash": src.get("content_hash"),
        "frame_sizes": None,
        "pages": None,
    }
    row.update(extra)
    return row


def end_marker(src: dict[str, Any], expected_rows: int) -> dict[str, Any]:
    """The row that closes a source's units: it carries the number of result rows (unit x task) the
    engine stage makes from them. It follows the source's last unit; blocks may reorder it. A
    duplicate's marker (input.dedup) names its claimant in `dedup_of` and expects no rows."""
    from schemas.records import EXPECTED_ROWS, MARKER_KIND

    return _source_row(src, None, tasks=[], unit_kind=MARKER_KIND, dedup_of=src.get("dedup_of"),
                       **{EXPECTED_ROWS: expected_rows})


def _result_rows(item: Any) -> int:
    """Result rows the engine stage makes of a unit row (dict) or table: one per unit and task."""
    if isinstance(item, dict):
        return len(item["tasks"])
    import pyarrow.compute as pc

    return int(pc.sum(pc.list_value_length(item.column("tasks"))).as_py() or 0)


def _table(rows: list[dict[str, Any]]) -> "pa.Table":
    """Rows as an Arrow table whose pixels column views the frames' memory (see _pixels_column)."""
    from schemas.records import UNITS_SCHEMA, to_table

    table = to_table([{k: v for k, v in r.items() if k not in ("_keepalive", "pixels")} for r in rows], UNITS_SCHEMA)
    i = UNITS_SCHEMA.get_field_index("pixels")
    return table.set_column(i, UNITS_SCHEMA.field(i), _pixels_column(rows))


def _pixels_column(rows: list[dict[str, Any]]) -> "pa.ChunkedArray":
    """The pixels column, one chunk per row, without copying a single-frame row's pixels.

    A page is ~21 MB at a 36-slice budget: copying it into an Arrow buffer cost a third as much as
    rendering it. Instead the chunk's data buffer is the frame's own memory (a MuPDF pixmap or a
    numpy array), kept alive by the buffer (`base`) for as long as the table lives; Ray copies it
    once, into the object store, as it would any buffer. Multi-frame rows (video clips, small
    frames) are joined into one buffer: a binary array has one data buffer.
    """
    from array import array

    import pyarrow as pa

    # Few calls per row: this runs once per page, right after a render that has flushed the CPU
    # caches, where every pyarrow call costs several times its warm price.
    binary, pixels_type = pa.binary(), pa.list_(pa.binary())
    chunks = []
    for row in rows:
        frames = row["pixels"]
        offsets = array("i", [0])  # pa.binary's int32 offsets (a C int: 32 bits on every platform we run)
        total = 0
        for frame in frames:
            total += memoryview(frame).nbytes
            if total >= 2**31:  # limits.max_pixels keeps real units far below
                raise ValueError(f"a unit's frames take over the 2 GiB a row can carry ({total}+ bytes)")
            offsets.append(total)
        if len(frames) == 1:
            view = pa.py_buffer(frames[0])  # no copy: holds the memoryview, which holds the array
            data = pa.foreign_buffer(view.address, view.size, base=(view, row.get("_keepalive")))
        else:
            data = pa.py_buffer(b"".join(frames))
        values = pa.Array.from_buffers(binary, len(frames), [None, pa.py_buffer(offsets), data])
        chunks.append(pa.Array.from_buffers(pixels_type, 1, [None, pa.py_buffer(array("i", [0, len(frames)]))],
                                            children=[values]))
    return pa.chunked_array(chunks, type=pixels_type)


def _unit_columns(unit: MediaUnit) -> dict[str, Any]:
    """A unit's own columns of its row(s): everything but the source's, the pixels and the timing."""
    from pipeline.media import textlayer

    return dict(
        unit_index=unit.unit_index, unit_kind=unit.unit_kind, text_layer=unit.text_layer,
        text_layer_quality=textlayer.quality(unit.text_layer), start_s=unit.start_s, end_s=unit.end_s,
        stack_frames=unit.stack_frames, flags=list(unit.flags), error_type=unit.error_type,
        error_message=unit.error_message,
    )


def _nbytes(row: dict[str, Any]) -> int:
    return sum(v.nbytes for v in row["pixels"])


def _with_pixels(meta: "pa.Table", unit: MediaUnit, ms: float) -> "pa.Table":
    """A one-row slice of a group's metadata table with this unit's pixels and preprocess time put in."""
    import pyarrow as pa

    from schemas.records import UNITS_SCHEMA

    row = {"pixels": ExpandSource._pixels(unit.frames)["pixels"], "_keepalive": unit.keepalive}
    i, k = UNITS_SCHEMA.get_field_index("pixels"), UNITS_SCHEMA.get_field_index("preprocess_ms")
    meta = meta.set_column(i, UNITS_SCHEMA.field(i), _pixels_column([row]))
    return meta.set_column(k, UNITS_SCHEMA.field(k), pa.array([ms], pa.float64()))


class _Output:
    """The stage's output buffer: unit rows and ready tables, in order, until a table's worth."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []
        self.tables: list["pa.Table"] = []
        self.units = 0
        self.nbytes = 0

    def __bool__(self) -> bool:
        return bool(self.rows or self.tables)

    def add(self, item: Any, nbytes: int) -> bool:
        """Add a row (dict) or a table; True when the buffer should go out."""
        if isinstance(item, dict):
            self.rows.append(item)
            self.units += 1
        else:
            self._flush_rows()
            self.tables.append(item)
            self.units += item.num_rows
        self.nbytes += nbytes
        return self.units >= CHUNK_UNITS or self.nbytes >= CHUNK_BYTES

    def take(self) -> "pa.Table":
        """Everything buffered as one table (zero copy); the buffer keeps no reference to it."""
        import pyarrow as pa

        self._flush_rows()
        tables, self.tables, self.units, self.nbytes = self.tables, [], 0, 0
        return tables[0] if len(tables) == 1 else pa.concat_tables(tables)

    def _flush_rows(self) -> None:
        if self.rows:
            self.tables.append(_table(self.rows))
            self.rows = []


# Units per output table: small blocks keep a 500-page PDF from becoming one huge block in memory.
CHUNK_UNITS = 8
CHUNK_BYTES = 16 * 2**20


#: The task whose PDF units are windows of `pdf.page_window` pages (tables that run over a page break).
WINDOW_TASK = "table"


class _PageWindows:
    """The `table` task's units of one PDF with `pdf.page_window` = n > 1: page k and the n-1 pages
    after it, one unit per page k, as n images in one prompt.

    Rows keep page k's `unit_index` and list their pages in `pages`. Each page is fit to the pixel
    budget like an untiled page (`ExpandSource._fit`; windows are never tiled) and held without a
    copy (its render buffer kept alive) for at most n-1 later renders. A window
    ends early at a page that failed (flag `page_window_cut`; the failed page's own window is its
    error row) and at the document's end (the last page's window holds it alone, no flag); pages
    beyond `limits.max_pixels` in total are left out (flag `page_window_capped`).
    """

    def __init__(self, stage: "ExpandSource", src: dict[str, Any], media_type: str, size: int) -> None:
        self.stage, self.media_type, self.size = stage, media_type, size
        self.src = {**src, "tasks": [WINDOW_TASK]}
        self.open: list[dict[str, Any]] = []  # windows still waiting for pages, oldest first

    def add(self, unit: MediaUnit, ms: float) -> Iterator[dict[str, Any]]:
        """The windows that are complete once page `unit` is rendered."""
        if unit.error_type is not None or not unit.frames:
            for window in self.open:
                window["flags"].append("page_window_cut")
            yield from self._close(len(self.open))
            yield from self.stage._unit_rows(self.src, self.media_type, unit, ms)  # the page's own error row
            return
        # The fit page may be a view of the render's buffer (a MuPDF pixmap): the windows holding it
        # keep that buffer alive (`keep`) instead of copying 20 MB a page; the row copies it once.
        frame = self.stage._fit(unit.frames[0], False)
        keep = unit.keepalive
        for window in self.open:
            window["preprocess_ms"] += ms
            if window["pixels_total"] + frame.shape[0] * frame.shape[1] > self.stage.job.limits.max_pixels:
                if "page_window_capped" not in window["flags"]:
                    window["flags"].append("page_window_capped")
                window["full"] = True
            elif not window["full"]:
                window["frames"].append(frame)
                window["keep"].append(keep)
                window["pages"].append(unit.unit_index)
                window["pixels_total"] += frame.shape[0] * frame.shape[1]
        self.open.append({"columns": _unit_columns(unit), "frames": [frame], "keep": [keep], "pages": [unit.unit_index],
                          "flags": list(unit.flags), "preprocess_ms": ms,
                          "pixels_total": frame.shape[0] * frame.shape[1], "full": False})
        done = 0
        while done < len(self.open) and (self.open[done]["full"] or len(self.open[done]["pages"]) >= self.size):
            done += 1
        yield from self._close(done)

    def finish(self) -> Iterator[dict[str, Any]]:
        """The windows still open at the document's end (or where it stopped)."""
        yield from self._close(len(self.open))

    def _close(self, n: int) -> Iterator[dict[str, Any]]:
        closing, self.open = self.open[:n], self.open[n:]
        for window in closing:
            yield self._row(window)

    def _row(self, window: dict[str, Any]) -> dict[str, Any]:
        frames, cols = window["frames"], dict(window["columns"])
        # The text layer is one page's; a window's prompt gets none (text_layer hint/use are per page).
        cols.update(text_layer=None, text_layer_quality=None, flags=window["flags"])
        pixels = ExpandSource._pixels(frames)
        sizes = [[f.shape[1], f.shape[0]] for f in frames]
        return _source_row(self.src, self.media_type, **cols, **pixels, preprocess_ms=window["preprocess_ms"],
                           _keepalive=window["keep"],
                           frame_sizes=sizes if len({tuple(s) for s in sizes}) > 1 else None,
                           pages=window["pages"])


class ExpandSource:
    """Callable class for `Dataset.map_batches`: source rows in, tables of unit rows out (streamed)."""

    def __init__(self, job: JobConfig, pixel_budget: int, task_kinds: dict[str, list[str]], family: str,
                 actor: bool = False, state_uri: str | None = None, end_markers: bool = False,
                 dedup_registry: str | None = None):
        """`actor`: this process is a preprocess actor of its own (Ray's), whose output Ray buffers per
        block: tune the process for that (pipeline/memory.py). Never in a caller's process (inspect).
        `end_markers`: close each source with its end marker (`end_marker`), for the run's driver.
        `state_uri`: where the watchdog records the units it stopped this process on (a directory or
        prefix, local or s3://), and where this process, restarted, reads them to turn those units
        into error rows (pipeline/watchdog.py). With `actor` and a `state_uri` a stuck or oversized
        unit kills the process; without a `state_uri` only the cooperative source deadline applies.
        `dedup_registry`: the name of the run's content registry actor (input.dedup content, with
        `end_markers`): a source whose bytes another source claimed first yields only its end
        marker, naming that source (pipeline/dedup.py)."""
        from pipeline.dedup import Claimer
        from pipeline.watchdog import Watchdog

        self._claimer = Claimer(dedup_registry) if dedup_registry and end_markers else None
        self.actor = actor
        self.end_markers = end_markers
        self._watchdog = Watchdog(job.limits, state_uri, job.storage, kill=actor)
        if actor:
            from pipeline import memory

            memory.keep_freed_buffers()  # page buffers are reused, not faulted in again
        self.job = job
        self.pixel_budget = pixel_budget
        self.task_kinds = task_kinds  # task name -> unit kinds it applies to
        from pipeline.tasks import TILING_TASKS

        # Only reading tasks (OCR, tables) are ever tiled; a job of captions renders and sends whole images.
        self._tiling = job.tiling.enabled and any(t in TILING_TASKS for t in task_kinds)
        self.family = family
        # The processor settings the engine will use for images (None: the family's default).
        m = job.model
        from pipeline.media.slicing import get_slice_spec

        self.image_settings = {"max_slice_nums": m.max_slice_nums or get_slice_spec(family).image_max_slice_nums}
        if m.downsample_mode:
            self.image_settings["downsample_mode"] = m.downsample_mode
        self.video_settings = {k: v for k, v in self.image_settings.items() if k == "downsample_mode"}

    def __call__(self, batch: "pa.Table") -> Iterator["pa.Table"]:
        from pipeline import memory

        if self.actor and not memory.frozen():
            self._load_media_libraries()
            # Ray, pyarrow and the media libraries are loaded: keep their objects out of the garbage
            # collector's walks from now on (once per process; pipeline/memory.py).
            memory.freeze_long_lived_objects()
        out = _Output()
        for src in batch.to_pylist():
            expected = 0
            for item, nbytes in self._expand(src):
                expected += _result_rows(item)
                # Few live page buffers: big pages go out alone, small units in groups.
                if out.add(item, nbytes):
                    yield out.take()
                # Hold no reference to a yielded page while the next one renders: a 21 MB page buffer
                # that is freed first is reused, still in the CPU's cache (L3 is ~32 MB), where two
                # live buffers make every render miss it (+15-30% per page, measured).
                del item
            # The source is complete downstream once this many result rows have come back
            # (pipeline/collect.py): the driver can then publish it without waiting for the job.
            if self.end_markers:
                out.add(end_marker(src, expected), 0)
        if out:
            yield out.take()

    def _load_media_libraries(self) -> None:
        """Import the decoders of the unit kinds this job's tasks take, so that their objects are frozen too."""
        import importlib

        modules = {"page": "pipeline.media.pdf", "image": "pipeline.media.image", "clip": "pipeline.media.video"}
        for kind in sorted({k for kinds in self.task_kinds.values() for k in kinds}):
            if kind in modules:
                importlib.import_module(modules[kind])

    def _expand(self, src: dict[str, Any]) -> Iterator[tuple[Any, int]]:
        """(row or table, pixel bytes) for every unit of one source, in order, under the source's
        limits (pipeline/watchdog.py): its clocks stop while an item waits to be taken."""
        guard = self._watchdog.source(src["source_id"])
        try:
            for item in self._expand_source(src, guard):
                guard.pause()
                yield item
                del item  # no reference to a yielded page while the next one renders (see __call__)
                guard.resume()
        finally:
            guard.end()

    def _expand_source(self, src: dict[str, Any], guard: SourceGuard) -> Iterator[tuple[Any, int]]:
        from pipeline import storage
        from pipeline.media.base import describe
        from pipeline.media.identify import identify

        t0 = time.perf_counter()
        if src.get("prompt_error"):  # its per-row prompt could not be made (pipeline/rowdata.py): not read
            from pipeline.rowdata import PROMPT_ERROR

            yield _source_row(src, None, error_type=PROMPT_ERROR, error_message=src["prompt_error"]), 0
            return
        if not guard.enter(-1, timed=False) or guard.recorded(-1):
            # A worker was stopped on this source before its first unit (reading or opening it).
            rec = guard.recorded(-1) or guard.stop_record
            yield _source_row(src, None, error_type=rec.kind, error_message=source_message(rec)), 0
            return
        if src.get("parts"):
            yield from self._parts_items(src, t0)
            return
        try:
            # The listing's size saves one request per object.
            data = storage.read_bytes(src["source_uri"], self.job.storage, max_bytes=self.job.limits.max_bytes,
                                      size=src.get("size"))
        except storage.ObjectTooLargeError as err:
            yield _source_row(src, None, error_type="too_large", error_message=str(err)), 0
            return
        except Exception as err:  # noqa: BLE001 - any read failure becomes this source's error row
            msg = storage.redact(f"the file could not be read: {describe(err)}", self.job.storage)
            yield _source_row(src, None, error_type="read_failed", error_message=msg), 0
            return
        if not data:
            yield _source_row(src, "unknown", error_type="empty_file", error_message="the file is empty (0 bytes)"), 0
            return
        if self._claimer is not None:
            from pipeline.dedup import content_hash, content_key

            src["content_hash"] = content_hash(data)  # `src` is __call__'s dict: its end marker sees these
            owner = self._claimer.claim(content_key(src["content_hash"], src["tasks"], src.get("prompt")),
                                        src["source_id"])
            if owner != src["source_id"]:
                src["dedup_of"] = owner  # identical bytes, same work: that source's rows stand for these
                return
        identity = identify(data)
        media_type = identity.media_type
        if media_type == "audio":
            # Audio, with or without cover art (an attached picture is not a video stream).
            yield _source_row(
                src, "audio", error_type="no_video_stream",
                error_message=f"the file has no video stream: audio only ({identity.format}), "
                "a cover picture is not video",
            ), 0
            return
        if media_type not in UNIT_KIND:
            yield _source_row(
                src, "unknown", error_type="unsupported_media_type",
                error_message=f"not a format Pillow, MuPDF or FFmpeg reads (first bytes {data[:16]!r}); "
                "see the README's supported formats",
            ), 0
            return
        kind = UNIT_KIND[media_type]
        tasks = [t for t in src["tasks"] if kind in self.task_kinds[t]]
        if not tasks:
            yield _source_row(
                src, media_type, tasks=list(src["tasks"]), error_type="task_not_applicable",
                error_message=f"no task of this job applies to {media_type} ({kind} units); "
                f"tasks: {', '.join(src['tasks'])}",
            ), 0
            return
        src = {**src, "tasks": tasks}
        try:
            if media_type in ("pdf", "document"):
                yield from self._pdf_items(src, data, t0, guard, media_type)
                return
            yield from self._media_items(src, media_type, data, t0, guard)
        except MediaError as err:
            yield _source_row(src, media_type, error_type=err.error_type, error_message=err.message), 0
        except Exception as err:  # noqa: BLE001 - a bug or an unforeseen file must not kill the job
            yield _source_row(src, media_type, error_type="preprocess_failed",
                              error_message=f"preprocessing this {media_type} failed unexpectedly "
                              f"({type(err).__name__}): {describe(err)}"), 0

    def _parts_items(self, src: dict[str, Any], t0: float) -> Iterator[tuple[Any, int]]:
        """A multi-image manifest row (input.manifest_images_column): ONE `image` unit of all its
        images, in the order listed, each read, decoded (first frame) and fit like an image source's,
        never tiled. Any image that cannot be read or decoded, or all of them together over
        limits.max_pixels, makes the row's error row, naming the image."""
        from pipeline import storage
        from pipeline.config import ImageConfig
        from pipeline.media.base import describe
        from pipeline.media.image import expand_image

        tasks = [t for t in src["tasks"] if "image" in self.task_kinds[t]]
        if not tasks:
            yield _source_row(src, "image", error_type="task_not_applicable",
                              error_message=f"no task of this job applies to image units; tasks: {', '.join(src['tasks'])}"), 0
            return
        src, j = {**src, "tasks": tasks}, self.job
        frames, flags, total = [], [], 0
        for k, uri in enumerate(src["parts"]):
            what = f"image {k} of the row ({storage.redact(uri, j.storage)})"
            try:
                data = storage.read_bytes(uri, j.storage, max_bytes=j.limits.max_bytes)
                unit = next(expand_image(data, ImageConfig(multi_frame="first"), j.limits))
            except storage.ObjectTooLargeError as err:
                yield _source_row(src, "image", error_type="too_large", error_message=f"{what}: {err}"), 0
                return
            except MediaError as err:
                yield _source_row(src, "image", error_type=err.error_type, error_message=f"{what}: {err.message}"), 0
                return
            except Exception as err:  # noqa: BLE001 - a read failure is the row's error, never the job's
                msg = storage.redact(f"{what} could not be read: {describe(err)}", j.storage)
                yield _source_row(src, "image", error_type="read_failed", error_message=msg), 0
                return
            frame = self._fit(unit.frames[0], False)
            total += frame.shape[0] * frame.shape[1]
            if total > j.limits.max_pixels:
                yield _source_row(src, "image", error_type="image_too_large",
                                  error_message=f"the row's first {k + 1} images take {total} pixels together, over "
                                  f"limits.max_pixels={j.limits.max_pixels}"), 0
                return
            frames.append(frame)
            flags += [f for f in unit.flags if f not in flags]
        sizes = [[f.shape[1], f.shape[0]] for f in frames]
        row = _source_row(src, "image", unit_index=0, unit_kind="image", flags=flags, **self._pixels(frames),
                          preprocess_ms=(time.perf_counter() - t0) * 1000.0,
                          frame_sizes=sizes if len({tuple(x) for x in sizes}) > 1 else None)
        yield row, _nbytes(row)

    def _media_items(self, src: dict[str, Any], media_type: str, data: bytes, t0: float,
                     guard: SourceGuard) -> Iterator[tuple[Any, int]]:
        """An image's frames or a video's clips, in order. A unit a worker was stopped on, or the
        source's time running out, ends the source with that unit's error row: the later frames or
        clips cannot be reached without decoding it. Image frames are under limits.page_timeout_s;
        clips only under the source's limit (their decoding time grows with the clip's length)."""
        kind = UNIT_KIND[media_type]
        units = self._units(media_type, data)
        index, last = 0, t0
        while True:
            if not guard.enter(index, timed=media_type == "image"):
                unit = guard.stop_unit(kind)
            elif (rec := guard.recorded(index)) is not None:
                unit = guard.skip_unit(rec, kind, ends_source=True)
            else:
                unit = next(units, None)
                if unit is None:
                    return
            now = time.perf_counter()
            for row in self._unit_rows(src, media_type, unit, (now - last) * 1000.0):
                yield row, _nbytes(row)
            if unit.error_type in KINDS:
                return
            index = unit.unit_index + 1
            del unit  # see __call__: the next unit renders with this one's buffer released
            last = time.perf_counter()

    def _pdf_items(self, src: dict[str, Any], data: bytes, t0: float, guard: SourceGuard,
                   media_type: str = "pdf") -> Iterator[tuple[Any, int]]:
        """A PDF's pages, planned a group at a time (`pdf.plan_pdf`), then rendered one at a time.

        The group's rows are converted to Arrow in one go before its renders (one conversion per
        group, run warm, where one per page ran right after a render had flushed the caches); each
        rendered page then goes out as its row's slice with the pixels put in. A page whose row the
        render changed (an error, a blank page in a repaired file, tiles, a resize) takes the
        general path instead. The watchdog is told each page as it is planned and as it is rendered;
        a page it stopped a worker on stands in as its error row, and a source out of time ends with
        one row for the pages it did not reach.
        """
        from pipeline.media.pdf import StopDocument, plan_pdf

        windows = None
        if self.job.pdf.page_window > 1 and WINDOW_TASK in src["tasks"]:
            # The table task runs on windows of pages (_PageWindows); every other task on pages.
            windows = _PageWindows(self, src, media_type, self.job.pdf.page_window)
            src = {**src, "tasks": [t for t in src["tasks"] if t != WINDOW_TASK]}

        def on_page(index: int, n_pages: int) -> MediaUnit | None:
            guard.n_units = n_pages
            if not guard.enter(index):
                raise StopDocument
            rec = guard.recorded(index)
            return None if rec is None else guard.skip_unit(rec, "page", ends_source=False)

        j = self.job
        tile_dpi = j.tiling.min_page_dpi if self._tiling else None
        groups = plan_pdf(data, j.pdf, j.limits, self.pixel_budget, tile_min_dpi=tile_dpi,
                          tile_min_area=j.tiling.min_page_area, fit=self._page_size, on_page=on_page,
                          filetype=None if media_type == "document" else "pdf")
        last = t0
        for group in groups:
            planned_ms = (time.perf_counter() - last) * 1000.0 / len(group)
            meta, n_flags = self._group_table(src, group, media_type), [len(p.unit.flags) for p in group]
            for k, plan in enumerate(group):
                if not guard.enter(plan.unit.unit_index):
                    break
                start = time.perf_counter()
                size = plan.size
                unit = plan.render()
                ms = planned_ms + (time.perf_counter() - start) * 1000.0
                if windows is not None:
                    for row in windows.add(unit, ms):
                        yield row, _nbytes(row)
                if not src["tasks"]:
                    pass  # a job of windowed tables only: the page has no row of its own
                elif meta is not None and size is not None and self._as_planned(unit, size, n_flags[k]):
                    yield _with_pixels(meta.slice(k, 1), unit, ms), unit.frames[0].nbytes
                else:
                    for row in self._unit_rows(src, media_type, unit, ms):
                        yield row, _nbytes(row)
                del unit  # see __call__
            del meta
            last = time.perf_counter()
            if guard.stopped_at is not None:
                break
        if windows is not None:
            for row in windows.finish():
                yield row, _nbytes(row)
            src = windows.src  # the stop row below stands for the windows not reached too
        if guard.stopped_at is not None:
            groups.close()
            yield from ((row, 0) for row in self._unit_rows(src, media_type, guard.stop_unit("page"), 0.0))

    def _group_table(self, src: dict[str, Any], group: list, media_type: str = "pdf") -> "pa.Table | None":
        """The rows of a group of planned pages as they will be once rendered, pixels aside (None
        when no page in it has a planned size)."""
        if not src["tasks"] or not any(p.size is not None for p in group):
            return None
        rows = []
        for plan in group:
            w, h = plan.size or (None, None)
            rows.append(_source_row(src, media_type, **_unit_columns(plan.unit), width=w, height=h,
                                    num_frames=1 if w else 0))
        return _table(rows)

    def _as_planned(self, unit: MediaUnit, size: tuple[int, int], n_flags: int) -> bool:
        """Whether a rendered page's row is exactly its planned row: rendered at the planned size,
        no flag added by the render, and neither tiled nor resized by `_unit_rows`."""
        if unit.error_type is not None or len(unit.flags) != n_flags or len(unit.frames) != 1:
            return False
        frame = unit.frames[0]
        h, w = frame.shape[:2]
        if (w, h) != size or self._tiles(frame, force="render_for_tiling" in unit.flags) is not None:
            return False
        return self._fit_size(w, h, video=False) is None

    def _units(self, media_type: str, data: bytes) -> Iterator[MediaUnit]:
        """The units of an image or a video (PDFs go through `_pdf_items`)."""
        j = self.job
        if media_type == "image":
            from pipeline.media.image import expand_image

            return expand_image(data, j.image, j.limits)
        from pipeline.media.video import expand_video

        return expand_video(data, j.video, j.limits, frame_size=self._frame_size)

    def _unit_rows(self, src: dict[str, Any], media_type: str, unit: MediaUnit, ms: float) -> Iterator[dict[str, Any]]:
        """One row per unit, or one per tile when the unit is too large or too long for the slicer."""
        base = dict(_keepalive=unit.keepalive, preprocess_ms=ms, **_unit_columns(unit))
        if unit.error_type is not None or not unit.frames:
            yield _source_row(src, media_type, **base)
            return
        video = unit.unit_kind == "clip"
        tiles = None if video else self._tiles(unit.frames[0], force="render_for_tiling" in unit.flags)
        if tiles is None:
            frames = [self._fit(f, video) for f in unit.frames]
            yield _source_row(src, media_type, **base, **self._pixels(frames))
            return
        from pipeline.media.tiling import cut
        from pipeline.tasks import TILING_TASKS

        reading = [t for t in src["tasks"] if t in TILING_TASKS]
        whole = [t for t in src["tasks"] if t not in TILING_TASKS]
        if whole or not reading:
            # Captions see the whole picture: one untiled row (the overview, fit to the budget) for
            # the tasks that are never tiled, next to the tiles of the reading tasks.
            yield _source_row(src, media_type, **base, tasks=whole or list(src["tasks"]),
                              **self._pixels([self._fit(unit.frames[0], False)]))
        if not reading:
            return
        for tile, part in zip(tiles, cut(unit.frames[0], tiles)):
            yield _source_row(src, media_type, **base, tasks=reading, tile_index=tile.index, num_tiles=len(tiles),
                              **self._pixels([self._fit(part, False)]))

    @staticmethod
    def _pixels(frames: list) -> dict[str, Any]:
        import numpy as np

        h, w = frames[0].shape[:2]
        # Arrow copies each buffer once when the table is built; a memoryview avoids a second copy
        # (tobytes) of what can be 20 MB per page.
        views = [memoryview(np.ascontiguousarray(f)).cast("B") for f in frames]
        return {"pixels": views, "width": w, "height": h, "num_frames": len(frames)}

    def _tiles(self, frame, force: bool = False):
        """Tiles for an oversized frame; `force`: a page rendered above its budget on purpose (a poster)."""
        from pipeline.media.tiling import needs_tiling, plan_tiles

        t = self.job.tiling
        h, w = frame.shape[:2]
        big = needs_tiling(w, h, self.pixel_budget, t.max_factor, t.max_aspect) or (force and w * h > self.pixel_budget)
        if not self._tiling or not big:
            return None
        tiles = plan_tiles(w, h, self.pixel_budget, t.overlap, t.max_tiles)
        return tiles if len(tiles) > 1 else None

    def _frame_size(self, width: int, height: int) -> tuple[int, int] | None:
        """The size the processor uses for an upright video frame of this display size (its overview:
        frames are never sliced), so frames are scaled once, in the decoder, to exactly that size."""
        from pipeline.media.slicing import model_input_size

        return model_input_size(self.family, width, height, video=True, **self.video_settings)

    def _page_size(self, width: int, height: int) -> tuple[int, int] | None:
        """The size a page of this natural render size should render at (see _fit); None: as is."""
        from pipeline.media.slicing import model_input_size

        return model_input_size(self.family, width, height, **self.image_settings)

    def _fit(self, frame, video: bool):
        """Resize on the CPU to the size the processor will work at, when that keeps its plan exact.

        The engine's processor then has (almost) nothing left to resample and the object store moves
        fewer bytes. Where no such size exists, images far above the budget are still shrunk to it
        (beyond 4x the budget the processor would discard those pixels anyway).
        """
        import numpy as np

        h, w = frame.shape[:2]
        target = self._fit_size(w, h, video)
        if target is None:
            return np.ascontiguousarray(frame, dtype=np.uint8)
        from PIL import Image

        return np.asarray(Image.fromarray(frame).resize(target, Image.Resampling.BICUBIC))

    def _fit_size(self, w: int, h: int, video: bool) -> tuple[int, int] | None:
        """The size `_fit` resizes a w x h frame to (None: kept as it is).

        An unsliced image (and every video frame) goes at its overview size: the processor's own
        resize is then a no-op, so the pixels are resampled once, as the reference does. A sliced
        image goes as it is: the processor makes its overview from the original and its slices from
        a resize of the original, and handing it the refine size instead would resample the
        overview twice. Only past 4x the budget (where shipping the original costs more than the
        second resampling loses) is a sliced image shrunk to its refine size.
        """
        from pipeline.media.slicing import model_input_size, plan_image

        settings = self.video_settings if video else self.image_settings
        target = model_input_size(self.family, w, h, video=video, **settings)
        if target is not None and not video and h * w <= 4 * self.pixel_budget:
            try:
                sliced = plan_image(self.family, w, h, **settings).grid is not None
            except ValueError:
                sliced = False
            if sliced:
                return None
        if target is None and h * w > 4 * self.pixel_budget:
            scale = (self.pixel_budget / (h * w)) ** 0.5
            target = (max(1, round(w * scale)), max(1, round(h * scale)))
        return target
