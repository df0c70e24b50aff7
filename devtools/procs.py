"""Start, wait for and stop local processes: the one implementation that tests/ and bench/ share.

- `free_port()`: a free TCP port on loopback.
- `spawn(cmd, log_path, ...)`: a process with its output in a log file, as a `Proc`.
- `Proc.stop()`: a signal (SIGTERM by default), a bounded wait, then SIGKILL; a process started in
  its own session (`new_session=True`) is stopped with its whole process group, children included.
- `wait_until(what, check, timeout, proc)`: poll `check` until it answers, failing early (with the
  end of its log) when the process died.

Standard library only: bench scripts import it with nothing but the project's .venv python.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TypeVar

T = TypeVar("T")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def tail(path: Path | None, n: int = 1500) -> str:
    """The last n characters of a log file ("" when there is none)."""
    if path is None:
        return ""
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


@dataclass
class Proc:
    """A started process: its Popen, the URL it serves (if any) and the file its output goes to."""

    popen: subprocess.Popen
    url: str = ""
    log_path: Path | None = None
    name: str = ""
    group: bool = False  # started in its own session: signals go to its whole process group

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def output(self) -> str:
        """Everything the process wrote so far."""
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")

    def _signal(self, sig: int) -> bool:
        if self.group:
            try:
                os.killpg(self.popen.pid, sig)
            except ProcessLookupError:
                return False
            return True
        if self.popen.poll() is not None:
            return False
        self.popen.send_signal(sig)
        return True

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0, kill_timeout: float = 5.0) -> int | None:
        """Send `sig`, wait up to `timeout` s, then SIGKILL; returns the exit status."""
        if self._signal(sig):
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)
                try:
                    self.popen.wait(kill_timeout)
                except subprocess.TimeoutExpired:
                    pass
        if self.group:  # the leader is gone; nothing of its group may linger (nginx, uvicorn workers)
            self._signal(signal.SIGKILL)
        return self.popen.returncode


def spawn(cmd: list[str], log_path: Path, *, cwd: Path | None = None, env: dict[str, str] | None = None,
          url: str = "", name: str = "", new_session: bool = False) -> Proc:
    """Start `cmd` with stdout and stderr in `log_path` and no stdin."""
    with open(log_path, "wb") as out:
        popen = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, start_new_session=new_session)
    return Proc(popen, url, log_path, name, group=new_session)


def wait_until(what: str, check: Callable[[], T], timeout: float, proc: Proc | subprocess.Popen | None = None,
               interval: float = 0.05, errors: tuple[type[BaseException], ...] = (OSError,)) -> T:
    """Call `check` until it returns something true (returned), `proc` exits (RuntimeError) or
    `timeout` s pass (TimeoutError). Exceptions in `errors` count as "not yet"."""
    popen = proc.popen if isinstance(proc, Proc) else proc
    log_path = proc.log_path if isinstance(proc, Proc) else None
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while time.monotonic() < deadline:
        if popen is not None and popen.poll() is not None:
            log = f": {tail(log_path)}" if log_path is not None else ""
            raise RuntimeError(f"{what}: process exited with {popen.returncode}{log}")
        try:
            result = check()
            if result:
                return result
        except errors as e:
            last = e
        time.sleep(interval)
    log = f"; log: {tail(log_path)}" if log_path is not None else ""
    raise TimeoutError(f"{what}: not ready within {timeout:g}s (last error: {last}){log}")
