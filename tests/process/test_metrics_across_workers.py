"""GET /metrics of a gateway with several worker processes counts what every worker served."""

import re
import time

import httpx
import pytest

from tests.procs import RedisServer
from tests.prometheus import Samples, samples_of, value


def scrape(gw, token=None) -> Samples:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return samples_of(httpx.get(gw.url + "/metrics", headers=headers))


@pytest.mark.parametrize("server", ["uvicorn", "granian"])
def test_metrics_add_up_across_workers(make_gateway, tmp_path, server):
    redis = RedisServer(tmp_path).start()
    try:
        gw = make_gateway(WORKERS="3", REDIS_URL=redis.url, SERVER=server)
        for _ in range(12):  # new connection each: spread over the workers
            with httpx.Client() as c:
                assert c.post(gw.url + "/v1/embeddings", headers=gw.auth(), json={"input": "hello world"}).status_code == 200
        # every worker hands its samples over within 10 ms of its answers (erproxy/flushing.py)
        deadline = time.monotonic() + 3
        while True:
            m = scrape(gw)
            total = value(m, "erproxy_requests_total", route="/v1/embeddings", model="minilm", status="200",
                          key="tester")
            if total == 12 or time.monotonic() > deadline:
                break
            time.sleep(0.02)
        assert total == 12
        assert value(m, "erproxy_inputs_total", model="minilm") == 12
        pids = set(re.findall(r"\[(\d+)\] erproxy\.access", gw.log_text(until="erproxy.access", count=12)))
        assert len(pids) >= 2
    finally:
        redis.stop()
