"""The item cache (erproxy/cache.py, split.py) before the fake vLLM: what reaches vLLM, what clients get.

Hits answer the exact float32 values of the first answer, in float (printed as vLLM prints them) and
base64; only misses go upstream, merged in input order; Cache-Control no-cache/no-store; headers,
usage, metrics and /health say what happened; Redis shares the cache and being down fails nothing.
"""

import base64
import json
import struct

import pytest
import redis

from tests.api.test_dialects import upstream_bodies
from tests.api.test_metrics import scrape, value
from tests.fakes.fake_vllm import generated_vector
from tests.procs import RedisServer

ON = {"CACHE_MAX_BYTES": "64MiB"}
DOCS = ["AI is artificial intelligence", "AI helps humans", "Bananas are yellow", "Paris is in France"]


def embedding_texts(body: bytes) -> list[bytes]:
    """The `embedding` values of an answer exactly as printed (each vector's JSON text)."""
    out, i = [], 0
    while (i := body.find(b'"embedding":', i)) >= 0:
        i += len(b'"embedding":')
        j = body.index(b"]", i) + 1 if body[i:i + 1] == b"[" else body.index(b'"', i + 1) + 1
        out.append(body[i:j])
    return out


async def embed(gw, inputs, **kw):
    headers = {**gw.auth(), **kw.pop("headers", {})}
    return await gw.post("/v1/embeddings", headers=headers, json={"model": "minilm", "input": inputs, **kw})


def upstream_calls(server, path="/v1/embeddings") -> int:
    return server.stats()["requests"].get(path, 0)


async def test_second_identical_request_reaches_vllm_with_zero_items(make_gateway, fake_embed):
    gw = await make_gateway(**ON)
    texts = ["hello world", "人工智能是计算机科学的一个分支。", "a third one"]
    first = await embed(gw, texts)
    assert first.status_code == 200, first.text
    assert (first.headers["x-cache-hits"], first.headers["x-cache-misses"]) == ("0", "3")
    calls = upstream_calls(fake_embed)
    second = await embed(gw, texts)
    assert second.status_code == 200
    assert upstream_calls(fake_embed) == calls  # nothing went upstream
    assert (second.headers["x-cache-hits"], second.headers["x-cache-misses"]) == ("3", "0")
    assert embedding_texts(second.content) == embedding_texts(first.content)  # the same numbers, printed the same
    assert second.json()["data"] == first.json()["data"]
    assert first.json()["usage"]["prompt_tokens"] > 0
    assert second.json()["usage"]["prompt_tokens"] == 0  # the upstream processed nothing


async def test_float_answer_prints_vllms_numbers(make_gateway, fake_embed):
    """vLLM prints Python's repr of each float32 widened to a double (9e-05, not 0.00009)."""
    gw = await make_gateway(**ON)
    texts = [f"text number {i}" for i in range(40)]  # 15k values: tiny ones included
    r = await embed(gw, texts)
    printed = embedding_texts(r.content)
    expected = [json.dumps(generated_vector(t), separators=(",", ":")).encode() for t in texts]
    assert printed == expected
    assert any(b"e-" in p for p in printed)
    again = await embed(gw, texts)
    assert embedding_texts(again.content) == expected


@pytest.mark.parametrize("first_format", ["float", "base64"])
async def test_cached_vector_is_the_same_float32_in_float_and_base64(make_gateway, fake_embed, first_format):
    gw = await make_gateway(**ON)
    texts = ["hello world", "x y z"]
    other = "base64" if first_format == "float" else "float"
    a = await embed(gw, texts, encoding_format=first_format)
    b = await embed(gw, texts, encoding_format=other)
    assert b.headers["x-cache-hits"] == "2"
    by = {first_format: a.json()["data"], other: b.json()["data"]}
    for f, raw in zip(by["float"], by["base64"]):
        assert struct.pack(f"<{len(f['embedding'])}f", *f["embedding"]) == base64.b64decode(raw["embedding"])
    # and against what vLLM itself answers for them
    direct = fake_embed.fake.embed({"model": "minilm", "input": texts, "encoding_format": "base64"})
    assert [d["embedding"] for d in json.loads(direct.body)["data"]] == [d["embedding"] for d in by["base64"]]


