"""Prometheus metrics, correct with several worker processes.

With WORKERS > 1 the serve command points PROMETHEUS_MULTIPROC_DIR at an empty directory before
the workers start; every worker writes its samples there and a scrape of any worker aggregates
all of them (gauges as the sum or max over live workers).
"""

from __future__ import annotations

import asyncio
import os
import re
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

if TYPE_CHECKING:
    from .upstreams import Upstreams

MULTIPROC = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)
# error code of an admission refusal -> its `reason` label
REFUSALS = {"rate_limit_exceeded": "rate_limit", "concurrency_limit_exceeded": "concurrency",
            "token_limit_exceeded": "token_limit"}
_PROMPT_TOKENS = re.compile(rb'"prompt_tokens"\s*:\s*(\d+)')


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self.registry = r
        self.requests = Counter("erproxy_requests", "Requests answered, by route, model, status and key name.",
                                ["route", "model", "status", "key"], registry=r)
        self.duration = Histogram("erproxy_request_duration_seconds", "Total time to answer a request.",
                                  ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.upstream_duration = Histogram("erproxy_upstream_duration_seconds", "Time spent waiting on vLLM.",
                                           ["kind", "replica"], buckets=LATENCY_BUCKETS, registry=r)
        self.overhead = Histogram("erproxy_overhead_duration_seconds",
                                  "The gateway's own time per request (total minus upstream).",
                                  ["route"], buckets=OVERHEAD_BUCKETS, registry=r)
        self.in_flight = Gauge("erproxy_in_flight_requests", "Requests being served now.", registry=r,
                               multiprocess_mode="livesum")
        self.rejections = Counter("erproxy_rejections", "Requests refused by admission, by reason.", ["reason"],
                                  registry=r)
        self.replica_healthy = Gauge("erproxy_upstream_healthy", "1 when the replica passes health checks.",
                                     ["kind", "replica"], registry=r, multiprocess_mode="livemax")
        self.replica_in_flight = Gauge("erproxy_upstream_in_flight", "Requests in flight to the replica.",
                                       ["kind", "replica"], registry=r, multiprocess_mode="livesum")
        self.inputs = Counter("erproxy_inputs", "Embedding inputs processed.", ["model"], registry=r)
        self.documents = Counter("erproxy_documents", "Documents reranked.", ["model"], registry=r)
        self.tokens = Counter("erproxy_tokens", "Prompt tokens processed, from upstream usage.", ["model", "kind"],
                              registry=r)
        self.cache_items = Counter("erproxy_cache_items", "Embedding inputs and rerank documents looked up in the "
                                   "item cache, by kind and result (hit, miss).", ["kind", "result"], registry=r)
        self.auth_failures = Counter("erproxy_auth_failures", "Failed authentications, by reason (missing, invalid, "
                                     "revoked, expired, metrics_token); never the key.", ["reason"], registry=r)
        self.auth_throttled = Counter("erproxy_auth_throttled", "Requests refused with 429 too_many_auth_failures "
                                      "(their address failed AUTH_FAILURE_LIMIT times).", registry=r)
        self.key_file_ok = Gauge("erproxy_key_file_ok", "1 when the key file was read fine at the last check, 0 while "
                                 "it is missing or unreadable (the last good keys are served).", registry=r,
                                 multiprocess_mode="livemin")
        self.key_file_loaded = Gauge("erproxy_key_file_last_good_load_timestamp_seconds",
                                     "Unix time of the last good read of the key file.", registry=r,
                                     multiprocess_mode="livemin")
        self._refusals = {code: self.rejections.labels(reason) for code, reason in REFUSALS.items()}
        self._auth_children: dict[str, Any] = {}
        # labels() costs a lock and a tuple build per call; the hot path looks children up here instead
        self._request_children: dict[tuple[str, str, int, str], Any] = {}
        self._route_children: dict[str, tuple[Any, Any]] = {}
        self._upstream_children: dict[tuple[str, str], Any] = {}

    def observe_request(self, route: str, model: str, status: int, key: str, total: float, upstream: float) -> None:
        k = (route, model, status, key)
        counter = self._request_children.get(k)
        if counter is None:
            counter = self._request_children[k] = self.requests.labels(route, model, str(status), key)
        counter.inc()
        hists = self._route_children.get(route)
        if hists is None:
            hists = self._route_children[route] = (self.duration.labels(route), self.overhead.labels(route))
        hists[0].observe(total)
        hists[1].observe(total - upstream if total > upstream else 0.0)

    def observe_refusal(self, code: str | int | None) -> None:
        """Count an error answer that is an admission refusal (rate limit or concurrency cap)."""
        counter = self._refusals.get(code)  # type: ignore[arg-type]
        if counter is not None:
            counter.inc()

    def observe_auth_failure(self, reason: str) -> None:
        counter = self._auth_children.get(reason)
        if counter is None:
            counter = self._auth_children[reason] = self.auth_failures.labels(reason)
        counter.inc()

    def observe_key_file(self, ok: bool, last_good_load: float | None) -> None:
        self.key_file_ok.set(1 if ok else 0)
        if last_good_load is not None:
            self.key_file_loaded.set(last_good_load)

    def observe_upstream(self, kind: str, replica: str, seconds: float) -> None:
        k = (kind, replica)
        hist = self._upstream_children.get(k)
        if hist is None:
            hist = self._upstream_children[k] = self.upstream_duration.labels(kind, replica)
        hist.observe(seconds)

    def refresh_replicas(self, upstreams: "Upstreams") -> None:
        for r in upstreams.all():
            self.replica_healthy.labels(r.kind, r.url).set(1 if r.healthy else 0)
            self.replica_in_flight.labels(r.kind, r.url).set(r.in_flight)

    async def refresh_loop(self, upstreams: "Upstreams", every: float = 1.0) -> None:
        while True:
            self.refresh_replicas(upstreams)
            await asyncio.sleep(every)

    def worker_exiting(self) -> None:
        """Drop this worker's live gauges from the shared files (uvicorn replaces workers that exit)."""
        if MULTIPROC:
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(os.getpid())

    def render(self, upstreams: "Upstreams") -> tuple[bytes, str]:
        self.refresh_replicas(upstreams)
        if MULTIPROC:
            from prometheus_client import multiprocess

            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            return generate_latest(registry), CONTENT_TYPE_LATEST
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def prompt_tokens(body: bytes) -> int | None:
    """`usage.prompt_tokens` from an embeddings answer without parsing the vectors (it comes last)."""
    m = _PROMPT_TOKENS.search(body, max(0, len(body) - 512))
    return int(m.group(1)) if m else None
