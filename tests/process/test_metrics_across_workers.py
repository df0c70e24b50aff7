"""GET /metrics of a gateway with several worker processes counts what every worker served."""

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.procs import RedisServer, set_fake_mode
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


@pytest.mark.parametrize("server", ["uvicorn", "granian"])
def test_a_killed_workers_gauges_leave_the_scrape_so_a_down_upstream_shows_down(make_gateway, own_fakes, tmp_path,
                                                                               server):
    """The OOM killer ends a worker: uvicorn starts another, but the dead one's live gauges must not keep
    saying that its upstream is healthy (livemax) or that its requests are in flight (livesum)."""
    embed, rerank = own_fakes
    redis = RedisServer(tmp_path).start()
    try:
        gw = make_gateway(embed=embed.url, rerank=rerank.url, WORKERS="2", REDIS_URL=redis.url, HEALTH_INTERVAL="0.5",
                          SERVER=server)
        metrics_dir = Path(gw.env["LOG_DIR"]) / f".metrics-{gw.env['PORT']}"
        deadline = time.monotonic() + 10
        while len([f for f in os.listdir(metrics_dir) if f.startswith("gauge_livemax")]) < 2:
            assert time.monotonic() < deadline, "both workers should have written their gauges"
            time.sleep(0.1)
        workers = [int(p) for p in subprocess.run(["pgrep", "-P", str(gw.proc.pid)], capture_output=True,
                                                   text=True).stdout.split()]
        victim = max(p for p in workers if any(f.endswith(f"_{p}.db") for f in os.listdir(metrics_dir)))
        os.kill(victim, signal.SIGKILL)
        set_fake_mode(embed, "down")
        deadline = time.monotonic() + 15
        while True:
            healthy = value(scrape(gw), "erproxy_upstream_healthy", kind="embedding", replica=embed.url)
            if healthy == 0:
                break
            assert time.monotonic() < deadline, "the killed worker's last 'healthy' stayed in the scrape"
            time.sleep(0.2)
        assert not [f for f in os.listdir(metrics_dir) if f.endswith(f"_{victim}.db") and "live" in f]
        # and the gateway serves on (Granian's own default would have stopped it when a worker died)
        for _ in range(4):
            with httpx.Client() as c:
                r = c.post(gw.url + "/v1/rerank", headers=gw.auth(), json={"query": "q", "documents": ["a"]})
                assert r.status_code == 200
    finally:
        set_fake_mode(embed, "normal")
        redis.stop()
