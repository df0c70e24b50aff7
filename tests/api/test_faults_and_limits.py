"""Admission limits and upstream faults, each against its own gateway process and fake upstreams."""

import concurrent.futures as cf
import json
import os
import socket
import stat
import time
from pathlib import Path

import httpx
import pytest

from tests.procs import free_port, gateway_env, set_fake_mode, start_fake, start_gateway, wait_http


@pytest.fixture
def own_fakes(tmp_path):
    embed, rerank = start_fake(tmp_path, "embed"), start_fake(tmp_path, "rerank")
    yield embed, rerank
    embed.stop()
    rerank.stop()


def post_embed(gw, **kw):
    return httpx.post(gw.url + "/v1/embeddings", json={"model": "minilm", "input": "hello world"},
                      headers=kw.pop("headers", gw.auth()), timeout=kw.pop("timeout", 30), **kw)


def test_body_over_limit_is_413(make_gateway):
    gw = make_gateway(MAX_BODY_BYTES="2048")
    r = httpx.post(gw.url + "/v1/embeddings", headers=gw.auth(), json={"input": "x" * 5000})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    def chunks():  # no content-length: counted while streaming
        for _ in range(10):
            yield b"x" * 1000

    r = httpx.post(gw.url + "/v1/embeddings", headers=gw.auth(), content=chunks())
    assert r.status_code == 413


def test_rate_limit_per_key_is_429_with_retry_after(make_gateway):
    gw = make_gateway(RATE_LIMIT="3/minute", key_names=("alice", "bob"))
    alice, bob = gw.keys["alice"], gw.keys["bob"]
    codes = [post_embed(gw, headers={"Authorization": f"Bearer {alice}"}).status_code for _ in range(4)]
    assert codes == [200, 200, 200, 429]
    r = post_embed(gw, headers={"Authorization": f"Bearer {alice}"})
    assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limit_exceeded"
    assert 1 <= int(r.headers["retry-after"]) <= 60
    assert "3 per 1 minute" in r.json()["error"]["message"]
    assert post_embed(gw, headers={"Authorization": f"Bearer {bob}"}).status_code == 200  # per key


def test_concurrency_cap_is_a_distinct_429(tmp_path, make_gateway):
    slow = start_fake(tmp_path, "embed", delay=1.0)
    try:
        gw = make_gateway(embed=slow.url, MAX_CONCURRENT_REQUESTS="2")
        with cf.ThreadPoolExecutor(6) as pool:
            results = list(pool.map(lambda _: post_embed(gw), range(6)))
        codes = sorted(r.status_code for r in results)
        assert codes.count(200) == 2 and codes.count(429) == 4
        rejected = [r for r in results if r.status_code == 429][0]
        assert rejected.json()["error"]["code"] == "concurrency_limit_exceeded"
        assert rejected.headers["retry-after"] == "1"
    finally:
        slow.stop()


@pytest.mark.parametrize("mode", ["error500", "garbage", "badjson", "reset"])
def test_upstream_garbage_or_5xx_is_502(own_fakes, make_gateway, mode):
    embed, rerank = own_fakes
    gw = make_gateway(embed=embed.url, rerank=rerank.url)
    set_fake_mode(embed, mode)
    set_fake_mode(rerank, mode)
    r = post_embed(gw)
    assert r.status_code == 502, r.text
    assert r.json()["error"]["type"] == "upstream_error"
    r = httpx.post(gw.url + "/v1/rerank", headers=gw.auth(), json={"query": "q", "documents": ["a"]})
    assert r.status_code == 502


def test_unreachable_upstream_is_503_and_health_degraded(make_gateway, fake_rerank):
    closed = f"http://127.0.0.1:{free_port()}"
    gw = make_gateway(embed=closed)
    r = post_embed(gw)
    assert r.status_code == 503 and r.json()["error"]["code"] == "upstream_unavailable"
    assert "check_models_status" in r.json()["error"]["message"]
    h = httpx.get(gw.url + "/health")
    assert h.status_code == 503 and h.json()["status"] == "degraded" and h.json()["unavailable"] == ["embedding"]
    ok = httpx.post(gw.url + "/v1/rerank", headers=gw.auth(), json={"query": "q", "documents": ["a"]})
    assert ok.status_code == 200  # the other model still serves


