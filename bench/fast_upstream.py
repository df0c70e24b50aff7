"""A fast fake vLLM embedding server for the benchmark: raw asyncio (uvloop when available) HTTP/1.1.

It answers, on keep-alive connections:
  POST /v1/embeddings  a fixed, realistic ~20 KB vLLM embeddings body (one 1024-dim float vector,
                       compact JSON as vLLM writes it) after a fixed delay (default 2 ms);
  GET  /health         200 with an empty body;
  GET  /v1/models      the recorded vLLM model list, with the model id `bench-embed`;
  anything else        404 JSON.
The request body is read (Content-Length or chunked) and ignored, so the upstream costs the same for
every proxy in front of it. Kept deliberately tiny so that nearly all of core 0 is left to the proxy.

With --per-item-ms X it stands in for a GPU whose time grows with the work (the splitting rows):
  POST /v1/embeddings  one vector per input (float or base64 as asked), after delay + X ms per input;
  POST /v1/rerank      a score for every document, after delay + X ms per document.
The request is parsed (to count its items); the answer, which depends only on the item count and
the format, is printed once per count and kept (a response template), so the fake's own printing
costs nothing per request and its time is the per-item delay plus sending the bytes, as for a
vLLM whose printing were free; the rows measure the gateway, not the fake.

Run: python bench/fast_upstream.py --port N [--delay-ms 2] [--dim 1024] [--model bench-embed] [--per-item-ms 0]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import math
import os
import random
import signal
import struct
import time
from pathlib import Path

FIXTURES = Path(os.environ.get(
    "VLLM_FIXTURES", Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "vllm-0.32-cpu"))


def recorded(name: str) -> dict:
    """One recorded vLLM answer from the repository's fixtures; a missing one stops the benchmark."""
    path = FIXTURES / f"{name}.json"
    try:
        return json.loads(path.read_text())["response"]
    except (OSError, KeyError, ValueError) as e:
        raise SystemExit(f"fast_upstream: cannot read the recorded vLLM answer {path} ({e}); it is part of "
                         "the repository (tests/fixtures), re-record with scripts/record_vllm_fixtures.py")


def _f32(x: float) -> float:
    return struct.unpack("<f", struct.pack("<f", x))[0]


def embeddings_body(model: str, dim: int) -> bytes:
    """vLLM's compact JSON for one embedding: the recorded 384-float vector, extended to `dim` floats
    (deterministic pseudo-random float32 values of the same magnitude), L2-normalised."""
    vec: list[float] = list(recorded("embed_float_single")["data"][0]["embedding"])
    rng = random.Random(1024)
    while len(vec) < dim:
        vec.append(rng.gauss(0.0, 1.0 / math.sqrt(384)))
    vec = vec[:dim]
    norm = math.sqrt(sum(x * x for x in vec)) or 1.0
    vec = [_f32(x / norm) for x in vec]
    doc = {"id": "embd-b3c1f2a4d5e6f708", "object": "list", "created": int(time.time()), "model": model,
           "data": [{"index": 0, "object": "embedding", "embedding": vec}],
           "usage": {"prompt_tokens": 4, "total_tokens": 4, "completion_tokens": 0,
                     "prompt_tokens_details": None, "completion_tokens_details": None}}
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()


def models_body(model: str) -> bytes:
    doc = recorded("embed_models")
    doc["data"] = doc["data"][:1]
    doc["data"][0]["id"] = model
    doc["data"][0]["root"] = f"/models/{model}"
    return json.dumps(doc, separators=(",", ":")).encode()


def response(status: str, body: bytes, content_type: bytes = b"application/json") -> bytes:
    return (b"HTTP/1.1 " + status.encode() + b"\r\ndate: Thu, 01 Jan 2026 00:00:00 GMT\r\nserver: uvicorn\r\n"
            b"content-length: " + str(len(body)).encode() + b"\r\ncontent-type: " + content_type + b"\r\n\r\n"
            + body)


