"""Stage 2, streaming: the engine stage for vLLM that never lets the engine idle at a batch tail.

`InferStage` hands each Ray Data batch to `engine.generate` and waits: the engine drains to zero
while the longest reply of the batch finishes, and the next batch only enters after that. Here the
actor's `__call__` is a coroutine, Ray Data runs several calls per actor at once (`max_concurrency`
plus `max_tasks_in_flight_per_actor`, see `stage_kwargs`), and every request goes into one
running vLLM engine as soon as its batch arrives, so new requests fill the slots that finishing
ones free.

The engine is the project's own `VLLMEngine` (same prompts, chat templates, processor options and
checks), driven by one engine thread: it takes requests from a queue, `LLM.enqueue`s them (a
request vLLM rejects, e.g. a prompt over `max_model_len`, fails alone and becomes an error row),
calls `llm_engine.step()` while anything is in flight and resolves each request's future when it
finishes. The event loop of the actor only builds rows and awaits futures. An exception inside
`step()` means the engine is dead (vLLM 0.32 hangs on later steps): its in-flight requests fail
with `EngineDead`, the actor rebuilds the engine (at most InferStage's MAX_ENGINE_REBUILDS times
per actor, once for all the calls that saw it die) and retries each such request up to
`engine.max_retries` times; what still fails becomes an `engine_error` row and the job completes.

Rows are built by `InferStage` (imported, not copied), so the results schema, pass-through of
error units, the text-layer path and provenance are the same as on the synchronous path.
Engines other than vLLM run through `InferStage._generate` on a worker thread, one batch at a time.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from pipeline.engines.base import Reply, Request
from pipeline.infer import InferStage, RunContext

if TYPE_CHECKING:
    import pyarrow as pa

    from pipeline.checks import Attempts
    from pipeline.config import JobConfig
    from pipeline.tasks import ResolvedTask

log = logging.getLogger(__name__)

#: Ray Data batches one engine actor works on at once. With batch_size B the engine sees up to
#: B * CONCURRENT_BATCHES requests; keep that >= vLLM's max_num_seqs so its scheduler stays full.
CONCURRENT_BATCHES = 4


class EngineDead(RuntimeError):
    """The engine failed while running: the actor must be restarted."""


class EngineDriver:
    """Runs a `VLLMEngine` on one thread and answers requests one by one as they finish.

    `submit` may be called from any thread or event loop; vLLM itself is only touched by the
    engine thread (`LLMEngine` is not thread-safe). `trace` records (submit, finish) times.
    """

    def __init__(self, engine: Any):
        self.engine = engine
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._failed: BaseException | None = None
        self._in_flight = 0
        self.trace: list[tuple[float, float]] = []
        self._thread = threading.Thread(target=self._run, name="vllm-engine", daemon=True)
        self._thread.start()

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def submit(self, request: Request) -> asyncio.Future:
        """Queue `request`; the returned future (of the running loop) resolves to its Reply."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future = loop.create_future()
        if self._failed is not None:
            fut.set_exception(EngineDead(f"vLLM engine failed earlier: {self._failed!r}"))
            return fut
        self._inbox.put((request, loop, fut, time.perf_counter()))
        return fut

    def close(self) -> None:
        self._inbox.put(None)
        self._thread.join(timeout=30)

    # -- engine thread ----------------------------------------------------------------------------

    def _run(self) -> None:
        from pipeline.engines.base import error_reply as _error
        from pipeline.engines.vllm import _is_engine_dead, _reply

        llm = self.engine.llm
        core = llm.llm_engine
        pending: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Future, float]] = {}
        while True:
            # Block for work only when nothing runs; otherwise take what has arrived and step.
            items = [self._inbox.get()] if not pending else []
            while True:
                try:
                    items.append(self._inbox.get_nowait())
                except queue.Empty:
                    break
            for item in items:
                if item is None:
                    self._fail(pending, EngineDead("engine driver closed"))
                    return
                request, loop, fut, t_submit = item
                if self._failed is not None:
                    _resolve(loop, fut, exc=EngineDead(f"vLLM engine failed earlier: {self._failed!r}"))
                    continue
                try:
                    prompt, params = self.engine._prompt(request), self.engine._sampling(request)
                    (request_id,) = llm.enqueue([prompt], [params], use_tqdm=False)
                except Exception as exc:  # noqa: BLE001 - a rejected request fails alone
                    if _is_engine_dead(exc):
                        self._fail(pending, exc)
                        _resolve(loop, fut, exc=EngineDead(repr(exc)))
                        continue
                    self.trace.append((t_submit, time.perf_counter()))
                    _resolve(loop, fut, reply=_error(exc))
                    continue
                pending[str(request_id)] = (loop, fut, t_submit)
            self._in_flight = len(pending)
            if not pending:
                continue
            try:
                outputs = core.step()
            except BaseException as exc:  # noqa: BLE001 - vLLM 0.32 hangs on later steps: stop here
                log.error("vLLM engine step failed; failing %d in-flight requests: %r", len(pending), exc)
                self._fail(pending, exc)
                continue
            now = time.perf_counter()
            for output in outputs:
                if not getattr(output, "finished", False):
                    continue
                key = str(output.request_id)
                # enqueue() returns the internal id "<external>-<suffix>"; outputs carry the external one.
                match = key if key in pending else next((k for k in pending if k.split("-", 1)[0] == key), None)
                if match is None:
                    continue
                loop, fut, t_submit = pending.pop(match)
                self.trace.append((t_submit, now))
                _resolve(loop, fut, reply=_reply(output))
            self._in_flight = len(pending)

    def _fail(self, pending: dict[str, Any], exc: BaseException) -> None:
        self._failed = exc
        for loop, fut, _ in pending.values():
            _resolve(loop, fut, exc=EngineDead(f"vLLM engine failed: {exc!r}"))
        pending.clear()
        self._in_flight = 0