def test_hanging_upstream_is_504_at_timeout(own_fakes, make_gateway):
    embed, rerank = own_fakes
    gw = make_gateway(embed=embed.url, rerank=rerank.url, TIMEOUT="1")
    set_fake_mode(embed, "hang")
    t0 = time.monotonic()
    r = post_embed(gw)
    elapsed = time.monotonic() - t0
    assert r.status_code == 504 and r.json()["error"]["code"] == "upstream_timeout"
    assert 0.9 <= elapsed < 5


def test_client_disconnect_cancels_the_upstream_request(own_fakes, make_gateway):
    embed, rerank = own_fakes
    gw = make_gateway(embed=embed.url, rerank=rerank.url, TIMEOUT="120")
    set_fake_mode(embed, "hang")
    with pytest.raises(httpx.ReadTimeout):
        post_embed(gw, timeout=1.0)

    def in_flight():
        return httpx.get(gw.url + "/health").json()["upstreams"]["embedding"]["replicas"][0]["in_flight"]

    deadline = time.monotonic() + 5
    while in_flight() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert in_flight() == 0  # without cancellation it would stay 1 for TIMEOUT=120 s
    assert "status=499" in gw.log_file().read_text()


def test_first_start_creates_key_file_and_prints_key_once(tmp_path, fake_embed, fake_rerank):
    env = gateway_env(tmp_path, fake_embed.url, fake_rerank.url)
    keys_file = Path(env["API_KEYS_FILE"])
    proc = start_gateway(tmp_path, env)
    try:
        out = proc.output()
        key = next(w for w in out.split() if w.startswith("er-") and len(w) > 30)
        assert stat.S_IMODE(os.stat(keys_file).st_mode) == 0o600
        assert key not in keys_file.read_text()
        assert key not in (Path(env["LOG_DIR"]) / "embedding_reranker_proxy.log").read_text()
        r = httpx.get(proc.url + "/v1/models", headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 200
    finally:
        proc.stop()
    before = keys_file.read_bytes()
    proc = start_gateway(tmp_path, env)  # second start: same file, no new key printed
    try:
        assert keys_file.read_bytes() == before
        assert "A new API key" not in proc.output()
    finally:
        proc.stop()


def test_corrupt_key_file_stops_start_up_untouched(tmp_path, fake_embed, fake_rerank):
    env = gateway_env(tmp_path, fake_embed.url, fake_rerank.url)
    Path(env["API_KEYS_FILE"]).write_text('{"keys": [oops')
    proc = start_gateway(tmp_path, env, wait=False)
    assert proc.popen.wait(30) != 0
    assert "not valid JSON" in proc.output() and env["API_KEYS_FILE"] in proc.output()
    assert Path(env["API_KEYS_FILE"]).read_text() == '{"keys": [oops'


def test_bad_configuration_stops_start_up_naming_the_variable(tmp_path, fake_embed, fake_rerank):
    env = gateway_env(tmp_path, fake_embed.url, fake_rerank.url, RATE_LIMIT="fast please")
    proc = start_gateway(tmp_path, env, wait=False)
    assert proc.popen.wait(30) == 2
    assert "RATE_LIMIT" in proc.output()


def test_key_revoked_in_file_is_refused_without_restart(make_gateway):
    from erproxy.keys import read_records, write_key_file
    gw = make_gateway()
    assert post_embed(gw).status_code == 200
    path = Path(gw.env["API_KEYS_FILE"])
    records = read_records(path)
    records[0].revoked = True
    write_key_file(path, records)
    deadline = time.monotonic() + 3
    while post_embed(gw).status_code == 200 and time.monotonic() < deadline:
        time.sleep(0.1)
    r = post_embed(gw)
    assert r.status_code == 401 and "revoked" in r.json()["error"]["message"]
