"""The item cache's parts (erproxy/cache.py, split.py): keys, the LRU's bound, Cache-Control, chunks, and
float32 values printed exactly as vLLM prints them."""

import json
import random
import struct

import orjson
import pytest

from erproxy.cache import BYPASS, REFRESH, USE, ItemCache, cache_mode, embedding_keys, rerank_keys
from erproxy.split import auto_truncate, chunks, floats_json, from_floats, to_floats


def f32(x):
    return struct.unpack("<f", struct.pack("<f", x))[0]


def test_floats_print_as_pythons_repr_of_the_widened_float32():
    rng = random.Random(7)
    values = [f32(rng.gauss(0, 0.05)) for _ in range(50000)]
    values += [f32(x) for x in (1e-5, -3e-7, 1e-4, 0.0001234, 1e16, -1e22, 123456789.0, 1e-38, 3.4e38, 0.5)]
    values += [0.0, -0.0, 1.0, -1.0]
    raw = from_floats(values)
    assert floats_json(raw) == json.dumps(values, separators=(",", ":")).encode()
    assert to_floats(raw) == values


def test_keys_follow_everything_that_changes_the_answer():
    base = embedding_keys("m", "root", ["a", "b"], {})
    assert len(set(base)) == 2
    assert embedding_keys("m", "root", ["a"], {"user": "u", "priority": 3})[0] == base[0]
    for other in (embedding_keys("m2", "root", ["a"], {}), embedding_keys("m", "root2", ["a"], {}),
                  embedding_keys("m", "root", ["a"], {"dimensions": 64}),
                  embedding_keys("m", "root", ["a"], {"truncate_prompt_tokens": -1}),
                  embedding_keys("m", "root", ["a"], {"use_activation": False}),
                  embedding_keys("m", "root", ["Instruct: x\nQuery:a"], {})):
        assert other[0] != base[0]
    r = rerank_keys("m", None, None, "q", ["d"], {})[0]
    assert r != base[0]
    assert rerank_keys("m", None, "inst", "q", ["d"], {})[0] != r
    assert rerank_keys("m", None, None, "q2", ["d"], {})[0] != r
    assert rerank_keys("m", None, None, "q", ["d"], {"truncate_prompt_tokens": 100})[0] != r
    assert rerank_keys("m", None, None, "q", ["d"], {"top_n": 2, "return_documents": True})[0] == r


async def test_lru_stays_within_its_bytes_and_drops_the_oldest():
    c = ItemCache(2000)
    await c.put_many([(f"k{i}", bytes(300)) for i in range(10)])
    assert c.bytes <= 2000 and len(c.lru) == c.bytes // (300 + 2 + 96)
    got = await c.get_many(["k0", "k9"])
    assert got == [None, bytes(300)]
    off = ItemCache(0)
    assert not off.enabled and off.state()["enabled"] is False


class FakeReq:
    def __init__(self, value):
        self.value = value

    def header(self, name):
        return self.value


@pytest.mark.parametrize("value,mode", [(None, USE), (b"max-age=60", USE), (b"no-cache", REFRESH),
                                        (b"No-Store", BYPASS), (b"no-cache, no-store", BYPASS)])
def test_cache_control(value, mode):
    assert cache_mode(FakeReq(value)) == mode


def test_chunks_even_one_per_replica_at_most_one_per_limit():
    idx = list(range(100))
    assert chunks(idx, 32, 1) == [idx]
    assert chunks(idx[:32], 32, 4) == [idx[:32]]
    assert [len(c) for c in chunks(idx, 32, 2)] == [50, 50]
    assert [len(c) for c in chunks(idx, 32, 8)] == [25, 25, 25, 25]
    assert [len(c) for c in chunks(idx[:33], 32, 3)] == [17, 16]
    assert sum(chunks(idx, 10, 3), []) == idx


def test_auto_truncate_unless_the_request_decides():
    f = {}
    auto_truncate(f, True)
    assert f == {"truncate_prompt_tokens": -1}
    f = {"truncate_prompt_tokens": 10}
    auto_truncate(f, True)
    assert f == {"truncate_prompt_tokens": 10}
    f = {}
    auto_truncate(f, True, refused=True)
    auto_truncate(f, False)
    assert f == {}


def test_float_texts_cuts_vllms_answer_without_parsing_numbers():
    from erproxy.split import float_texts
    from tests.fakes.fake_vllm import vllm_json

    vectors = [[0.5, -1e-05], [0.25, 3e-07], [1.0, 0.0]]
    doc = {"id": "embd-1", "object": "list", "created": 7, "model": "m\"x", "data": [
        {"index": i, "object": "embedding", "embedding": v} for i, v in [(2, vectors[2]), (0, vectors[0]),
                                                                         (1, vectors[1])]],
           "usage": {"prompt_tokens": 12, "total_tokens": 12, "completion_tokens": 0}}
    texts, tokens, rid, created, model = float_texts(vllm_json(doc), 3)
    assert texts == [json.dumps(v, separators=(",", ":")).encode() for v in vectors]
    assert (tokens, rid, created, model) == (12, "embd-1", 7, 'm"x')
    assert float_texts(vllm_json(doc), 2) is None  # more vectors than inputs
    assert float_texts(vllm_json({**doc, "data": doc["data"][:2]}), 3) is None
    assert float_texts(b'{"object":"list","data":[{"embedding":[1.0],"index":0}]}', 1) is None  # other order


def test_a_long_query_is_hashed_once_per_request_not_once_per_document(monkeypatch):
    """A 4 MB query with 2,048 documents was hashed 2,048 times on the event loop (10 s, every other
    client stalled). The keys must stay what they were: cached entries keep serving."""
    import hashlib

    from erproxy import cache

    calls = []
    blake2b = hashlib.blake2b

    def counting_blake2b(data=b"", **kw):
        calls.append(len(data))
        return blake2b(data, **kw)

    monkeypatch.setattr(cache.hashlib, "blake2b", counting_blake2b)
    query, docs = "q" * 100_000, [f"doc {i}" for i in range(2048)]
    keys = rerank_keys("m", "root", None, query, docs, {})
    assert len(calls) == 1
    monkeypatch.undo()
    prefix = orjson.dumps(["r", "m", "root", None, query, {}], option=orjson.OPT_SORT_KEYS)
    one_by_one = [hashlib.blake2b(prefix + b"\x00" + d.encode(), digest_size=20).hexdigest() for d in docs]
    assert keys == one_by_one
