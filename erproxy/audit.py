"""Audit log of key operations: who ran what, on which key, when. Never the key itself."""

from __future__ import annotations

import getpass
import os
import socket
import sys
from pathlib import Path
from typing import Any

import orjson

from .settings import Settings
from .util import open_as_folder_owner, utc_now

AUDIT_FILE = "key_audit.log"


def _open(settings: Settings) -> int:
    path = Path(settings.log_dir) / AUDIT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    return open_as_folder_owner(str(path), os.O_WRONLY | os.O_APPEND, 0o640)


def audit_ready(settings: Settings) -> None:
    """Before a key command changes the key file: ValueError if its audit entry could not be written (a
    LOG_DIR owned by another user, say), so the change is not made rather than made unrecorded, or
    made and then reported as failed with its new key never shown."""
    try:
        os.close(_open(settings))
    except OSError as e:
        raise ValueError(f"cannot write the audit log {Path(settings.log_dir) / AUDIT_FILE} ({e.strerror or e}); "
                         "nothing was changed. Run the command as the user that owns LOG_DIR, or fix its "
                         "permissions.") from None


def audit(settings: Settings, action: str, name: str, **details: Any) -> None:
    """Append one JSON line to LOG_DIR/key_audit.log (O_APPEND: safe across processes). The change is made
    by then: a write that fails now is a warning, never an error that hides the change's result."""
    try:
        user = getpass.getuser()
    except Exception:  # noqa: BLE001 - no passwd entry in some containers
        user = str(os.getuid())
    entry = {"time": utc_now(), "action": action, "key_name": name, "user": user, "host": socket.gethostname(),
             "pid": os.getpid(), "key_file": str(Path(settings.api_keys_file).resolve()),
             **{k: v for k, v in details.items() if v is not None}}
    try:
        fd = _open(settings)
        try:
            os.write(fd, orjson.dumps(entry) + b"\n")
        finally:
            os.close(fd)
    except OSError as e:
        print(f"warning: {action} of {name!r} is done, but its audit entry could not be written to "
              f"{Path(settings.log_dir) / AUDIT_FILE} ({e.strerror or e})", file=sys.stderr)
