"""A private redis-server for WORKERS>1 without REDIS_URL: started before the workers, stopped after them.

Several workers must share their state (exact rate, token and concurrency limits, revocations,
the item cache, usage counters); without REDIS_URL the gateway runs its own `redis-server` as a
child process: no TCP port (`--port 0`), a unix socket of mode 0700 and its data (append-only
file, so usage counters survive a restart) in `.redis/` beside API_KEYS_FILE. It answers PING
before uvicorn forks the workers, which get `REDIS_URL=unix://…/redis.sock`, and it is stopped
(SIGTERM: Redis writes its data and exits) once the workers have drained and flushed. It runs in
a session of its own, so a Ctrl-C to the terminal stops the gateway first and Redis after it; on
Linux it is also told to stop if the gateway dies without cleaning up (PR_SET_PDEATHSIG).

Without the `redis-server` binary the gateway refuses to start, saying how to install it or set
REDIS_URL.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from .util import term_with_parent

if TYPE_CHECKING:
    from .settings import Settings

log = logging.getLogger("erproxy.redis")

DIR_NAME = ".redis"
SOCKET_NAME = "redis.sock"
LOCK_NAME = "gateway.lock"  # held by the gateway that runs the private redis-server, for as long as it runs
LOG_NAME = "redis.log"
START_TIMEOUT_S = 15.0  # to answer PING once started (a server still loading its data is waited for)
LOCK_WAIT_S = 10.0  # for the folder's lock held by someone else: a keys command ends within it, a gateway not
RESTART_LIMIT = 5  # exits restarted within RESTART_WINDOW_S; one more and it is left down
RESTART_WINDOW_S = 60.0
STOP_TIMEOUT_S = 30.0
MAX_SOCKET_PATH = 100  # sun_path holds 108 bytes on Linux (104 on macOS)


class PrivateRedisError(RuntimeError):
    """The private redis-server cannot be started; the message says what to do."""


def data_dir(settings: "Settings") -> Path:
    """`.redis/` beside the key file (like er_usage.db): the socket, the append-only file, redis.log."""
    return Path(settings.api_keys_file).resolve().parent / DIR_NAME


def needed(settings: "Settings") -> bool:
    return settings.workers > 1 and not settings.redis_url


def missing_binary_message(settings: "Settings") -> str:
    return (f"WORKERS={settings.workers} without REDIS_URL needs redis-server, which is not installed (not on PATH): "
            "without a shared Redis the limits would be per process (each worker keeping its own rate limits "
            "and concurrency count), so clients would get up to WORKERS times the configured limits. "
            "Install it (apt-get install redis-server; make run does) and the gateway starts a private one, "
            "or set REDIS_URL=redis://host:6379/0, or use WORKERS=1.")


def ping(path: Path, timeout: float = 0.5) -> bytes | None:
    """The first bytes of a redis-server's answer to PING on `path` (b"+PONG", or b"-LOADING ..." while
    it reads its append-only file back); None when nothing answers."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(path))
            s.sendall(b"PING\r\n")
            return s.recv(16) or None
    except OSError:
        return None


def answers_ping(path: Path, timeout: float = 0.5) -> bool:
    """A redis-server runs on `path`: it answers PING, or says it is still loading its data."""
    reply = ping(path, timeout)
    return reply is not None and (reply.startswith(b"+PONG") or reply.startswith(b"-LOADING"))


