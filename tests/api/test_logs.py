"""Access log: JSON lines on request, size-based rotation that loses nothing across workers."""

import json

import httpx

from tests.procs import RedisServer


def test_json_access_log(make_gateway):
    gw = make_gateway(LOG_JSON="1")
    httpx.post(gw.url + "/v1/embeddings", headers=gw.auth(), json={"model": "minilm", "input": ["a", "b"]})
    lines = [json.loads(ln) for ln in gw.log_file().read_text().splitlines() if ln.startswith("{")]
    entry = [e for e in lines if e["route"] == "/v1/embeddings"][-1]
    assert entry["key"] == "tester" and entry["status"] == 200 and entry["items"] == 2 and entry["model"] == "minilm"
    assert entry["upstream"] == gw.env["EMBEDDING_UPSTREAMS"] and entry["latency_ms"] > 0 and entry["time"].endswith("Z")
    assert gw.key not in gw.log_file().read_text()


def test_rotation_by_size_keeps_every_line_across_workers(make_gateway, tmp_path):
    redis = RedisServer(tmp_path).start()
    try:
        gw = make_gateway(WORKERS="2", REDIS_URL=redis.url, LOG_MAX_BYTES="4096", LOG_BACKUPS="100",
                          RATE_LIMIT="100000/minute")
        n = 120
        for i in range(n):
            with httpx.Client() as c:
                assert c.post(gw.url + "/v1/embeddings", headers=gw.auth(), json={"input": f"r{i}"}).status_code == 200
        log_dir = gw.log_file().parent
        files = sorted(log_dir.glob("embedding_reranker_proxy.log*"))
        files = [f for f in files if not f.name.endswith(".lock")]
        assert len(files) >= 4
        for f in files[1:]:
            assert f.stat().st_size < 4096 + 1024
        text = "".join(f.read_text() for f in files)
        assert text.count("POST /v1/embeddings") == n
    finally:
        redis.stop()