async def test_partial_hit_sends_only_the_misses_and_merges_in_order(make_gateway, fake_embed):
    gw = await make_gateway(**ON)
    assert (await embed(gw, ["a", "c"])).status_code == 200
    seen = upstream_bodies(fake_embed)
    r = await embed(gw, ["a", "b", "c", "d"])
    assert r.status_code == 200
    assert [b["input"] for _, b in seen] == [["b", "d"]]
    assert (r.headers["x-cache-hits"], r.headers["x-cache-misses"]) == ("2", "2")
    data = r.json()["data"]
    assert [d["index"] for d in data] == [0, 1, 2, 3]
    assert [d["embedding"] for d in data] == [generated_vector(t) for t in "abcd"]
    assert r.json()["usage"]["prompt_tokens"] == 2 * 3  # the fake counts words + 2 per input: b and d only


async def test_fields_that_change_the_vector_are_part_of_the_key(make_gateway, fake_embed):
    gw = await make_gateway(**ON)
    seen = upstream_bodies(fake_embed)
    await embed(gw, ["hello"])
    await embed(gw, ["hello"], truncate_prompt_tokens=8)
    await embed(gw, ["hello"], user="someone")  # a label only: a hit
    assert [b.get("truncate_prompt_tokens") for _, b in seen] == [None, 8]


async def test_no_cache_recomputes_and_refreshes_no_store_neither_reads_nor_writes(make_gateway, fake_embed):
    gw = await make_gateway(**ON)
    seen = upstream_bodies(fake_embed)
    r = await embed(gw, ["s1"], headers={"Cache-Control": "no-store"})
    assert r.status_code == 200 and r.headers["x-cache-misses"] == "1"
    r = await embed(gw, ["s1"])
    assert r.headers["x-cache-misses"] == "1"  # no-store wrote nothing
    r = await embed(gw, ["s1"], headers={"Cache-Control": "no-cache"})
    assert (r.headers["x-cache-hits"], r.headers["x-cache-misses"]) == ("0", "1")
    r = await embed(gw, ["s1"], headers={"Cache-Control": "max-age=0, no-store"})
    assert r.headers["x-cache-misses"] == "1"
    r = await embed(gw, ["s1"])
    assert r.headers["x-cache-hits"] == "1"
    assert len(seen) == 4


@pytest.mark.parametrize("scope", ["key", "shared"])
async def test_one_key_cannot_tell_from_the_cache_what_another_key_sent_unless_shared(make_gateway, fake_embed,
                                                                                      fake_rerank, scope):
    env = {**ON, "CACHE_SCOPE": scope} if scope == "shared" else ON  # key: the default
    gw = await make_gateway(key_names=("team-a", "team-b"), **env)
    a, b = gw.keys["team-a"], gw.keys["team-b"]
    texts = ["a private contract clause", "another one"]
    assert (await gw.post("/v1/embeddings", headers=gw.auth(a), json={"model": "minilm", "input": texts})
            ).headers["x-cache-misses"] == "2"
    probe = await gw.post("/v1/embeddings", headers=gw.auth(b), json={"model": "minilm", "input": texts})
    rerank = {"query": "q", "documents": ["d1", "d2"]}
    await gw.post("/v1/rerank", headers=gw.auth(a), json=rerank)
    rprobe = await gw.post("/v1/rerank", headers=gw.auth(b), json=rerank)
    hits = "2" if scope == "shared" else "0"
    assert (probe.headers["x-cache-hits"], rprobe.headers["x-cache-hits"]) == (hits, hits)
    again = await gw.post("/v1/embeddings", headers=gw.auth(a), json={"model": "minilm", "input": texts})
    assert again.headers["x-cache-hits"] == "2"  # each key's own entries still serve it


async def test_cache_off_keeps_the_pass_through_and_says_so(make_gateway, fake_embed):
    gw = await make_gateway(CACHE_MAX_BYTES="0")
    seen = upstream_bodies(fake_embed)
    for _ in range(2):
        r = await embed(gw, ["hello world", "x"])
        assert (r.headers["x-cache-hits"], r.headers["x-cache-misses"]) == ("0", "2")
    assert [b for _, b in seen] == [{"model": "minilm", "input": ["hello world", "x"]}] * 2  # the client's body
    assert (await gw.get("/health")).json()["cache"]["enabled"] is False


