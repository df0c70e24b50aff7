"""The item cache: one entry per embedding input or per rerank (query, document) pair.

Keys hash everything that changes the answer of one item: the served model and its upstream root,
the exact text sent upstream (after the Qwen3 instruction), and every other upstream field but the
ones that only label a request (`user`, `priority`). Values are what vLLM computed: an embedding's
float32 little-endian bytes (vLLM's base64 payload), a rerank score as an IEEE double. A cached
vector therefore decodes to the same float32 values as the first answer, in float and in base64.

Lookups go to an in-process LRU bounded by CACHE_MAX_BYTES, then, for what it lacks, to Redis when
REDIS_URL is set (one MGET per request; the misses are written with one pipelined SET ... EX
CACHE_TTL), so workers and instances share it. Redis being down never fails a request: the error
is logged once, Redis is skipped for REDIS_RETRY_S, and the request is served from the LRU and
the upstream. Redis holds the limits and usage too, and its entries leave only by CACHE_TTL: while
its memory (INFO used_memory, read at most every MEMORY_CHECK_S) is over CACHE_REDIS_MAX_BYTES, no
entry is written to it, so a day of unique inputs cannot grow it until the kernel kills it.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import OrderedDict
from typing import Any, Iterable

import orjson

from .asgi import Request
from .protocol import client_json

log = logging.getLogger("erproxy.cache")

REDIS_PREFIX = "erproxy:item:"
REDIS_TIMEOUT_S = 0.5
REDIS_RETRY_S = 5.0
MEMORY_CHECK_S = 5.0  # how often Redis's used_memory is read again (with the next write)
ENTRY_OVERHEAD = 210  # bytes an LRU entry costs beyond its key and value: the str and bytes objects, the
# OrderedDict slot and node (measured with tracemalloc: tests/unit/test_cache_memory.py)
# Upstream fields that label a request without changing any item's answer.
UNKEYED_FIELDS = frozenset({"user", "priority", "request_id", "encoding_format", "embed_dtype", "endianness",
                            "input", "model", "documents", "query", "top_n", "return_documents"})

# Cache-Control of a request -> what the cache does
USE, REFRESH, BYPASS = "use", "refresh", "bypass"


def cache_mode(req: Request) -> str:
    """`no-store`: neither read nor write; `no-cache`: recompute and refresh; else read and write."""
    value = req.header(b"cache-control")
    if not value:
        return USE
    directives = {d.strip().split(b"=")[0].lower() for d in value.split(b",")}
    if b"no-store" in directives:
        return BYPASS
    if b"no-cache" in directives:
        return REFRESH
    return USE


def _fields(fields: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in fields.items() if k not in UNKEYED_FIELDS}


def _item_keys(context: list[Any], items: Iterable[str]) -> list[str]:
    """One key per item: a hash of what every item shares (`context`) and the item's own text."""
    prefix = client_json(context, option=orjson.OPT_SORT_KEYS)  # a client's fields: too deep is its 400
    # the prefix (a rerank query, a client's extra fields: of any size) is hashed once and the state copied
    # per item: hashing it again for each of 2,048 items froze the event loop for seconds
    shared = hashlib.blake2b(prefix, digest_size=20)
    shared.update(b"\x00")
    out = []
    for item in items:
        h = shared.copy()
        h.update(item.encode())
        out.append(h.hexdigest())
    return out


def embedding_keys(model: str | None, root: str | None, texts: Iterable[str], fields: dict[str, Any],
                   scope: str | None = None) -> list[str]:
    """One key per text: model, root, the text as sent upstream, and the fields that change a vector; with
    a `scope` (CACHE_SCOPE=key: the API key's name), that key's own entries."""
    context = ["e", model, root, _fields(fields)]
    return _item_keys(context if scope is None else [*context, scope], texts)


def rerank_keys(model: str | None, root: str | None, instruction: str | None, query: str, documents: Iterable[str],
                fields: dict[str, Any], scope: str | None = None) -> list[str]:
    """One key per document: model, root, instruction, query, the document, truncation and the other fields
    (and the `scope`, as for embedding_keys)."""
    context = ["r", model, root, instruction, query, _fields(fields)]
    return _item_keys(context if scope is None else [*context, scope], documents)


