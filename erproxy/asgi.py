"""Plain ASGI plumbing: the request and response objects, reading a body, sending an answer.

No framework and no middleware classes: every layer on the hot path costs throughput (bench/).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Awaitable, Callable

import orjson

from .errors import ApiError, body_too_large, body_too_slow
from .keys import Identity

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

JSON = b"application/json"


class Request:
    """What the handlers need to know of one HTTP request, plus what the access log records."""

    __slots__ = ("scope", "receive", "path", "method", "who", "model", "items", "upstream", "upstream_s", "start",
                 "body", "body_complete", "tokens", "token_ticket", "cache_hits", "cache_misses")

    def __init__(self, scope: Scope, receive: Receive) -> None:
        self.scope = scope
        self.receive = receive
        self.path: str = scope["path"]
        self.method: str = scope["method"]
        self.who: Identity | None = None
        self.model: str | None = None
        self.items: int | None = None
        self.upstream: str | None = None
        self.upstream_s = 0.0
        self.body = b""
        self.body_complete = False  # the client has sent all of its body (read_body saw the last part)
        self.tokens = 0  # prompt tokens the upstream processed (set by the handler); usage.py counts them
        self.token_ticket: object = None  # the token limit's mark of this request (token_limits.py)
        self.cache_hits = 0  # items answered from the item cache (split.py); usage accounting reads them
        self.cache_misses = 0  # items the upstream computed for this request
        self.start = time.perf_counter()

    def header(self, name: bytes) -> bytes | None:
        for k, v in self.scope["headers"]:
            if k == name:
                return v
        return None


class Response:
    __slots__ = ("status", "body", "headers")

    def __init__(self, status: int, body: bytes, headers: list[tuple[bytes, bytes]] | None = None) -> None:
        self.status = status
        self.body = body
        self.headers = headers or [(b"content-type", JSON)]


def json_response(doc: Any, status: int = 200) -> Response:
    return Response(status, orjson.dumps(doc))


def error_response(e: ApiError) -> Response:
    return Response(e.status, e.body(), [(b"content-type", JSON), *e.headers])


class ClientGone(Exception):
    """The client disconnected; nothing is sent back."""


async def read_body(req: Request, limit: int, timeout: float) -> bytes:
    """The whole body, at most `limit` bytes (else 413), within `timeout` seconds (else 408)."""
    declared = req.header(b"content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise body_too_large(limit)
    chunks: list[bytes] = []
    size = 0
    # A timer that cancels this task, rather than asyncio.timeout(): the same deadline for less work
    # on every request (bench/results/ANALYSIS.md).
    task = asyncio.current_task()
    assert task is not None
    expired = []
    timer = asyncio.get_running_loop().call_later(timeout, _expire, task, expired)
    try:
        while True:
            message = await req.receive()
            if message["type"] == "http.disconnect":
                raise ClientGone()
            chunk = message.get("body", b"")
            size += len(chunk)
            if not message.get("more_body", False):
                req.body_complete = True
            if size > limit:
                raise body_too_large(limit)
            chunks.append(chunk)
            if req.body_complete:
                break
    except asyncio.CancelledError:
        if expired and task.uncancel() == 0:
            raise body_too_slow(timeout) from None
        raise
    finally:
        timer.cancel()
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _expire(task: asyncio.Task[Any], expired: list[bool]) -> None:
    expired.append(True)
    task.cancel()


# After an answer that ends the connection (408, 413: `Connection: close`), what the client still
# sends is read and dropped for at most this long and this much, then the connection is closed:
# closing at once, with its upload still arriving, would reset the connection and could destroy
# the answer before the client reads it; reading on without a bound let a client hold the socket.
LINGER_S = 0.5
LINGER_BYTES = 4 * 1024 * 1024


def body_unread(req: Request) -> bool:
    """The request has a body the gateway has not read (answered before it: 401, 404, 405, a GET with a
    body): left to the server, it would be read and dropped to its end, with no size or time bound."""
    if req.body_complete:
        return False
    for name, value in req.scope["headers"]:
        if (name == b"content-length" and value.strip() != b"0") or name == b"transfer-encoding":
            return True
    return False


async def start_closing(req: Request, response: Response, send: Send) -> None:
    """Send all of `response` (its headers say `Connection: close`) but leave the exchange open.

    The body goes out with its Content-Length, so the client has the whole answer at once;
    `finish_closing` then ends the connection.
    """
    await send(response_start(req, response))
    await send({"type": "http.response.body", "body": response.body, "more_body": True})


async def finish_closing(req: Request, send: Send) -> None:
    """Read and drop what the client still sends (LINGER_S, LINGER_BYTES at most), then end: the server
    closes the connection after the last part of a `Connection: close` answer."""
    if not req.body_complete:
        drained = 0
        try:
            async with asyncio.timeout(LINGER_S):
                while drained < LINGER_BYTES:
                    message = await req.receive()
                    if message["type"] != "http.request":
                        break
                    drained += len(message.get("body", b""))
                    if not message.get("more_body", False):
                        break
        except TimeoutError:
            pass
    await send({"type": "http.response.body", "body": b"", "more_body": False})


def response_start(req: Request, response: Response) -> dict[str, Any]:
    """The response's start message, with its Content-Length (the body is whole: no chunked framing, which
    an HTTP/1.0 client cannot read) and a Server-Timing header: the gateway's time, the upstream's."""
    total = time.perf_counter() - req.start
    response.headers.append((b"content-length", str(len(response.body)).encode()))
    response.headers.append((b"server-timing", (
        f"gateway;dur={(total - req.upstream_s) * 1000:.3f}, upstream;dur={req.upstream_s * 1000:.3f}").encode()))
    return {"type": "http.response.start", "status": response.status, "headers": response.headers}
