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
                 "body")

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
    try:
        async with asyncio.timeout(timeout):
            while True:
                message = await req.receive()
                if message["type"] == "http.disconnect":
                    raise ClientGone()
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > limit:
                    raise body_too_large(limit)
                chunks.append(chunk)
                if not message.get("more_body", False):
                    break
    except TimeoutError:
        raise body_too_slow(timeout) from None
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def response_start(req: Request, response: Response) -> dict[str, Any]:
    """The response's start message, with a Server-Timing header: the gateway's time, the upstream's."""
    total = time.perf_counter() - req.start
    response.headers.append((b"server-timing", (
        f"gateway;dur={(total - req.upstream_s) * 1000:.3f}, upstream;dur={req.upstream_s * 1000:.3f}").encode()))
    return {"type": "http.response.start", "status": response.status, "headers": response.headers}
