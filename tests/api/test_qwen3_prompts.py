"""Qwen3 prompt rules as the upstream sees them: query instructions for Qwen3 embedding models."""

import httpx
import pytest

from tests.procs import start_fake


@pytest.fixture(scope="module")
def qwen3_embed(tmp_path_factory):
    fake = start_fake(tmp_path_factory.mktemp("q3"), "embed", model="Qwen3-Embedding-0.6B")
    yield fake
    fake.stop()


def direct(fake, text):
    return httpx.post(fake.url + "/v1/embeddings", json={"model": "Qwen3-Embedding-0.6B", "input": text}
                      ).json()["data"][0]["embedding"]


def via(gw, **body):
    r = httpx.post(gw.url + "/v1/embeddings", headers=gw.auth(), json={"model": "Qwen3-Embedding-0.6B", **body})
    assert r.status_code == 200, r.text
    return [d["embedding"] for d in r.json()["data"]]


def test_qwen3_queries_get_the_model_card_instruction(make_gateway, qwen3_embed):
    gw = make_gateway(embed=qwen3_embed.url, EMBEDDING_QUERY_INSTRUCTION="Given a web search query, retrieve "
                      "relevant passages that answer the query")
    default = "Given a web search query, retrieve relevant passages that answer the query"
    assert via(gw, input=["What is AI?"], input_type="query") == [
        direct(qwen3_embed, f"Instruct: {default}\nQuery:What is AI?")]
    assert via(gw, input="什么是人工智能？", input_type="query", instruction="检索相关段落") == [
        direct(qwen3_embed, "Instruct: 检索相关段落\nQuery:什么是人工智能？")]
    assert via(gw, input=["AI is artificial intelligence"], input_type="document") == [
        direct(qwen3_embed, "AI is artificial intelligence")]
    assert via(gw, input="plain") == [direct(qwen3_embed, "plain")]


def test_instruction_on_token_ids_is_a_clear_400(make_gateway, qwen3_embed):
    gw = make_gateway(embed=qwen3_embed.url)
    r = httpx.post(gw.url + "/v1/embeddings", headers=gw.auth(),
                   json={"input": [[1, 2, 3]], "input_type": "query"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "instruction"
