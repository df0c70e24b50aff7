"""Usage accounting and token limits in-process: counters equal the upstreams' `usage`, survive a
restart (SQLite), a key sees only its own, and a token-limited key is refused with 429."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import httpx

from erproxy.app import create_app
from erproxy.settings import Settings
from tests.api.conftest import GATEWAY_URL, Lifespan
from tests.procs import gateway_env, make_key_file

EMBED_MIX = [
    {"input": "hello world"},
    {"input": ["one two three", "four five", "six seven eight nine"]},
    {"input": ["alpha beta"] * 5, "encoding_format": "base64"},
]
RERANK_MIX = [
    {"query": "What is AI?", "documents": ["AI is artificial intelligence", "Bananas are yellow"]},
    {"query": "q", "documents": [f"doc number {i}" for i in range(7)], "top_n": 2},
]


async def send_mix(gw, key: str) -> dict[str, int]:
    """A known mix of requests; returns the counters they should add up to (from the answers' usage)."""
    want = {"requests": 0, "items": 0, "prompt_tokens": 0, "errors_4xx": 0}
    for body in EMBED_MIX:
        r = await gw.post("/v1/embeddings", json=body, headers=gw.auth(key))
        assert r.status_code == 200, r.text
        want["requests"] += 1
        want["items"] += 1 if isinstance(body["input"], str) else len(body["input"])
        want["prompt_tokens"] += r.json()["usage"]["prompt_tokens"]
    for body in RERANK_MIX:
        r = await gw.post("/v1/rerank", json=body, headers=gw.auth(key))
        assert r.status_code == 200, r.text
        want["requests"] += 1
        want["items"] += len(body["documents"])
        want["prompt_tokens"] += r.json()["usage"]["prompt_tokens"]
    r = await gw.post("/v2/embed", json={"texts": ["a b c", "d e"], "input_type": "search_document"},
                      headers=gw.auth(key))
    assert r.status_code == 200, r.text
    want["requests"] += 1
    want["items"] += 2
    want["prompt_tokens"] += r.json()["meta"]["billed_units"]["input_tokens"]
    r = await gw.post("/v1/embeddings", json={"input": "x", "model": "no-such-model"}, headers=gw.auth(key))
    assert r.status_code == 404
    want["requests"] += 1
    want["items"] += 1
    want["errors_4xx"] += 1
    return want


async def usage_of(gw, key: str, **params: str) -> dict:
    r = await gw.get("/v1/usage", headers=gw.auth(key), params=params)
    assert r.status_code == 200, r.text
    return r.json()


async def test_counters_equal_the_sum_of_the_upstream_usage(make_gateway):
    gw = await make_gateway(RATE_LIMIT="100000/minute")
    want = await send_mix(gw, gw.key)
    doc = await usage_of(gw, gw.key)
    assert doc["key"] == "tester" and doc["object"] == "usage"
    total = doc["total"]
    assert {k: total[k] for k in want} == want
    assert total["errors_5xx"] == 0 and total["cache_hits"] == 0
    models = {row["model"] for row in doc["data"]}
    assert models >= {"minilm"} and all(row["day"] for row in doc["data"])
    # the metric by key and model carries the same tokens
    text = (await gw.get("/metrics")).text
    per_key = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                  if line.startswith('erproxy_key_tokens_total{key="tester"'))
    assert per_key == want["prompt_tokens"]


async def test_split_and_partly_cached_requests_count_what_the_upstream_processed(make_gateway, fakes, fake_embed):
    second = await fakes.start("embed")
    gw = await make_gateway(embed=f"{fake_embed.url},{second.url}", RATE_LIMIT="100000/minute", CACHE_MAX_BYTES="64MiB",
                            SPLIT_EMBEDDING_INPUTS="2", SPLIT_RERANK_DOCUMENTS="2")
    await asyncio.sleep(0.2)  # both replicas healthy
    tokens = items = hits = 0
    for body in ({"input": [f"split text {i}" for i in range(6)]},            # split over both replicas
                 {"input": [f"split text {i}" for i in range(3, 9)]},         # half of it cached
                 {"input": "hello world"}, {"input": "hello world"}):         # single, then cached
        r = await gw.post("/v1/embeddings", json=body, headers=gw.auth())
        assert r.status_code == 200, r.text
        tokens += r.json()["usage"]["prompt_tokens"]
        items += 1 if isinstance(body["input"], str) else len(body["input"])
        hits += int(r.headers.get("x-cache-hits", "0"))
    r = await gw.post("/v1/rerank", json={"query": "q", "documents": [f"d {i}" for i in range(5)]},
                      headers=gw.auth())
    assert r.status_code == 200
    tokens += r.json()["usage"]["prompt_tokens"]
    items += 5
    hits += int(r.headers.get("x-cache-hits", "0"))
    total = (await usage_of(gw, gw.key))["total"]
    assert hits > 0  # the mix really was partly cached
    assert (total["requests"], total["items"], total["prompt_tokens"], total["cache_hits"]) == (5, items, tokens, hits)


