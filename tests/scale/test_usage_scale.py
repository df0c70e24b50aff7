"""Usage and token limits with real processes: 4 workers sharing a real redis-server, restarts."""

import concurrent.futures as cf
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from tests.procs import ROOT
from tests.scale.test_scale_out import gateway, procs, redis, serving_pids  # noqa: F401 - fixtures

BODY = {"input": "one two three four five six seven eight"}  # the fake counts 10 prompt tokens
REQUEST_TOKENS = 10
WORKERS = 4


def hammer(url: str, key: str, until: float, clients: int) -> list[tuple[int, int]]:
    """Clients sending BODY one after another until `until`; (status, prompt tokens) of every answer."""
    barrier = threading.Barrier(clients)

    def client(_: int) -> list[tuple[int, int]]:
        got = []
        with httpx.Client(timeout=30, limits=httpx.Limits(max_keepalive_connections=0)) as c:
            barrier.wait()
            while time.time() < until:
                r = c.post(url + "/v1/embeddings", json=BODY, headers={"Authorization": f"Bearer {key}"})
                got.append((r.status_code, r.json()["usage"]["prompt_tokens"] if r.status_code == 200 else 0))
                if r.status_code != 200:
                    assert r.status_code == 429 and r.json()["error"]["code"] == "token_limit_exceeded", r.text
                    assert int(r.headers["retry-after"]) >= 1
                    time.sleep(0.02)
        return got

    with cf.ThreadPoolExecutor(clients) as pool:
        return [x for got in pool.map(client, range(clients)) for x in got]


def test_token_limit_exact_across_four_workers(tmp_path, procs, redis, fake_embed, fake_rerank):  # noqa: F811
    limit, period = 600, 10
    gw = gateway(tmp_path, procs, fake_embed.url, fake_rerank.url, WORKERS=str(WORKERS), REDIS_URL=redis.url,
                 RATE_LIMIT="1000000/minute", TOKEN_LIMIT=f"{limit}/{period} seconds")
    # the windows are fixed (aligned to multiples of the period, Redis's clock: this host's): start at
    # the beginning of one and stop well before its end, so every answer is charged to that one window
    while time.time() % period > 0.3:
        time.sleep(0.02)
    start = time.time()
    answers = hammer(gw.url, gw.key, start + period * 0.6, clients=12)
    assert time.time() < start - start % period + period  # still in the same window
    admitted = sum(t for s, t in answers if s == 200)
    refused = sum(1 for s, _ in answers if s == 429)
    overshoot = admitted - limit
    print(f"\ntoken limit {limit}/{period}s, {WORKERS} workers, 12 clients: {admitted} tokens admitted "
          f"({sum(1 for s, _ in answers if s == 200)} requests of {REQUEST_TOKENS}), overshoot {overshoot} tokens, "
          f"{refused} refused")
    assert refused > 0 and admitted >= limit  # the window was used up
    assert overshoot <= WORKERS * REQUEST_TOKENS  # at most one request's tokens per worker
    assert len(serving_pids(gw)) >= 2  # the requests really were spread over several workers
    # the usage counters (Redis) saw exactly the admitted tokens
    time.sleep(1.0)
    doc = httpx.get(gw.url + "/v1/usage", headers=gw.auth()).json()
    assert doc["total"]["prompt_tokens"] == admitted
    assert doc["total"]["requests"] == len(answers) and doc["total"]["errors_4xx"] == refused


def keys_usage(env: dict) -> list[dict]:
    out = subprocess.run([sys.executable, str(ROOT / "embedding_reranker_proxy.py"), "keys", "usage", "--json"],
                         env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)["data"]


def test_usage_in_redis_adds_across_workers_and_survives_a_restart(tmp_path, procs, redis,  # noqa: F811
                                                                   fake_embed, fake_rerank):
    gw = gateway(tmp_path, procs, fake_embed.url, fake_rerank.url, WORKERS=str(WORKERS), REDIS_URL=redis.url,
                 RATE_LIMIT="1000000/minute")
    with cf.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda i: httpx.post(gw.url + "/v1/embeddings", json={"input": [f"t {i}", "a b c"]},
                                                     headers=gw.auth(), timeout=30).json(), range(40)))
    tokens = sum(a["usage"]["prompt_tokens"] for a in answers)
    assert len(serving_pids(gw)) >= 2
    gw.proc.stop()  # SIGTERM: every worker flushes what it answered
    assert not (tmp_path / "gw0" / "er_usage.db").exists()  # with REDIS_URL the counters live in Redis

    again = gateway(tmp_path, procs, fake_embed.url, fake_rerank.url, keyfile=Path(gw.env["API_KEYS_FILE"]),
                    REDIS_URL=redis.url, RATE_LIMIT="1000000/minute")
    doc = httpx.get(again.url + "/v1/usage", headers=gw.auth()).json()
    assert (doc["total"]["requests"], doc["total"]["items"], doc["total"]["prompt_tokens"]) == (40, 80, tokens)
    rows = keys_usage(again.env)
    assert sum(r["prompt_tokens"] for r in rows if r["key"] == "tester") == tokens


def test_redis_down_fail_open_keeps_token_limits_per_process(tmp_path, procs, redis,  # noqa: F811
                                                             fake_embed, fake_rerank):
    gw = gateway(tmp_path, procs, fake_embed.url, fake_rerank.url, REDIS_URL=redis.url, REDIS_FAIL_OPEN="true",
                 RATE_LIMIT="1000/minute", TOKEN_LIMIT="25/hour")
    redis.stop()
    codes, slowest = [], 0.0
    for _ in range(5):
        t0 = time.monotonic()
        codes.append(httpx.post(gw.url + "/v1/embeddings", json=BODY, headers=gw.auth(), timeout=10).status_code)
        slowest = max(slowest, time.monotonic() - t0)
    assert codes[-2:] == [429, 429] and codes[0] == 200  # this process's own window (10-token requests)
    assert codes.count(200) == 3
    # usage waits in memory for Redis; the answers never wait for it (after the first noticed it down)
    assert slowest < 3.5
