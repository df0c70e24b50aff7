"""The upstream hot path's HTTP/1.1 client: pooled keep-alive connections on an asyncio protocol,
responses parsed by httptools (the parser uvicorn uses).

Why not aiohttp's client here: on this project's bench machine one aiohttp `session.post` + `read`
costs 95-150 us of CPU against the fast fake vLLM, this client 16-40 us (`bench/client_bench.py`
measures both); that difference was most of what the gateway's features cost above the bare
pass-through floor. aiohttp stays for what is off the hot path (health checks, /v1/models).

What it does, and only that: POST (or GET) a body, read the whole answer (Content-Length or chunked),
keep the connection for the next request when the server allows it. A connection whose request was
cancelled, timed out or failed is closed, never reused. Failures are typed for upstreams.py:
`ConnectFailed` (refused, unreachable: the replica is down), `ConnectionDropped` (closed before a
complete answer: e.g. a keep-alive connection the server had just closed; `reused` says whether the
connection had served a request before), `InvalidResponse` (not HTTP), `AnswerTooLarge` (more bytes
than the request's `limit`: the connection is closed before they fill the gateway's memory),
and `asyncio.TimeoutError`.
"""

from __future__ import annotations

import asyncio
import errno
import ssl
import time
from collections import deque
from urllib.parse import urlsplit

import httptools

CONNECT_TIMEOUT_S = 5.0  # to open a connection to a replica (a LAN or loopback answers in well under 1 ms)
DEFAULT_MAX_ANSWER_BYTES = 256 * 1024 * 1024  # the MAX_ANSWER_BYTES setting's default


class UpstreamError(Exception):
    """A request to an upstream that got no HTTP answer."""


class ConnectFailed(UpstreamError):
    def __init__(self, os_error: OSError) -> None:
        super().__init__(str(os_error))
        self.os_error = os_error


class ConnectionDropped(UpstreamError):
    def __init__(self, message: str, reused: bool = False) -> None:
        super().__init__(message)
        self.reused = reused  # on a kept-alive connection (the server may just have closed it), not a new one


class InvalidResponse(UpstreamError):
    pass


class AnswerTooLarge(UpstreamError):
    pass


class _Connection(asyncio.Protocol):
    """One keep-alive connection: at most one request at a time."""

    __slots__ = ("transport", "parser", "waiter", "chunks", "closed", "keep_alive", "idle_since", "received",
                 "limit", "reused")

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.waiter: asyncio.Future[tuple[int, bytes]] | None = None
        self.chunks: list[bytes] = []
        self.closed = False
        self.keep_alive = True
        self.idle_since = 0.0
        self.received = 0  # bytes of the answer under way (head and body)
        self.limit = 0  # set by each request (HostPool.request)
        self.reused = False  # has answered a request before

    # -- asyncio.Protocol --
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.waiter is None:  # bytes nobody asked for: the connection is not usable any more
            self.abort()
            return
        self.received += len(data)
        if self.received > self.limit:
            self._fail(AnswerTooLarge(f"answer larger than {self.limit} bytes"))
            self.abort()
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as e:
            self._fail(InvalidResponse(f"invalid HTTP answer: {e}"))
            self.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail(ConnectionDropped(f"connection closed before a complete answer"
                                     f"{f' ({exc})' if exc else ''}", self.reused))

    # -- httptools callbacks --
    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)

    def on_message_complete(self) -> None:
        waiter, self.waiter = self.waiter, None
        self.keep_alive = self.parser.should_keep_alive()
        body = b"".join(self.chunks) if len(self.chunks) != 1 else self.chunks[0]
        self.chunks = []
        if waiter is not None and not waiter.done():
            waiter.set_result((self.parser.get_status_code(), body))

    # --
    def _fail(self, e: BaseException) -> None:
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(e)

    def timed_out(self) -> None:
        self._fail(asyncio.TimeoutError())
        self.abort()

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()


class HostPool:
    """Keep-alive connections to one upstream (`scheme://host:port[/prefix]`)."""

    def __init__(self, url: str, *, idle_timeout: float) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https"):
            raise ValueError(f"upstream URL must be http:// or https://, got {url!r}")
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.prefix = parts.path.rstrip("/").encode()
        self.ssl = ssl.create_default_context() if parts.scheme == "https" else None
        default_port = self.port == (443 if self.ssl else 80)
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.host_header = (host if default_port else f"{host}:{self.port}").encode()
        self.idle_timeout = idle_timeout
        self.idle: deque[_Connection] = deque()

    async def _connect(self, timeout: float) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                _, conn = await loop.create_connection(
                    _Connection, self.host, self.port, ssl=self.ssl,
                    server_hostname=self.host if self.ssl else None)
        except TimeoutError:  # (an OSError too) a host that is gone: no answer, not even a refusal
            raise ConnectFailed(OSError(errno.ETIMEDOUT, f"no connection within {timeout:g} s")) from None
        except OSError as e:
            raise ConnectFailed(e) from None
        return conn  # type: ignore[return-value]

    def _take_idle(self) -> _Connection | None:
        now = time.monotonic()
        while self.idle:
            conn = self.idle.pop()  # the most recently used: the likeliest to be alive
            if not conn.closed and now - conn.idle_since < self.idle_timeout:
                return conn
            conn.abort()
        return None

    async def request(self, method: bytes, path: str, body: bytes, timeout: float,
                      content_type: bytes = b"application/json", limit: int = DEFAULT_MAX_ANSWER_BYTES
                      ) -> tuple[int, bytes]:
        """(status, body) of the answer, of at most `limit` bytes; raises UpstreamError or asyncio.TimeoutError."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        # connecting gets a few seconds of the budget: a host that is down or cut off does not answer at
        # all, and the request should go to another replica rather than wait for the whole TIMEOUT
        conn = self._take_idle() or await self._connect(min(timeout, CONNECT_TIMEOUT_S))
        waiter = conn.waiter = loop.create_future()
        conn.received = 0
        conn.limit = limit
        head = b"%s %s%s HTTP/1.1\r\nHost: %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n" % (
            method, self.prefix, path.encode(), self.host_header, content_type, len(body))
        assert conn.transport is not None
        conn.transport.write(head + body if len(body) < 65536 else head)
        if len(body) >= 65536:
            conn.transport.write(body)
        timer = loop.call_at(deadline, conn.timed_out)
        try:
            status, data = await waiter
        except BaseException:  # cancelled, timed out, dropped: this connection is done
            conn.abort()
            raise
        finally:
            timer.cancel()
        if conn.keep_alive and not conn.closed:
            conn.reused = True
            conn.idle_since = time.monotonic()
            self.idle.append(conn)
        else:
            conn.abort()
        return status, data

    def close(self) -> None:
        while self.idle:
            self.idle.pop().abort()


class UpstreamClient:
    """One HostPool per upstream URL."""

    def __init__(self, *, idle_timeout: float) -> None:
        self.idle_timeout = idle_timeout
        self.pools: dict[str, HostPool] = {}

    def pool(self, url: str) -> HostPool:
        p = self.pools.get(url)
        if p is None:
            p = self.pools[url] = HostPool(url, idle_timeout=self.idle_timeout)
        return p

    async def post(self, url: str, path: str, body: bytes, timeout: float,
                   limit: int = DEFAULT_MAX_ANSWER_BYTES) -> tuple[int, bytes]:
        """`limit`: the most bytes the answer may have (Upstreams passes MAX_ANSWER_BYTES or a part's share)."""
        return await self.pool(url).request(b"POST", path, body, timeout, limit=limit)

    def close(self) -> None:
        for p in self.pools.values():
            p.close()
