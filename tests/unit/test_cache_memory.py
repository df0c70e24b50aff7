"""CACHE_MAX_BYTES bounds what the in-process item cache really holds (tracemalloc), not only its own
count of key and value bytes: a rerank score is 8 bytes, and the objects and the LRU's slot around it
cost far more than that."""

from __future__ import annotations

import tracemalloc

import pytest

from erproxy.cache import ItemCache, _item_keys

MAX_BYTES = 4 << 20


@pytest.mark.parametrize("value_len", [8, 1536, 4096])  # a rerank score, 384 and 1024 float32s
def test_the_lru_holds_no_more_memory_than_cache_max_bytes(value_len: int) -> None:
    items = 4 * MAX_BYTES // (value_len + 64)  # several times what fits: the LRU evicts throughout
    tracemalloc.start()
    try:
        cache = ItemCache(MAX_BYTES)
        before = tracemalloc.get_traced_memory()[0]
        for i in range(items):
            [key] = _item_keys(["minilm", "org/minilm"], [f"item {i}"])  # kept by the LRU, as in serving
            cache._put_local(key, bytes(value_len))
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert cache.bytes <= MAX_BYTES
    assert len(cache.lru) < items  # it did evict
    assert held <= 1.1 * MAX_BYTES, f"{held / MAX_BYTES:.2f}x CACHE_MAX_BYTES for {value_len}-byte values"
