"""Log set-up: console plus a size-rotated file in LOG_DIR; one access line per request.

Several worker processes append to the same file; rotation takes a file lock and each process
reopens the file when another one has rotated it, so no line is lost or written to a rotated file.
Access lines name the key by its name, never the key itself. LOG_JSON=1 writes access lines as JSON.

Access lines are written in batches: each request's line is a LogRecord made directly (no logger
lookup, no caller search) and queued; at most flushing.FLUSH_WINDOW_S (10 ms) later the queue is
formatted and written with one write per handler (the per-line write, flush and rotation check
were ~14 % of the gateway's CPU under load: bench/results/ANALYSIS.md). Lines still queued at exit
are written by atexit.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import re
import sys
import time
from pathlib import Path

import orjson

from .flushing import due_on, flush_later
from .settings import Settings
from .util import exclusive_lock, iso_utc

LOG_FILE = "embedding_reranker_proxy.log"
ACCESS = "erproxy.access"
access_log = logging.getLogger(ACCESS)
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
        except (OSError, ValueError):  # the file is gone or unreadable, or our stream is closed
            same = False
        if not same:
            self._reopen()

    def _reopen(self) -> None:
        """Close the stream and open the file afresh. The stream is None until that open succeeds, so a
        failed open (the folder or the file's permissions gone for a moment) is tried again at the
        next write rather than leaving a closed stream that fails every write after it."""
        stream, self.stream = self.stream, None
        stream.close()
        self.stream = self._open()

    def _ready(self) -> None:
        """The stream open on the current file, rotated first if it is full."""
        if self.stream is None:
            self.stream = self._open()
        self._reopen_if_rotated()
        if self.stream.tell() >= self.max_bytes:
            self._rotate()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._ready()
            super().emit(record)
        except Exception:  # noqa: BLE001
            self.handleError(record)

    def emit_text(self, text: str) -> None:
        """Several formatted lines at once (AccessBatch): one rotation check, one write, one flush."""
        try:
            self._ready()
            self.stream.write(text)
            self.stream.flush()
        except Exception:  # noqa: BLE001
            self.handleError(logging.LogRecord(self.name or "erproxy.access", logging.ERROR, "", 0, text[:200],
                                               None, None))

    def _rotate(self) -> None:
        with exclusive_lock(self._lock_path, 0o640):
            # another process may have rotated while we waited for the lock
            if os.stat(self.baseFilename).st_size >= self.max_bytes:
                for i in range(self.backup_count - 1, 0, -1):
                    src, dst = f"{self.baseFilename}.{i}", f"{self.baseFilename}.{i + 1}"
                    if os.path.exists(src):
                        os.replace(src, dst)
                os.replace(self.baseFilename, self.baseFilename + ".1")
            self._reopen()


class Formatter(logging.Formatter):
    """logging.Formatter with the same output, formatting the time of day once per second."""

    _cached: tuple[int, str | None, str] = (-1, None, "")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
        second = int(record.created)
        cached = self._cached
        if cached[0] != second or cached[1] != datefmt:
            ct = self.converter(record.created)
            text = time.strftime(datefmt, ct) if datefmt else time.strftime(self.default_time_format, ct)
            self._cached = cached = (second, datefmt, text)
        if datefmt or not self.default_msec_format:
            return cached[2]
        return self.default_msec_format % (cached[2], record.msecs)


class AccessBatch:
    """Access records queued by log_access, written by their handlers together (flushing.py)."""

    def __init__(self, handlers: list[logging.Handler]) -> None:
        self.handlers = handlers
        self.pending: list[tuple[float, str]] = []
        self.scheduled: asyncio.AbstractEventLoop | None = None  # the loop whose timer will flush
        atexit.register(self.flush)

    def add(self, line: str) -> None:
        self.pending.append((time.time(), line))
        if due_on(self.scheduled):
            return
        self.scheduled = flush_later(self.flush)
        if self.scheduled is None:  # no event loop (a command-line use): at once
            self.flush()

    def flush(self) -> None:
        self.scheduled = None
        lines, self.pending = self.pending, []
        if not lines:
            return
        record = logging.LogRecord(ACCESS, logging.INFO, "", 0, "", None, None)  # one, refilled per line
        for h in self.handlers:
            if logging.INFO < h.level:
                continue
            try:
                text = "".join([h.format(_refill(record, t, line)) + "\n" for t, line in lines])
            except Exception:  # noqa: BLE001
                for t, line in lines:
                    h.handle(_refill(logging.LogRecord(ACCESS, logging.INFO, "", 0, "", None, None), t, line))
                continue
            if isinstance(h, SharedRotatingFileHandler):
                h.emit_text(text)
            elif isinstance(h, logging.StreamHandler):
                try:
                    h.stream.write(text)
                    h.flush()
                except Exception:  # noqa: BLE001
                    h.handleError(record)
            else:
                for t, line in lines:
                    h.handle(_refill(logging.LogRecord(ACCESS, logging.INFO, "", 0, "", None, None), t, line))


def _refill(record: logging.LogRecord, created: float, line: str) -> logging.LogRecord:
    """`record` as if made for `line` at `created` (a LogRecord costs more to make than to format)."""
    record.msg = line
    record.created = created
    record.msecs = int((created - int(created)) * 1000) + 0.0  # as LogRecord does (gh-89047)
    record.relativeCreated = (created - logging._startTime) * 1000  # type: ignore[attr-defined]
    return record


_batch: AccessBatch | None = None


def flush_access_log() -> None:
    """Write the access lines still waiting for their flush window (a stopping worker: uvicorn ends the
    process by re-raising the signal, so atexit does not run)."""
    if _batch is not None:
        _batch.flush()


def setup_logging(settings: Settings) -> Path:
    global _json_access, _batch
    _json_access = settings.log_json
    log_dir = Path(settings.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    path = log_dir / LOG_FILE
    fmt = Formatter(settings.log_format)
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
        json_fmt = Formatter("%(message)s")
        access_log.propagate = False
        for h in list(access_log.handlers):
            access_log.removeHandler(h)
        for h in (file_handler, console):
            jh = SharedRotatingFileHandler(path, settings.log_max_bytes, settings.log_backups) \
                if h is file_handler else logging.StreamHandler(sys.stderr)
            jh.setFormatter(json_fmt)
            access_log.addHandler(jh)
        access_log.setLevel(settings.log_level.upper())
        targets = list(access_log.handlers)
    else:
        access_log.propagate = True
        targets = [file_handler, console]
    if _batch is not None:
        _batch.flush()
    _batch = AccessBatch(targets)
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
        line = orjson.dumps(entry).decode()
    else:
        line = (f"key={_clean(who, 64)} {method} {_clean(route, 200)} model={_clean(model)} "
                f"items={'-' if items is None else items} status={status} latency_ms={latency_ms:.1f} "
                f"upstream={upstream or '-'}{' ' + note if note else ''}")
    if _batch is None:  # logging not set up by this module (tests, embedding): the plain logger call
        access_log.info("%s", line)
    else:
        _batch.add(line)
