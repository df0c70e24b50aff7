"""Log set-up: console plus a size-rotated file in LOG_DIR; one access line per request.

Several worker processes append to the same file; rotation takes a file lock and each process
reopens the file when another one has rotated it, so no line is lost or written to a rotated file.
Access lines name the key by its name, never the key itself. LOG_JSON=1 writes access lines as JSON.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from pathlib import Path

import orjson

from .settings import Settings
from .util import exclusive_lock, iso_utc

LOG_FILE = "embedding_reranker_proxy.log"
access_log = logging.getLogger("erproxy.access")
_json_access = False


class SharedRotatingFileHandler(logging.FileHandler):
    """Size-based rotation that is safe when several processes write the same file."""

    def __init__(self, path: Path, max_bytes: int, backup_count: int) -> None:
        super().__init__(path, mode="a", encoding="utf-8", delay=False)
        self.max_bytes = max_bytes
        self.backup_count = backup_count
        self._lock_path = str(path) + ".lock"

    def _reopen_if_rotated(self) -> None:
        try:
            same = os.stat(self.baseFilename).st_ino == os.fstat(self.stream.fileno()).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            self.stream.close()
            self.stream = self._open()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            if self.stream is None:
                self.stream = self._open()
            self._reopen_if_rotated()
            if self.stream.tell() >= self.max_bytes:
                self._rotate()
            super().emit(record)
        except Exception:  # noqa: BLE001
            self.handleError(record)

    def _rotate(self) -> None:
        with exclusive_lock(self._lock_path, 0o640):
            # another process may have rotated while we waited for the lock
            if os.stat(self.baseFilename).st_size >= self.max_bytes:
                for i in range(self.backup_count - 1, 0, -1):
                    src, dst = f"{self.baseFilename}.{i}", f"{self.baseFilename}.{i + 1}"
                    if os.path.exists(src):
                        os.replace(src, dst)
                os.replace(self.baseFilename, self.baseFilename + ".1")
            self.stream.close()
            self.stream = self._open()


def setup_logging(settings: Settings) -> Path:
    global _json_access
    _json_access = settings.log_json
    log_dir = Path(settings.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    path = log_dir / LOG_FILE
    fmt = logging.Formatter(settings.log_format)
    file_handler = SharedRotatingFileHandler(path, settings.log_max_bytes, settings.log_backups)
    file_handler.setFormatter(fmt)
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(fmt)
    for name in ("erproxy", "uvicorn"):
        logger = logging.getLogger(name)
        logger.setLevel(settings.log_level.upper())
        logger.propagate = False
        for h in list(logger.handlers):
            logger.removeHandler(h)
            h.close()
        logger.addHandler(file_handler)
        logger.addHandler(console)
    logging.getLogger("uvicorn.access").disabled = True
    if settings.log_json:
        json_fmt = logging.Formatter("%(message)s")
        access_log.propagate = False
        for h in list(access_log.handlers):
            access_log.removeHandler(h)
        for h in (file_handler, console):
            jh = SharedRotatingFileHandler(path, settings.log_max_bytes, settings.log_backups) \
                if h is file_handler else logging.StreamHandler(sys.stderr)
            jh.setFormatter(json_fmt)
            access_log.addHandler(jh)
        access_log.setLevel(settings.log_level.upper())
    else:
        access_log.propagate = True
    return path


_UNSAFE = re.compile(r"[\x00-\x20\x7f-\x9f\\]")


def _clean(value: str | None, limit: int = 120) -> str:
    """One log token from client-chosen text: no spaces or control characters (no forged lines), bounded."""
    if not value:
        return "-"
    text = value if len(value) <= limit else value[:limit] + "…"
    return _UNSAFE.sub(lambda m: "\\x%02x" % ord(m.group()), text)


def log_access(*, who: str, method: str, route: str, model: str | None, items: int | None, status: int,
               latency_ms: float, upstream: str | None, note: str | None = None) -> None:
    """One access line. `note` (the gateway's own `name=value` words, e.g. a failed authentication's
    client address and failure count) is appended as it is, or as fields of the JSON object."""
    if not access_log.isEnabledFor(logging.INFO):
        return
    if _json_access:
        entry = {
            "time": iso_utc(), "key": who, "method": method,
            "route": route[:200], "model": model[:120] if model else model, "items": items, "status": status,
            "latency_ms": round(latency_ms, 2), "upstream": upstream}
        if note:
            entry.update(word.partition("=")[::2] for word in note.split())
        access_log.info(orjson.dumps(entry).decode())
    else:
        access_log.info("key=%s %s %s model=%s items=%s status=%d latency_ms=%.1f upstream=%s%s",
                        who, method, _clean(route, 200), _clean(model), "-" if items is None else items, status,
                        latency_ms, upstream or "-", " " + note if note else "")
