"""Every route through a real gateway process in front of fake vLLM upstreams."""

import base64
import struct
import subprocess

import httpx
import openai
import pytest

from tests.fakes.fake_vllm import load_fixtures

FX = load_fixtures()
HELLO = FX["embed_float_single"]["response"]["data"][0]["embedding"]


def test_health_needs_no_key_and_lists_upstreams(shared_gateway):
    r = httpx.get(shared_gateway.url + "/health")
    assert r.status_code == 200
    doc = r.json()
    assert doc["status"] == "ok"
    assert doc["upstreams"]["embedding"]["replicas"][0]["healthy"] is True
    assert doc["upstreams"]["reranker"]["replicas"][0]["models"] == ["Qwen3-Reranker-0.6B"]


def test_models_lists_what_upstreams_serve(shared_gateway):
    r = httpx.get(shared_gateway.url + "/v1/models", headers=shared_gateway.auth())
    assert r.status_code == 200
    doc = r.json()
    assert doc["object"] == "list"
    by_id = {m["id"]: m for m in doc["data"]}
    assert set(by_id) == {"minilm", "Qwen3-Reranker-0.6B"}
    assert by_id["minilm"]["object"] == "model" and by_id["minilm"]["max_model_len"] == 256
    assert by_id["minilm"]["type"] == "embedding" and by_id["Qwen3-Reranker-0.6B"]["type"] == "reranker"


def test_embeddings_pass_upstream_bytes_through(shared_gateway, fake_embed):
    req = FX["embed_float_batch"]["request"]["json"]
    direct = httpx.post(fake_embed.url + "/v1/embeddings", json=req)
    via = httpx.post(shared_gateway.url + "/v1/embeddings", json=req, headers=shared_gateway.auth())
    assert via.status_code == 200
    assert via.content == direct.content


def test_embeddings_default_model_and_token_ids(shared_gateway):
    r = httpx.post(shared_gateway.url + "/v1/embeddings", json={"input": [[101, 7592, 2088, 102]]},
                   headers=shared_gateway.auth())
    assert r.status_code == 200
    doc = r.json()
    assert doc["model"] == "minilm" and doc["data"][0]["embedding"] == HELLO


def test_openai_sdk_base64_default_gives_correct_vectors(shared_gateway):
    client = openai.OpenAI(base_url=shared_gateway.url + "/v1", api_key=shared_gateway.key)
    res = client.embeddings.create(model="minilm", input=["hello world"])  # SDK asks for base64
    assert res.data[0].embedding == pytest.approx(HELLO, abs=1e-7)
    assert res.usage.prompt_tokens == 4
    as_float = client.embeddings.create(model="minilm", input="hello world", encoding_format="float")
    assert as_float.data[0].embedding == HELLO


def test_base64_request_is_float32_little_endian(shared_gateway):
    r = httpx.post(shared_gateway.url + "/v1/embeddings", headers=shared_gateway.auth(),
                   json={"model": "minilm", "input": ["hello world"], "encoding_format": "base64"})
    raw = base64.b64decode(r.json()["data"][0]["embedding"])
    assert list(struct.unpack(f"<{len(raw) // 4}f", raw)) == pytest.approx(HELLO, abs=1e-7)


@pytest.mark.parametrize("path", ["/v1/rerank", "/rerank", "/v2/rerank", "/api/v1/rerank"])
def test_rerank_on_every_path(shared_gateway, path):
    r = httpx.post(shared_gateway.url + path, headers=shared_gateway.auth(), json={
        "model": "Qwen3-Reranker-0.6B", "query": "What is AI?",
        "documents": ["Bananas are yellow", {"text": "AI is artificial intelligence"}, "AI helps humans"]})
    assert r.status_code == 200, r.text
    doc = r.json()
    assert set(doc) == {"id", "model", "results", "usage"}
    assert [x["index"] for x in doc["results"]] == [1, 2, 0]
    assert doc["results"][0] == {"index": 1, "relevance_score": 0.7618554830551147,
                                 "document": {"text": "AI is artificial intelligence"}}
    scores = [x["relevance_score"] for x in doc["results"]]
    assert scores == sorted(scores, reverse=True)


@pytest.mark.parametrize("field", ["top_n", "top_k"])
def test_rerank_top_n_and_alias(shared_gateway, field):
    r = httpx.post(shared_gateway.url + "/v1/rerank", headers=shared_gateway.auth(), json={
        "query": "What is AI?", field: 2,
        "documents": ["AI is artificial intelligence", "AI helps humans", "Bananas are yellow"]})
    assert [x["index"] for x in r.json()["results"]] == [0, 1]


def test_rerank_return_documents_false_omits_document(shared_gateway):
    r = httpx.post(shared_gateway.url + "/v1/rerank", headers=shared_gateway.auth(), json={
        "query": "What is AI?", "return_documents": False,
        "documents": ["AI is artificial intelligence", "Bananas are yellow"]})
    assert r.status_code == 200
    assert all(set(x) == {"index", "relevance_score"} for x in r.json()["results"])