class PrivateRedis:
    """One redis-server child on a unix socket in `directory`."""

    def __init__(self, directory: Path, binary: str | None = None) -> None:
        self.directory = directory
        self.socket = directory / SOCKET_NAME
        self.binary = binary
        self.popen: subprocess.Popen | None = None
        self.lock_fd: int | None = None
        self._exe: str | None = None
        self._stopping = threading.Event()
        self._restarts: list[float] = []

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def start(self) -> "PrivateRedis":
        exe = self.binary or binary()
        if not exe:
            raise PrivateRedisError("redis-server is not installed")
        if len(str(self.socket).encode()) > MAX_SOCKET_PATH:
            raise PrivateRedisError(f"the socket path {self.socket} is too long for a unix socket "
                                    f"(at most {MAX_SOCKET_PATH} bytes): move API_KEYS_FILE to a shorter path "
                                    "or set REDIS_URL")
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.directory, 0o700)
        self._lock()
        try:
            return self._start(exe)
        except BaseException:
            self.stop()
            raise

    def _lock(self) -> None:
        """One gateway per data folder: two redis-servers on one append-only file would corrupt it. The PING
        check below cannot see a gateway started at the same moment, before its Redis answers; the lock
        can (released by the kernel if the gateway dies)."""
        fd = os.open(self.directory / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        deadline = time.monotonic() + LOCK_WAIT_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                # a `keys usage` run (a billing export from cron, say) holds it for a second or two
                if time.monotonic() < deadline:
                    time.sleep(0.1)
                    continue
            os.close(fd)
            raise PrivateRedisError(
                f"another gateway with the same API_KEYS_FILE folder runs its private redis-server in "
                f"{self.directory}; stop it first, or give this one REDIS_URL=unix://{self.socket} to share it"
            ) from None
        self.lock_fd = fd

    def _start(self, exe: str) -> "PrivateRedis":
        if self.socket.exists() or self.socket.is_symlink():
            if answers_ping(self.socket):
                raise PrivateRedisError(
                    f"a redis-server already answers on {self.socket}: another gateway with the same "
                    "API_KEYS_FILE folder is running; stop it first, or give this one REDIS_URL=unix://"
                    f"{self.socket} to share it")
            log.warning("removing the stale socket %s of a private redis-server that did not stop cleanly",
                        self.socket)
            self.socket.unlink()
        self._exe = exe
        cmd = [exe, "--port", "0", "--unixsocket", str(self.socket), "--unixsocketperm", "700",
               "--dir", str(self.directory), "--appendonly", "yes", "--appendfsync", "everysec", "--save", "",
               "--daemonize", "no", "--logfile", str(self.directory / LOG_NAME), "--pidfile", ""]
        self.popen = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL, start_new_session=True, cwd=self.directory,
                                      preexec_fn=term_with_parent)  # the child: SIGTERM if the gateway dies
        deadline = time.monotonic() + START_TIMEOUT_S
        loading_since = None
        while True:
            reply = ping(self.socket)
            if reply is not None and reply.startswith(b"+PONG"):
                break
            if reply is not None and reply.startswith(b"-LOADING"):
                # reading a large append-only file back takes as long as it takes: wait while it loads
                if loading_since is None:
                    loading_since = time.monotonic()
                    log.info("private redis-server (pid %d) is loading its data from %s; waiting",
                             self.popen.pid, self.directory)
                deadline = time.monotonic() + START_TIMEOUT_S
            if self.popen.poll() is not None or time.monotonic() > deadline:
                raise PrivateRedisError(f"the private redis-server did not start; its log "
                                        f"{self.directory / LOG_NAME} ends with:\n{self._log_tail()}")
            time.sleep(0.05)
        log.info("private redis-server (pid %d) on %s, data in %s%s", self.popen.pid, self.socket, self.directory,
                 "" if loading_since is None else f" (loaded in {time.monotonic() - loading_since:.1f}s)")
        return self

    def keep_running(self) -> None:
        """Watch the redis-server from a thread for as long as the gateway runs: if it exits (killed, out of
        memory), start it again on the same data (its append-only file keeps usage and revocations), so the
        workers, which answer 503 while it is gone, serve again within seconds. After RESTART_LIMIT exits
        within RESTART_WINDOW_S it is left down, with an error in the log."""
        threading.Thread(target=self._watch, name="private-redis-watch", daemon=True).start()

    def _watch(self) -> None:
        while not self._stopping.is_set():
            p = self.popen
            if p is None:
                return
            code = p.wait()
            if self._stopping.is_set() or self.popen is not p:
                return
            now = time.monotonic()
            self._restarts = [t for t in self._restarts if now - t < RESTART_WINDOW_S] + [now]
            if len(self._restarts) > RESTART_LIMIT:
                log.error("private redis-server (pid %d) exited with %s, the %d-th time in %gs: not restarted; "
                          "requests that need it get 503 until the gateway is restarted. Its log %s ends "
                          "with:\n%s", p.pid, code, len(self._restarts), RESTART_WINDOW_S,
                          self.directory / LOG_NAME, self._log_tail())
                return
            log.error("private redis-server (pid %d) exited with %s; starting it again on the same data",
                      p.pid, code)
            try:
                assert self._exe is not None  # set by the _start that launched `p`
                self._start(self._exe)
            except (PrivateRedisError, OSError) as e:
                log.error("private redis-server could not be started again: %s", e)
                return

    def stop(self) -> None:
        """SIGTERM (Redis fsyncs its append-only file and exits), then SIGKILL after STOP_TIMEOUT_S; then the
        folder's lock is given up."""
        try:
            self._stop_server()
        finally:
            if self.lock_fd is not None:
                os.close(self.lock_fd)  # releases the flock
                self.lock_fd = None

    def _stop_server(self) -> None:
        self._stopping.set()
        p = self.popen
        if p is None:
            return
        if p.poll() is None:
            p.terminate()
            try:
                p.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                log.error("private redis-server (pid %d) did not stop in %gs; killed", p.pid, STOP_TIMEOUT_S)
                p.kill()
                p.wait()
            else:
                log.info("private redis-server (pid %d) stopped", p.pid)
        self.popen = None

    def _log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join((self.directory / LOG_NAME).read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def binary() -> str | None:
    return shutil.which("redis-server")


def start_for(settings: "Settings") -> PrivateRedis:
    """The private Redis for these settings, answering PING; PrivateRedisError with what to do otherwise."""
    binary_path = binary()
    if not binary_path:
        raise PrivateRedisError(missing_binary_message(settings))
    return PrivateRedis(data_dir(settings), binary_path).start()


def running_url(settings: "Settings") -> str | None:
    """The URL of a gateway's private Redis that is running now (for the `keys` commands), else None.
    Whatever WORKERS this command was given: a gateway running on the same folder decides."""
    if settings.redis_url:
        return None
    path = data_dir(settings) / SOCKET_NAME
    return f"unix://{path}" if answers_ping(path) else None
