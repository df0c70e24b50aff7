"""The dialects (erproxy/dialects.py) as vLLM sees them and as clients get them: TEI, Cohere embed and
rerank meta, Dify's score_threshold, the single-service rerank API."""

import base64
import struct

import httpx
import pytest

from erproxy import dialects as d

QUERY = "What is AI?"
DOCS = ["Bananas are yellow", "AI is artificial intelligence", "AI helps humans"]
RANKED = [(1, 0.7618554830551147), (2, 0.6572144627571106), (0, 0.5548709034919739)]  # rerank_basic.json
INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"


def upstream_bodies(server):
    """Every JSON body the fake vLLM receives from now on, as (path, body)."""
    seen = []
    original = server.fake.recorded

    def recorded(method, path, body):
        seen.append((path, body))
        return original(method, path, body)

    server.fake.recorded = recorded
    return seen


async def vector(server, text, model="minilm"):
    async with httpx.AsyncClient() as c:
        r = await c.post(server.url + "/v1/embeddings", json={"model": model, "input": [text]})
    return r.json()["data"][0]["embedding"]


@pytest.fixture
async def qwen3_embed(fakes):
    return await fakes.start("embed", model="Qwen3-Embedding-0.6B")


# ---- TEI /embed ---------------------------------------------------------------------------------------
async def test_tei_embed_defaults_send_nothing_extra(gateway, fake_embed):
    seen = upstream_bodies(fake_embed)
    r = await gateway.post("/embed", headers=gateway.auth(), json={"inputs": ["hello world", "x"]})
    assert r.status_code == 200, r.text
    assert r.json() == [await vector(fake_embed, "hello world"), await vector(fake_embed, "x")]
    d.TEIEmbedResponse.model_validate(r.json())
    assert seen[0] == ("/v1/embeddings", {"input": ["hello world", "x"], "encoding_format": "float",
                                          "model": "minilm"})


async def test_tei_embed_normalize_false_and_truncation_reach_vllm(gateway, fake_embed):
    seen = upstream_bodies(fake_embed)
    r = await gateway.post("/embed", headers=gateway.auth(), json={
        "inputs": "hello world", "normalize": False, "truncate": True, "truncation_direction": "Left"})
    assert r.status_code == 200, r.text
    assert len(r.json()) == 1 and len(r.json()[0]) == 384
    body = seen[0][1]
    # vLLM 0.32 removed `normalize`: `use_activation: false` skips the pooler's L2 normalisation
    assert body["use_activation"] is False
    assert (body["truncate_prompt_tokens"], body["truncation_side"]) == (-1, "left")
    await gateway.post("/embed", headers=gateway.auth(), json={"inputs": "a", "truncate": True})
    assert "truncation_side" not in seen[1][1]  # TEI's default Right: the tokenizer's own side, keeps [SEP]


async def test_tei_embed_dimensions_go_to_vllm_which_may_refuse(gateway, fake_embed):
    seen = upstream_bodies(fake_embed)
    r = await gateway.post("/embed", headers=gateway.auth(), json={"inputs": "a", "dimensions": 8})
    assert seen[0][1]["dimensions"] == 8
    assert r.status_code == 400 and "Matryoshka" in r.json()["error"]["message"]


