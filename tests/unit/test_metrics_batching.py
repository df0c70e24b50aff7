"""Per-request samples are handed to prometheus_client together, within flushing.FLUSH_WINDOW_S
(metrics.Pending): what a scrape shows is exactly what direct updates would have shown."""

from __future__ import annotations

import asyncio
import os

import pytest
from prometheus_client import CollectorRegistry, Histogram

from erproxy.flushing import FLUSH_WINDOW_S
from erproxy.metrics import LATENCY_BUCKETS, Metrics


def sample(m: Metrics, name: str, labels: dict[str, str]) -> float | None:
    return m.registry.get_sample_value(name, labels)


@pytest.mark.asyncio
async def test_samples_reach_the_registry_within_the_flush_window_and_add_up_exactly() -> None:
    m = Metrics()
    reference = CollectorRegistry()
    direct = Histogram("direct", "d", ["route"], buckets=LATENCY_BUCKETS, registry=reference)
    values = [0.0004, 0.001, 0.0011, 0.0025, 0.2, 7.5, 700.0]  # on bounds, between them, past the last
    for v in values:
        m.observe_request("/v1/embeddings", "minilm", 200, "k", v, v / 2)
        direct.labels("/v1/embeddings").observe(v)
    m.observe_items("embedding", "minilm", 3, 12)
    m.in_flight.inc()
    labels = {"route": "/v1/embeddings", "model": "minilm", "status": "200", "key": "k"}
    assert sample(m, "erproxy_requests_total", labels) == 0.0, "nothing reaches prometheus_client at once"
    await asyncio.sleep(0)
    assert sample(m, "erproxy_requests_total", labels) == 0.0, "several turns share one hand-over"
    await asyncio.sleep(FLUSH_WINDOW_S * 3)
    assert sample(m, "erproxy_requests_total", labels) == len(values)
    assert sample(m, "erproxy_inputs_total", {"model": "minilm"}) == 3
    assert sample(m, "erproxy_tokens_total", {"model": "minilm", "kind": "embedding"}) == 12
    assert sample(m, "erproxy_in_flight_requests", {}) == 1
    for bound in [*LATENCY_BUCKETS, float("inf")]:
        le = "+Inf" if bound == float("inf") else str(float(bound))
        ours = sample(m, "erproxy_request_duration_seconds_bucket", {"route": "/v1/embeddings", "le": le})
        assert ours == reference.get_sample_value("direct_bucket", {"route": "/v1/embeddings", "le": le}), le
    assert sample(m, "erproxy_request_duration_seconds_sum", {"route": "/v1/embeddings"}) == pytest.approx(sum(values))


@pytest.mark.asyncio
async def test_a_scrape_includes_the_samples_not_yet_handed_over() -> None:
    m = Metrics()

    class NoUpstreams:
        def all(self) -> list:
            return []

    m.observe_upstream("embedding", "http://r1", 0.01)
    m.observe_request("/v1/rerank", "-", 429, "k", 0.001, 0.0)
    body, _ = m.render(NoUpstreams())  # type: ignore[arg-type]
    assert b'erproxy_requests_total{key="k",model="-",route="/v1/rerank",status="429"} 1.0' in body
    assert b'erproxy_upstream_duration_seconds_count{kind="embedding",replica="http://r1"} 1.0' in body


def test_without_an_event_loop_samples_are_recorded_at_once() -> None:
    m = Metrics()
    m.observe_items("reranker", "bge", 10, None)
    assert sample(m, "erproxy_documents_total", {"model": "bge"}) == 10
    assert not sample(m, "erproxy_tokens_total", {"model": "bge", "kind": "reranker"})  # no usage: none counted


def test_two_scrapes_forgetting_the_same_dead_worker_at_once_both_succeed(tmp_path, monkeypatch):
    """Every worker sweeps the live gauges of dead ones before a scrape: two at once race to remove the
    same files, and the one that loses must not fail its scrape (FileNotFoundError: a 500)."""
    from erproxy import metrics as m

    dead = tmp_path / "gauge_livesum_4000001.db"
    dead.write_bytes(b"")
    (tmp_path / "gauge_livemax_4000001.db").write_bytes(b"")
    (tmp_path / "counter_4000001.db").write_bytes(b"")  # counters of dead workers stay: their counts count
    real_remove = os.remove

    def remove_twice(path):  # the other scrape removes it first
        real_remove(path)
        raise FileNotFoundError(path)

    monkeypatch.setattr(m.os, "remove", remove_twice)
    monkeypatch.setattr(m, "_is_sibling", lambda pid: False)
    m.forget_dead_workers(str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["counter_4000001.db"]
