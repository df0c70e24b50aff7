"""GET /metrics after known traffic: names, labels and values; Server-Timing on every answer."""

import re

from tests.deploy.common import EXPECTED_METRICS
from tests.prometheus import Samples, samples_of, value


async def scrape(gw, token=None) -> Samples:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return samples_of(await gw.get("/metrics", headers=headers))


async def traffic(gw):
    for _ in range(3):
        assert (await gw.post("/v1/embeddings", headers=gw.auth(),
                              json={"model": "minilm", "input": ["hello world", "人工智能是计算机科学的一个分支。"]}
                              )).status_code == 200
    assert (await gw.post("/v1/rerank", headers=gw.auth(), json={
        "model": "Qwen3-Reranker-0.6B", "query": "What is AI?",
        "documents": ["AI is artificial intelligence", "AI helps humans", "Bananas are yellow"]})).status_code == 200
    assert (await gw.post("/v1/embeddings", headers={"Authorization": "Bearer er-bad"},
                          json={"input": "x"})).status_code == 401


async def test_metrics_after_known_traffic(make_gateway):
    gw = await make_gateway(RATE_LIMIT="5/minute")
    await traffic(gw)
    assert (await gw.post("/v1/embeddings", headers=gw.auth(), json={"input": "x"})).status_code == 200
    assert (await gw.post("/v1/embeddings", headers=gw.auth(), json={"input": "x"})).status_code == 429
    m = await scrape(gw)
    assert value(m, "erproxy_requests_total", route="/v1/embeddings", model="minilm", status="200", key="tester") == 4
    assert value(m, "erproxy_requests_total", route="/v1/rerank", model="Qwen3-Reranker-0.6B", status="200",
                 key="tester") == 1
    assert value(m, "erproxy_requests_total", route="/v1/embeddings", model="-", status="401", key="-") == 1
    assert value(m, "erproxy_rejections_total", reason="rate_limit") == 1
    assert value(m, "erproxy_rejections_total", reason="concurrency") == 0
    assert value(m, "erproxy_inputs_total", model="minilm") == 7
    assert value(m, "erproxy_documents_total", model="Qwen3-Reranker-0.6B") == 3
    assert value(m, "erproxy_tokens_total", model="minilm", kind="embedding") == 3 * 22 + 3  # recorded usage + 1 new
    assert value(m, "erproxy_tokens_total", model="Qwen3-Reranker-0.6B", kind="reranker") == 32
    assert value(m, "erproxy_request_duration_seconds_count", route="/v1/embeddings") == 6
    assert value(m, "erproxy_overhead_duration_seconds_count", route="/v1/rerank") == 1
    embed_url = gw.env["EMBEDDING_UPSTREAMS"]
    assert value(m, "erproxy_upstream_duration_seconds_count", kind="embedding", replica=embed_url) == 4
    assert value(m, "erproxy_upstream_healthy", kind="embedding", replica=embed_url) == 1
    assert value(m, "erproxy_upstream_in_flight", kind="reranker", replica=gw.env["RERANKER_UPSTREAMS"]) == 0
    assert value(m, "erproxy_in_flight_requests") == 0


async def test_server_timing_reports_gateway_overhead(gateway):
    r = await gateway.post("/v1/embeddings", headers=gateway.auth(), json={"input": "hi"})
    m = re.fullmatch(r"gateway;dur=([\d.]+), upstream;dur=([\d.]+)", r.headers["server-timing"])
    assert m and 0 < float(m.group(1)) < 1000 and float(m.group(2)) > 0
    assert "server-timing" in (await gateway.get("/health")).headers


async def test_metrics_token(make_gateway):
    gw = await make_gateway(METRICS_TOKEN="scrape-secret")
    assert (await gw.get("/metrics")).status_code == 401
    assert (await gw.get("/metrics", headers={"Authorization": "Bearer wrong"})).status_code == 401
    assert "erproxy_requests_total" in (await gw.get("/metrics",
                                                     headers={"Authorization": "Bearer scrape-secret"})).text


async def test_scrapes_without_the_metrics_token_do_not_lock_out_the_address(make_gateway):
    """A Prometheus not yet given METRICS_TOKEN scrapes every few seconds: that is not someone guessing."""
    gw = await make_gateway(METRICS_TOKEN="scrape-secret", AUTH_FAILURE_LIMIT="3")
    for _ in range(6):
        r = await gw.get("/metrics")
        assert r.status_code == 401 and r.json()["error"]["code"] == "missing_metrics_token"
    assert (await gw.post("/v1/embeddings", json={"input": "x"}, headers=gw.auth())).status_code == 200
    for _ in range(3):  # wrong tokens are guesses
        assert (await gw.get("/metrics", headers={"Authorization": "Bearer wrong"})).status_code == 401
    r = await gw.post("/v1/embeddings", json={"input": "x"}, headers=gw.auth())
    assert r.status_code == 429 and r.json()["error"]["code"] == "too_many_auth_failures"


async def test_live_metrics_match_what_the_grafana_dashboard_uses(make_gateway):
    gw = await make_gateway(CACHE_MAX_BYTES="1MiB")  # the item cache on, so its lookups are counted
    await traffic(gw)
    live: dict[str, set[str]] = {}
    for (name, labels), _ in (await scrape(gw)).items():
        if name.startswith("erproxy_") and not name.endswith("_created"):
            live.setdefault(name, set()).update(k for k, _ in labels)
    for name, labels in EXPECTED_METRICS.items():
        assert name in live, name
        assert live[name] == set(labels), name
    assert set(live) == set(EXPECTED_METRICS)  # and nothing the dashboard does not know of
