"""Admission shared through Redis: exact limits across worker processes and gateway instances.

- Rate limits: the `limits` library's moving window on Redis (an atomic Lua script per hit).
- Concurrency cap: a sorted set of leases, taken and counted in one Lua script, so under any
  interleaving at most MAX_CONCURRENT_REQUESTS are admitted. Each worker renews its leases every
  few seconds; the leases of a crashed worker expire after LEASE_TTL_S and free their slots.
- Revocations: `keys revoke` also adds the key's hash to a Redis set that every worker polls, so a
  key revoked on one host is refused by every instance sharing the Redis within a second.

When Redis cannot be reached, requests get 503 `limits_unavailable` (REDIS_FAIL_OPEN=false, the
default) or are admitted under this process's own limits (REDIS_FAIL_OPEN=true). The redis
client reconnects by itself: no restart is needed once Redis is back.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from typing import Awaitable, Callable, TypeVar
from urllib.parse import urlsplit, urlunsplit

from limits.aio.storage import RedisStorage
from limits.aio.strategies import MovingWindowRateLimiter
from redis import asyncio as aioredis
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.asyncio.retry import Retry

from .admission import MemoryAdmission, RateLimits, retry_after_s
from .errors import concurrency_exceeded, limits_unavailable, rate_limited
from .keys import Identity

log = logging.getLogger("erproxy.redis")

PREFIX = "erproxy"
LEASE_TTL_S = 15.0
RENEW_EVERY_S = 5.0
REVOKED_POLL_S = 0.5
POOL_SIZE = 64
POOL_WAIT_S = 5.0

# KEYS[1] = lease set; ARGV = limit, member, ttl. Uses the server clock so instances agree.
ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZSCORE', KEYS[1], ARGV[2]) then
  return 1  -- a retried call whose first reply was lost: the lease is already ours
end
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[1]) then
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[2])
  return 1
end
return 0
"""
# KEYS[1] = lease set; ARGV[1] = ttl; ARGV[2..] = members still held by this worker.
RENEW = """
local t = redis.call('TIME')
local expiry = tonumber(t[1]) + tonumber(t[2]) / 1000000 + tonumber(ARGV[1])
for i = 2, #ARGV do
  redis.call('ZADD', KEYS[1], 'XX', expiry, ARGV[i])
end
return #ARGV - 1
"""

REDIS_ERRORS: tuple[type[BaseException], ...] = (aioredis.RedisError, OSError, asyncio.TimeoutError)
try:  # limits wraps storage errors when asked to
    from limits.errors import StorageError

    REDIS_ERRORS = REDIS_ERRORS + (StorageError,)
except ImportError:  # pragma: no cover
    pass


T = TypeVar("T")
LOCAL_SLOT = ("local", None)  # a concurrency slot taken under this process's own cap


def revoked_set_key() -> str:
    return f"{PREFIX}:revoked"


