"""Log set-up: console plus a rotating file in LOG_DIR; one access line per request.

Access lines name the key by its name or display prefix, never the key itself.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys
from pathlib import Path

from .settings import Settings

LOG_FILE = "embedding_reranker_proxy.log"
access_log = logging.getLogger("erproxy.access")


def setup_logging(settings: Settings) -> Path:
    log_dir = Path(settings.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    path = log_dir / LOG_FILE
    fmt = logging.Formatter(settings.log_format)
    root = logging.getLogger("erproxy")
    root.setLevel(settings.log_level.upper())
    root.propagate = False
    for h in list(root.handlers):
        root.removeHandler(h)
        h.close()
    file_handler = logging.handlers.RotatingFileHandler(path, maxBytes=20 * 1024 * 1024, backupCount=5,
                                                        encoding="utf-8")
    file_handler.setFormatter(fmt)
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(fmt)
    root.addHandler(file_handler)
    root.addHandler(console)
    os.chmod(path, 0o640)
    return path


def log_access(*, who: str, method: str, route: str, model: str | None, items: int | None, status: int,
               latency_ms: float, upstream: str | None) -> None:
    if access_log.isEnabledFor(logging.INFO):
        access_log.info("key=%s %s %s model=%s items=%s status=%d latency_ms=%.1f upstream=%s",
                        who, method, route, model or "-", "-" if items is None else items, status,
                        latency_ms, upstream or "-")
