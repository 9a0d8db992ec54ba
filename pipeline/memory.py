"""Process settings for the preprocess actors, which allocate and free a ~21 MB page buffer per page.

Measured under Ray Data (`bench/under_ray.py`: one actor, born-digital Letter pages at the 36-slice
budget, 12 MP photos), two process-level costs took a large share of the actor's CPU:

- Page faults. Ray holds a block's worth of pages (128 MiB) before copying it into the object store;
  when they are freed, glibc hands the heap top back to the kernel (its trim threshold is twice the
  last large allocation), and the next pages fault every 4 KiB in again, zeroed by the kernel.
  `keep_freed_buffers` keeps such memory in the process for reuse.
- Garbage collection. An actor holds over a hundred thousand long-lived objects (Ray, pyarrow, the
  media libraries); the stage makes many short-lived ones per page, and every full collection
  walked them all. `freeze_long_lived_objects` moves what exists once the libraries are loaded out
  of the collector's sight.

Together, in steady state: ~43 -> ~52 born-digital pages and ~3.1 -> ~3.8 photos per CPU-second of
the actor on this machine (video frames, which are small, unchanged).
"""

from __future__ import annotations

import ctypes
import gc
import logging
import platform

log = logging.getLogger(__name__)

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 2**20  # glibc's maximum: buffers up to it come from the heap and are reused
TRIM_THRESHOLD = 1024 * 2**20  # free heap kept before any is returned to the kernel


def keep_freed_buffers() -> bool:
    """Make glibc reuse freed page-sized buffers instead of returning them to the kernel and faulting
    them in again. Raises the process's idle RSS by at most TRIM_THRESHOLD above what it has used.
    False (and nothing changed) where the C library is not glibc."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    except (OSError, AttributeError):
        ok = False
    if not ok:
        log.warning("could not tune glibc malloc for page buffers; preprocessing works, with more page faults")
    return ok


_frozen = False


def frozen() -> bool:
    """Whether `freeze_long_lived_objects` has run in this process."""
    return _frozen


def freeze_long_lived_objects() -> None:
    """Collect once, then exclude every object alive now from future collections (once per process).

    Call when the stage is warm (its libraries imported, its first source done): what exists then
    lives as long as the process, and walking it in every full collection was pure cost.
    """
    global _frozen
    if not _frozen:
        gc.collect()
        gc.freeze()
        _frozen = True
