"""A split answer is byte for byte the one a single replica gives (erproxy/split.py passes each vector's
text on as vLLM printed it, in the client's encoding_format): float, base64 and the default, with
`dimensions`, with part of the items answered from the item cache, and vLLM's own error when one
is refused. Only `id` and `created`, which every answer has its own of, are left out of the comparison."""

import base64
import json
import math
import re
import struct

import pytest

from tests.api.test_dialects import upstream_bodies
from tests.fakes.fake_vllm import FakeVLLM, generated_vector

TEXTS = [f"input number {i}" for i in range(100)]
SPLIT = {"SPLIT_EMBEDDING_INPUTS": "32", "SPLIT_RERANK_DOCUMENTS": "32"}
FORMATS = [None, "float", "base64"]


def masked(body: bytes) -> bytes:
    """The answer without the two fields each answer has its own of."""
    body = re.sub(rb'^\{"id":"embd-[0-9a-f]+"', b'{"id":"-"', body)
    return re.sub(rb',"created":\d+,', b',"created":0,', body, count=1)


def vectors_and_usage(body: bytes) -> tuple[bytes, bytes]:
    head, _, usage = masked(body).rpartition(b'],"usage":')
    return head, usage


def with_dimensions(server):
    """The fake vLLM as a Matryoshka model (Qwen3-Embedding): `dimensions` keeps the first values of the
    vector, normalised again, as float32."""
    original = server.fake.embed

    def embed(body):
        body = dict(body)
        dims = body.pop("dimensions", None)
        resp = original(body)
        if dims is None or resp.status != 200:
            return resp
        doc = json.loads(resp.body)
        for item in doc["data"]:
            emb = item["embedding"]
            vec = (list(struct.unpack(f"<{len(base64.b64decode(emb)) // 4}f", base64.b64decode(emb)))
                   if isinstance(emb, str) else emb)[:dims]
            norm = math.sqrt(sum(x * x for x in vec)) or 1.0
            vec = [struct.unpack("<f", struct.pack("<f", x / norm))[0] for x in vec]
            item["embedding"] = (base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode()
                                 if isinstance(emb, str) else vec)
        return FakeVLLM.json(doc)

    server.fake.embed = embed


@pytest.fixture
async def replicas(fakes):
    """Three fake vLLM embedding replicas: [0] alone answers like one vLLM, [1] and [2] take the chunks."""
    return [await fakes.start("embed") for _ in range(3)]


async def one_and_two(make_gateway, replicas, **env):
    one = await make_gateway(embed=replicas[0].url, **SPLIT, **env)
    two = await make_gateway(embed=f"{replicas[1].url},{replicas[2].url}", **SPLIT, **env)
    return one, two


@pytest.mark.parametrize("fmt", FORMATS)
async def test_split_answer_is_byte_for_byte_the_single_replicas(make_gateway, replicas, fmt):
    one, two = await one_and_two(make_gateway, replicas)
    seen = [upstream_bodies(s) for s in replicas]
    body = {"model": "minilm", "input": TEXTS, **({"encoding_format": fmt} if fmt else {})}
    single = await one.post("/v1/embeddings", headers=one.auth(), json=body)
    split = await two.post("/v1/embeddings", headers=two.auth(), json=body)
    assert single.status_code == split.status_code == 200, split.text
    assert [len(s) for s in seen] == [1, 1, 1]  # the single one whole, the other two a chunk each
    assert all(b["encoding_format"] == (fmt or "float") for s in seen[1:] for _, b in s)  # the client's own
    assert masked(split.content) == masked(single.content)
    data = split.json()["data"]
    if fmt == "base64":
        assert [list(struct.unpack("<384f", base64.b64decode(d["embedding"]))) for d in data] == \
            [generated_vector(t) for t in TEXTS]
    else:
        assert [d["embedding"] for d in data] == [generated_vector(t) for t in TEXTS]
    assert split.json()["usage"] == single.json()["usage"]


@pytest.mark.parametrize("fmt", FORMATS)
async def test_with_dimensions_every_chunk_asks_them_and_the_answer_is_the_single_replicas(make_gateway, replicas,
                                                                                          fmt):
    for s in replicas:
        with_dimensions(s)
    one, two = await one_and_two(make_gateway, replicas)
    seen = [upstream_bodies(s) for s in replicas[1:]]
    body = {"model": "minilm", "input": TEXTS, "dimensions": 64, **({"encoding_format": fmt} if fmt else {})}
    single = await one.post("/v1/embeddings", headers=one.auth(), json=body)
    split = await two.post("/v1/embeddings", headers=two.auth(), json=body)
    assert single.status_code == split.status_code == 200, split.text
    assert [b["dimensions"] for s in seen for _, b in s] == [64, 64]
    assert masked(split.content) == masked(single.content)
    first = split.json()["data"][0]["embedding"]
    assert len(first) == 64 if fmt != "base64" else len(base64.b64decode(first)) == 64 * 4


async def test_a_refused_dimensions_is_vllms_own_error_split_or_not(make_gateway, replicas):
    one, two = await one_and_two(make_gateway, replicas)  # MiniLM: not a Matryoshka model
    body = {"model": "minilm", "input": TEXTS, "dimensions": 64}
    single = await one.post("/v1/embeddings", headers=one.auth(), json=body)
    split = await two.post("/v1/embeddings", headers=two.auth(), json=body)
    assert single.status_code == split.status_code == 400
    assert split.json() == single.json()


@pytest.mark.parametrize("fmt", FORMATS)
async def test_cached_and_fresh_vectors_merge_into_the_single_replicas_answer(make_gateway, replicas, fmt):
    one, two = await one_and_two(make_gateway, replicas, CACHE_MAX_BYTES="64MiB")
    extra = {"encoding_format": fmt} if fmt else {}
    # every other input cached first, in the other format: a cached vector is float32 bytes, printed anew
    other = {"encoding_format": "base64" if fmt != "base64" else "float"}
    warm = await two.post("/v1/embeddings", headers=two.auth(),
                          json={"model": "minilm", "input": TEXTS[::2], **other})
    assert warm.status_code == 200
    seen = [upstream_bodies(s) for s in replicas[1:]]
    body = {"model": "minilm", "input": TEXTS, **extra}
    split = await two.post("/v1/embeddings", headers=two.auth(), json=body)
    assert (split.headers["x-cache-hits"], split.headers["x-cache-misses"]) == ("50", "50")
    assert [len(s) for s in seen] == [1, 1]  # 50 misses > 32: split in two
    single = await one.post("/v1/embeddings", headers={**one.auth(), "Cache-Control": "no-store"}, json=body)
    assert vectors_and_usage(split.content)[0] == vectors_and_usage(single.content)[0]
    # usage counts what the upstreams processed (the misses only), in vLLM's shape
    tokens = sum(len(t.split()) + 2 for t in TEXTS[1::2])
    assert vectors_and_usage(split.content)[1] == vectors_and_usage(single.content)[1].replace(
        b'"prompt_tokens":%d,"total_tokens":%d' % ((single.json()["usage"]["prompt_tokens"],) * 2),
        b'"prompt_tokens":%d,"total_tokens":%d' % (tokens, tokens))
    # and a request answered from the cache alone is the single replica's too, usage 0 in vLLM's shape
    again = await two.post("/v1/embeddings", headers=two.auth(), json=body)
    assert again.headers["x-cache-misses"] == "0"
    assert vectors_and_usage(again.content)[0] == vectors_and_usage(single.content)[0]
    assert again.json()["usage"] == {**single.json()["usage"], "prompt_tokens": 0, "total_tokens": 0}
