"""Upstream vLLM replicas: health, routing, and the pooled connections that forward requests.

Each model kind ("embedding", "reranker") has one or more replicas (base URLs). A background task
checks every replica (`GET /health`, then `GET /v1/models` to learn what it serves); a replica that
refuses connections, times out or answers 5xx is ejected at once and probed again with growing
back-off. Requests go to the healthy replica with the fewest requests in flight (ties at random) and
are retried once on another replica after a connection failure or a 503, never after TIMEOUT.

ReplicaSet routes (which replica serves a model), HealthChecks ejects and probes (with aiohttp),
Upstreams adds the keep-alive client that forwards a request (upstream_client.py). Turning an upstream's error answer into the client's error
is `errors.upstream_error`.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

from .errors import ApiError, bad_gateway, gateway_timeout, not_found, unavailable
from .upstream_client import (
    DEFAULT_MAX_ANSWER_BYTES, AnswerTooLarge, ConnectFailed, ConnectionDropped, InvalidResponse, UpstreamClient,
)

log = logging.getLogger("erproxy.upstreams")

KINDS = ("embedding", "reranker")
# vLLM's HTTP server closes idle connections after 5 s; reusing one it already closed costs a retry.
UPSTREAM_KEEPALIVE_S = 4.0
MAX_BACKOFF_S = 30.0
# New connections a replica may close in a row without answering before it is ejected: one can be a request
# that crashed a worker, several are a replica that accepts connections and serves nothing (its /health may
# still answer). A drop on a kept-alive connection does not count: the server may just have closed it.
DROPS_TO_EJECT = 3
HEALTH_TIMEOUT_S = 5.0


@dataclass
class ModelInfo:
    id: str
    root: str | None = None
    max_model_len: int | None = None
    created: int | None = None


@dataclass(eq=False)
class Replica:
    url: str
    kind: str
    healthy: bool = False
    discovered: bool = False  # /v1/models answered at least once
    models: dict[str, ModelInfo] = field(default_factory=dict)
    in_flight: int = 0
    failures: int = 0
    next_check: float = 0.0
    last_error: str | None = None
    hung: bool = False  # ejected for not answering (a timeout), not for refusing
    drops: int = 0  # new connections closed in a row without an answer (DROPS_TO_EJECT)
    drop_ejections: int = 0  # ejections for drops since its last answer: each one is kept out twice as long

    def state(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "healthy": self.healthy,
            "models": list(self.models),
            "in_flight": self.in_flight,
            "consecutive_failures": self.failures,
            "last_error": self.last_error,
        }


@dataclass
class UpstreamResponse:
    status: int
    body: bytes
    replica: Replica


class _ConnectionFailed(Exception):
    def __init__(self, replica: Replica, reason: str, refused: bool) -> None:
        super().__init__(reason)
        self.replica = replica
        self.reason = reason
        self.refused = refused


class ReplicaSet:
    """The replicas of each kind, the models they serve, and which replica a request goes to."""

    def __init__(self, embedding: tuple[str, ...], reranker: tuple[str, ...],
                 default_models: dict[str, str | None] | None = None) -> None:
        self.replicas: dict[str, list[Replica]] = {
            "embedding": [Replica(u, "embedding") for u in embedding],
            "reranker": [Replica(u, "reranker") for u in reranker],
        }
        self.default_models = default_models or {}

    def all(self) -> list[Replica]:
        return [r for kind in KINDS for r in self.replicas[kind]]

    def default_model(self, kind: str) -> str | None:
        configured = self.default_models.get(kind)
        if configured:
            return configured
        for r in self.replicas[kind]:
            if r.models:
                return next(iter(r.models))
        return None

    def model_info(self, model: str | None) -> ModelInfo | None:
        if model is None:
            return None
        for r in self.all():
            if model in r.models:
                return r.models[model]
        return None

    def cache_root(self, kind: str, model: str | None) -> str | None:
        """The model root (the weights vLLM loaded) of every replica that may answer `model` for `kind`:
        what an item cache key names besides the served name. None when they differ (a rolling upgrade
        under one served name), when one is not discovered yet, or without a model: then nothing may be
        read from or written to the cache, or one model's vectors would be served as another's."""
        if model is None:
            return None
        try:
            replicas = self.candidates(kind, model)
        except ApiError:
            return None
        # with the context length: a request truncated to the model's length (truncate_prompt_tokens=-1,
        # AUTO_TRUNCATE) gives another vector once vLLM is restarted with another --max-model-len
        roots = {(r.models[model].root, r.models[model].max_model_len) if model in r.models else (None, None)
                 for r in replicas}
        if len(roots) != 1:
            return None
        root, length = roots.pop()
        return None if root is None else (root if length is None else f"{root}@{length}")

    def is_known_model(self, model: str) -> bool:
        return model in self.default_models.values() or any(model in r.models for r in self.all())

    def known_models(self) -> list[str]:
        seen: dict[str, None] = {}
        for r in self.all():
            for m in r.models:
                seen[m] = None
        return list(seen)

    def candidates(self, kind: str, model: str | None) -> list[Replica]:
        """Replicas that can serve `model` for a request of `kind`; 404 when no upstream serves it."""
        primary = self.replicas[kind]
        if model is None:
            return primary
        serving = [r for r in primary if model in r.models]
        if serving:
            return serving
        other = [r for k in KINDS if k != kind for r in self.replicas[k] if model in r.models]
        if other:
            return other
        if model == self.default_models.get(kind) or not all(r.discovered for r in primary):
            return primary  # not discovered yet: let the upstream answer
        known = ", ".join(self.known_models()) or "none"
        raise not_found(f"The model `{model}` does not exist. Models served here: {known}.",
                        code="model_not_found", param="model")

    @staticmethod
    def pick_replica(candidates: list[Replica], exclude: list[Replica]) -> Replica | None:
        """The healthy replica with the fewest requests in flight, ties broken at random.

        When none is healthy, the unhealthy one due to be probed soonest is tried anyway, so a
        replica that just came back serves without waiting for the next health check.
        """
        pool = [r for r in candidates if r.healthy and r not in exclude]
        if not pool:
            # Not one that was ejected for hanging, until its probe is due: each request would wait the
            # whole TIMEOUT for it (10 minutes by default) instead of getting a 503 at once.
            now = time.monotonic()
            rest = [r for r in candidates if r not in exclude and (not r.hung or r.next_check <= now)]
            return min(rest, key=lambda r: r.next_check) if rest else None
        if len(pool) == 1:
            return pool[0]
        least = min(r.in_flight for r in pool)
        return random.choice([r for r in pool if r.in_flight == least])


class HealthChecks:
    """Active checks of every replica: eject on failure, probe again with back-off, learn its models."""

    def __init__(self, replicas: ReplicaSet, *, timeout: float, interval: float) -> None:
        self.replicas = replicas
        self.timeout = timeout
        self.interval = interval
        self.session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()

    async def start(self) -> None:
        # Health checks get their own small pool: with every request connection busy, a probe queued
        # behind them would time out and eject replicas that are merely saturated.
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=max(4, 2 * len(self.replicas.all())), force_close=True),
            skip_auto_headers=("User-Agent",))
        await self.check_all()
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        if self.session:
            await self.session.close()

    async def check_all(self) -> None:
        await asyncio.gather(*(self.check(r) for r in self.replicas.all()))

    async def check(self, r: Replica) -> None:
        assert self.session is not None
        timeout = aiohttp.ClientTimeout(total=min(HEALTH_TIMEOUT_S, self.timeout))
        try:
            async with self.session.get(r.url + "/health", timeout=timeout) as resp:
                await resp.read()
                if resp.status != 200:
                    raise RuntimeError(f"/health answered {resp.status}")
            async with self.session.get(r.url + "/v1/models", timeout=timeout) as resp:
                body = await resp.read()
                if resp.status == 200:
                    _learn_models(r, body)
        except Exception as e:  # noqa: BLE001 - any failure means "not healthy now"
            self.mark_failed(r, _describe(e), probe=True, hung=isinstance(e, asyncio.TimeoutError))
            return
        was_healthy = r.healthy
        r.healthy, r.failures, r.last_error, r.hung = True, 0, None, False
        r.next_check = time.monotonic() + self.interval
        if not was_healthy:
            log.info("upstream %s (%s) is healthy, serving %s", r.url, r.kind, ", ".join(r.models) or "?")

    def mark_failed(self, r: Replica, reason: str, probe: bool = False, hung: bool = False,
                    strikes: int = 1) -> None:
        """Eject a replica and schedule a probe with back-off that grows with each failed probe.

        A request that fails on an already ejected replica changes nothing: eight requests in flight
        when vLLM restarts are one failure, not eight. `hung`: it did not answer (a timeout). `strikes`:
        how many times in a row requests have ejected it (a probe that passes does not prove it serves).
        """
        r.hung = hung
        if not probe and not r.healthy:
            r.last_error = reason
            return
        r.failures = r.failures + 1 if probe else strikes
        backoff = min(MAX_BACKOFF_S, 0.5 * 2 ** (r.failures - 1))
        r.next_check = time.monotonic() + backoff
        r.last_error = reason
        if r.healthy:
            log.warning("upstream %s (%s) ejected: %s; next probe in %.1f s", r.url, r.kind, reason, backoff)
        r.healthy = False
        self._wake.set()

    async def _loop(self) -> None:
        while True:
            now = time.monotonic()
            due = [r for r in self.replicas.all() if r.next_check <= now]
            if due:
                await asyncio.gather(*(self.check(r) for r in due))
            next_due = min((r.next_check for r in self.replicas.all()), default=now + self.interval)
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=max(0.05, next_due - time.monotonic()))
            except asyncio.TimeoutError:
                pass


def _learn_models(r: Replica, body: bytes) -> None:
    try:
        data = orjson.loads(body)["data"]
        r.models = {
            m["id"]: ModelInfo(m["id"], m.get("root"), m.get("max_model_len"), m.get("created"))
            for m in data if isinstance(m, dict) and isinstance(m.get("id"), str)
        }
        r.discovered = True
    except (orjson.JSONDecodeError, KeyError, TypeError):
        log.warning("upstream %s answered /v1/models with something that is not a model list", r.url)


class Upstreams(ReplicaSet):
    """The replicas with their health checks and the keep-alive client that forwards requests to them."""

    def __init__(
        self,
        embedding: tuple[str, ...],
        reranker: tuple[str, ...],
        *,
        timeout: float,
        health_interval: float,
        default_models: dict[str, str | None] | None = None,
        max_answer_bytes: int = DEFAULT_MAX_ANSWER_BYTES,
    ) -> None:
        super().__init__(embedding, reranker, default_models)
        self.timeout = timeout
        self.max_answer_bytes = max_answer_bytes
        self.health = HealthChecks(self, timeout=timeout, interval=health_interval)
        self.client: UpstreamClient | None = None

    async def start(self) -> None:
        # Requests go through upstream_client.py (keep-alive, no compression asked: bodies pass as bytes);
        # health checks keep their own aiohttp session (HealthChecks).
        self.client = UpstreamClient(idle_timeout=UPSTREAM_KEEPALIVE_S)
        await self.health.start()

    async def close(self) -> None:
        await self.health.close()
        if self.client:
            self.client.close()

    def mark_failed(self, r: Replica, reason: str, probe: bool = False, hung: bool = False,
                    strikes: int = 1) -> None:
        self.health.mark_failed(r, reason, probe, hung, strikes)

    async def post(self, kind: str, model: str | None, path: str, body: bytes,
                   max_answer_bytes: int | None = None) -> UpstreamResponse:
        """POST `body` to a replica serving `model`; map transport failures to 502/503/504. `max_answer_bytes`:
        this answer's bound when it is one part of a split request (its share of MAX_ANSWER_BYTES)."""
        candidates = self.candidates(kind, model)
        deadline = time.monotonic() + self.timeout
        tried: list[Replica] = []
        failure: _ConnectionFailed | None = None
        for attempt in range(2):
            r = self.pick_replica(candidates, tried)
            if failure is not None and not failure.refused and failure.replica.healthy and (r is None or not r.healthy):
                r = failure.replica  # a dropped keep-alive connection: the same healthy replica may answer now
            if r is None:
                break
            remaining = deadline - time.monotonic() if attempt else self.timeout
            if remaining <= 0:
                raise gateway_timeout(f"No answer from the {kind} upstream within TIMEOUT={self.timeout:g} s.")
            try:
                resp = await self._post_once(r, path, body, remaining, max_answer_bytes)
            except _ConnectionFailed as e:
                failure = e
                tried.append(r)
                continue
            if resp.status == 503 and attempt == 0 and self.pick_replica(candidates, tried + [r]) is not None:
                tried.append(r)
                continue
            return resp
        if failure is not None and not failure.refused:
            raise bad_gateway(f"The {kind} upstream {failure.replica.url} closed the connection without a "
                              f"complete answer ({failure.reason}).")
        if failure is not None:
            raise unavailable(f"No {kind} upstream is reachable: {failure.replica.url} {failure.reason}. "
                              "Check that vLLM is running (./check_models_status.sh).", retry_after=1)
        raise unavailable(f"No healthy {kind} upstream for model `{model}`.", retry_after=1)

    async def _post_once(self, r: Replica, path: str, body: bytes, timeout: float,
                         max_answer_bytes: int | None = None) -> UpstreamResponse:
        assert self.client is not None
        r.in_flight += 1
        try:
            status, data = await self.client.post(r.url, path, body, timeout, max_answer_bytes or self.max_answer_bytes)
        except asyncio.TimeoutError:
            if timeout >= self.timeout:  # a retry's leftover budget says nothing about the replica
                self.mark_failed(r, f"no answer within {timeout:.3g} s", hung=True)
            raise gateway_timeout(f"The upstream {r.url} did not answer within TIMEOUT={self.timeout:g} s.") from None
        except ConnectFailed as e:
            self.mark_failed(r, _describe(e))
            raise _ConnectionFailed(r, _describe(e), refused=True) from None
        except ConnectionDropped as e:
            if not e.reused:
                r.drops += 1
                if r.drops >= DROPS_TO_EJECT and r.healthy:
                    r.drops, r.drop_ejections = 0, r.drop_ejections + 1
                    self.mark_failed(r, f"closed {DROPS_TO_EJECT} new connections in a row without answering",
                                     strikes=r.drop_ejections)
            raise _ConnectionFailed(r, _describe(e), refused=False) from None
        except InvalidResponse as e:  # not HTTP at all
            self.mark_failed(r, str(e))
            raise bad_gateway(f"The upstream {r.url} answered something that is not valid HTTP.") from None
        except AnswerTooLarge:  # this request's answer (or a runaway upstream): the replica stays in rotation
            raise bad_gateway(f"The answer from the upstream {r.url} is larger than MAX_ANSWER_BYTES="
                              f"{self.max_answer_bytes} bytes allow (a split request's parts share the bound); "
                              "it was dropped.", code="upstream_answer_too_large") from None
        finally:
            r.in_flight -= 1
        if r.drops or r.drop_ejections:
            r.drops = r.drop_ejections = 0
        if status >= 500:
            self.mark_failed(r, f"answered HTTP {status}")
        return UpstreamResponse(status, data, r)


def _describe(e: BaseException) -> str:
    if isinstance(e, asyncio.TimeoutError):
        return "timed out"
    if isinstance(e, ConnectFailed):
        return f"refused or unreachable ({e.os_error.strerror or e.os_error})"
    if isinstance(e, aiohttp.ClientConnectorError):  # a health check's
        return f"refused or unreachable ({e.os_error.strerror or e.os_error})" if e.os_error else "unreachable"
    if isinstance(e, ConnectionDropped):
        return str(e)
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__