def test_rerank_with_an_embedding_model_uses_that_upstream(shared_gateway):
    r = httpx.post(shared_gateway.url + "/v1/rerank", headers=shared_gateway.auth(), json={
        "model": "minilm", "query": "What is AI?", "documents": ["AI is artificial intelligence", "Bananas are yellow"]})
    assert r.status_code == 200 and r.json()["model"] == "minilm"
    assert r.json()["results"][0]["relevance_score"] == 0.8113619685173035


# ---- auth --------------------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["bearer", "api_key", "access_token"])
def test_each_auth_form_is_accepted(shared_gateway, how):
    key = shared_gateway.key
    if how == "bearer":
        r = httpx.get(shared_gateway.url + "/v1/models", headers={"Authorization": f"Bearer {key}"})
    else:
        r = httpx.get(shared_gateway.url + f"/v1/models?{how}={key}")
    assert r.status_code == 200


def test_static_access_token_is_a_key(shared_gateway):
    token = shared_gateway.env["ACCESS_TOKEN"]
    assert httpx.get(shared_gateway.url + "/v1/models", params={"access_token": token}).status_code == 200


@pytest.mark.parametrize("headers,params,code", [
    ({}, {}, "missing_api_key"),
    ({"Authorization": "Bearer er-wrong"}, {}, "invalid_api_key"),
    ({}, {"api_key": "er-wrong"}, "invalid_api_key"),
    ({"Authorization": "Basic abc"}, {}, "missing_api_key"),
])
def test_missing_or_wrong_key_is_401_in_openai_shape(shared_gateway, headers, params, code):
    r = httpx.post(shared_gateway.url + "/v1/embeddings", headers=headers, params=params, json={"input": "x"})
    assert r.status_code == 401
    err = r.json()["error"]
    assert err["code"] == code and err["type"] == "authentication_error" and "key" in err["message"].lower()
    assert set(err) == {"message", "type", "param", "code"}


def test_openai_sdk_wrong_key_raises_authentication_error(shared_gateway):
    client = openai.OpenAI(base_url=shared_gateway.url + "/v1", api_key="er-not-a-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.embeddings.create(model="minilm", input="x")


# ---- errors --------------------------------------------------------------------------------------
def test_unknown_route_and_method(shared_gateway):
    r = httpx.get(shared_gateway.url + "/v1/nothing", headers=shared_gateway.auth())
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = httpx.get(shared_gateway.url + "/v1/embeddings", headers=shared_gateway.auth())
    assert r.status_code == 405


def test_unknown_model_is_404_naming_the_served_models(shared_gateway):
    r = httpx.post(shared_gateway.url + "/v1/embeddings", json={"model": "nope", "input": "x"},
                   headers=shared_gateway.auth())
    assert r.status_code == 404
    err = r.json()["error"]
    assert err["code"] == "model_not_found" and "minilm" in err["message"] and err["param"] == "model"


def test_upstream_4xx_passes_through_in_openai_shape(shared_gateway):
    r = httpx.post(shared_gateway.url + "/v1/embeddings", headers=shared_gateway.auth(),
                   json={"model": "minilm", "input": "hello", "dimensions": 64})
    assert r.status_code == 400
    assert r.json()["error"]["message"] == FX["embed_dimensions"]["response"]["error"]["message"]
    assert r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(shared_gateway.url + "/v1/embeddings", headers=shared_gateway.auth(),
                   json={"model": "minilm", "input": "word " * 2000})
    assert r.status_code == 400 and "maximum context length" in r.json()["error"]["message"]


def test_embedding_on_reranker_model_explains_the_404(shared_gateway):
    r = httpx.post(shared_gateway.url + "/v1/embeddings", headers=shared_gateway.auth(),
                   json={"model": "Qwen3-Reranker-0.6B", "input": "x"})
    assert r.status_code == 404
    assert "does not offer this endpoint" in r.json()["error"]["message"]


def test_invalid_json_is_400(shared_gateway):
    r = httpx.post(shared_gateway.url + "/v1/embeddings", headers={**shared_gateway.auth(),
                   "content-type": "application/json"}, content=b"{nope")
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"


def test_curl_works_with_api_key_in_query(shared_gateway):
    out = subprocess.run(
        ["curl", "-sS", "-w", "\\n%{http_code}", f"{shared_gateway.url}/v1/rerank?api_key={shared_gateway.key}",
         "-H", "Content-Type: application/json",
         "-d", '{"query": "What is AI?", "documents": ["Bananas are yellow", "AI is artificial intelligence"]}'],
        capture_output=True, text=True, timeout=30, check=True).stdout
    body, status = out.rsplit("\n", 1)
    assert status == "200" and '"index":1' in body


def test_access_log_names_key_never_contains_it(shared_gateway):
    httpx.post(shared_gateway.url + "/v1/embeddings", json={"input": "log me"}, headers=shared_gateway.auth())
    httpx.get(shared_gateway.url + "/v1/models", params={"api_key": shared_gateway.key})
    text = shared_gateway.log_file().read_text() + shared_gateway.proc.output()
    assert shared_gateway.key not in text
    assert shared_gateway.env["ACCESS_TOKEN"] not in text
    line = [ln for ln in text.splitlines() if "POST /v1/embeddings" in ln and "key=tester" in ln][-1]
    for part in ("model=minilm", "items=1", "status=200", "latency_ms=", "upstream=http://127.0.0.1:"):
        assert part in line
