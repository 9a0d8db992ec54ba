"""Few-shot examples (`tasks[].examples`): read, preprocessed and fingerprinted like inputs.

An example is an image URI and an answer. The engine actor reads each example's image once (not per
unit: `ExampleCache`), through the same storage layer (`pipeline.storage.read_bytes`, so s3:// URIs
and `limits.max_bytes` apply), decoder (`pipeline.media.image.expand_image`, `limits.max_pixels`) and
CPU resize to the processor's working size (`ExpandSource._fit`) as a unit's image, so an example
costs the model the same visual tokens it would as an input. The examples' content (each image's
bytes and each answer) is part of the task's resume fingerprint (`examples_digest`): a changed
example image under the same URI redoes the work.

MiniCPM-V 1.0/2.0 take one image per prompt (their processor asserts it), so a job with examples
on them fails before any work (`check_examples`); clips take none (the examples are images).
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import TYPE_CHECKING

from pipeline.config import ConfigError, ExampleConfig, JobConfig, LimitsConfig, StorageConfig

if TYPE_CHECKING:
    import numpy as np

    from pipeline.engines.base import Example

log = logging.getLogger(__name__)

#: error_type of a unit whose task's examples could not be read or decoded on the engine actor.
EXAMPLES_UNREADABLE = "examples_unreadable"


def read_example_bytes(example: ExampleConfig, storage: StorageConfig, limits: LimitsConfig) -> bytes:
    """The bytes of one example's image, under `limits.max_bytes` (ObjectTooLargeError past it)."""
    from pipeline import storage as st

    return st.read_bytes(example.image, storage, max_bytes=limits.max_bytes)


def decode_example(data: bytes, limits: LimitsConfig) -> "np.ndarray":
    """The example image's first frame as RGB uint8 (H, W, 3); MediaError when it is no image."""
    from pipeline.config import ImageConfig
    from pipeline.media.image import expand_image

    unit = next(expand_image(data, ImageConfig(multi_frame="first"), limits))
    return unit.frames[0]


def examples_digest(examples: list[ExampleConfig], storage: StorageConfig, limits: LimitsConfig) -> str:
    """Content hash of a task's examples: sha256 over each image's sha256 and its answer, in order.

    Reads every image once (the driver, at run start). Raises ConfigError naming the example when an
    image cannot be read or decoded: a bad example is bad configuration, caught before any work.
    """
    from pipeline.media.base import MediaError, describe
    from pipeline.storage import redact

    parts = []
    for k, ex in enumerate(examples):
        try:
            data = read_example_bytes(ex, storage, limits)
            decode_example(data, limits)
        except MediaError as err:
            raise ConfigError(f"tasks[].examples[{k}].image {redact(ex.image, storage)!r}: {err.message}") from None
        except Exception as err:  # noqa: BLE001 - any read failure names the example
            raise ConfigError(f"tasks[].examples[{k}].image {redact(ex.image, storage)!r} could not be read: "
                              f"{redact(describe(err), storage)}") from None
        parts.append({"image_sha256": hashlib.sha256(data).hexdigest(), "answer": ex.answer})
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def check_examples(job: JobConfig, family: str) -> None:
    """Refuse examples where the generation cannot take them (ConfigError naming the fix)."""
    from pipeline.models import get_family

    spec = get_family(family)
    with_examples = [t.name for t in job.tasks if t.examples]
    if with_examples and spec.chat_format == "minicpm_v2":
        raise ConfigError(
            f"tasks[].examples ({', '.join(with_examples)}): {spec.display} takes one image per prompt (its "
            f"processor asserts it), so few-shot examples with images cannot go before a unit; remove `examples` "
            f"or use MiniCPM-V 2.5 or later"
        )


def images_per_prompt(job: JobConfig) -> int:
    """The most images one prompt of `job` holds: a task's examples plus its unit's images (a page
    window of the `table` task holds pdf.page_window pages)."""
    most = 1
    for t in job.tasks:
        unit = job.pdf.page_window if t.name == "table" else 1
        most = max(most, len(t.examples) + unit)
    return most


class ExampleCache:
    """The examples of each task of one engine actor, read on first use and kept (`get`).

    `fit` resizes a decoded image as the expand stage resizes a unit's (ExpandSource._fit). A read
    or decode failure is kept too: every unit of that task then becomes an `examples_unreadable`
    error row (errors are data) instead of the actor reading the example again for each unit.
    `reads` counts image reads (tests check that each example is read once per actor).
    """

    def __init__(self, job: JobConfig, fit) -> None:
        self.job, self.fit = job, fit
        self._by_task: dict[str, list["Example"] | Exception] = {}
        self.reads = 0

    def get(self, task: str, prompt: str) -> list["Example"]:
        """The task's examples as engine turns (prompt: the task's own); raises what loading raised."""
        if task not in self._by_task:
            self._by_task[task] = self._load(task, prompt)
        value = self._by_task[task]
        if isinstance(value, Exception):
            raise value
        return value

    def _load(self, task: str, prompt: str) -> list["Example"] | Exception:
        from pipeline.engines.base import Example
        from pipeline.media.base import describe
        from pipeline.storage import redact

        cfg = next(t for t in self.job.tasks if t.name == task)
        out = []
        for k, ex in enumerate(cfg.examples):
            try:
                self.reads += 1
                frame = decode_example(read_example_bytes(ex, self.job.storage, self.job.limits), self.job.limits)
            except Exception as err:  # noqa: BLE001 - becomes the task's error rows
                message = redact(f"example {k} of task {task} ({ex.image}) could not be read: {describe(err)}",
                                 self.job.storage)
                log.error("%s", message)
                return RuntimeError(message)
            import numpy as np

            # A writable copy: decoded arrays can be read-only views, which torch warns about.
            out.append(Example(images=(np.array(self.fit(frame), dtype=np.uint8),), prompt=prompt,
                               answer=ex.answer))
        return out
