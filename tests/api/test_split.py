"""Big requests split across replicas (erproxy/split.py) before two fake vLLM replicas: the answer one
replica would give, chunks spread least-loaded first, a failed chunk retried elsewhere, a chunk that
fails for good answered with its error (never a partial answer), only cache misses split."""

import pytest

from tests.api.test_dialects import upstream_bodies
from tests.fakes.fake_vllm import generated_score, generated_vector

QUERY = "which document is about what"
TEXTS = [f"input number {i}" for i in range(100)]
DOCS = [f"document number {i} about topic {i % 7}" for i in range(100)]
SPLIT = {"SPLIT_EMBEDDING_INPUTS": "32", "SPLIT_RERANK_DOCUMENTS": "32"}


@pytest.fixture
async def two_embed(fakes):
    return [await fakes.start("embed"), await fakes.start("embed")]


@pytest.fixture
async def two_rerank(fakes):
    return [await fakes.start("rerank"), await fakes.start("rerank")]


def calls(server, path):
    return server.stats()["requests"].get(path, 0)


async def test_embeddings_split_over_two_replicas_answer_like_one(make_gateway, two_embed):
    gw = await make_gateway(embed=",".join(s.url for s in two_embed), **SPLIT)
    seen = [upstream_bodies(s) for s in two_embed]
    r = await gw.post("/v1/embeddings", headers=gw.auth(), json={"model": "minilm", "input": TEXTS})
    assert r.status_code == 200, r.text
    assert [len(s) for s in seen] == [1, 1]  # one chunk each, concurrently
    assert sorted(len(s[0][1]["input"]) for s in seen) == [50, 50]
    data = r.json()["data"]
    assert [d["index"] for d in data] == list(range(100))
    assert [d["embedding"] for d in data] == [generated_vector(t) for t in TEXTS]
    assert r.json()["usage"]["prompt_tokens"] == sum(len(t.split()) + 2 for t in TEXTS)  # summed over chunks
    assert (r.headers["x-cache-hits"], r.headers["x-cache-misses"]) == ("0", "100")
    # the dialects take the same path
    tei = await gw.post("/embed", headers=gw.auth(), json={"inputs": TEXTS})
    assert tei.json() == [d["embedding"] for d in data]
    assert [len(s) for s in seen] == [2, 2]


async def test_small_requests_and_one_replica_are_not_split(make_gateway, two_embed, fakes):
    gw = await make_gateway(embed=",".join(s.url for s in two_embed), **SPLIT)
    seen = [upstream_bodies(s) for s in two_embed]
    r = await gw.post("/v1/embeddings", headers=gw.auth(), json={"model": "minilm", "input": TEXTS[:32]})
    assert r.status_code == 200
    assert sum(len(s) for s in seen) == 1
    single = await fakes.start("embed")
    gw1 = await make_gateway(embed=single.url, **SPLIT)
    seen1 = upstream_bodies(single)
    r = await gw1.post("/v1/embeddings", headers=gw1.auth(), json={"model": "minilm", "input": TEXTS})
    assert r.status_code == 200 and len(seen1) == 1


async def test_rerank_split_merges_then_applies_top_n_documents_and_threshold(make_gateway, two_rerank):
    gw = await make_gateway(rerank=",".join(s.url for s in two_rerank), **SPLIT)
    seen = [upstream_bodies(s) for s in two_rerank]
    body = {"model": "Qwen3-Reranker-0.6B", "query": QUERY, "documents": DOCS, "top_n": 5,
            "return_documents": True}
    r = await gw.post("/v1/rerank", headers=gw.auth(), json=body)
    assert r.status_code == 200, r.text
    assert [len(s) for s in seen] == [1, 1]
    assert all("top_n" not in s[0][1] for s in seen)  # top_n after the merge, over all documents
    expected = sorted(range(100), key=lambda i: -generated_score(QUERY, DOCS[i]))[:5]
    results = r.json()["results"]
    assert [x["index"] for x in results] == expected
    assert [x["relevance_score"] for x in results] == [generated_score(QUERY, DOCS[i]) for i in expected]
    assert [x["document"]["text"] for x in results] == [DOCS[i] for i in expected]
    total = sum(len(QUERY.split()) + len(d.split()) + 2 for d in DOCS)
    assert r.json()["usage"]["prompt_tokens"] == total
    # Dify's score_threshold and TEI's shape, after the merge too
    threshold = sorted(generated_score(QUERY, d) for d in DOCS)[-10]
    r = await gw.post("/v1/rerank", headers=gw.auth(), json={**body, "top_n": None, "score_threshold": threshold})
    assert len(r.json()["results"]) == 10
    tei = await gw.post("/rerank", headers=gw.auth(), json={"query": QUERY, "texts": DOCS})
    assert [x["index"] for x in tei.json()][:5] == expected