async def test_rerank_scores_are_cached_per_document(make_gateway, fake_rerank):
    gw = await make_gateway(**ON)
    seen = upstream_bodies(fake_rerank)
    body = {"model": "Qwen3-Reranker-0.6B", "query": "What is AI?", "documents": DOCS[:3], "top_n": 2,
            "return_documents": True}
    first = await gw.post("/v1/rerank", headers=gw.auth(), json=body)
    assert first.status_code == 200, first.text
    assert "top_n" not in seen[0][1]  # every score is needed to cache it; top_n is applied after
    second = await gw.post("/v1/rerank", headers=gw.auth(), json=body)
    assert len(seen) == 1 and second.headers["x-cache-hits"] == "3"
    assert second.json()["results"] == first.json()["results"]
    assert len(first.json()["results"]) == 2
    assert second.json()["usage"]["prompt_tokens"] == 0
    # one more document: only it goes upstream; the ranking is over all four
    r = await gw.post("/v1/rerank", headers=gw.auth(), json={**body, "documents": DOCS, "top_n": None})
    assert seen[1][1]["documents"] == [DOCS[3]]
    scores = {x["index"]: x["relevance_score"] for x in r.json()["results"]}
    assert [x["index"] for x in r.json()["results"]] == sorted(scores, key=lambda i: -scores[i])
    # a different instruction or query is another key
    await gw.post("/v1/rerank", headers=gw.auth(), json={**body, "instruction": "Judge relevance"})
    assert len(seen) == 3
    # TEI's /rerank shares the cache (same model, query, documents, no truncation)
    tei = await gw.post("/rerank", headers=gw.auth(), json={"query": "What is AI?", "texts": DOCS[:3]})
    assert tei.status_code == 200 and tei.headers["x-cache-hits"] == "3" and len(seen) == 3


async def test_dialects_share_the_embedding_cache(make_gateway, fake_embed):
    gw = await make_gateway(**ON)
    first = await embed(gw, ["hello world", "x"])
    tei = await gw.post("/embed", headers=gw.auth(), json={"inputs": ["hello world", "x"]})
    assert tei.status_code == 200 and tei.headers["x-cache-hits"] == "2"
    assert tei.json() == [d["embedding"] for d in first.json()["data"]]
    cohere = await gw.post("/v2/embed", headers=gw.auth(), json={"texts": ["x"], "truncate": "NONE",
                                                                 "embedding_types": ["base64"]})
    assert cohere.headers["x-cache-hits"] == "1"
    assert cohere.json()["embeddings"]["base64"][0] == base64.b64encode(
        struct.pack("<384f", *first.json()["data"][1]["embedding"])).decode()
    assert cohere.json()["meta"]["billed_units"]["input_tokens"] == 0


async def test_metrics_and_health_show_the_cache(make_gateway, fake_embed):
    gw = await make_gateway(**ON)
    await embed(gw, ["m1", "m2"])
    await embed(gw, ["m1", "m3"])
    samples = await scrape(gw)
    assert value(samples, "erproxy_cache_items_total", kind="embedding", result="hit") == 1
    assert value(samples, "erproxy_cache_items_total", kind="embedding", result="miss") == 3
    cache = (await gw.get("/health")).json()["cache"]
    assert cache["enabled"] is True and cache["items"] == 3 and 0 < cache["bytes"] <= cache["max_bytes"]
    assert cache["redis"] is None


@pytest.fixture
def redis_server(tmp_path):
    server = RedisServer(tmp_path).start()
    yield server
    server.stop()


