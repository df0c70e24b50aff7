"""A small pipelined Redis client for the admission's hot path: one connection, many commands in flight.

redis-py's asyncio client spends around a hundred microseconds of Python on each call (a pool, a
connection object, a parser and a lock per call); with one admission per request that cost more than
the request itself (bench/). This client keeps ONE connection per process (TCP, TLS or a unix socket)
and lets every caller's command go out on it at once: replies come back in the order the commands
were sent (RESP), so each is handed to its caller first in, first out. Commands issued within one turn
of the event loop leave in one write; hiredis parses the replies.

- `call(*args)` returns a future of the reply (an error reply raises RespError from it);
- `send(*args, on_reply=f)` queues a command whose reply nobody awaits (`f(reply)` if given);
- `script(s, keys, args, on_reply)` runs a Lua `Script` by EVALSHA; a server that does not know it
  (NOSCRIPT: a restart, SCRIPT FLUSH) gets it once by EVAL. Every connection loads the registered
  scripts (SCRIPT LOAD) before anything else is sent on it;
- `before_flush`: callables run just before each write, for callers that batch (the lease releases).

Failures: a connect that fails or takes longer than `connect_timeout`, a reply that does not come
within `timeout` seconds of its command, a lost connection or a garbled reply end the connection and
fail every command still waiting with RespConnectionError (a ConnectionError, so an OSError). The
next command connects again: nothing needs restarting once Redis is back.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import ssl
from collections import deque
from typing import Any, Callable, Iterable

import hiredis
from redis.asyncio.connection import SSLConnection, parse_url

log = logging.getLogger("erproxy.redis")

WATCH_EVERY_S = 0.1  # how often a connection checks that its oldest command is not overdue


class RespError(Exception):
    """An error reply of Redis (NOSCRIPT, WRONGTYPE, a Lua error, NOAUTH...)."""


class RespConnectionError(ConnectionError):
    """Redis could not be reached, stopped answering, or the connection broke."""


def encode(args: Iterable[Any]) -> bytes:
    """The RESP array of bulk strings of a command (str, bytes, int or float arguments)."""
    parts = [b""]
    n = 0
    for a in args:
        if a.__class__ is not bytes:
            a = a.encode() if a.__class__ is str else str(a).encode()
        parts.append(b"$%d\r\n%b\r\n" % (len(a), a))
        n += 1
    parts[0] = b"*%d\r\n" % n
    return b"".join(parts)


def bulk(a: Any) -> bytes:
    """One argument as a RESP bulk string."""
    if a.__class__ is not bytes:
        a = a.encode() if a.__class__ is str else str(a).encode()
    return b"$%d\r\n%b\r\n" % (len(a), a)


class Script:
    """A Lua script, known to Redis by its SHA-1."""

    def __init__(self, text: str) -> None:
        self.text = text.encode()
        self.sha = hashlib.sha1(self.text).hexdigest().encode()
        self._sha_bulk = bulk(self.sha)
        self._text_bulk = bulk(self.text)

    def head(self, nargs: int, by_sha: bool = True) -> bytes:
        """The start of an EVALSHA (or EVAL) command followed by `nargs` arguments (numkeys, keys, args)."""
        if by_sha:
            return b"*%d\r\n$7\r\nEVALSHA\r\n%b" % (nargs + 2, self._sha_bulk)
        return b"*%d\r\n$4\r\nEVAL\r\n%b" % (nargs + 2, self._text_bulk)

    def tail(self, keys: list[Any], args: list[Any]) -> tuple[int, bytes]:
        """(number of arguments, their RESP bytes) after the script: numkeys, keys, args."""
        return 1 + len(keys) + len(args), bulk(len(keys)) + b"".join(bulk(a) for a in (*keys, *args))


Waiter = Any  # asyncio.Future | Callable[[reply], None] | None


class _Protocol(asyncio.Protocol):
    def __init__(self, client: "RespClient") -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.client._received(self, data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.client._lost(self, exc)


class RespClient:
    def __init__(self, url: str, *, timeout: float = 2.0, connect_timeout: float = 1.0) -> None:
        opts = parse_url(url)
        self.path: str | None = opts.get("path")
        self.host: str = opts.get("host") or "localhost"
        self.port = int(opts.get("port") or 6379)
        self.db = int(opts.get("db") or 0)
        self.username: str | None = opts.get("username")
        self.password: str | None = opts.get("password")
        self.ssl: ssl.SSLContext | None = None
        if opts.get("connection_class") is SSLConnection:
            # built by redis-py itself from the URL's ssl_* options (client certificate, CA file or folder,
            # ssl_cert_reqs, ssl_check_hostname...), so this client and the gateway's redis-py clients
            # (usage, cache, revocations) connect, verify and present certificates alike
            self.ssl = SSLConnection(**{k: v for k, v in opts.items() if k.startswith("ssl_")}).ssl_context.get()
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.scripts: list[Script] = []  # loaded on every new connection before anything else
        self.before_flush: list[Callable[[], None]] = []
        self.loop: asyncio.AbstractEventLoop | None = None
        self._proto: _Protocol | None = None  # the connection (from its handshake on)
        self._ready = False  # its handshake (AUTH, SELECT) answered: queued commands may be written
        self._connecting: asyncio.Task[None] | None = None
        self._waiters: deque[tuple[Waiter, float, Script | None, int, bytes]] = deque()
        self._out: list[bytes] = []  # commands not yet written, in the order of the last len(_out) waiters
        self._flush_pending = False
        self._watchdog: asyncio.TimerHandle | None = None
        self._reader = self._new_reader()
        self.closed = False

    @staticmethod
    def _new_reader() -> Any:
        return hiredis.Reader(replyError=RespError)

    def register(self, script: Script) -> Script:
        self.scripts.append(script)
        return script

    @property
    def connected(self) -> bool:
        return self._ready

    # ---- issuing commands ------------------------------------------------------------------------
    def call(self, *args: Any) -> asyncio.Future[Any]:
        fut = asyncio.get_running_loop().create_future()
        self._queue(encode(args), fut, None, 0, b"")
        return fut

    def send(self, *args: Any, on_reply: Callable[[Any], None] | None = None) -> None:
        self._queue(encode(args), on_reply, None, 0, b"")

    def script(self, script: Script, keys: list[Any], args: list[Any], on_reply: Waiter = None) -> None:
        nargs, tail = script.tail(keys, args)
        self.script_raw(script, nargs, tail, on_reply)

    def script_raw(self, script: Script, nargs: int, tail: bytes, on_reply: Waiter) -> None:
        """EVALSHA with arguments already encoded (`Script.tail`): for callers that cache them."""
        self._queue(script.head(nargs) + tail, on_reply, script, nargs, tail)

    async def call_script(self, script: Script, keys: list[Any], args: list[Any]) -> Any:
        fut = asyncio.get_running_loop().create_future()
        self.script(script, keys, args, fut)
        return await fut

    def _queue(self, payload: bytes, waiter: Waiter, script: Script | None, nargs: int, tail: bytes) -> None:
        if self.closed:
            self._settle(waiter, RespConnectionError("the Redis client is closed"))
            return
        if self._proto is None:
            self._start_connecting()
        loop = self.loop
        assert loop is not None
        self._out.append(payload)
        self._waiters.append((waiter, loop.time(), script, nargs, tail))
        if not self._flush_pending and self._ready:
            self._flush_pending = True
            loop.call_soon(self._flush)

    def request_flush(self) -> None:
        """Run `before_flush` and write at the end of this turn of the loop (nothing queued needed)."""
        if not self._flush_pending and self._ready and self.loop is not None:
            self._flush_pending = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        for hook in self.before_flush:  # what they queue goes out in this write (no second flush scheduled)
            try:
                hook()
            except Exception:  # noqa: BLE001 - a hook's bug must not stop every later write
                log.exception("a Redis client flush hook failed")
        self._flush_pending = False
        proto, out = self._proto, self._out
        if proto is None or not self._ready or not out or proto.transport is None:
            return
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        proto.transport.write(data)

    # ---- replies ---------------------------------------------------------------------------------
    def _received(self, proto: _Protocol, data: bytes) -> None:
        if proto is not self._proto:
            return
        reader = self._reader
        waiters = self._waiters
        try:
            reader.feed(data)
            while True:
                reply = reader.gets()
                if reply is False:
                    return
                waiter, _, script, nargs, tail = waiters.popleft()
                if script is not None and reply.__class__ is RespError and str(reply).startswith("NOSCRIPT"):
                    self._queue(script.head(nargs, by_sha=False) + tail, waiter, None, 0, b"")
                    continue
                self._settle(waiter, reply)
        except (hiredis.ProtocolError, IndexError) as e:  # garbage, or a reply nobody asked for
            self._fail(RespConnectionError(f"unexpected data from Redis ({type(e).__name__}: {e})"))

    @staticmethod
    def _settle(waiter: Waiter, reply: Any) -> None:
        if waiter is None:
            return
        if isinstance(waiter, asyncio.Future):
            if not waiter.done():
                if isinstance(reply, BaseException):
                    waiter.set_exception(reply)
                else:
                    waiter.set_result(reply)
            return
        try:
            waiter(reply)
        except Exception:  # noqa: BLE001 - a callback's bug must not break the connection
            log.exception("a Redis reply callback failed")

    # ---- the connection --------------------------------------------------------------------------
    def _start_connecting(self) -> None:
        if self._connecting is None:
            self.loop = asyncio.get_running_loop()
            self._connecting = self.loop.create_task(self._connect())

    async def _connect(self) -> None:
        loop = self.loop
        assert loop is not None
        proto: _Protocol | None = None
        try:
            async with asyncio.timeout(self.connect_timeout):
                if self.path:
                    _, proto = await loop.create_unix_connection(lambda: _Protocol(self), self.path)
                else:
                    _, proto = await loop.create_connection(lambda: _Protocol(self), self.host, self.port,
                                                            ssl=self.ssl,
                                                            server_hostname=self.host if self.ssl else None)
                # The handshake goes first, alone; what callers queued meanwhile follows once it is
                # answered (so a wrong password fails them as a connection error, not NOAUTH each).
                handshake: list[tuple[bytes, Waiter]] = []
                checks: list[asyncio.Future[Any]] = []
                if self.password:
                    auth = [b"AUTH", self.username, self.password] if self.username else [b"AUTH", self.password]
                    checks.append(loop.create_future())
                    handshake.append((encode(auth), checks[-1]))
                if self.db:
                    checks.append(loop.create_future())
                    handshake.append((encode([b"SELECT", self.db]), checks[-1]))
                for s in self.scripts:
                    handshake.append((encode([b"SCRIPT", b"LOAD", s.text]), None))
                now = loop.time()
                self._waiters.extendleft(reversed([(w, now, None, 0, b"") for _, w in handshake]))
                self._reader = self._new_reader()
                self._proto = proto
                if handshake:
                    assert proto.transport is not None
                    proto.transport.write(b"".join(payload for payload, _ in handshake))
                self._watchdog = loop.call_later(WATCH_EVERY_S, self._watch)
                for check in checks:
                    await check  # a wrong password or db: RespError, the connection is dropped
                self._ready = True
                self._flush()
        except asyncio.CancelledError:
            self._connecting = None  # before the callbacks run: a command they queue starts a new attempt
            self._fail(RespConnectionError("connecting to Redis was cancelled"), proto)
            raise
        except BaseException as e:  # noqa: BLE001 - refused, timed out, TLS, AUTH...
            what = "timed out" if isinstance(e, TimeoutError) else f"{type(e).__name__}: {e}"
            self._connecting = None
            self._fail(RespConnectionError(f"cannot connect to Redis ({what})"), proto)
        finally:
            if self._connecting is asyncio.current_task():
                self._connecting = None

    def _watch(self) -> None:
        self._watchdog = None
        if self._proto is None or self.loop is None:
            return
        now = self.loop.time()
        if self._waiters and self._waiters[0][1] + self.timeout < now:
            self._fail(RespConnectionError(f"Redis did not answer within {self.timeout:g} s"))
            return
        self._watchdog = self.loop.call_later(WATCH_EVERY_S, self._watch)

    def _lost(self, proto: _Protocol, exc: Exception | None) -> None:
        if proto is self._proto:
            self._fail(RespConnectionError(f"the connection to Redis was lost ({exc or 'closed by the server'})"))

    def _fail(self, exc: BaseException, proto: _Protocol | None = None) -> None:
        """End the connection; every command waiting on it (or queued for it) fails with `exc`."""
        proto = proto or self._proto
        self._proto = None
        self._ready = False
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        if proto is not None and proto.transport is not None:
            proto.transport.abort()
        waiters, self._waiters = self._waiters, deque()
        self._out.clear()
        self._reader = self._new_reader()
        for waiter, *_ in waiters:
            self._settle(waiter, exc)

    async def close(self) -> None:
        """Wait for what is in flight (at most `timeout`), then close; later commands fail at once."""
        if self._connecting is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._connecting), self.connect_timeout + 0.5)
            except (asyncio.TimeoutError, Exception):  # noqa: BLE001
                pass
        if self._proto is not None:
            self._flush()
            try:
                await asyncio.wait_for(self.call(b"PING"), self.timeout)
            except (asyncio.TimeoutError, Exception):  # noqa: BLE001
                pass
        self.closed = True
        if self._connecting is not None:
            self._connecting.cancel()
        self._fail(RespConnectionError("the Redis client is closed"))
