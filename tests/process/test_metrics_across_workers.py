"""GET /metrics of a gateway with several worker processes counts what every worker served."""

import re

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.procs import RedisServer


def scrape(gw, token=None) -> dict[tuple[str, tuple], float]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    r = httpx.get(gw.url + "/metrics", headers=headers)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    samples = {}
    for fam in text_string_to_metric_families(r.text):
        for s in fam.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples, name, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_add_up_across_workers(make_gateway, tmp_path):
    redis = RedisServer(tmp_path).start()
    try:
        gw = make_gateway(WORKERS="3", REDIS_URL=redis.url)
        for _ in range(12):  # new connection each: spread over the workers
            with httpx.Client() as c:
                assert c.post(gw.url + "/v1/embeddings", headers=gw.auth(), json={"input": "hello world"}).status_code == 200
        m = scrape(gw)
        assert value(m, "erproxy_requests_total", route="/v1/embeddings", model="minilm", status="200",
                     key="tester") == 12
        assert value(m, "erproxy_inputs_total", model="minilm") == 12
        pids = set(re.findall(r"\[(\d+)\] erproxy\.access", gw.log_file().read_text()))
        assert len(pids) >= 2
    finally:
        redis.stop()
