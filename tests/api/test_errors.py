"""Requests the gateway refuses or vLLM refuses: the status and the OpenAI-shaped error a client gets."""

import orjson
import pytest

from tests.fakes.fake_vllm import load_fixtures

FX = load_fixtures()


async def test_unknown_route_and_method(gateway):
    r = await gateway.get("/v1/nothing", headers=gateway.auth())
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = await gateway.get("/v1/embeddings", headers=gateway.auth())
    assert r.status_code == 405


async def test_unknown_model_is_404_naming_the_served_models(gateway):
    r = await gateway.post("/v1/embeddings", json={"model": "nope", "input": "x"}, headers=gateway.auth())
    assert r.status_code == 404
    err = r.json()["error"]
    assert err["code"] == "model_not_found" and "minilm" in err["message"] and err["param"] == "model"


async def test_upstream_4xx_passes_through_in_openai_shape(gateway):
    r = await gateway.post("/v1/embeddings", headers=gateway.auth(),
                           json={"model": "minilm", "input": "hello", "dimensions": 64})
    assert r.status_code == 400
    assert r.json()["error"]["message"] == FX["embed_dimensions"]["response"]["error"]["message"]
    assert r.json()["error"]["type"] == "invalid_request_error"
    r = await gateway.post("/v1/embeddings", headers=gateway.auth(),
                           json={"model": "minilm", "input": "word " * 2000})
    assert r.status_code == 400 and "maximum context length" in r.json()["error"]["message"]


async def test_embedding_on_reranker_model_explains_the_404(gateway):
    r = await gateway.post("/v1/embeddings", headers=gateway.auth(), json={"model": "Qwen3-Reranker-0.6B", "input": "x"})
    assert r.status_code == 404
    assert "does not offer this endpoint" in r.json()["error"]["message"]


async def test_invalid_json_is_400(gateway):
    r = await gateway.post("/v1/embeddings", headers={**gateway.auth(), "content-type": "application/json"},
                           content=b"{nope")
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"


@pytest.mark.parametrize("path, doc", [
    ("/v1/embeddings", {"input": "x"}),
    ("/v1/embeddings", {"model": "minilm", "input": "x"}),
    ("/v1/rerank", {"query": "q", "documents": ["a"]}),
    ("/v1/embed", {"texts": ["x"]}),
])
@pytest.mark.parametrize("depth", [253, 300, 1000])
async def test_json_nested_deeper_than_the_gateway_writes_is_never_a_500(gateway, path, doc, depth):
    """orjson reads 1,024 levels but writes 254: an unknown field nested in between was accepted and then
    failed where the gateway writes the body again (to vLLM, into a cache key): a 500 and a traceback. It
    is served when the gateway can write it (or forwards it as it came), else a 400 invalid_json."""
    body = orjson.dumps(doc)[:-1] + b', "extra": ' + b"[" * depth + b"]" * depth + b"}"
    r = await gateway.post(path, headers={**gateway.auth(), "content-type": "application/json"}, content=body)
    # 502: forwarded as it came (the pass-through path) to an upstream that could not read it either
    assert r.status_code in (200, 400, 502), r.text
    if r.status_code == 400:
        assert r.json()["error"]["code"] == "invalid_json"
    if path == "/v1/rerank" and depth == 300:  # always written again (the upstream body): refused
        assert r.status_code == 400 and "too deep" in r.json()["error"]["message"]
    shallow = orjson.dumps({**doc, "extra": [[["fine"]]]})
    assert (await gateway.post(path, headers={**gateway.auth(), "content-type": "application/json"},
                               content=shallow)).status_code == 200
