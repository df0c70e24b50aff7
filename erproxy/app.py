"""The ASGI application: `create_app(settings)` wires the parts; `Gateway` runs each request through them.

A request goes, one named step each: route (routing.py: 404/405) -> authenticate (auth.py: 401)
-> read the body (asgi.py: 413/408) -> admit: rate limit, token limit and concurrency slot in one
call (admission.py, one Redis round trip with REDIS_URL: 429) -> handler (handlers.py) -> send ->
record (metrics and the access log, batched: flushing.py).
Each step raises the ApiError that ends the request; `handle` turns it into the answer.
Plain calls, no middleware classes: every layer on the hot path costs throughput (bench/).
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time

from .admission import Admission, MemoryAdmission
from .asgi import (
    ClientGone,
    Receive,
    Request,
    Response,
    Scope,
    Send,
    body_unread,
    error_response,
    finish_closing,
    read_body,
    response_start,
    start_closing,
)
from .accounting import Accounting, make_accounting
from .auth import authenticate
from .cache import ItemCache
from .auth_throttle import COUNTED, AuthThrottle, failure_reason, make_auth_throttle, too_many_failures
from .errors import CLOSE, ApiError, shutting_down, unexpected
from .docs import with_docs
from .handlers import Handlers, route_table
from .keys import KeyStore
from .logs import flush_access_log, log_access
from .memory import settle_after_start
from .metrics import Metrics
from .routing import RouteTable
from .settings import Settings
from .usage import usage_routes
from .upstreams import Upstreams

log = logging.getLogger("erproxy.app")

KEY_RELOAD_INTERVAL_S = 0.5
CLOSING_STATUSES = frozenset({408, 413})  # answers that end the connection (errors.CLOSE)
AUTH_CODES = frozenset({"invalid_api_key", "missing_api_key", "invalid_metrics_token", "missing_metrics_token",
                        "too_many_auth_failures"})


class Services:
    """The long-lived parts a lifespan starts and stops, with their background tasks."""

    def __init__(self, keys: KeyStore, admission: Admission, upstreams: Upstreams, metrics: Metrics,
                 throttle: AuthThrottle | None = None) -> None:
        self.keys = keys
        self.admission = admission
        self.upstreams = upstreams
        self.metrics = metrics
        self.throttle = throttle
        self._tasks: list[asyncio.Task[None]] = []
        self.accounting: Accounting | None = None  # usage and token limits (accounting.py)
        self.cache: ItemCache | None = None

    async def start(self) -> None:
        self.keys.load()
        if self.keys.error and not self.keys.size:  # (with the last good copy's keys, load() said so)
            log.error("key file: %s; no keys but ACCESS_TOKEN are accepted until it is readable", self.keys.error)
        self.metrics.observe_key_file(self.keys.error is None, self.keys.last_good_load)
        await self.admission.start()
        if self.throttle is not None:
            await self.throttle.start()
        await self.upstreams.start()
        if self.accounting is not None:
            await self.accounting.start()
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self._watch_keys()))
        self._tasks.append(loop.create_task(self.metrics.refresh_loop(self.upstreams)))

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.upstreams.close()
        if self.throttle is not None:
            await self.throttle.close()
        if self.accounting is not None:
            await self.accounting.close()  # the last usage flush
        await self.admission.close()
        if self.cache is not None:
            await self.cache.close()
        self.metrics.worker_exiting()
        flush_access_log()  # the last answers' lines, queued less than a flush window ago

    async def _watch_keys(self) -> None:
        while True:
            await asyncio.sleep(KEY_RELOAD_INTERVAL_S)
            try:
                before = self.keys.error
                reloaded = self.keys.reload_if_changed()
                error = self.keys.error
                if error and error != before:
                    log.error("key file: %s; still serving the %d keys of the last good load (%s). Keys are only "
                              "revoked by `keys revoke`: restore the file or fix it", error, self.keys.size,
                              self.keys.last_good_load_iso or "never")
                elif before and not error:
                    log.info("key file %s is good again: %d keys loaded", self.keys.path, self.keys.size)
                elif reloaded:
                    log.info("key file %s reloaded", self.keys.path)
                self.metrics.observe_key_file(error is None, self.keys.last_good_load)
            except Exception:  # noqa: BLE001 - a bad edit must not stop the watcher
                log.exception("key file reload failed")


class Gateway:
    """ASGI callable: the lifespan starts the services; each HTTP request takes the steps in `serve`."""

    def __init__(self, services: Services, routes: RouteTable, *, max_body_bytes: int, body_timeout: float) -> None:
        self.services = services
        self.routes = routes
        self.keys = services.keys
        self.admission = services.admission
        self.upstreams = services.upstreams
        self.metrics = services.metrics
        self.in_flight = services.metrics.in_flight
        self.max_body_bytes = max_body_bytes
        self.body_timeout = body_timeout
        self.throttle = services.throttle
        self.accounting = services.accounting
        try:  # /health stays open to an address blocked for failed authentications
            self.health_endpoint: object = routes.match("/health", "GET")
        except ApiError:
            self.health_endpoint = None

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
                    await self.services.start()
                except Exception as e:  # noqa: BLE001
                    log.exception("start-up failed")
                    await send({"type": "lifespan.startup.failed", "message": str(e)})
                    return
                settle_after_start()  # memory.py: freed memory kept, start-up objects out of the collector's way
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.services.stop()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        """One request: serve it, turn any error into its answer, send it, record it."""
        req = Request(scope, receive)
        note = None
        try:
            response = await self.serve(req)
        except ApiError as e:
            if e.code in AUTH_CODES:
                e, note = await self.auth_failed(req, e)
            response = error_response(e)
            self.metrics.observe_refusal(e.code)
            if e.status in CLOSING_STATUSES:
                await start_closing(req, response, send)
                self.record(req, response.status)
                await finish_closing(req, send)
                return
        except ClientGone:
            self.record(req, 499)
            return
        except asyncio.CancelledError:
            # Only the server cancels a request: SHUTDOWN_GRACE ran out (uvicorn's graceful timeout,
            # server.py under Granian). The client gets the error in the OpenAI shape, not the server's
            # plain-text 500, and the request is recorded (usage, access log) like any other.
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
            response = error_response(shutting_down())
            try:
                await send(response_start(req, response))
                await send({"type": "http.response.body", "body": response.body})
            except Exception:  # noqa: BLE001 - the connection may be gone already
                pass
            self.record(req, 503)
            return
        except Exception:  # noqa: BLE001 - never leak a traceback to the client
            log.exception("unhandled error on %s %s", req.method, req.path)
            response = error_response(unexpected())
        if body_unread(req):
            # answered before its body was read (401, 404, 405...): end the connection after a bounded
            # drain, as for 413, instead of letting the server read the rest of an upload of any size
            response.headers.append(CLOSE)
            await start_closing(req, response, send)
            self.record(req, response.status, note)
            await finish_closing(req, send)
            return
        await send(response_start(req, response))
        await send({"type": "http.response.body", "body": response.body})
        self.record(req, response.status, note)

    async def auth_failed(self, req: Request, e: ApiError) -> tuple[ApiError, str]:
        """Count a failed authentication (metrics, the address's failures); the error to answer and the
        access log's note. The failure that goes over AUTH_FAILURE_LIMIT is answered 429."""
        throttle = self.throttle
        if e.code == "too_many_auth_failures":  # refused by check(): the address is blocked
            self.metrics.auth_throttled.inc()
            return e, f"client={throttle.client(req) if throttle else '-'} auth=blocked"
        reason = failure_reason(e)
        self.metrics.observe_auth_failure(reason)
        if throttle is None or reason not in COUNTED:
            return e, f"auth={reason}"
        address = throttle.client(req)
        count, left = await throttle.failed(address)
        counted = throttle.counted_as(address)  # an IPv6 client counts with its /64 (AUTH_FAILURE_IPV6_PREFIX)
        note = (f"client={address}" + (f" counted_as={counted}" if counted != address else "")
                + f" auth={reason} auth_failures={count}/{throttle.limit}")
        if count > throttle.limit:
            self.metrics.auth_throttled.inc()
            return too_many_failures(math.ceil(left)), note
        return e, note

    async def serve(self, req: Request) -> Response:
        """The request flow, one step per line; each step raises the error that ends it."""
        endpoint = self.routes.match(req.path, req.method)
        if self.throttle is not None and self.throttle.blocked and endpoint is not self.health_endpoint:
            self.throttle.check(req)  # 429 while the address is blocked for failed authentications
        if endpoint.public:
            return await endpoint.handler(req)
        req.who = authenticate(req, self.keys)
        token_limit = None
        if req.method == "POST":
            # The whole body, under a deadline, before a slot is taken: a client that trickles its
            # body must not hold one of MAX_CONCURRENT_REQUESTS slots while it does.
            req.body = await read_body(req, self.max_body_bytes, self.body_timeout)
            if self.accounting is not None:  # TOKEN_LIMIT: 429 token_limit_exceeded
                token_limit = self.accounting.token_limit(req.who)
        # Rate limit, token limit, concurrency slot (429 each): one call, one Redis round trip.
        admitted = await self.admission.admit(req.who, token_limit)
        req.token_ticket = admitted.ticket  # settled in the record step
        self.in_flight.inc()
        try:
            return await endpoint.handler(req)
        finally:
            self.in_flight.dec()
            self.admission.finish(admitted)  # never waited for: queued for the next write to Redis

    def record(self, req: Request, status: int, note: str | None = None) -> None:
        """Metrics and the access log line of an answered (or abandoned) request."""
        total = time.perf_counter() - req.start
        who = req.who.name if req.who else "-"
        route = self.routes.label(req.path)
        # Labels only from known values: a client-chosen model name must not create metric series.
        model = req.model if req.model is None or self.upstreams.is_known_model(req.model) else "unknown"
        if route != "/metrics":
            self.metrics.observe_request(route, model or "-", status, who, total, req.upstream_s)
        if self.accounting is not None:  # per-key usage, token charges: batched, never awaited here
            self.accounting.record(req, model or "-", status)
        log_access(who=who, method=req.method, route=req.path, model=req.model, items=req.items, status=status,
                   latency_ms=total * 1000, upstream=req.upstream, note=note)


def make_admission(settings: Settings) -> Admission:
    if settings.redis_url:
        from .redis_admission import RedisAdmission

        return RedisAdmission(settings.redis_url, settings.rate_limit, settings.max_concurrent_requests,
                              fail_open=settings.redis_fail_open)
    return MemoryAdmission(settings.rate_limit, settings.max_concurrent_requests)


def create_app(settings: Settings, admission: Admission | None = None) -> Gateway:
    """The gateway for `settings` as an ASGI app (run its lifespan to start it). `admission` is for tests."""
    admission = admission or make_admission(settings)
    keys = KeyStore(settings.api_keys_file, settings.access_token,
                    revoked_elsewhere=lambda: getattr(admission, "revoked_hashes", frozenset()))
    upstreams = Upstreams(
        settings.embedding_upstreams, settings.reranker_upstreams,
        timeout=settings.timeout,
        health_interval=settings.health_interval,
        default_models={"embedding": settings.embedding_model, "reranker": settings.reranker_model},
        max_answer_bytes=settings.max_answer_bytes,
    )
    metrics = Metrics()
    cache = ItemCache(settings.cache_max_bytes, settings.redis_url, settings.cache_ttl,
                      redis_max_bytes=settings.cache_redis_max_bytes, shared=settings.cache_scope == "shared")
    handlers = Handlers(upstreams, metrics, query_instruction=settings.embedding_query_instruction,
                        metrics_token=settings.metrics_token, accept_token_ids=settings.accept_token_ids,
                        auto_truncate=settings.auto_truncate, cache=cache,
                        split_inputs=settings.split_embedding_inputs,
                        split_documents=settings.split_rerank_documents)
    handlers.keys = keys  # /health shows the key file's state
    throttle = make_auth_throttle(settings.auth_failure_limit, settings.auth_failure_window,
                                  settings.trusted_proxies, getattr(admission, "redis", None),
                                  settings.auth_failure_ipv6_prefix)
    accounting = make_accounting(settings, admission, metrics)
    table = route_table(handlers)
    table = RouteTable([*table.routes, *usage_routes(accounting.usage)])  # GET /v1/usage
    routes = with_docs(table, settings.docs)  # DOCS: /docs, /openapi.json, /
    services = Services(keys, admission, upstreams, metrics, throttle)
    services.accounting = accounting
    services.cache = cache  # closed with the services
    return Gateway(services, routes,
                   max_body_bytes=settings.max_body_bytes, body_timeout=settings.body_timeout)


def app_from_env() -> Gateway:
    """Factory for uvicorn workers (`--factory`): each worker process reads the same environment."""
    from .logs import setup_logging

    settings = Settings.from_env()
    setup_logging(settings)
    stop_with_parent()
    return create_app(settings)


def stop_with_parent() -> None:
    """A worker process (several WORKERS) stops gracefully when the gateway's main process dies without
    stopping it (SIGKILL, a crash): otherwise it would keep the port, answering 503 once the private Redis
    that died with the main process is gone, and the next start would find the address in use. Linux
    only (PR_SET_PDEATHSIG); nothing for a gateway of one process, whose parent is the operator's shell."""
    import multiprocessing
    import signal

    from .util import term_with_parent

    parent = multiprocessing.parent_process()
    if parent is None or not term_with_parent():
        return
    if os.getppid() != parent.pid:  # it died before the line above: the signal will not come
        os.kill(os.getpid(), signal.SIGTERM)
