"""How a worker process handles memory once it has started: two settings that cut per-request CPU.

- Freed memory is kept for the next answer. glibc's malloc serves a large block (a 256-input
  embeddings answer is ~5.4 MB) from fresh pages and returns them to the kernel when it is freed,
  so every such request page-faults its whole body in again: ~2,800 faults and about half of the
  gateway's CPU for that answer (bench split rows). Blocks up to MMAP_THRESHOLD come from the heap
  instead, and up to TRIM_THRESHOLD of freed heap is kept. The price: a worker keeps what its
  largest recent answers used (bounded by TRIM_THRESHOLD), rather than giving it back at once.
- What start-up built lives as long as the process: it is frozen out of the garbage collector's
  sight, so that a full collection under load does not walk it (a pause every client waits on).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging

log = logging.getLogger("erproxy.memory")

MMAP_THRESHOLD = 32 * 1024 * 1024
TRIM_THRESHOLD = 128 * 1024 * 1024
_M_TRIM_THRESHOLD = -1  # glibc's <malloc.h>
_M_MMAP_THRESHOLD = -3


def keep_freed_memory(mmap_threshold: int = MMAP_THRESHOLD, trim_threshold: int = TRIM_THRESHOLD) -> bool:
    """Tell glibc's malloc to keep freed memory (True), or nothing where malloc is not glibc's (False)."""
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others: their malloc has no such knobs
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    ok = mallopt(_M_MMAP_THRESHOLD, mmap_threshold) == 1 and mallopt(_M_TRIM_THRESHOLD, trim_threshold) == 1
    if not ok:
        log.debug("mallopt refused the thresholds; malloc keeps its defaults")
    return ok


def settle_after_start() -> None:
    """Once the services have started: keep freed memory, freeze the start-up objects."""
    keep_freed_memory()
    gc.collect()
    gc.freeze()
