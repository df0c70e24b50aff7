"""Scale-out and resilience with real processes: workers, instances, Redis, replicas, SIGTERM."""

import concurrent.futures as cf
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.procs import (
    ROOT,
    Gateway,
    RedisServer,
    free_port,
    gateway_env,
    make_key_file,
    set_fake_mode,
    start_fake,
    start_gateway,
)


@pytest.fixture
def redis(tmp_path):
    server = RedisServer(tmp_path).start()
    yield server
    server.stop()


@pytest.fixture
def procs():
    started = []
    yield started
    for p in started:
        p.stop()


def gateway(tmp: Path, procs: list, embed: str, rerank: str, keys: dict | None = None, keyfile: Path | None = None,
            **overrides: str) -> Gateway:
    d = tmp / f"gw{len(procs)}"
    d.mkdir()
    env = gateway_env(d, embed, rerank, **overrides)
    if keyfile is not None:
        shutil.copy(keyfile, env["API_KEYS_FILE"])
    elif keys is None:
        keys = make_key_file(Path(env["API_KEYS_FILE"]))
    proc = start_gateway(d, env)
    procs.append(proc)
    return Gateway(proc, env, keys or {})


def burst(urls: list[str], key: str, n: int, clients: int = 6) -> list[int]:
    """n embedding requests at once, spread over several clients and gateway URLs; returns status codes."""
    barrier = threading.Barrier(clients)

    def client(i: int) -> list[int]:
        codes = []
        with httpx.Client(timeout=30, limits=httpx.Limits(max_keepalive_connections=0)) as c:
            barrier.wait()
            for j in range(i, n, clients):
                url = urls[j % len(urls)]
                codes.append(c.post(url + "/v1/embeddings", json={"input": "hello world"},
                                    headers={"Authorization": f"Bearer {key}"}).status_code)
        return codes

    with cf.ThreadPoolExecutor(clients) as pool:
        return [c for codes in pool.map(client, range(clients)) for c in codes]


def serving_pids(gw: Gateway, requests: int = 1) -> set[str]:
    """The pids of the workers whose access lines show POST /v1/embeddings, once `requests` are there."""
    text = gw.log_text(until="POST /v1/embeddings", count=requests)
    return set(re.findall(r"\[(\d+)\] erproxy\.access .*POST /v1/embeddings", text))


def test_rate_limit_exact_across_four_workers(tmp_path, procs, redis, fake_embed, fake_rerank):
    gw = gateway(tmp_path, procs, fake_embed.url, fake_rerank.url, WORKERS="4", REDIS_URL=redis.url,
                 RATE_LIMIT="20/minute")
    codes = burst([gw.url], gw.key, 60)
    assert codes.count(200) == 20 and codes.count(429) == 40
    assert len(serving_pids(gw, 60)) >= 2  # the requests really were spread over several workers


def test_rate_limit_exact_across_two_instances(tmp_path, procs, redis, fake_embed, fake_rerank):
    a = gateway(tmp_path, procs, fake_embed.url, fake_rerank.url, WORKERS="2", REDIS_URL=redis.url,
                RATE_LIMIT="20/minute")
    b = gateway(tmp_path, procs, fake_embed.url, fake_rerank.url, keyfile=Path(a.env["API_KEYS_FILE"]),
                WORKERS="2", REDIS_URL=redis.url, RATE_LIMIT="20/minute")
    codes = burst([a.url, b.url], a.key, 60)
    assert codes.count(200) == 20 and codes.count(429) == 40
    assert serving_pids(a) and serving_pids(b)


def test_concurrency_cap_exact_across_workers(tmp_path, procs, redis, fake_rerank):
    slow = start_fake(tmp_path, "embed", delay=1.5)
    procs.append(slow)
    gw = gateway(tmp_path, procs, slow.url, fake_rerank.url, WORKERS="4", REDIS_URL=redis.url,
                 MAX_CONCURRENT_REQUESTS="3")
    codes = burst([gw.url], gw.key, 12, clients=12)
    assert codes.count(200) == 3 and codes.count(429) == 9
    assert burst([gw.url], gw.key, 3, clients=3) == [200, 200, 200]  # slots were given back


