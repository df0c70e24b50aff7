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


def open_as_folder_owner(path: str, flags: int, mode: int) -> int:
    """`os.open(path, flags | O_CREAT, mode)`; a file this call creates while running as root gets the owner
    of its folder: a gateway running as a service user must still open the lock and log files that a
    `keys` command run as root created in that user's folders."""
    try:
        fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        return os.open(path, flags | os.O_CREAT, mode)
    if os.geteuid() == 0:
        folder = os.stat(os.path.dirname(os.path.abspath(path)))
        if folder.st_uid != 0:
            with contextlib.suppress(OSError):
                os.fchown(fd, folder.st_uid, folder.st_gid)
    return fd


@contextlib.contextmanager
def exclusive_lock(lock_path: str, mode: int = 0o600) -> Iterator[None]:
    """Hold an exclusive advisory lock (flock) on `lock_path`, created with `mode` if missing."""
    fd = open_as_folder_owner(lock_path, os.O_RDWR, mode)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def term_with_parent() -> bool:
    """Linux: this process gets SIGTERM when its parent dies (PR_SET_PDEATHSIG), so it does not outlive a
    gateway killed without stopping it (SIGKILL, a crash). False where the system has no such thing."""
    try:
        import ctypes
        import signal

        return ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM) == 0  # PR_SET_PDEATHSIG = 1
    except Exception:  # noqa: BLE001 - not Linux
        return False