async def test_redis_shares_the_cache_and_being_down_fails_nothing(make_gateway, fake_embed, redis_server, caplog):
    one = await make_gateway(**ON, REDIS_URL=redis_server.url, REDIS_FAIL_OPEN="true")
    two = await make_gateway(**ON, REDIS_URL=redis_server.url, REDIS_FAIL_OPEN="true")
    assert (await embed(one, ["shared 1", "shared 2"])).headers["x-cache-misses"] == "2"
    calls = upstream_calls(fake_embed)
    r = await embed(two, ["shared 1", "shared 2"])  # another worker/instance: from Redis
    assert r.headers["x-cache-hits"] == "2" and upstream_calls(fake_embed) == calls
    assert (await two.get("/health")).json()["cache"]["redis"] == "ok"

    redis_server.stop()
    r = await embed(two, ["shared 1", "new while down"])
    assert r.status_code == 200, r.text  # the LRU still has shared 1; the rest from vLLM
    assert (r.headers["x-cache-hits"], r.headers["x-cache-misses"]) == ("1", "1")
    r = await embed(one, ["only vllm 1", "only vllm 2"])
    assert r.status_code == 200 and r.headers["x-cache-misses"] == "2"
    r = await gw_rerank(one)
    assert r.status_code == 200
    assert (await one.get("/health")).json()["cache"]["redis"] == "unavailable"
    warnings = [rec for rec in caplog.records if rec.name == "erproxy.cache" and "unavailable" in rec.getMessage()]
    assert 1 <= len(warnings) <= 2  # once per gateway, not once per request


async def test_a_redis_over_its_memory_bound_gets_no_new_cache_entries(make_gateway, fake_embed, redis_server, caplog):
    """Entries leave Redis only by CACHE_TTL: a day of unique inputs must not grow it without bound (it holds
    the limits and usage too). An empty Redis already uses about a megabyte: a 1 KiB bound is over it."""
    r = redis.Redis.from_url(redis_server.url)
    bounded = await make_gateway(**ON, REDIS_URL=redis_server.url, CACHE_REDIS_MAX_BYTES="1KiB")
    for i in range(3):
        assert (await embed(bounded, [f"bounded {i}"])).status_code == 200
    # the first write goes out with the first reading of its memory; after that reading, nothing more
    assert len(r.keys("erproxy:item:*")) <= 1
    assert (await bounded.get("/health")).json()["cache"]["redis"] == "full"
    full = [rec for rec in caplog.records if rec.name == "erproxy.cache" and "over CACHE_REDIS_MAX_BYTES" in rec.getMessage()]
    assert len(full) == 1
    unbounded = await make_gateway(**ON, REDIS_URL=redis_server.url, CACHE_REDIS_MAX_BYTES="0")
    assert (await embed(unbounded, ["free 1", "free 2"])).status_code == 200
    assert len(r.keys("erproxy:item:*")) >= 2


async def gw_rerank(gw):
    return await gw.post("/v1/rerank", headers=gw.auth(), json={"query": "q", "documents": ["a", "b"]})


@pytest.mark.parametrize("field, value", [("root", "org/minilm-v2"), ("max_model_len", 128)])
async def test_replicas_of_one_name_with_different_weights_are_never_cached(make_gateway, fakes, fake_rerank,
                                                                            field, value):
    """During a rolling upgrade two replicas serve `minilm` from different weights (roots), or one was
    restarted with another --max-model-len (a truncated input's vector changes with it). A vector of one
    must never be stored or served as the other's: the cache keys name the root and the length, and with
    two behind one name there is no single one, so those requests bypass the cache."""
    old, new = await fakes.start("embed"), await fakes.start("embed")
    new.fake.models_doc["data"][0][field] = value
    gw = await make_gateway(embed=f"{new.url},{old.url}", rerank=fake_rerank.url, **ON)
    for _ in range(2):
        r = await embed(gw, ["hello"])
        assert r.status_code == 200
        assert (r.headers["x-cache-hits"], r.headers["x-cache-misses"]) == ("0", "1")
    assert upstream_calls(old) + upstream_calls(new) == 2
    assert gw.app.services.upstreams.cache_root("embedding", "minilm") is None
    # one root again (the old replica gone from the list): cached as before
    single = await make_gateway(embed=new.url, rerank=fake_rerank.url, **ON)
    await embed(single, ["hello"])
    again = await embed(single, ["hello"])
    assert again.headers["x-cache-hits"] == "1"
    info = new.fake.models_doc["data"][0]
    assert single.app.services.upstreams.cache_root("embedding", "minilm") == f"{info['root']}@{info['max_model_len']}"
