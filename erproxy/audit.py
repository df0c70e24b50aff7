"""Audit log of key operations: who ran what, on which key, when. Never the key itself."""

from __future__ import annotations

import getpass
import os
import socket
from pathlib import Path
from typing import Any

import orjson

from .settings import Settings
from .util import utc_now

AUDIT_FILE = "key_audit.log"


def audit(settings: Settings, action: str, name: str, **details: Any) -> None:
    """Append one JSON line to LOG_DIR/key_audit.log (O_APPEND: safe across processes)."""
    try:
        user = getpass.getuser()
    except Exception:  # noqa: BLE001 - no passwd entry in some containers
        user = str(os.getuid())
    entry = {"time": utc_now(), "action": action, "key_name": name, "user": user, "host": socket.gethostname(),
             "pid": os.getpid(), "key_file": str(Path(settings.api_keys_file).resolve()),
             **{k: v for k, v in details.items() if v is not None}}
    path = Path(settings.log_dir) / AUDIT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
    try:
        os.write(fd, orjson.dumps(entry) + b"\n")
    finally:
        os.close(fd)
