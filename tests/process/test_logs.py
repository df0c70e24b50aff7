"""The access log a gateway process writes: key names never keys, no forged lines, JSON lines, rotation
by size that loses nothing across workers."""

import json
import re
import time

import httpx
import pytest

from tests.procs import RedisServer


def test_access_log_names_key_never_contains_it(shared_gateway):
    httpx.post(shared_gateway.url + "/v1/embeddings", json={"input": "log me"}, headers=shared_gateway.auth())
    httpx.get(shared_gateway.url + "/v1/models", params={"api_key": shared_gateway.key})
    text = shared_gateway.log_text(until="GET /v1/models") + shared_gateway.proc.output()
    assert shared_gateway.key not in text
    assert shared_gateway.env["ACCESS_TOKEN"] not in text
    line = [ln for ln in text.splitlines() if "POST /v1/embeddings" in ln and "key=tester" in ln][-1]
    for part in ("model=minilm", "items=1", "status=200", "latency_ms=", "upstream=http://127.0.0.1:"):
        assert part in line


def test_client_chosen_model_names_do_not_become_labels_and_logs_cannot_be_forged(shared_gateway):
    for i in range(3):
        r = httpx.post(shared_gateway.url + "/v1/embeddings", headers=shared_gateway.auth(),
                       json={"model": f"bogus-{i}\n2026-01-01 INFO forged", "input": "x"})
        assert r.status_code == 404
    httpx.get(shared_gateway.url + "/x%0A2026-11-24 06:20:00,714 INFO [1] erproxy.access key=team-a POST")
    metrics = httpx.get(shared_gateway.url + "/metrics").text
    assert "bogus" not in metrics
    assert re.search(r'erproxy_requests_total\{key="tester",model="unknown",route="/v1/embeddings",status="404"\} 3',
                     metrics)
    log = shared_gateway.log_text(until="\\x0a2026")
    assert not any(line.startswith("2026-11-24 06:20:00,714") or line.startswith("2026-01-01")
                   for line in log.splitlines())
    assert "\\x0a2026" in log


def test_json_access_log(make_gateway):
    gw = make_gateway(LOG_JSON="1")
    httpx.post(gw.url + "/v1/embeddings", headers=gw.auth(), json={"model": "minilm", "input": ["a", "b"]})
    lines = [json.loads(ln) for ln in gw.log_text(until='"/v1/embeddings"').splitlines() if ln.startswith("{")]
    entry = [e for e in lines if e["route"] == "/v1/embeddings"][-1]
    assert entry["key"] == "tester" and entry["status"] == 200 and entry["items"] == 2 and entry["model"] == "minilm"
    assert entry["upstream"] == gw.env["EMBEDDING_UPSTREAMS"] and entry["latency_ms"] > 0 and entry["time"].endswith("Z")
    assert gw.key not in gw.log_file().read_text()


@pytest.mark.parametrize("server", ["uvicorn", "granian"])
def test_rotation_by_size_keeps_every_line_across_workers(make_gateway, tmp_path, server):
    redis = RedisServer(tmp_path).start()
    try:
        gw = make_gateway(WORKERS="2", REDIS_URL=redis.url, LOG_MAX_BYTES="4096", LOG_BACKUPS="100",
                          RATE_LIMIT="100000/minute", SERVER=server)
        n = 120
        for i in range(n):
            with httpx.Client() as c:
                assert c.post(gw.url + "/v1/embeddings", headers=gw.auth(), json={"input": f"r{i}"}).status_code == 200
        log_dir = gw.log_file().parent

        def log_files():
            files = sorted(log_dir.glob("embedding_reranker_proxy.log*"))
            return [f for f in files if not f.name.endswith(".lock")]

        # A request's access line is written just after its answer is sent: give the last one a moment.
        deadline = time.monotonic() + 5
        while "".join(f.read_text() for f in log_files()).count("POST /v1/embeddings") < n \
                and time.monotonic() < deadline:
            time.sleep(0.05)
        files = log_files()
        assert len(files) >= 4
        for f in files[1:]:
            assert f.stat().st_size < 4096 + 1024
        text = "".join(f.read_text() for f in files)
        assert text.count("POST /v1/embeddings") == n
    finally:
        redis.stop()
