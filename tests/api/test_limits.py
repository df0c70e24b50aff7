"""Admission limits: request body size, requests per minute per key, concurrent requests."""

import asyncio

import httpx


async def post_embed(gw, **kw) -> httpx.Response:
    return await gw.post("/v1/embeddings", json={"model": "minilm", "input": "hello world"},
                         headers=kw.pop("headers", gw.auth()), timeout=kw.pop("timeout", 30), **kw)


async def test_body_over_limit_is_413(make_gateway):
    gw = await make_gateway(MAX_BODY_BYTES="2048")
    r = await gw.post("/v1/embeddings", headers=gw.auth(), json={"input": "x" * 5000})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    async def chunks():  # no content-length: counted while streaming
        for _ in range(10):
            yield b"x" * 1000

    r = await gw.post("/v1/embeddings", headers=gw.auth(), content=chunks())
    assert r.status_code == 413


async def test_rate_limit_per_key_is_429_with_retry_after(make_gateway):
    gw = await make_gateway(RATE_LIMIT="3/minute", key_names=("alice", "bob"))
    alice, bob = gw.keys["alice"], gw.keys["bob"]
    codes = [(await post_embed(gw, headers={"Authorization": f"Bearer {alice}"})).status_code for _ in range(4)]
    assert codes == [200, 200, 200, 429]
    r = await post_embed(gw, headers={"Authorization": f"Bearer {alice}"})
    assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limit_exceeded"
    assert 1 <= int(r.headers["retry-after"]) <= 60
    assert "3 per 1 minute" in r.json()["error"]["message"]
    assert (await post_embed(gw, headers={"Authorization": f"Bearer {bob}"})).status_code == 200  # per key


async def test_concurrency_cap_is_a_distinct_429(fakes, make_gateway):
    slow = await fakes.start("embed", delay=1.0)
    gw = await make_gateway(embed=slow.url, MAX_CONCURRENT_REQUESTS="2")
    results = await asyncio.gather(*(post_embed(gw) for _ in range(6)))
    codes = sorted(r.status_code for r in results)
    assert codes.count(200) == 2 and codes.count(429) == 4
    rejected = [r for r in results if r.status_code == 429][0]
    assert rejected.json()["error"]["code"] == "concurrency_limit_exceeded"
    assert rejected.headers["retry-after"] == "1"
