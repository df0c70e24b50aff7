"""Prometheus metrics, correct with several worker processes.

With WORKERS > 1 the serve command points PROMETHEUS_MULTIPROC_DIR at an empty directory before
the workers start; every worker writes its samples there and a scrape of any worker aggregates
all of them (gauges as the sum or max over live workers).

The per-request samples (requests, durations, upstream times, inputs, tokens, requests in flight)
are added up in plain dicts and handed to prometheus_client together, at most
flushing.FLUSH_WINDOW_S later (`Pending`), and before every scrape: each prometheus_client update
takes a lock, and with several workers also writes a shared file, which was 8-10 % of a worker's CPU
under load (bench/results/ANALYSIS.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
from bisect import bisect_left
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from .flushing import due_on, flush_later

if TYPE_CHECKING:
    from .upstreams import Upstreams

MULTIPROC = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)
# error code of an admission refusal -> its `reason` label
REFUSALS = {"rate_limit_exceeded": "rate_limit", "concurrency_limit_exceeded": "concurrency",
            "token_limit_exceeded": "token_limit"}
_PROMPT_TOKENS = re.compile(rb'"prompt_tokens"\s*:\s*(\d+)')


class Pending:
    """Counter and gauge increments and histogram observations not yet given to prometheus_client.

    `flush` runs at most flushing.FLUSH_WINDOW_S after the first sample not yet flushed, and at once
    when there is no running loop.
    """

    def __init__(self) -> None:
        self.adds: dict[Any, float] = {}  # counter or gauge child -> amount
        self.hists: dict[Any, list[Any]] = {}  # histogram child -> [sum, count per bucket]
        self.scheduled: asyncio.AbstractEventLoop | None = None  # the loop whose timer will flush

    def add(self, child: Any, amount: float = 1.0) -> None:
        adds = self.adds
        adds[child] = adds.get(child, 0.0) + amount
        if not due_on(self.scheduled):
            self._schedule()

    def observe(self, child: Any, value: float) -> None:
        acc = self.hists.get(child)
        if acc is None:
            acc = self.hists[child] = [0.0, [0] * len(child._upper_bounds)]
        acc[0] += value
        acc[1][bisect_left(child._upper_bounds, value)] += 1  # the first bucket whose bound >= value
        if not due_on(self.scheduled):
            self._schedule()

    def _schedule(self) -> None:
        self.scheduled = flush_later(self.flush)
        if self.scheduled is None:  # no event loop: now
            self.flush()

    def flush(self) -> None:
        self.scheduled = None
        adds, hists = self.adds, self.hists
        self.adds, self.hists = {}, {}
        for child, amount in adds.items():
            if amount:
                child.inc(amount)
        for child, (total, counts) in hists.items():
            child._sum.inc(total)
            for bucket, n in zip(child._buckets, counts):
                if n:
                    bucket.inc(n)


class _PendingGauge:
    """A gauge whose inc/dec go through Pending (the requests-in-flight gauge)."""

    def __init__(self, gauge: Gauge, pending: Pending) -> None:
        self.gauge = gauge
        self.pending = pending

    def inc(self, amount: float = 1.0) -> None:
        self.pending.add(self.gauge, amount)

    def dec(self, amount: float = 1.0) -> None:
        self.pending.add(self.gauge, -amount)


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
        self.pending = Pending()
        self.in_flight_gauge = Gauge("erproxy_in_flight_requests", "Requests being served now.", registry=r,
                                     multiprocess_mode="livesum")
        self.in_flight = _PendingGauge(self.in_flight_gauge, self.pending)
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
        self._item_children: dict[tuple[str, str], tuple[Any, Any]] = {}

    def observe_request(self, route: str, model: str, status: int, key: str, total: float, upstream: float) -> None:
        k = (route, model, status, key)
        counter = self._request_children.get(k)
        if counter is None:
            counter = self._request_children[k] = self.requests.labels(route, model, str(status), key)
        pending = self.pending
        pending.add(counter)
        hists = self._route_children.get(route)
        if hists is None:
            hists = self._route_children[route] = (self.duration.labels(route), self.overhead.labels(route))
        pending.observe(hists[0], total)
        pending.observe(hists[1], total - upstream if total > upstream else 0.0)

    def observe_items(self, kind: str, model: str, items: int, tokens: int | None) -> None:
        """Inputs embedded (kind "embedding") or documents reranked ("reranker"), and their prompt tokens."""
        k = (kind, model)
        children = self._item_children.get(k)
        if children is None:
            counter = self.inputs if kind == "embedding" else self.documents
            children = self._item_children[k] = (counter.labels(model), self.tokens.labels(model, kind))
        self.pending.add(children[0], items)
        if tokens:
            self.pending.add(children[1], tokens)

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
        self.pending.observe(hist, seconds)

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
        self.pending.flush()
        if MULTIPROC:
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(os.getpid())

    def render(self, upstreams: "Upstreams") -> tuple[bytes, str]:
        self.pending.flush()
        self.refresh_replicas(upstreams)
        if MULTIPROC:
            from prometheus_client import multiprocess

            forget_dead_workers(os.environ["PROMETHEUS_MULTIPROC_DIR"])
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            return generate_latest(registry), CONTENT_TYPE_LATEST
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def _is_sibling(pid: int) -> bool:
    """`pid` is this worker or another worker of the same gateway (alive, with the same parent)."""
    if pid == os.getpid():
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    return int(stat.rsplit(b")", 1)[1].split()[1]) == os.getppid()  # the field after the state: the parent


def forget_dead_workers(directory: str) -> None:
    """Drop the live gauges (in flight, replica health) of workers that died without a clean stop (SIGKILL,
    the OOM killer): `worker_exiting` never ran for them, and their last values would be summed (in flight)
    or maxed (an upstream's health: a down replica shown as up) into every scrape until a restart."""
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for name in names:
        if not (name.startswith("gauge_live") and name.endswith(".db")):
            continue
        pid = name[:-3].rsplit("_", 1)[1]
        if pid.isdigit() and not _is_sibling(int(pid)):
            # what prometheus_client's mark_process_dead removes, but a file another worker's scrape has
            # just removed is no error (it raised FileNotFoundError: a 500 for that scrape)
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(directory, name))


def prompt_tokens(body: bytes) -> int | None:
    """`usage.prompt_tokens` from an embeddings answer without parsing the vectors (it comes last)."""
    m = _PROMPT_TOKENS.search(body, max(0, len(body) - 512))
    return int(m.group(1)) if m else None