class ItemCache:
    """In-process LRU of at most `max_bytes` (0: off), in front of Redis when `redis_url` is set."""

    def __init__(self, max_bytes: int, redis_url: str | None = None, ttl: float = 86400.0,
                 redis_max_bytes: int = 0, shared: bool = False) -> None:
        self.max_bytes = max_bytes
        # CACHE_SCOPE=shared: one cache for every API key; else each key's own entries, so that no key can
        # learn from X-Cache-Hits (or the time an answer takes) which texts another key has sent
        self.shared = shared
        self.redis_max_bytes = redis_max_bytes  # 0: no bound on Redis's memory
        self._redis_full = False
        self._memory_checked = float("-inf")
        self.ttl = max(1, int(ttl))
        self.lru: OrderedDict[str, bytes] = OrderedDict()
        self.bytes = 0
        self.redis: Any = None
        self.redis_url = redis_url
        self._redis_down_until = 0.0
        self._redis_error: str | None = None
        if max_bytes > 0 and redis_url:
            import redis.asyncio as aioredis

            self.redis = aioredis.Redis.from_url(redis_url, socket_timeout=REDIS_TIMEOUT_S,
                                                 socket_connect_timeout=REDIS_TIMEOUT_S)

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def state(self) -> dict[str, Any]:
        """What /health shows."""
        return {"enabled": self.enabled, "items": len(self.lru), "bytes": self.bytes, "max_bytes": self.max_bytes,
                "redis": None if self.redis is None else ("unavailable" if self._redis_error else
                                                          "full" if self._redis_full else "ok")}

    async def close(self) -> None:
        if self.redis is not None:
            await self.redis.aclose()

    # ---- the in-process LRU ------------------------------------------------------------------------
    def _get_local(self, key: str) -> bytes | None:
        value = self.lru.get(key)
        if value is not None:
            self.lru.move_to_end(key)
        return value

    def _put_local(self, key: str, value: bytes) -> None:
        cost = len(key) + len(value) + ENTRY_OVERHEAD
        if cost > self.max_bytes:
            return
        old = self.lru.pop(key, None)
        if old is not None:
            self.bytes -= len(key) + len(old) + ENTRY_OVERHEAD
        self.lru[key] = value
        self.bytes += cost
        while self.bytes > self.max_bytes:
            k, v = self.lru.popitem(last=False)
            self.bytes -= len(k) + len(v) + ENTRY_OVERHEAD

    # ---- Redis -------------------------------------------------------------------------------------
    def _redis_usable(self) -> bool:
        return self.redis is not None and time.monotonic() >= self._redis_down_until

    def _redis_failed(self, e: BaseException) -> None:
        reason = f"{type(e).__name__}: {e}"
        if self._redis_error is None:
            log.warning("Redis item cache unavailable (%s): serving from the in-process cache and the upstream; "
                        "trying again every %.0f s", reason, REDIS_RETRY_S)
        self._redis_error = reason
        self._redis_down_until = time.monotonic() + REDIS_RETRY_S

    def _redis_ok(self) -> None:
        if self._redis_error is not None:
            log.info("Redis item cache is reachable again")
            self._redis_error = None

    # ---- what the item path calls --------------------------------------------------------------------
    def scope(self, req: Request) -> str | None:
        """What item keys add for this request: None when shared, else the API key's name."""
        if self.shared:
            return None
        return req.who.name if req.who is not None else "-"

    async def get_many(self, keys: list[str]) -> list[bytes | None]:
        found = [self._get_local(k) for k in keys]
        missing = [i for i, v in enumerate(found) if v is None]
        if missing and self._redis_usable():
            try:
                values = await self.redis.mget([REDIS_PREFIX + keys[i] for i in missing])
            except Exception as e:  # noqa: BLE001 - any Redis failure: skip the shared layer
                self._redis_failed(e)
            else:
                self._redis_ok()
                for i, v in zip(missing, values):
                    if v is not None:
                        found[i] = v
                        self._put_local(keys[i], v)
        return found

    async def put_many(self, items: list[tuple[str, bytes]]) -> None:
        for k, v in items:
            self._put_local(k, v)
        if items and self._redis_usable():
            check = self.redis_max_bytes > 0 and time.monotonic() - self._memory_checked >= MEMORY_CHECK_S
            if self._redis_full and not check:
                return
            try:
                pipe = self.redis.pipeline(transaction=False)
                if check:
                    pipe.info("memory")
                if not self._redis_full:
                    for k, v in items:
                        pipe.set(REDIS_PREFIX + k, v, ex=self.ttl)
                replies = await pipe.execute()
            except Exception as e:  # noqa: BLE001
                self._redis_failed(e)
            else:
                self._redis_ok()
                if check:
                    self._memory_checked = time.monotonic()
                    self._note_memory(int(replies[0].get("used_memory", 0)))

    def _note_memory(self, used: int) -> None:
        full = used > self.redis_max_bytes
        if full and not self._redis_full:
            log.warning("Redis uses %d bytes, over CACHE_REDIS_MAX_BYTES=%d: no new items are cached in Redis "
                        "until entries expire (CACHE_TTL) or memory is freed", used, self.redis_max_bytes)
        elif self._redis_full and not full:
            log.info("Redis uses %d bytes, under CACHE_REDIS_MAX_BYTES again: caching items in Redis", used)
        self._redis_full = full
