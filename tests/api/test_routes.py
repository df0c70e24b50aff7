"""Every route and what it answers, through the gateway app in front of fake vLLM upstreams."""

import base64
import struct

import httpx
import openai
import pytest

from tests.fakes.fake_vllm import load_fixtures

FX = load_fixtures()
HELLO = FX["embed_float_single"]["response"]["data"][0]["embedding"]


async def test_health_needs_no_key_and_lists_upstreams(gateway):
    r = await gateway.get("/health")
    assert r.status_code == 200
    doc = r.json()
    assert doc["status"] == "ok"
    assert doc["upstreams"]["embedding"]["replicas"][0]["healthy"] is True
    assert doc["upstreams"]["reranker"]["replicas"][0]["models"] == ["Qwen3-Reranker-0.6B"]


async def test_models_lists_what_upstreams_serve(gateway):
    r = await gateway.get("/v1/models", headers=gateway.auth())
    assert r.status_code == 200
    doc = r.json()
    assert doc["object"] == "list"
    by_id = {m["id"]: m for m in doc["data"]}
    assert set(by_id) == {"minilm", "Qwen3-Reranker-0.6B"}
    assert by_id["minilm"]["object"] == "model" and by_id["minilm"]["max_model_len"] == 256
    assert by_id["minilm"]["type"] == "embedding" and by_id["Qwen3-Reranker-0.6B"]["type"] == "reranker"


async def test_embeddings_pass_upstream_bytes_through(gateway, fake_embed):
    req = FX["embed_float_batch"]["request"]["json"]
    async with httpx.AsyncClient() as c:
        direct = await c.post(fake_embed.url + "/v1/embeddings", json=req)
    via = await gateway.post("/v1/embeddings", json=req, headers=gateway.auth())
    assert via.status_code == 200
    assert via.content == direct.content


async def test_embeddings_default_model_and_token_ids(make_gateway):
    gateway = await make_gateway(ACCEPT_TOKEN_IDS="true")  # else token ids are refused (test_token_ids.py)
    r = await gateway.post("/v1/embeddings", json={"input": [[101, 7592, 2088, 102]]}, headers=gateway.auth())
    assert r.status_code == 200
    doc = r.json()
    assert doc["model"] == "minilm" and doc["data"][0]["embedding"] == HELLO


async def test_openai_sdk_base64_default_gives_correct_vectors(gateway):
    client = openai.AsyncOpenAI(base_url=gateway.url + "/v1", api_key=gateway.key, http_client=gateway.client)
    res = await client.embeddings.create(model="minilm", input=["hello world"])  # SDK asks for base64
    assert res.data[0].embedding == pytest.approx(HELLO, abs=1e-7)
    assert res.usage.prompt_tokens == 4
    as_float = await client.embeddings.create(model="minilm", input="hello world", encoding_format="float")
    assert as_float.data[0].embedding == HELLO


async def test_base64_request_is_float32_little_endian(gateway):
    r = await gateway.post("/v1/embeddings", headers=gateway.auth(),
                           json={"model": "minilm", "input": ["hello world"], "encoding_format": "base64"})
    raw = base64.b64decode(r.json()["data"][0]["embedding"])
    assert list(struct.unpack(f"<{len(raw) // 4}f", raw)) == pytest.approx(HELLO, abs=1e-7)


@pytest.mark.parametrize("path", ["/v1/rerank", "/rerank", "/v2/rerank", "/api/v1/rerank"])
async def test_rerank_on_every_path(gateway, path):
    r = await gateway.post(path, headers=gateway.auth(), json={
        "model": "Qwen3-Reranker-0.6B", "query": "What is AI?",
        "documents": ["Bananas are yellow", {"text": "AI is artificial intelligence"}, "AI helps humans"]})
    assert r.status_code == 200, r.text
    doc = r.json()
    # Cohere's `meta` on the Cohere/Jina paths; the single-service API's results carry `text` (issue 11)
    single = path == "/api/v1/rerank"
    assert set(doc) == {"id", "model", "results", "usage"} | (set() if single else {"meta"})
    assert [x["index"] for x in doc["results"]] == [1, 2, 0]
    assert doc["results"][0] == {"index": 1, "relevance_score": 0.7618554830551147,
                                 "document": {"text": "AI is artificial intelligence"},
                                 **({"text": "AI is artificial intelligence"} if single else {})}
    scores = [x["relevance_score"] for x in doc["results"]]
    assert scores == sorted(scores, reverse=True)


@pytest.mark.parametrize("field", ["top_n", "top_k"])
async def test_rerank_top_n_and_alias(gateway, field):
    r = await gateway.post("/v1/rerank", headers=gateway.auth(), json={
        "query": "What is AI?", field: 2,
        "documents": ["AI is artificial intelligence", "AI helps humans", "Bananas are yellow"]})
    assert [x["index"] for x in r.json()["results"]] == [0, 1]


async def test_rerank_return_documents_false_omits_document(gateway):
    r = await gateway.post("/v1/rerank", headers=gateway.auth(), json={
        "query": "What is AI?", "return_documents": False,
        "documents": ["AI is artificial intelligence", "Bananas are yellow"]})
    assert r.status_code == 200
    assert all(set(x) == {"index", "relevance_score"} for x in r.json()["results"])


async def test_rerank_with_an_embedding_model_uses_that_upstream(gateway):
    r = await gateway.post("/v1/rerank", headers=gateway.auth(), json={
        "model": "minilm", "query": "What is AI?", "documents": ["AI is artificial intelligence", "Bananas are yellow"]})
    assert r.status_code == 200 and r.json()["model"] == "minilm"
    assert r.json()["results"][0]["relevance_score"] == 0.8113619685173035