def test_revocation_reaches_every_worker_and_instance_within_a_second(tmp_path, procs, redis, fake_embed,
                                                                      fake_rerank):
    a = gateway(tmp_path, procs, fake_embed.url, fake_rerank.url, WORKERS="4", REDIS_URL=redis.url,
                RATE_LIMIT="100000/minute")
    b = gateway(tmp_path, procs, fake_embed.url, fake_rerank.url, keyfile=Path(a.env["API_KEYS_FILE"]),
                REDIS_URL=redis.url, RATE_LIMIT="100000/minute")  # another host: its own copy of the file
    assert set(burst([a.url, b.url], a.key, 24)) == {200}
    out = subprocess.run([sys.executable, str(ROOT / "embedding_reranker_proxy.py"), "keys", "revoke", "tester"],
                         env=a.env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    time.sleep(1.0)
    codes = burst([a.url, b.url], a.key, 48, clients=8)
    assert set(codes) == {401}, codes


def test_redis_down_is_503_and_recovers_without_restart(tmp_path, procs, redis, fake_embed, fake_rerank):
    gw = gateway(tmp_path, procs, fake_embed.url, fake_rerank.url, WORKERS="2", REDIS_URL=redis.url)
    assert burst([gw.url], gw.key, 4) == [200] * 4
    redis.stop()
    r = httpx.post(gw.url + "/v1/embeddings", json={"input": "x"}, headers=gw.auth(), timeout=10)
    assert r.status_code == 503 and r.json()["error"]["code"] == "limits_unavailable"
    redis.start()
    # each worker notices on its own (its poll, within a second or so): a burst that happened to reach
    # only the first one back says nothing of the other, so wait for two whole bursts in a row
    deadline, good = time.monotonic() + 10, 0
    while time.monotonic() < deadline and good < 2:
        good = good + 1 if set(burst([gw.url], gw.key, 8)) == {200} else 0
        time.sleep(0.2)
    assert good == 2
    assert set(burst([gw.url], gw.key, 8)) == {200}


def test_redis_fail_open_admits_under_local_limits(tmp_path, procs, redis, fake_embed, fake_rerank):
    gw = gateway(tmp_path, procs, fake_embed.url, fake_rerank.url, REDIS_URL=redis.url, REDIS_FAIL_OPEN="true",
                 RATE_LIMIT="5/minute")
    redis.stop()
    codes = [httpx.post(gw.url + "/v1/embeddings", json={"input": "x"}, headers=gw.auth(), timeout=10).status_code
             for _ in range(6)]
    assert codes == [200] * 5 + [429]


def load(url: str, key: str, stop: threading.Event, errors: list, ok: list) -> None:
    with httpx.Client(timeout=30) as c:
        while not stop.is_set():
            try:
                r = c.post(url + "/v1/embeddings", json={"input": "hello world"},
                           headers={"Authorization": f"Bearer {key}"})
                (ok if r.status_code == 200 else errors).append(r.status_code)
            except httpx.HTTPError as e:
                errors.append(repr(e))


def test_killed_replica_costs_no_client_error_and_comes_back(tmp_path, procs, fake_rerank):
    port_b = free_port()
    a = start_fake(tmp_path, "embed")
    b = start_fake(tmp_path, "embed", port=port_b, delay=0.005)
    procs += [a, b]
    gw = gateway(tmp_path, procs, f"{a.url},{b.url}", fake_rerank.url, RATE_LIMIT="1000000/minute")
    stop, errors, ok = threading.Event(), [], []
    threads = [threading.Thread(target=load, args=(gw.url, gw.key, stop, errors, ok)) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    b.popen.kill()                      # dies with requests in flight
    b.popen.wait()
    time.sleep(1.5)
    health = httpx.get(gw.url + "/health").json()["upstreams"]["embedding"]["replicas"]
    assert [r["healthy"] for r in health] == [True, False]
    b2 = start_fake(tmp_path, "embed", port=port_b)
    procs.append(b2)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and httpx.get(b2.url + "/_fake/stats").json()["requests"].get(
            "/v1/embeddings", 0) < 5:
        time.sleep(0.2)
    stop.set()
    for t in threads:
        t.join()
    assert errors == []
    assert len(ok) > 100
    assert httpx.get(b2.url + "/_fake/stats").json()["requests"].get("/v1/embeddings", 0) >= 5
    models = httpx.get(gw.url + "/v1/models", headers=gw.auth()).json()["data"]
    assert [r["healthy"] for r in models[0]["replicas"]] == [True, True]


def test_hanging_replica_times_out_while_the_other_keeps_serving(tmp_path, procs, fake_rerank):
    a = start_fake(tmp_path, "embed")
    b = start_fake(tmp_path, "embed")
    procs += [a, b]
    set_fake_mode(b, "hang")
    gw = gateway(tmp_path, procs, f"{a.url},{b.url}", fake_rerank.url, TIMEOUT="1", HEALTH_INTERVAL="30")
    set_fake_mode(b, "normal")  # healthy at start-up ...
    httpx.post(gw.url + "/v1/embeddings", json={"input": "warm"}, headers=gw.auth())
    set_fake_mode(b, "hang")    # ... then hangs
    codes: list[int] = []
    timings: list[float] = []
    with cf.ThreadPoolExecutor(4) as pool:
        def one(_):
            t0 = time.monotonic()
            r = httpx.post(gw.url + "/v1/embeddings", json={"input": "x"}, headers=gw.auth(), timeout=30)
            return r.status_code, time.monotonic() - t0
        for code, dt in pool.map(one, range(8)):
            codes.append(code)
            timings.append(dt)
    assert set(codes) <= {200, 504} and 200 in codes
    for code, dt in zip(codes, timings):
        if code == 504:
            assert 0.9 <= dt < 3  # at TIMEOUT, never retried after it
    after = [httpx.post(gw.url + "/v1/embeddings", json={"input": "x"}, headers=gw.auth(), timeout=30).status_code
             for _ in range(10)]
    assert after == [200] * 10  # the hanging replica was ejected


def test_sigterm_finishes_in_flight_requests(tmp_path, procs, fake_rerank):
    slow = start_fake(tmp_path, "embed", delay=1.5)
    procs.append(slow)
    gw = gateway(tmp_path, procs, slow.url, fake_rerank.url, SHUTDOWN_GRACE="20")
    with cf.ThreadPoolExecutor(10) as pool:
        futures = [pool.submit(httpx.post, gw.url + "/v1/embeddings", json={"input": f"t{i}"},
                               headers=gw.auth(), timeout=30) for i in range(10)]
        time.sleep(0.5)
        gw.proc.popen.send_signal(signal.SIGTERM)
        codes = [f.result().status_code for f in futures]
    assert codes == [200] * 10
    assert gw.proc.popen.wait(20) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once drained
    assert "Application shutdown complete" in gw.proc.output()
    with pytest.raises(httpx.ConnectError):
        httpx.get(gw.url + "/health", timeout=2)