async def test_a_chunk_that_fails_for_good_is_the_clients_error_never_a_partial_answer(make_gateway, two_embed,
                                                                                       two_rerank):
    gw = await make_gateway(embed=",".join(s.url for s in two_embed),
                            rerank=",".join(s.url for s in two_rerank), **SPLIT)
    two_embed[1].set_mode("error500")
    r = await gw.post("/v1/embeddings", headers=gw.auth(), json={"model": "minilm", "input": TEXTS})
    assert r.status_code == 502, r.text
    assert r.json()["error"]["type"] == "upstream_error"
    assert "data" not in r.json()
    two_rerank[0].set_mode("badjson")
    r = await gw.post("/v1/rerank", headers=gw.auth(), json={"query": QUERY, "documents": DOCS})
    assert r.status_code == 502 and "results" not in r.json()


async def test_a_failed_chunk_is_retried_on_the_other_replica(make_gateway, two_embed, two_rerank):
    gw = await make_gateway(embed=",".join(s.url for s in two_embed),
                            rerank=",".join(s.url for s in two_rerank), **SPLIT)
    seen = [upstream_bodies(s) for s in two_embed]
    two_embed[0].set_mode("reset")  # drops the connection: the chunk goes to the other replica
    r = await gw.post("/v1/embeddings", headers=gw.auth(), json={"model": "minilm", "input": TEXTS})
    assert r.status_code == 200, r.text
    assert [d["embedding"] for d in r.json()["data"]] == [generated_vector(t) for t in TEXTS]
    assert len(seen[1]) == 2 and not seen[0]
    # a replica that is gone (connection refused): its chunk is retried on the one left
    await two_rerank[1].runner.cleanup()
    r = await gw.post("/v1/rerank", headers=gw.auth(), json={"query": QUERY, "documents": DOCS, "top_n": 3})
    assert r.status_code == 200, r.text
    expected = sorted(range(100), key=lambda i: -generated_score(QUERY, DOCS[i]))[:3]
    assert [x["index"] for x in r.json()["results"]] == expected


async def test_with_the_cache_only_the_misses_are_split(make_gateway, two_embed):
    gw = await make_gateway(embed=",".join(s.url for s in two_embed), CACHE_MAX_BYTES="64MiB", **SPLIT)
    first = await gw.post("/v1/embeddings", headers=gw.auth(), json={"model": "minilm", "input": TEXTS[:60]})
    assert first.status_code == 200
    seen = [upstream_bodies(s) for s in two_embed]
    r = await gw.post("/v1/embeddings", headers=gw.auth(), json={"model": "minilm", "input": TEXTS})
    assert (r.headers["x-cache-hits"], r.headers["x-cache-misses"]) == ("60", "40")
    sent = sorted(t for s in seen for _, b in s for t in b["input"])
    assert sent == sorted(TEXTS[60:])
    assert [len(s) for s in seen] == [1, 1]  # 40 misses > 32: split in two
    assert [d["embedding"] for d in r.json()["data"]] == [generated_vector(t) for t in TEXTS]
    assert r.json()["usage"]["prompt_tokens"] == sum(len(t.split()) + 2 for t in TEXTS[60:])
