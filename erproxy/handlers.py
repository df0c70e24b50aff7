"""The route handlers, one per endpoint, and the route table that names them.

A handler runs after routing, authentication and admission (app.py): it validates the body
(protocol.py), forwards it (`Forwarder`), and shapes the answer. Nothing here knows ASGI beyond
Request and Response.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from dataclasses import replace
from typing import Any, Awaitable, TypeVar

import orjson

from . import __version__
from .asgi import ClientGone, Request, Response, json_response
from .auth import check_model_allowed, presented_key
from .dialects import Dialects, dialect_routes
from .errors import bad_gateway, token_ids_not_accepted, unauthorized, upstream_error
from .metrics import Metrics, prompt_tokens
from .protocol import apply_query_instruction, client_json, is_qwen3_embedding, parse_embeddings
from .routing import Route, RouteTable
from .schemas import EmbeddingsRequest, EmbeddingsResponse, Health, ModelList
from .split import Items, auto_truncate, check_status, embeddings_answer
from .upstreams import KINDS, UpstreamResponse, Upstreams
from .cache import ItemCache

DISCONNECT_WATCH_AFTER_S = 0.05
T = TypeVar("T")


def route_table(h: Handlers) -> RouteTable:
    return RouteTable([
        Route("/health", ("GET",), h.health, public=True, summary="Gateway and replica health", tags=("status",),
              response_model=Health, responses={503: "A model kind has no reachable replica (`status: degraded`)."}),
        Route("/metrics", ("GET",), h.metrics_route, public=True,  # checks METRICS_TOKEN itself
              summary="Prometheus metrics (text format)", tags=("status",),
              responses={401: "METRICS_TOKEN is set and the request does not send it as a bearer token."}),
        Route("/v1/models", ("GET",), h.models, summary="List the served models", tags=("models",),
              response_model=ModelList),
        *(Route(p, ("POST",), with_cache_headers(h.embeddings), summary="Create embeddings (OpenAI)", tags=("embeddings",),
                request_model=EmbeddingsRequest, response_model=EmbeddingsResponse)
          for p in ("/v1/embeddings", "/embeddings")),
        # every rerank route, TEI /embed, Cohere /v1/embed and /v2/embed
        *(replace(r, handler=with_cache_headers(r.handler)) for r in dialect_routes(Dialects(h))),
    ])


def with_cache_headers(handler: Any) -> Any:
    """Every embeddings and rerank answer says what the item cache did: X-Cache-Hits, X-Cache-Misses."""
    async def counted(req: Request) -> Response:
        resp = await handler(req)
        resp.headers = [*resp.headers, (b"x-cache-hits", b"%d" % req.cache_hits),
                        (b"x-cache-misses", b"%d" % req.cache_misses)]
        return resp
    counted.__doc__ = handler.__doc__
    counted.__name__ = getattr(handler, "__name__", "counted")
    return counted


class Forwarder:
    """Forwards a request body to an upstream; a client that disconnects meanwhile cancels it.

    Watching for the disconnect takes a task, so it is armed only once the upstream has taken
    DISCONNECT_WATCH_AFTER_S: most answers come sooner and never pay for it.
    """

    def __init__(self, upstreams: Upstreams, metrics: Metrics) -> None:
        self.upstreams = upstreams
        self.metrics = metrics

    async def __call__(self, req: Request, kind: str, model: str | None, path: str, body: bytes) -> UpstreamResponse:
        t0 = time.perf_counter()
        try:
            resp = await self._watched(req, self.upstreams.post(kind, model, path, body))
        finally:
            req.upstream_s = time.perf_counter() - t0
        req.upstream = resp.replica.url
        self.metrics.observe_upstream(kind, resp.replica.url, req.upstream_s)
        return resp

    async def many(self, req: Request, kind: str, model: str | None, path: str, bodies: list[bytes]
                   ) -> list[UpstreamResponse]:
        """Post `bodies` concurrently (split.py's chunks), each retried like a whole request; the first
        that fails for good (transport error or non-200 answer) ends the call and cancels the others."""
        if len(bodies) == 1:
            return [check_status(await self(req, kind, model, path, bodies[0]), kind)]

        # MAX_ANSWER_BYTES bounds what the request's answers add up to, whatever the number of parts
        share = max(1, self.upstreams.max_answer_bytes // len(bodies))

        async def one(body: bytes) -> UpstreamResponse:
            t = time.perf_counter()
            resp = check_status(await self.upstreams.post(kind, model, path, body, max_answer_bytes=share), kind)
            self.metrics.observe_upstream(kind, resp.replica.url, time.perf_counter() - t)
            return resp

        t0 = time.perf_counter()
        try:
            resps = await self._watched(req, all_or_first_error([one(b) for b in bodies]))
        finally:
            req.upstream_s = time.perf_counter() - t0
        req.upstream = ",".join(dict.fromkeys(r.replica.url for r in resps))
        return resps

    async def _watched(self, req: Request, work: Awaitable[T]) -> T:
        """`work`, cancelled when the client disconnects meanwhile (ClientGone)."""
        task = asyncio.current_task()
        assert task is not None
        state: dict[str, Any] = {"gone": False, "watcher": None}

        async def watch_disconnect() -> None:
            while True:
                message = await req.receive()
                if message["type"] == "http.disconnect":
                    state["gone"] = True
                    task.cancel()
                    return

        def arm() -> None:
            state["watcher"] = loop.create_task(watch_disconnect())

        loop = asyncio.get_running_loop()
        timer = loop.call_later(DISCONNECT_WATCH_AFTER_S, arm)
        try:
            return await work
        except asyncio.CancelledError:
            if state["gone"]:
                raise ClientGone() from None
            raise
        finally:
            timer.cancel()
            if state["watcher"] is not None:
                state["watcher"].cancel()


async def all_or_first_error(coros: list[Awaitable[T]]) -> list[T]:
    """Every result in order, or the first error (in the order given) with the others cancelled."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for t in tasks:
            if t.done() and not t.cancelled() and t.exception() is not None:
                raise t.exception()  # type: ignore[misc]
        return [t.result() for t in tasks]
    finally:
        for t in tasks:
            if not t.done():
                t.cancel()
            # the errors of the others are this request's too, and answered with the first: read them, or
            # asyncio prints each as "Task exception was never retrieved" with a traceback on stderr
            t.add_done_callback(_read_outcome)


def _read_outcome(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()


class Handlers:
    """One method per endpoint. Except for the public ones, the key is known and admitted before they run."""

    def __init__(self, upstreams: Upstreams, metrics: Metrics, *, query_instruction: str,
                 metrics_token: str | None, accept_token_ids: bool = False, auto_truncate: bool = False,
                 cache: ItemCache | None = None, split_inputs: int = 32, split_documents: int = 32) -> None:
        self.upstreams = upstreams
        self.metrics = metrics
        self.query_instruction = query_instruction
        self.accept_token_ids = accept_token_ids  # else token-id input is refused (ids of another tokenizer)
        self.metrics_token = metrics_token
        self.forward = Forwarder(upstreams, metrics)
        self.auto_truncate = auto_truncate  # AUTO_TRUNCATE: cut too-long inputs unless a request says otherwise
        # the item cache and splitting across replicas (split.py), shared by every embeddings/rerank route
        self.items = Items(upstreams, self.forward, cache or ItemCache(0), metrics,
                           split_inputs=split_inputs, split_documents=split_documents)
        self.keys: Any = None  # the KeyStore, whose state /health shows (set by create_app)

    async def health(self, req: Request) -> Response:
        kinds: dict[str, Any] = {}
        degraded: list[str] = []
        for kind in KINDS:
            replicas = self.upstreams.replicas[kind]
            healthy = [r for r in replicas if r.healthy]
            kinds[kind] = {"healthy": len(healthy), "replicas": [r.state() for r in replicas]}
            if not healthy:
                degraded.append(kind)
        status = "degraded" if degraded else "ok"
        doc = {"status": status, "version": __version__, "upstreams": kinds}
        if self.keys is not None:
            doc["keys"] = self.keys.status()  # a missing or broken key file: served on the last good keys
        doc["cache"] = self.items.cache.state()
        if degraded:
            doc["unavailable"] = degraded
        return json_response(doc, 503 if degraded else 200)

    async def metrics_route(self, req: Request) -> Response:
        token = self.metrics_token
        if token:
            given = presented_key(req)
            if not given:  # a scraper not given the token yet: not a guess (auth_throttle)
                raise unauthorized("GET /metrics needs METRICS_TOKEN as 'Authorization: Bearer <token>'.",
                                   code="missing_metrics_token")
            if not hmac.compare_digest(given.encode(), token.encode()):
                raise unauthorized("GET /metrics needs METRICS_TOKEN as 'Authorization: Bearer <token>'.",
                                   code="invalid_metrics_token")
        body, ctype = self.metrics.render(self.upstreams)
        return Response(200, body, [(b"content-type", ctype.encode())])

    async def models(self, req: Request) -> Response:
        data: dict[str, dict[str, Any]] = {}
        for r in self.upstreams.all():
            for mid, info in r.models.items():
                entry = data.setdefault(mid, {
                    "id": mid, "object": "model", "created": info.created or 0, "owned_by": "vllm",
                    "root": info.root, "max_model_len": info.max_model_len, "type": r.kind, "replicas": [],
                })
                entry["replicas"].append({"url": r.url, "healthy": r.healthy, "in_flight": r.in_flight})
        return json_response({"object": "list", "data": list(data.values())})

    async def embeddings(self, req: Request) -> Response:
        body = req.body
        parsed = parse_embeddings(body)
        if parsed.token_ids and not self.accept_token_ids:
            raise token_ids_not_accepted()
        model = parsed.model or self.upstreams.default_model("embedding")
        req.model, req.items = model, parsed.items
        check_model_allowed(req.who, model)
        if self.auto_truncate and not parsed.token_ids and "truncate_prompt_tokens" not in parsed.doc:
            auto_truncate(parsed.doc, True)
            parsed.changed = True
        fmt = parsed.doc.get("encoding_format")
        mode = (self.items.plan(req, "embedding", model, parsed.items)
                if not parsed.token_ids and fmt in (None, "float", "base64")
                and "embed_dtype" not in parsed.doc and "endianness" not in parsed.doc else None)
        if mode is None:
            req.cache_hits, req.cache_misses = 0, parsed.items
        if parsed.changed or mode is not None:
            info = self.upstreams.model_info(model)
            apply_query_instruction(parsed, qwen3=is_qwen3_embedding(model, info.root if info else None),
                                    default_instruction=self.query_instruction)
            if model is not None:
                parsed.doc["model"] = model
        if mode is not None:  # the item path: cache, splitting, merged answer (split.py)
            doc = parsed.doc
            inp = doc["input"]
            texts = [inp] if isinstance(inp, str) else inp
            fields = {k: v for k, v in doc.items() if k not in ("input", "model", "encoding_format")}
            got = await self.items.embed(req, mode, model, texts, fields, text=fmt or "float")
            answer = embeddings_answer(got, fmt, model)
            tokens = got.prompt_tokens
        else:
            if parsed.changed:
                body = client_json(parsed.doc)
            resp = await self.forward(req, "embedding", model, "/v1/embeddings", body)
            if resp.status != 200:
                raise upstream_error(resp, "embedding")
            if not (resp.body.startswith(b"{") and resp.body.rstrip().endswith(b"}")):
                raise bad_gateway(f"The embedding upstream {resp.replica.url} answered something that is not JSON.")
            answer = resp.body
            tokens = prompt_tokens(resp.body)
        self.metrics.observe_items("embedding", model or "-", parsed.items, tokens)
        # the one place a request's upstream-processed prompt tokens are known (cached items count none)
        req.tokens = tokens or 0  # usage accounting and token limits (usage.py, token_limits.py)
        return Response(200, answer)
