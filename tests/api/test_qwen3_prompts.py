"""Qwen3 prompt rules as the upstream sees them: query instructions for Qwen3 embedding models."""

import httpx
import pytest


@pytest.fixture
async def qwen3_embed(fakes):
    return await fakes.start("embed", model="Qwen3-Embedding-0.6B")


async def direct(fake, text):
    async with httpx.AsyncClient() as c:
        r = await c.post(fake.url + "/v1/embeddings", json={"model": "Qwen3-Embedding-0.6B", "input": text})
    return r.json()["data"][0]["embedding"]


async def via(gw, **body):
    r = await gw.post("/v1/embeddings", headers=gw.auth(), json={"model": "Qwen3-Embedding-0.6B", **body})
    assert r.status_code == 200, r.text
    return [d["embedding"] for d in r.json()["data"]]


async def test_qwen3_queries_get_the_model_card_instruction(make_gateway, qwen3_embed):
    gw = await make_gateway(embed=qwen3_embed.url, EMBEDDING_QUERY_INSTRUCTION="Given a web search query, retrieve "
                            "relevant passages that answer the query")
    default = "Given a web search query, retrieve relevant passages that answer the query"
    assert await via(gw, input=["What is AI?"], input_type="query") == [
        await direct(qwen3_embed, f"Instruct: {default}\nQuery:What is AI?")]
    assert await via(gw, input="什么是人工智能？", input_type="query", instruction="检索相关段落") == [
        await direct(qwen3_embed, "Instruct: 检索相关段落\nQuery:什么是人工智能？")]
    assert await via(gw, input=["AI is artificial intelligence"], input_type="document") == [
        await direct(qwen3_embed, "AI is artificial intelligence")]
    assert await via(gw, input="plain") == [await direct(qwen3_embed, "plain")]


async def test_instruction_on_token_ids_is_a_clear_400(make_gateway, qwen3_embed):
    gw = await make_gateway(embed=qwen3_embed.url, ACCEPT_TOKEN_IDS="true")
    r = await gw.post("/v1/embeddings", headers=gw.auth(), json={"input": [[1, 2, 3]], "input_type": "query"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "instruction"
