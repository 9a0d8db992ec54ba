"""The preprocess stage's per-core rates inside Ray Data, as production runs it.

The other figures call `ExpandSource` directly and drop each yielded table. Under Ray Data the same
actor also buffers its output up to the target block size (128 MiB by default) and copies every block
into the object store, which for 21 MB pages costs about as much again as preprocessing them. This
measures that: a local Ray cluster, one preprocess actor on one CPU (`map_batches` with an actor pool
of one, as `pipeline.resources` plans the stage), the driver consuming the blocks; the actor reports
its own process CPU time (all its threads, Ray's included) in steady state: from its first output
table (imports, warm-up and that table excluded) to the end of its last batch. The last block's copy
happens after that end, so the rates are slightly optimistic (one block in the run: ~6 of 240 pages).

    python -m bench.under_ray
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

from pipeline.expand import ExpandSource


class _TimedStage(ExpandSource):
    """ExpandSource that writes its process's CPU time since its first batch to `report` after each batch."""

    def __init__(self, *args: Any, report: str, tuned: bool = True) -> None:
        # tuned=False: the actor without its process settings (pipeline/memory.py), for comparison
        super().__init__(*args, actor=tuned)
        self.report = report
        self.start: float | None = None
        self.units = 0  # units timed (all but the first table's)
        self.total = 0

    def __call__(self, batch):
        for table in super().__call__(batch):
            if self.start is None:  # steady state: from the first output on (imports and warm-up excluded)
                self.start = time.process_time()
            else:
                self.units += table.num_rows
            self.total += table.num_rows
            yield table
        Path(self.report).write_text(json.dumps(
            {"cpu_s": time.process_time() - self.start, "units": self.units, "total": self.total}))


def stage_rate(path: Path, copies: int, overrides: list[str] | None = None, tuned: bool = True) -> dict[str, Any]:
    """Units per CPU-second of one preprocess actor over `copies` source rows of one file (Ray must be up)."""
    import pyarrow as pa
    import ray

    from bench import expand_stage

    expander, source = expand_stage(path, overrides)
    source = pa.concat_tables([source] * copies)
    args = (expander.job, expander.pixel_budget, expander.task_kinds, expander.family)
    with tempfile.TemporaryDirectory() as tmp:
        report = str(Path(tmp) / "actor.json")
        ds = ray.data.from_arrow(source).map_batches(
            _TimedStage, fn_constructor_args=args, fn_constructor_kwargs={"report": report, "tuned": tuned},
            compute=ray.data.ActorPoolStrategy(size=1), batch_size=1, num_cpus=1, batch_format="pyarrow",
        )
        units = frames = 0
        for block in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            units += block.num_rows
            frames += sum(n or 0 for n in block.column("num_frames").to_pylist())
        actor = json.loads(Path(report).read_text())
    if actor["total"] != units:
        raise SystemExit(f"{path.name}: the actor made {actor['total']} units, the driver got {units}")
    # Frames per unit are the same throughout (one per page or photo, fps x clip length per clip).
    return {"units": actor["units"], "frames": frames * actor["units"] / units, "cpu_s": actor["cpu_s"]}


def measure(born: Path, photo: Path, clip: Path, video_overrides: list[str]) -> dict[str, Any]:
    """Per-core rates of the stage under Ray Data for born-digital pages, 12 MP photos and video frames,
    as it runs (`tuned`) and without its process settings (`untuned`, pipeline/memory.py)."""
    import os

    import ray

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    out: dict[str, Any] = {}
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        for name, tuned in (("untuned", False), ("tuned", True)):
            pdf = stage_rate(born, copies=4, tuned=tuned)
            image = stage_rate(photo, copies=4, tuned=tuned)
            video = stage_rate(clip, copies=4, overrides=video_overrides, tuned=tuned)
            out[name] = {
                "pdf_pages_per_s": round(pdf["units"] / pdf["cpu_s"], 2),
                "image_per_s": round(image["units"] / image["cpu_s"], 2),
                "video_frames_per_s": round(video["frames"] / video["cpu_s"], 2),
            }
    finally:
        ray.shutdown()
    return out | {
        "inputs": {"pdf": "4 copies of the born-digital PDF", "image": "4 x the 12 MP JPEG",
                   "video": "4 copies of the clip"},
        "method": "local Ray, one preprocess actor on 1 CPU (ActorPoolStrategy(size=1), batch_size=1), default "
                  "DataContext (128 MiB target blocks), the driver consuming every block; units per second of the "
                  "actor's process CPU time (all threads) in steady state: from its first output table (imports and "
                  "warm-up excluded) to the end of its last batch. untuned: without pipeline/memory.py's settings",
    }


if __name__ == "__main__":
    from bench.cpu_per_gpu import measure_under_ray

    print(json.dumps(measure_under_ray(), indent=1))