class Server:
    def __init__(self, model: str, dim: int, delay_s: float, per_item_s: float = 0.0) -> None:
        self.delay_s = delay_s
        self.per_item_s = per_item_s
        self.model = model
        vec = json.loads(embeddings_body(model, dim))["data"][0]["embedding"]
        self.vector_json = json.dumps(vec, separators=(",", ":"))
        self.vector_b64 = '"' + base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode() + '"'
        self.embed = response("200 OK", embeddings_body(model, dim))
        self.models = response("200 OK", models_body(model))
        self.health = response("200 OK", b"", b"text/plain; charset=utf-8")
        self.not_found = response("404 Not Found", b'{"detail":"Not Found"}')
        self.bad = response("400 Bad Request", b'{"detail":"Bad Request"}')
        self.printed: dict[tuple[str, int, bool], bytes] = {}  # per-item answers by (path, items, base64)

    def per_item(self, path: str, body: bytes) -> tuple[float, bytes]:
        """(delay, answer) of the per-item mode: one vector per input, a score per document."""
        doc = json.loads(body)
        if path == "/v1/rerank":
            n = len(doc.get("documents") or [])
            key = (path, n, False)
        else:
            inputs = doc.get("input")
            n = 1 if isinstance(inputs, str) else len(inputs or [])
            key = (path, n, doc.get("encoding_format") == "base64")
        answer = self.printed.get(key)
        if answer is None:
            if len(self.printed) > 64:
                self.printed.clear()
            answer = self.printed[key] = response("200 OK", self.print_answer(*key))
        return self.delay_s + self.per_item_s * n, answer

    def print_answer(self, path: str, n: int, b64: bool) -> bytes:
        """vLLM's compact JSON answer for `n` items (vLLM 0.32's shape)."""
        if path == "/v1/rerank":
            results = [{"index": i, "relevance_score": ((i * 2654435761) % 1000) / 1000.0} for i in range(n)]
            results.sort(key=lambda r: -r["relevance_score"])
            return json.dumps({"id": "score-bench", "model": self.model, "results": results,
                               "usage": {"prompt_tokens": 4 * n, "total_tokens": 4 * n}}).encode()
        emb = self.vector_b64 if b64 else self.vector_json
        data = ",".join(f'{{"index":{i},"object":"embedding","embedding":{emb}}}' for i in range(n))
        return (f'{{"id":"embd-bench","object":"list","created":0,"model":"{self.model}","data":[{data}],'
                f'"usage":{{"prompt_tokens":{4 * n},"total_tokens":{4 * n},"completion_tokens":0,'
                f'"prompt_tokens_details":null,"completion_tokens_details":null}}}}').encode()


class HTTP(asyncio.Protocol):
    __slots__ = ("srv", "loop", "transport", "buf", "closing")

    def __init__(self, srv: Server, loop: asyncio.AbstractEventLoop) -> None:
        self.srv, self.loop = srv, loop
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.closing = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while self.buf and not self.closing:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buf[:end].decode("latin-1")
            lines = head.split("\r\n")
            try:
                method, target, version = lines[0].split(" ", 2)
            except ValueError:
                self._send(self.srv.bad, close=True)
                return
            headers = {}
            for line in lines[1:]:
                k, _, v = line.partition(":")
                headers[k.strip().lower()] = v.strip()
            pos = end + 4
            if "chunked" in headers.get("transfer-encoding", "").lower():
                while True:  # skip the chunked body; wait for more data if incomplete
                    eol = self.buf.find(b"\r\n", pos)
                    if eol < 0:
                        return
                    size = int(self.buf[pos:eol].split(b";")[0] or b"0", 16)
                    if size == 0:
                        tail = self.buf.find(b"\r\n\r\n", eol)
                        if self.buf[eol:eol + 4] == b"\r\n\r\n":
                            pos = eol + 4
                            break
                        if tail < 0:
                            return
                        pos = tail + 4
                        break
                    if len(self.buf) < eol + 2 + size + 2:
                        return
                    pos = eol + 2 + size + 2
            else:
                length = int(headers.get("content-length", "0") or 0)
                if len(self.buf) < pos + length:
                    return
                pos += length
            body = self.buf[end + 4:pos]
            self.buf = self.buf[pos:]
            close = headers.get("connection", "").lower() == "close" or version == "HTTP/1.0"
            path = target.split("?", 1)[0]
            if method == "POST" and path in ("/v1/embeddings", "/v1/rerank") and self.srv.per_item_s > 0:
                delay, answer = self.srv.per_item(path, body)
                self.loop.call_later(delay, self._send, answer, close)
            elif method == "POST" and path == "/v1/embeddings":
                if self.srv.delay_s > 0:
                    self.loop.call_later(self.srv.delay_s, self._send, self.srv.embed, close)
                else:
                    self._send(self.srv.embed, close)
            elif method == "GET" and path == "/health":
                self._send(self.srv.health, close)
            elif method == "GET" and path == "/v1/models":
                self._send(self.srv.models, close)
            else:
                self._send(self.srv.not_found, close)
            if close:
                self.closing = True

    def _send(self, data: bytes, close: bool = False) -> None:
        t = self.transport
        if t is None or t.is_closing():
            return
        t.write(data)
        if close:
            t.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--delay-ms", type=float, default=2.0)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--model", default="bench-embed")
    p.add_argument("--per-item-ms", type=float, default=0.0,
                   help="answer one vector per input / a score per document, this much later per item")
    a = p.parse_args()
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    srv = Server(a.model, a.dim, a.delay_ms / 1000.0, a.per_item_ms / 1000.0)
    server = loop.run_until_complete(
        loop.create_server(lambda: HTTP(srv, loop), a.host, a.port, backlog=4096, reuse_address=True))
    stop = loop.create_future()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, lambda: stop.done() or stop.set_result(None))
    print(f"fast upstream on http://{a.host}:{a.port} (embeddings body {len(srv.embed)} bytes, "
          f"delay {a.delay_ms} ms)", flush=True)
    loop.run_until_complete(stop)
    server.close()
    loop.close()


if __name__ == "__main__":
    main()
