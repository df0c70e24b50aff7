"""The ASGI application: wires keys, admission, upstreams and the routes in a lifespan.

A request goes auth -> admission -> route -> upstream -> response -> record, each stage in its own
module. Plain ASGI, no middleware classes: every layer on the hot path costs throughput.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from typing import Any, Awaitable, Callable
from urllib.parse import parse_qsl

import orjson

from . import __version__
from .admission import Admission, MemoryAdmission
from .errors import ApiError, bad_gateway, error_body, forbidden, unauthorized
from .keys import Identity, KeyStore
from .logs import log_access
from .metrics import Metrics, prompt_tokens
from .protocol import (
    apply_query_instruction,
    build_rerank_response,
    is_qwen3_embedding,
    parse_embeddings,
    parse_rerank,
)
from .settings import Settings
from .upstreams import KINDS, Upstreams, upstream_error

log = logging.getLogger("erproxy.app")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

JSON = b"application/json"
RERANK_PATHS = ("/v1/rerank", "/rerank", "/v2/rerank", "/api/v1/rerank")
KEY_RELOAD_INTERVAL_S = 0.5
DISCONNECT_WATCH_AFTER_S = 0.05


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

    def api_key(self) -> str | None:
        auth = self.header(b"authorization")
        if auth:
            scheme, _, value = auth.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and value.strip():
                return value.strip()
        qs = self.scope.get("query_string")
        if qs:
            params = dict(parse_qsl(qs.decode("latin-1")))
            return params.get("api_key") or params.get("access_token")
        return None


class Response:
    __slots__ = ("status", "body", "headers")

    def __init__(self, status: int, body: bytes, headers: list[tuple[bytes, bytes]] | None = None) -> None:
        self.status = status
        self.body = body
        self.headers = headers or [(b"content-type", JSON)]


def json_response(doc: Any, status: int = 200) -> Response:
    return Response(status, orjson.dumps(doc))


class Gateway:
    """ASGI callable. Create with `create_app(settings)`; the lifespan starts and stops everything."""

    def __init__(self, settings: Settings, admission: Admission | None = None) -> None:
        self.settings = settings
        self.admission: Admission = admission or make_admission(settings)
        self.keys = KeyStore(settings.api_keys_file, settings.access_token,
                             revoked_elsewhere=lambda: getattr(self.admission, "revoked_hashes", frozenset()))
        self.upstreams = Upstreams(
            settings.embedding_upstreams, settings.reranker_upstreams,
            timeout=settings.timeout, pool_size=settings.max_concurrent_requests,
            health_interval=settings.health_interval,
            default_models={"embedding": settings.embedding_model, "reranker": settings.reranker_model},
        )
        self.metrics = Metrics()
        self.started = False
        self._tasks: list[asyncio.Task[None]] = []
        self.routes: dict[str, dict[str, Callable[[Request], Awaitable[Response]]]] = {
            "/health": {"GET": self.health},
            "/metrics": {"GET": self.metrics_route},
            "/v1/models": {"GET": self.models},
            "/v1/embeddings": {"POST": self.embeddings},
            "/embeddings": {"POST": self.embeddings},
            **{p: {"POST": self.rerank} for p in RERANK_PATHS},
        }
        self.public = {"/health", "/metrics"}  # /metrics checks METRICS_TOKEN itself

    # ---- lifecycle -----------------------------------------------------------------------------
    async def startup(self) -> None:
        self.keys.load()
        await self.admission.start()
        await self.upstreams.start()
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self._watch_keys()))
        self._tasks.append(loop.create_task(self.metrics.refresh_loop(self.upstreams)))
        self.started = True

    async def shutdown(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.upstreams.close()
        await self.admission.close()
        self.metrics.worker_exiting()

    async def _watch_keys(self) -> None:
        while True:
            await asyncio.sleep(KEY_RELOAD_INTERVAL_S)
            try:
                if self.keys.reload_if_changed():
                    log.info("key file %s reloaded", self.keys.path)
            except Exception:  # noqa: BLE001 - a bad edit must not stop the watcher
                log.exception("key file reload failed")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self.handle(scope, receive, send)
        elif scope["type"] == "lifespan":
            await self.lifespan(receive, send)

    async def lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.startup()
                except Exception as e:  # noqa: BLE001
                    log.exception("start-up failed")
                    await send({"type": "lifespan.startup.failed", "message": str(e)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return

    # ---- request path ----------------------------------------------------------------------------
    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        req = Request(scope, receive)
        try:
            response = await self.dispatch(req)
        except ApiError as e:
            response = Response(e.status, e.body(), [(b"content-type", JSON), *e.headers])
        except _ClientGone:
            self.record(req, 499)
            return
        except Exception:  # noqa: BLE001 - never leak a traceback to the client
            log.exception("unhandled error on %s %s", req.method, req.path)
            response = Response(500, error_body("Internal gateway error; see the gateway log.",
                                                "server_error", "internal_error"))
        total = time.perf_counter() - req.start
        response.headers.append((b"server-timing", (
            f"gateway;dur={(total - req.upstream_s) * 1000:.3f}, upstream;dur={req.upstream_s * 1000:.3f}").encode()))
        await send({"type": "http.response.start", "status": response.status, "headers": response.headers})
        await send({"type": "http.response.body", "body": response.body})
        self.record(req, response.status)

    def record(self, req: Request, status: int) -> None:
        total = time.perf_counter() - req.start
        who = req.who.name if req.who else "-"
        route = req.path if req.path in self.routes else "other"
        # Labels only from known values: a client-chosen model name must not create metric series.
        model = req.model if req.model is None or self.upstreams.is_known_model(req.model) else "unknown"
        if route != "/metrics":
            self.metrics.observe_request(route, model or "-", status, who, total, req.upstream_s)
        log_access(who=who, method=req.method, route=req.path, model=req.model, items=req.items, status=status,
                   latency_ms=total * 1000, upstream=req.upstream)

    async def dispatch(self, req: Request) -> Response:
        methods = self.routes.get(req.path)
        if methods is None:
            if req.path.endswith("/") and req.path.rstrip("/") in self.routes:
                methods = self.routes[req.path.rstrip("/")]
            else:
                raise ApiError(404, f"No route {req.path}. Routes: /v1/embeddings, /v1/rerank, /v1/models, /health.",
                               type="invalid_request_error", code="not_found")
        handler = methods.get(req.method)
        if handler is None:
            raise ApiError(405, f"{req.method} is not allowed on {req.path}; use {', '.join(methods)}.",
                           type="invalid_request_error", code="method_not_allowed",
                           headers=[(b"allow", ", ".join(methods).encode())])
        if req.path in self.public:
            return await handler(req)
        key = req.api_key()
        if not key:
            raise unauthorized("Missing API key. Send 'Authorization: Bearer <key>' or add '?api_key=<key>'.",
                               code="missing_api_key")
        who = self.keys.authenticate(key)
        if isinstance(who, str):
            raise unauthorized(who)
        req.who = who
        try:
            await self.admission.check_rate(who)
        except ApiError as e:
            if e.status == 429:
                self.metrics.rejections.labels("rate_limit").inc()
            raise
        if req.method == "POST":
            # Read the whole body before taking a concurrency slot, under a deadline: a client that
            # trickles its body must not hold one of MAX_CONCURRENT_REQUESTS slots while it does.
            req.body = await self.read_body(req)
        try:
            slot = await self.admission.acquire()
        except ApiError as e:
            if e.status == 429:
                self.metrics.rejections.labels("concurrency").inc()
            raise
        self.metrics.in_flight.inc()
        try:
            return await handler(req)
        finally:
            self.metrics.in_flight.dec()
            await self.admission.release(slot)

    async def read_body(self, req: Request) -> bytes:
        limit = self.settings.max_body_bytes
        declared = req.header(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise _too_large(limit)
        chunks: list[bytes] = []
        size = 0
        try:
            async with asyncio.timeout(self.settings.body_timeout):
                while True:
                    message = await req.receive()
                    if message["type"] == "http.disconnect":
                        raise _ClientGone()
                    chunk = message.get("body", b"")
                    size += len(chunk)
                    if size > limit:
                        raise _too_large(limit)
                    chunks.append(chunk)
                    if not message.get("more_body", False):
                        break
        except TimeoutError:
            raise ApiError(408, f"The request body did not arrive within BODY_TIMEOUT={self.settings.body_timeout:g} s.",
                           type="invalid_request_error", code="request_timeout") from None
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def call_upstream(self, req: Request, kind: str, model: str | None, path: str, body: bytes):
        """Forward to an upstream; a client that disconnects meanwhile cancels the upstream request.

        Watching for the disconnect takes a task, so it is armed only once the upstream has taken
        DISCONNECT_WATCH_AFTER_S: most answers come sooner and never pay for it.
        """
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
        t0 = time.perf_counter()
        try:
            resp = await self.upstreams.post(kind, model, path, body)
        except asyncio.CancelledError:
            if state["gone"]:
                raise _ClientGone() from None
            raise
        finally:
            timer.cancel()
            if state["watcher"] is not None:
                state["watcher"].cancel()
            req.upstream_s = time.perf_counter() - t0
        req.upstream = resp.replica.url
        self.metrics.observe_upstream(kind, resp.replica.url, req.upstream_s)
        return resp

    # ---- routes ----------------------------------------------------------------------------------
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
        if degraded:
            doc["unavailable"] = degraded
        return json_response(doc, 503 if degraded else 200)

    async def metrics_route(self, req: Request) -> Response:
        token = self.settings.metrics_token
        if token:
            given = req.api_key() or ""
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
        model = parsed.model or self.upstreams.default_model("embedding")
        req.model, req.items = model, parsed.items
        check_model_allowed(req, model)
        candidates_model = parsed.model  # an omitted model goes to the embedding replicas
        if parsed.changed:
            info = self.upstreams.model_info(model)
            apply_query_instruction(parsed, qwen3=is_qwen3_embedding(model, info.root if info else None),
                                    default_instruction=self.settings.embedding_query_instruction)
            if model is not None:
                parsed.doc["model"] = model
            body = orjson.dumps(parsed.doc)
        resp = await self.call_upstream(req, "embedding", candidates_model or model, "/v1/embeddings", body)
        if resp.status != 200:
            raise upstream_error(resp, "embedding")
        if not (resp.body.startswith(b"{") and resp.body.rstrip().endswith(b"}")):
            raise bad_gateway(f"The embedding upstream {resp.replica.url} answered something that is not JSON.")
        label = model or "-"
        self.metrics.inputs.labels(label).inc(parsed.items)
        tokens = prompt_tokens(resp.body)
        if tokens:
            self.metrics.tokens.labels(label, "embedding").inc(tokens)
        return Response(200, resp.body)

    async def rerank(self, req: Request) -> Response:
        body = req.body
        parsed = parse_rerank(body)
        model = parsed.model or self.upstreams.default_model("reranker")
        req.model, req.items = model, parsed.items
        check_model_allowed(req, model)
        resp = await self.call_upstream(req, "reranker", parsed.model or model, "/v1/rerank",
                                        parsed.upstream_body(model))
        if resp.status != 200:
            raise upstream_error(resp, "reranker")
        try:
            out, usage = build_rerank_response(parsed, resp.body, model)
        except (ValueError, KeyError, TypeError):
            raise bad_gateway(f"The reranker upstream {resp.replica.url} answered something that is not a "
                              "rerank result.") from None
        label = model or "-"
        self.metrics.documents.labels(label).inc(parsed.items)
        if isinstance(usage.get("prompt_tokens"), int):
            self.metrics.tokens.labels(label, "reranker").inc(usage["prompt_tokens"])
        return Response(200, out)


def check_model_allowed(req: Request, model: str | None) -> None:
    allowed = req.who.models if req.who else None
    if allowed and model not in allowed:
        raise forbidden(f"This API key may only use the models {', '.join(allowed)}; `{model}` is not among them.")


class _ClientGone(Exception):
    """The client disconnected; nothing is sent back."""


def _too_large(limit: int) -> ApiError:
    return ApiError(413, f"The request body is larger than MAX_BODY_BYTES={limit} bytes; split the input "
                    "into smaller batches.", type="invalid_request_error", code="request_too_large")


def make_admission(settings: Settings) -> Admission:
    if settings.redis_url:
        from .redis_admission import RedisAdmission

        return RedisAdmission(settings.redis_url, settings.rate_limit, settings.max_concurrent_requests,
                              fail_open=settings.redis_fail_open)
    return MemoryAdmission(settings.rate_limit, settings.max_concurrent_requests)


def create_app(settings: Settings) -> Gateway:
    return Gateway(settings)


def app_from_env() -> Gateway:
    """Factory for uvicorn workers (`--factory`): each worker process reads the same environment."""
    from .logs import setup_logging

    settings = Settings.from_env()
    setup_logging(settings)
    return create_app(settings)
