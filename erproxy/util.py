"""Two small helpers shared by keys, logs and audit: UTC timestamps and an exclusive file lock."""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from typing import Iterator


def iso_utc(ts: float | None = None) -> str:
    """`ts` (default now) as ISO-8601 UTC to the second: 2026-11-24T06:20:00Z."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def utc_now() -> str:
    return iso_utc()


@contextlib.contextmanager
def exclusive_lock(lock_path: str, mode: int = 0o600) -> Iterator[None]:
    """Hold an exclusive advisory lock (flock) on `lock_path`, created with `mode` if missing."""
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, mode)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