async def test_a_key_sees_only_its_own_usage(make_gateway):
    gw = await make_gateway(key_names=("team-a", "team-b"), RATE_LIMIT="100000/minute")
    a, b = gw.keys["team-a"], gw.keys["team-b"]
    for _ in range(3):
        assert (await gw.post("/v1/embeddings", json={"input": "only a"}, headers=gw.auth(a))).status_code == 200
    assert (await gw.post("/v1/rerank", json={"query": "q", "documents": ["x"]}, headers=gw.auth(b))).status_code == 200
    doc_a, doc_b = await usage_of(gw, a), await usage_of(gw, b)
    assert doc_a["key"] == "team-a" and doc_a["total"]["requests"] == 3 and doc_a["total"]["items"] == 3
    assert doc_b["key"] == "team-b" and doc_b["total"]["requests"] == 1
    assert {r["model"] for r in doc_a["data"]} == {"minilm"}
    assert all(r["model"] != "minilm" for r in doc_b["data"])
    # a key cannot ask for another's: there is no parameter for it, and the answer names the caller
    r = await gw.get("/v1/usage", headers=gw.auth(b), params={"key": "team-a"})
    assert r.json()["key"] == "team-b" and r.json()["total"]["items"] == 1
    assert r.json()["total"]["requests"] == 2  # its rerank and its first GET /v1/usage