class RedisAdmission:
    def __init__(self, url: str, rate_limit: str, max_concurrent: int, *, fail_open: bool = False) -> None:
        self.url = url
        self.limits = RateLimits(rate_limit)
        self.max_concurrent = max_concurrent
        self.fail_open = fail_open
        # A blocking pool: under a burst, requests wait for one of POOL_SIZE connections instead of
        # failing with "Too many connections". One immediate retry on a broken connection: pooled
        # connections opened before a Redis restart fail once each, and should cost the client
        # nothing. A retried hit or lease errs on the safe side (counted twice; a stray lease
        # expires after LEASE_TTL_S).
        pool = aioredis.BlockingConnectionPool.from_url(
            url, max_connections=POOL_SIZE, timeout=POOL_WAIT_S, socket_connect_timeout=1.0, socket_timeout=2.0,
            health_check_interval=10, retry=Retry(NoBackoff(), 1), retry_on_error=[RedisConnectionError],
        )
        self.redis = aioredis.Redis(connection_pool=pool)
        self._storage = RedisStorage(limits_storage_uri(url), implementation="redispy", wrap_exceptions=True,
                                     connection_pool=self.redis.connection_pool)
        self._limiter = MovingWindowRateLimiter(self._storage)
        self._acquire = self.redis.register_script(ACQUIRE)
        self._renew = self.redis.register_script(RENEW)
        self._leases_key = f"{PREFIX}:inflight"
        self._held: set[str] = set()
        self._worker = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._fallback = MemoryAdmission(rate_limit, max_concurrent)
        self._tasks: list[asyncio.Task[None]] = []
        self.revoked_hashes: frozenset[str] = frozenset()
        self._redis_ok = True

    async def start(self) -> None:
        try:
            await self.redis.ping()
        except REDIS_ERRORS as e:
            self._note_down(e)
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._renew_loop()), loop.create_task(self._revoked_loop())]

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._held:
            try:
                await self.redis.zrem(self._leases_key, *self._held)
            except REDIS_ERRORS:
                pass
        await self.redis.aclose()

    # ---- state of the connection ---------------------------------------------------------------
    def _note_down(self, e: BaseException) -> None:
        if self._redis_ok:
            log.error("Redis at %s unreachable (%s): %s", _safe_url(self.url), e,
                      "admitting under per-process limits (REDIS_FAIL_OPEN=true)" if self.fail_open
                      else "refusing requests with 503 until it is back")
        self._redis_ok = False

    def _note_up(self) -> None:
        if not self._redis_ok:
            log.warning("Redis at %s reachable again; shared limits restored", _safe_url(self.url))
        self._redis_ok = True

    async def _without_redis(self, local: Callable[[], Awaitable[T]]) -> T:
        """Redis is down: REDIS_FAIL_OPEN=true admits under this process's own limits, else 503."""
        if not self.fail_open:
            raise limits_unavailable()
        return await local()

    # ---- Admission protocol --------------------------------------------------------------------
    # While Redis is known to be down no request waits for a timeout: it goes straight to
    # _without_redis, and the revocation poll notices when Redis is back.
    async def enforce_rate_limit(self, who: Identity) -> None:
        item = self.limits.item_for(who)
        if self._redis_ok:
            bucket = who.bucket or who.name
            try:
                allowed = await self._limiter.hit(item, bucket)
                reset_time = None if allowed else (await self._limiter.get_window_stats(item, bucket)).reset_time
            except REDIS_ERRORS as e:
                self._note_down(e)
            else:
                self._note_up()
                if reset_time is not None:
                    raise rate_limited(item, retry_after_s(reset_time, time.time()))
                return
        await self._without_redis(lambda: self._fallback.enforce_rate_limit(who))

    async def acquire(self) -> object:
        if self._redis_ok:
            member = f"{self._worker}:{uuid.uuid4().hex}"
            try:
                ok = await self._acquire(keys=[self._leases_key], args=[self.max_concurrent, member, LEASE_TTL_S])
            except REDIS_ERRORS as e:
                self._note_down(e)
            else:
                self._note_up()
                if not ok:
                    raise concurrency_exceeded(self.max_concurrent)
                self._held.add(member)
                return ("redis", member)
        await self._without_redis(self._fallback.acquire)
        return LOCAL_SLOT

    async def release(self, slot: object) -> None:
        where, member = slot  # type: ignore[misc]
        if where == "local":
            await self._fallback.release(None)
            return
        self._held.discard(member)
        try:
            await self.redis.zrem(self._leases_key, member)
        except REDIS_ERRORS as e:  # the lease expires by itself
            self._note_down(e)

    def in_flight(self) -> int:
        return len(self._held) + self._fallback.in_flight()

    # ---- background ------------------------------------------------------------------------------
    async def _renew_loop(self) -> None:
        while True:
            await asyncio.sleep(RENEW_EVERY_S)
            if not self._held:
                continue
            try:
                await self._renew(keys=[self._leases_key], args=[LEASE_TTL_S, *self._held])
            except REDIS_ERRORS as e:
                self._note_down(e)

    async def _revoked_loop(self) -> None:
        while True:
            try:
                members = await self.redis.smembers(revoked_set_key())
                self.revoked_hashes = frozenset(m.decode() if isinstance(m, bytes) else m for m in members)
                await self.redis.ping()
                self._note_up()
            except REDIS_ERRORS as e:
                self._note_down(e)
            await asyncio.sleep(REVOKED_POLL_S)


def limits_storage_uri(url: str) -> str:
    """REDIS_URL as the `limits` library names it: a bare unix:// would pick its valkey client."""
    return "redis+" + url if url.startswith("unix://") else url


def _safe_url(url: str) -> str:
    """The Redis URL without its password (in the userinfo or the query), for logs."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "***@" + netloc.rpartition("@")[2]
    query = "&".join(q if not q.lower().startswith("password=") else "password=***" for q in parts.query.split("&")
                     if q)
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


async def publish_revocation(url: str, key_hash: str) -> None:
    """Tell every gateway sharing this Redis that a key is revoked (used by `keys revoke`)."""
    r = aioredis.Redis.from_url(url, socket_connect_timeout=2.0, socket_timeout=2.0)
    try:
        await r.sadd(revoked_set_key(), key_hash)
    finally:
        await r.aclose()