@pytest.mark.parametrize("body, param", [
    ({}, "inputs"), ({"inputs": []}, "inputs"), ({"inputs": ["a", 1]}, "inputs[1]"),
    ({"inputs": "a", "normalize": "false"}, "normalize"), ({"inputs": "a", "truncation_direction": "Middle"},
                                                            "truncation_direction"),
    ({"inputs": "a", "dimensions": 0}, "dimensions"), ({"inputs": "a", "prompt_name": "passage"}, "prompt_name"),
])
async def test_tei_embed_400_names_the_field(gateway, body, param):
    r = await gateway.post("/embed", headers=gateway.auth(), json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


async def test_tei_prompt_name_is_the_qwen3_query_instruction(make_gateway, qwen3_embed, gateway):
    gw = await make_gateway(embed=qwen3_embed.url)
    r = await gw.post("/embed", headers=gw.auth(), json={"inputs": ["What is AI?"], "prompt_name": "query"})
    assert r.json() == [await vector(qwen3_embed, f"Instruct: {INSTRUCTION}\nQuery:What is AI?",
                                     "Qwen3-Embedding-0.6B")]
    r = await gw.post("/embed", headers=gw.auth(), json={"inputs": ["AI is ..."], "prompt_name": "document"})
    assert r.json() == [await vector(qwen3_embed, "AI is ...", "Qwen3-Embedding-0.6B")]
    refused = await gateway.post("/embed", headers=gateway.auth(), json={"inputs": "a", "prompt_name": "query"})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "prompt_name"


# ---- TEI /rerank ---------------------------------------------------------------------------------------
async def test_tei_rerank_answers_a_sorted_array(gateway, fake_rerank):
    seen = upstream_bodies(fake_rerank)
    r = await gateway.post("/rerank", headers=gateway.auth(), json={"query": QUERY, "texts": DOCS})
    assert r.status_code == 200, r.text
    assert r.json() == [{"index": i, "score": s} for i, s in RANKED]
    d.TEIRerankResponse.model_validate(r.json())
    assert seen[0] == ("/v1/rerank", {"query": QUERY, "documents": DOCS, "model": "Qwen3-Reranker-0.6B"})


async def test_tei_rerank_raw_scores_return_text_and_truncation(gateway, fake_rerank):
    seen = upstream_bodies(fake_rerank)
    r = await gateway.post("/rerank", headers=gateway.auth(), json={
        "query": QUERY, "texts": DOCS, "raw_scores": True, "return_text": True, "truncate": True,
        "truncation_direction": "right"})
    assert [(x["index"], x["text"]) for x in r.json()] == [(i, DOCS[i]) for i, _ in RANKED]
    body = seen[0][1]
    assert body["use_activation"] is False  # the reranker's sigmoid is its activation: raw logits without it
    assert (body["truncate_prompt_tokens"], body.get("truncation_side")) == (-1, None)
    assert "raw_scores" not in body and "texts" not in body


async def test_rerank_with_texts_and_documents_is_a_400(gateway):
    r = await gateway.post("/rerank", headers=gateway.auth(), json={"query": QUERY, "texts": DOCS, "documents": DOCS})
    assert r.status_code == 400 and r.json()["error"]["param"] == "texts"
    r = await gateway.post("/rerank", headers=gateway.auth(), json={"query": QUERY, "texts": []})
    assert r.status_code == 400 and r.json()["error"]["param"] == "texts"


# ---- Cohere rerank meta, Dify score_threshold, the single-service API -----------------------------------
@pytest.mark.parametrize("path, version", [("/v1/rerank", "1"), ("/v2/rerank", "2"), ("/rerank", "1")])
async def test_cohere_rerank_meta(gateway, path, version):
    docs = [f"document {i}" for i in range(250)]
    r = await gateway.post(path, headers=gateway.auth(), json={"query": QUERY, "documents": docs, "top_n": 3})
    assert r.status_code == 200, r.text
    doc = d.CohereRerankResponse.model_validate(r.json())
    assert len(doc.results) == 3
    assert doc.meta.api_version.version == version
    assert doc.meta.billed_units.search_units == 3  # one per query per 100 documents
    assert doc.meta.tokens.input_tokens == doc.usage.prompt_tokens > 0


async def test_score_threshold_drops_results_and_stays_in_the_gateway(gateway, fake_rerank):
    seen = upstream_bodies(fake_rerank)
    r = await gateway.post("/v1/rerank", headers=gateway.auth(), json={
        "query": QUERY, "documents": DOCS, "score_threshold": 0.6, "return_documents": False})
    assert r.json()["results"] == [{"index": i, "relevance_score": s} for i, s in RANKED[:2]]
    assert "score_threshold" not in seen[0][1]
    r = await gateway.post("/api/v1/rerank", headers=gateway.auth(), json={
        "query": QUERY, "documents": DOCS, "score_threshold": 0.99})
    assert r.status_code == 200 and r.json()["results"] == []
    r = await gateway.post("/v1/rerank", headers=gateway.auth(), json={
        "query": QUERY, "documents": DOCS, "score_threshold": "high"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "score_threshold"


async def test_single_service_rerank_results_carry_text(gateway):
    r = await gateway.post("/api/v1/rerank", headers=gateway.auth(), json={"query": QUERY, "documents": DOCS,
                                                                         "top_k": 2})
    doc = d.SingleServiceRerankResponse.model_validate(r.json())
    assert [(x.index, x.relevance_score, x.text) for x in doc.results] == [(i, s, DOCS[i]) for i, s in RANKED[:2]]
    bare = await gateway.post("/api/v1/rerank", headers=gateway.auth(), json={
        "query": QUERY, "documents": DOCS, "return_documents": False})
    assert all(set(x) == {"index", "relevance_score"} for x in bare.json()["results"])


# ---- Cohere /v1/embed and /v2/embed ---------------------------------------------------------------------
async def test_cohere_embed_v2_by_type(gateway, fake_embed):
    r = await gateway.post("/v2/embed", headers=gateway.auth(), json={
        "texts": ["hello world", "x"], "input_type": "search_document", "embedding_types": ["float", "base64"]})
    assert r.status_code == 200, r.text
    doc = d.CohereEmbedByTypeResponse.model_validate(r.json())
    expected = [await vector(fake_embed, "hello world"), await vector(fake_embed, "x")]
    assert doc.embeddings.float_ == expected
    decoded = [list(struct.unpack("<384f", base64.b64decode(b))) for b in doc.embeddings.base64]
    assert decoded == expected
    assert doc.texts == ["hello world", "x"] and doc.meta.api_version.version == "2"
    assert doc.meta.billed_units.input_tokens == 7


async def test_cohere_embed_v1_answers_floats_unless_types_are_asked(gateway, fake_embed):
    r = await gateway.post("/v1/embed", headers=gateway.auth(), json={"texts": ["hello world"]})
    doc = d.CohereEmbedFloatsResponse.model_validate(r.json())
    assert doc.embeddings == [await vector(fake_embed, "hello world")] and doc.meta.api_version.version == "1"
    r = await gateway.post("/v1/embed", headers=gateway.auth(), json={"texts": ["a"], "embedding_types": ["base64"]})
    assert set(r.json()["embeddings"]) == {"base64"} and r.json()["response_type"] == "embeddings_by_type"


@pytest.mark.parametrize("fields, expected", [
    ({}, {"truncate_prompt_tokens": -1}),  # Cohere's default: END, the tokenizer's own side
    ({"truncate": "END"}, {"truncate_prompt_tokens": -1}),
    ({"truncate": "START"}, {"truncate_prompt_tokens": -1, "truncation_side": "left"}),
    ({"truncate": "START", "max_tokens": 16}, {"truncate_prompt_tokens": 16, "truncation_side": "left"}),
    ({"truncate": "NONE"}, {}),
    ({"output_dimension": 8, "truncate": "NONE"}, {"dimensions": 8}),
])
async def test_cohere_embed_fields_as_vllm_gets_them(gateway, fake_embed, fields, expected):
    seen = upstream_bodies(fake_embed)
    await gateway.post("/v2/embed", headers=gateway.auth(), json={"texts": ["a"], **fields})
    body = seen[0][1]
    assert {k: v for k, v in body.items() if k not in ("input", "model", "encoding_format")} == expected


@pytest.mark.parametrize("body, param", [
    ({"texts": []}, "texts"), ({"images": ["data:image/png;base64,AAAA"]}, "texts"),
    ({"texts": ["a"], "images": ["data:image/png;base64,AAAA"]}, "images"),
    ({"texts": ["a"], "inputs": [{"content": []}]}, "inputs"),
    ({"texts": ["a"], "embedding_types": ["int8"]}, "embedding_types[0]"),
    ({"texts": ["a"], "truncate": "MIDDLE"}, "truncate"), ({"texts": ["a"], "input_type": "image"}, "input_type"),
    ({"texts": ["a"], "truncate": "NONE", "max_tokens": 10}, "max_tokens"),
])
async def test_cohere_embed_400_names_the_field(gateway, body, param):
    r = await gateway.post("/v2/embed", headers=gateway.auth(), json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


async def test_cohere_input_type_is_the_qwen3_query_instruction(make_gateway, qwen3_embed):
    gw = await make_gateway(embed=qwen3_embed.url)

    async def embed(**body):
        r = await gw.post("/v2/embed", headers=gw.auth(), json={"texts": ["What is AI?"], **body})
        assert r.status_code == 200, r.text
        return r.json()["embeddings"]["float"][0]

    model = "Qwen3-Embedding-0.6B"
    assert await embed(input_type="search_query") == await vector(
        qwen3_embed, f"Instruct: {INSTRUCTION}\nQuery:What is AI?", model)
    assert await embed(input_type="search_query", instruction="Find answers") == await vector(
        qwen3_embed, "Instruct: Find answers\nQuery:What is AI?", model)
    plain = await vector(qwen3_embed, "What is AI?", model)
    assert await embed(input_type="search_document") == plain
    assert await embed(input_type="classification") == plain
    assert await embed(input_type="clustering", instruction="Identify the topic") == await vector(
        qwen3_embed, "Instruct: Identify the topic\nQuery:What is AI?", model)


# ---- what every dialect shares: keys, upstream failures ------------------------------------------------------
@pytest.mark.parametrize("path, body", [
    ("/embed", {"inputs": "a"}), ("/v2/embed", {"texts": ["a"]}), ("/rerank", {"query": "q", "texts": ["a"]}),
])
async def test_a_key_limited_to_other_models_gets_403(make_gateway, path, body):
    gw = await make_gateway(key_fields={"models": ["some-other-model"]})
    r = await gw.post(path, headers=gw.auth(), json=body)
    assert r.status_code == 403 and r.json()["error"]["code"] == "model_not_allowed"


@pytest.mark.parametrize("path, body", [
    ("/embed", {"inputs": "a"}), ("/v1/embed", {"texts": ["a"]}), ("/rerank", {"query": "q", "texts": ["a"]}),
    ("/api/v1/rerank", {"query": "q", "documents": ["a"]}),
])
async def test_an_upstream_that_answers_garbage_is_a_502(gateway, fake_embed, fake_rerank, path, body):
    fake_embed.set_mode("badjson")
    fake_rerank.set_mode("badjson")
    r = await gateway.post(path, headers=gateway.auth(), json=body)
    assert r.status_code == 502 and r.json()["error"]["code"] == "bad_upstream_response"