async def test_usage_needs_a_key_and_checks_its_days(make_gateway):
    gw = await make_gateway()
    assert (await gw.get("/v1/usage")).status_code == 401
    r = await gw.get("/v1/usage", headers=gw.auth(), params={"since": "yesterday"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "since"
    swapped = await gw.get("/v1/usage", headers=gw.auth(), params={"since": "2026-12-01", "until": "2026-11-01"})
    assert swapped.status_code == 400 and "since 2026-12-01 is after until 2026-11-01" in swapped.json()["error"]["message"]
    assert (await gw.post("/v1/embeddings", json={"input": "x"}, headers=gw.auth())).status_code == 200
    assert (await usage_of(gw, gw.key, since="2999-01-01"))["data"] == []
    assert (await usage_of(gw, gw.key, until="2000-01-01"))["data"] == []
    assert (await usage_of(gw, gw.key, model="minilm"))["total"]["requests"] == 1
    assert (await usage_of(gw, gw.key, model="other"))["total"]["requests"] == 0


async def started(env: dict[str, str]) -> tuple[Lifespan, httpx.AsyncClient]:
    app = create_app(Settings.from_env(env, env_file=""))
    lifespan = Lifespan(app)
    await lifespan.__aenter__()
    return lifespan, httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=GATEWAY_URL)


async def test_a_restart_keeps_the_counters_in_sqlite(tmp_path: Path, fake_embed, fake_rerank):
    env = gateway_env(tmp_path, fake_embed.url, fake_rerank.url, RATE_LIMIT="100000/minute")
    key = make_key_file(Path(env["API_KEYS_FILE"]))["tester"]
    auth = {"Authorization": f"Bearer {key}"}
    lifespan, client = await started(env)
    tokens = 0
    for i in range(4):
        r = await client.post("/v1/embeddings", json={"input": [f"text {i}", "more words here"]}, headers=auth)
        tokens += r.json()["usage"]["prompt_tokens"]
    await client.aclose()
    await lifespan.__aexit__(None, None, None)  # a graceful stop flushes what was answered

    db = tmp_path / "er_usage.db"  # beside the key file, in WAL mode
    assert db.exists()
    con = sqlite3.connect(db)
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert con.execute("SELECT sum(requests), sum(items), sum(prompt_tokens) FROM usage").fetchone() == (4, 8, tokens)
    con.close()

    lifespan, client = await started(env)
    try:
        doc = (await client.get("/v1/usage", headers=auth)).json()
        assert (doc["total"]["requests"], doc["total"]["prompt_tokens"]) == (4, tokens)
        await client.post("/v1/embeddings", json={"input": "after restart"}, headers=auth)
        doc = (await client.get("/v1/usage", headers=auth)).json()
        assert doc["total"]["requests"] == 6  # GET /v1/usage counts as a request of the key too (model "-")
    finally:
        await client.aclose()
        await lifespan.__aexit__(None, None, None)


async def test_a_token_limited_key_gets_429_token_limit_exceeded(make_gateway):
    gw = await make_gateway(key_names=("limited", "free"), RATE_LIMIT="100000/minute", TOKEN_LIMIT="50/hour")
    limited = gw.keys["limited"]
    used, codes = 0, []
    for _ in range(20):
        r = await gw.post("/v1/embeddings", json={"input": "one two three four five six seven eight"},
                          headers=gw.auth(limited))  # 10 tokens each
        codes.append(r.status_code)
        if r.status_code == 200:
            used += r.json()["usage"]["prompt_tokens"]
        else:
            break
    assert codes[-1] == 429 and codes[:-1] == [200] * (len(codes) - 1)
    assert 50 <= used <= 50 + 10  # admitted while the window had budget: overshoot by one request at most
    err = r.json()["error"]
    assert err["code"] == "token_limit_exceeded" and "50/hour" in err["message"]
    assert 1 <= int(r.headers["retry-after"]) <= 3600
    # the refusal is a counted request and error of the key, and a rejection in the metrics
    doc = await usage_of(gw, limited)
    assert doc["total"]["errors_4xx"] == 1 and doc["total"]["prompt_tokens"] == used
    assert 'erproxy_rejections_total{reason="token_limit"} 1.0' in (await gw.get("/metrics")).text


async def test_concurrent_requests_overshoot_by_about_one_request(make_gateway):
    gw = await make_gateway(RATE_LIMIT="100000/minute", TOKEN_LIMIT="100/hour")
    # learn the size first (the window's average), then a burst of 30 concurrent 10-token requests
    r = await gw.post("/v1/embeddings", json={"input": "one two three four five six seven eight"}, headers=gw.auth())
    assert r.json()["usage"]["prompt_tokens"] == 10
    rs = await asyncio.gather(*(gw.post("/v1/embeddings", json={"input": "one two three four five six seven eight"},
                                        headers=gw.auth()) for _ in range(30)))
    admitted = 10 + 10 * sum(1 for x in rs if x.status_code == 200)
    assert 90 <= admitted <= 100 + 10  # in flight counted at the window's average: one request over at most


async def test_keys_with_their_own_token_limit_and_without(make_gateway):
    gw = await make_gateway(key_names=("small",), key_fields={"extra": {"token_limit": "12/hour"}},
                            RATE_LIMIT="100000/minute")
    codes = [(await gw.post("/v1/embeddings", json={"input": "one two three four five six seven eight"},
                            headers=gw.auth())).status_code for _ in range(3)]
    assert codes == [200, 200, 429]  # 10 < 12 admits the second; 20 >= 12 refuses the third


class BrokenStore:
    async def add(self, batch, batch_id=""):
        raise OSError("disk I/O error")

    async def query(self, *args):
        raise OSError("disk I/O error")

    async def close(self):
        return None


async def test_a_broken_store_never_fails_an_answer(make_gateway):
    gw = await make_gateway(RATE_LIMIT="100000/minute")
    usage = gw.app.services.accounting.usage
    usage.store = BrokenStore()
    for _ in range(3):
        assert (await gw.post("/v1/embeddings", json={"input": "still served"}, headers=gw.auth())).status_code == 200
    r = await gw.get("/v1/usage", headers=gw.auth())
    assert r.status_code == 503 and r.json()["error"]["code"] == "usage_unavailable"
    metrics = (await gw.get("/metrics")).text
    assert "erproxy_usage_record_failures_total 1.0" in metrics
    kept = [usage.pending] + ([usage.unsent[1]] if usage.unsent else [])
    assert sum(v[0] for batch in kept for v in batch.values()) == 4  # 3 POSTs and the 503: kept for when the store works


async def test_a_graceful_stop_writes_the_access_lines_still_waiting_for_their_flush(
        tmp_path: Path, fake_embed, fake_rerank, monkeypatch):
    """uvicorn ends a stopping worker by re-raising the signal, so atexit never runs: the lifespan's stop
    writes what the access log still holds (here the flush window is made longer than the test)."""
    import io
    import logging

    from erproxy import flushing, logs

    monkeypatch.setattr(flushing, "FLUSH_WINDOW_S", 3600.0)
    stream = io.StringIO()
    console = logging.StreamHandler(stream)
    console.setFormatter(logs.Formatter("%(message)s"))
    monkeypatch.setattr(logs, "_batch", logs.AccessBatch([console]))
    monkeypatch.setattr(logging.root.manager, "disable", 0)
    before = logs.access_log.level
    logs.access_log.setLevel(logging.INFO)  # setLevel, not an attribute: it clears isEnabledFor's cache
    try:
        env = gateway_env(tmp_path, fake_embed.url, fake_rerank.url, RATE_LIMIT="100000/minute")
        key = make_key_file(Path(env["API_KEYS_FILE"]))["tester"]
        lifespan, client = await started(env)
        r = await client.post("/v1/embeddings", json={"input": "hello"},
                              headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 200
        assert stream.getvalue() == ""  # still waiting for its window
        await client.aclose()
        await lifespan.__aexit__(None, None, None)
        assert "key=tester POST /v1/embeddings" in stream.getvalue()
    finally:
        logs.access_log.setLevel(before)