def _resolve(loop: asyncio.AbstractEventLoop, fut: asyncio.Future, reply: Reply | None = None,
             exc: BaseException | None = None) -> None:
    def settle() -> None:
        if fut.done():
            return
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(reply)

    try:
        loop.call_soon_threadsafe(settle)
    except RuntimeError:  # loop closed: nobody waits any more
        pass


class AsyncInferStage(InferStage):
    """Callable class for `Dataset.map_batches` whose batches overlap inside one engine.

    Wire it with `stage_kwargs(...)`: Ray Data then runs up to `CONCURRENT_BATCHES` calls per actor
    at once. Each call yields result tables as its requests finish (one row per unit and task, in
    completion order; pass-through rows first).
    """

    def __init__(self, job: "JobConfig", ctx: RunContext, trace_path: str | None = None):
        super().__init__(job, ctx)
        self.driver = EngineDriver(self.engine) if _is_vllm(self.engine) else None
        self._streaming = self.driver is not None  # stays True after a failed rebuild (then: error rows)
        self._sync_lock = None if self._streaming else asyncio.Lock()
        self._revive_lock: asyncio.Lock | None = None
        self._rebuilds = getattr(self, "rebuilds_left", 2)  # InferStage's MAX_ENGINE_REBUILDS where it has one
        self._trace_path = trace_path
        self._traced = 0

    async def __call__(self, batch: "pa.Table") -> AsyncIterator["pa.Table"]:  # type: ignore[override]
        from schemas.records import STREAM_SCHEMA, to_table

        now = datetime.now(timezone.utc)
        done, todo = self._split(batch, now)
        if done:
            yield to_table(done, STREAM_SCHEMA)
        if not todo:
            return
        if not self._streaming:  # other engines: the synchronous path, one batch at a time
            async with self._sync_lock:  # type: ignore[union-attr]
                t0 = time.perf_counter()
                outcomes = await asyncio.to_thread(self._generate_checked, todo)
            call_ms = (time.perf_counter() - t0) * 1000.0
            yield to_table([self._reply_row(u, t, o, call_ms / len(todo), now, latency_ms=call_ms,
                                            batch_units=len(todo))
                            for (u, t, _), o in zip(todo, outcomes, strict=True)], STREAM_SCHEMA)
            return
        t0 = time.perf_counter()
        tasks = {asyncio.ensure_future(self._answer_checked(task, req)): (unit, task) for unit, task, req in todo}
        try:
            pending = set(tasks)
            while pending:
                finished, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                rows = []
                for fut in finished:
                    unit, task = tasks[fut]
                    # Requests overlap inside vLLM: each has its own latency; its share of engine
                    # time is that latency spread over the requests submitted with it.
                    latency = (time.perf_counter() - t0) * 1000.0
                    rows.append(self._reply_row(unit, task, fut.result(), latency / len(todo), now,
                                                latency_ms=latency, batch_units=len(todo)))
                yield to_table(rows, STREAM_SCHEMA)
        finally:
            for fut in tasks:
                fut.cancel()
            self._flush_trace()

    async def _answer_checked(self, task: "ResolvedTask", request: Request) -> "Attempts":
        """One unit's attempts: each reply checked (pipeline/checks.py) and, when it fails, the
        request sent again on its own with the task's next temperature, without waiting for others."""
        from pipeline.checks import Attempts

        outcome = Attempts(task, request, self.job.checks)
        next_request: Request | None = request
        while next_request is not None:
            next_request = outcome.take(await self._answer(next_request))
        return outcome

    async def _answer(self, request: Request) -> Reply:
        """One request through the driver; a dead engine is rebuilt (bounded per actor) and the
        request retried up to `engine.max_retries` times, after which it is an engine_error reply."""
        err: BaseException | None = None
        for _ in range(self.job.engine.max_retries + 1):
            driver = self.driver
            if driver is None:
                err = EngineDead("vLLM engine died and could not be rebuilt")
                break
            try:
                return await driver.submit(request)  # type: ignore[union-attr]
            except EngineDead as exc:
                err = exc
                if not await self._revive_async(driver):
                    break
        from pipeline.infer import _engine_message

        return Reply(error_type="engine_error", error_message=_engine_message(err))

    async def _revive_async(self, failed: EngineDriver | None) -> bool:
        """Replace a dead engine and its driver once for all the calls that saw it die."""
        from pipeline.engines.factory import make_engine

        if self._revive_lock is None:
            self._revive_lock = asyncio.Lock()
        async with self._revive_lock:
            if self.driver is not failed:  # another call rebuilt it already
                return self.driver is not None
            if self._rebuilds <= 0:
                return False
            self._rebuilds -= 1
            log.warning("vLLM engine died; rebuilding it (%d rebuild(s) left in this actor)", self._rebuilds)
            if failed is not None:
                self._flush_trace()
                failed.close()
            try:
                self.engine.close()
            except Exception as exc:  # noqa: BLE001 - a dead engine may not close cleanly
                log.warning("closing the dead engine failed: %s", exc)
            try:
                model_dir = getattr(self, "_model_dir", None)
                if model_dir is None:
                    from pipeline.model_source import materialize

                    model_dir = materialize(self.job.model, self.job.storage)
                self.engine = await asyncio.to_thread(make_engine, self.job, model_dir, self.ctx.family, self.ctx.engine)
            except Exception as exc:  # noqa: BLE001
                log.error("rebuilding the vLLM engine failed: %s", exc)
                self.driver, self._rebuilds = None, 0
                return False
            self.driver, self._traced = EngineDriver(self.engine), 0
            return True

    def _flush_trace(self) -> None:
        """Append new (submit, finish) pairs to `trace_path` (benchmarks: engine occupancy)."""
        if self._trace_path is None or self.driver is None:
            return
        new = self.driver.trace[self._traced:]
        self._traced += len(new)
        if new:
            with open(self._trace_path, "a", encoding="utf-8") as f:
                f.writelines(f"{a:.6f} {b:.6f}\n" for a, b in new)

    def __del__(self) -> None:
        driver = getattr(self, "driver", None)
        if driver is not None:
            driver.close()


def _is_vllm(engine: Any) -> bool:
    from pipeline.engines.vllm import VLLMEngine

    return isinstance(engine, VLLMEngine)


def stage_kwargs(replicas: int, batch_size: int, concurrent_batches: int = CONCURRENT_BATCHES) -> dict[str, Any]:
    """`map_batches` kwargs that overlap batches inside each engine actor.

    `max_concurrency` lets one actor run `concurrent_batches` calls of the coroutine at once;
    `max_tasks_in_flight_per_actor` lets Ray Data queue that many (times two, so the next batch's
    block is already fetched) tasks on it; without it Ray Data sends one task per actor at a time.
    """
    from ray.data import ActorPoolStrategy

    return {
        "compute": ActorPoolStrategy(size=replicas, max_tasks_in_flight_per_actor=2 * concurrent_batches),
        "max_concurrency": concurrent_batches,
        "batch_size": batch_size,
    }
