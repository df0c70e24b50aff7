"""Admission shared through Redis: exact limits across worker processes and gateway instances.

One round trip per request: the rate limit, the token limit and the concurrency lease are checked
and taken by ONE Lua script (ADMIT), atomically, with the Redis server's clock, sent on the worker's
one pipelined connection (resp.py: commands of concurrent requests share writes, no pool, no lock).
The admissions asked for within one turn of the event loop go out as one ADMIT that decides them in
order, one after the other, exactly as separate scripts would: Redis pays the script's set-up once
per batch instead of once per request (bench/results/ANALYSIS.md).
What happens after the answer is never awaited by a request: lease releases ride on the next ADMIT
(its extra arguments, removed before the cap is counted) and token charges (one SETTLE script per
batch) go out with the next write; only when no write comes within BATCH_WAIT_S do they go on their
own (a worker under load never sends them alone: no write, no reply, no wake-up of their own).

- Rate limits: `limits`' moving window and its data layout (a list of hit times, newest first, trimmed
  to the limit), under LIMITS:LIMITER/bucket, a name of the key's alone (admission.RateLimits.key_for:
  a lowered limit keeps the hits already made): the same limits per key, the same Retry-After (until
  the hit that fills the window leaves it).
- Token limits: token_limits.py's windows (`erproxy:tokens:BUCKET:WINDOW`), checked with the others.
- Concurrency cap: a sorted set of leases (`erproxy:inflight`), counted and taken in the same script,
  so under any interleaving at most MAX_CONCURRENT_REQUESTS are admitted. Each worker renews its
  leases every few seconds; the leases of a crashed worker expire after LEASE_TTL_S and free their slots.
- Revocations: `keys revoke` also adds the key's hash to a Redis set that every worker polls, so a
  key revoked on one host is refused by every instance sharing the Redis within a second.

When Redis cannot be reached (or does not answer within REPLY_TIMEOUT_S), requests get 503
`limits_unavailable` (REDIS_FAIL_OPEN=false, the default) or are admitted under this process's own
limits (REDIS_FAIL_OPEN=true). While Redis is known to be down no request waits for it; the
revocation poll notices when it is back, and the client reconnects by itself: no restart is needed.
redis-py (`self.redis`) still serves what is off the request's path: usage counters, the
authentication-failure throttle, `keys revoke`.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import os
import uuid
from typing import Any, Callable
from urllib.parse import urlsplit, urlunsplit

from redis import asyncio as aioredis

from .admission import LOCAL_LEASE, MemoryAdmission, Pass, RateLimits
from .errors import concurrency_exceeded, limits_unavailable, rate_limited
from .keys import Identity
from .resp import RespClient, RespError, Script, bulk
from .token_limits import Ticket, TokenLimit, token_exceeded

log = logging.getLogger("erproxy.redis")

PREFIX = "erproxy"
LIMITS_PREFIX = "LIMITS"  # `limits`' RedisStorage key prefix: the rate windows keep its layout
LEASE_TTL_S = 15.0
RENEW_EVERY_S = 5.0
REVOKED_POLL_S = 0.5
REPLY_TIMEOUT_S = 2.0
CONNECT_TIMEOUT_S = 1.0
MAX_RIDERS = 512  # releases one ADMIT carries at most (Lua's unpack has a stack limit)
MAX_BATCH = 256  # admissions one ADMIT decides at most
BATCH_WAIT_S = 0.002  # releases and charges wait at most this long for a write to ride on

# KEYS: [1] the lease set; then three per admission: its rate window (a list of hit times, newest
# first), its token windows' prefix (+ ':' .. window), its key's last answer (tokens).
# ARGV: [1] lease ttl s, [2] r = how many leases this worker gives back (answered requests), [3..2+r]
# those leases (removed first, whatever the outcome); then six per admission: rate limit (-1: no rate
# check), its window in s, concurrency cap (0: take no lease), token limit (0: none), token period s,
# the lease's member.
# Returns one reply per admission, in order, each decided after the ones before it: {0, 0, token
# window} admitted; {1, ms until a hit frees} rate limited; {2, ms, window} token limited; {3, 0, 0}
# no free slot; {4, 0, error} Redis refused one of its commands. A refused admission takes nothing but
# its rate hit.
ADMIT = Script("""
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local ttl, r = tonumber(ARGV[1]), tonumber(ARGV[2])
if r > 0 then redis.call('ZREM', KEYS[1], unpack(ARGV, 3, 2 + r)) end
local held, swept = nil, false

local function admit(rate_key, tprefix, last, amount, expiry, cap, tlimit, period, member)
  if amount >= 0 then
    if amount == 0 then return {1, expiry * 1000, 0} end
    local oldest = redis.call('LINDEX', rate_key, amount - 1)
    if oldest and tonumber(oldest) >= now - expiry then
      return {1, math.ceil((tonumber(oldest) + expiry - now) * 1000), 0}
    end
    if redis.call('LPUSH', rate_key, now) > amount then redis.call('LTRIM', rate_key, 0, amount - 1) end
    redis.call('EXPIRE', rate_key, expiry)
  end
  local tkey, window
  if tlimit > 0 then
    window = math.floor(now / period)
    tkey = tprefix .. ':' .. window
    local v = redis.call('HMGET', tkey, 'used', 'n', 'f')
    local used, n, f = tonumber(v[1]) or 0, tonumber(v[2]) or 0, tonumber(v[3]) or 0
    if used >= tlimit then
      return {2, math.floor(((window + 1) * period - now) * 1000), window}
    end
    local avg = 0
    if n > 0 then avg = used / n else avg = tonumber(redis.call('GET', last) or '0') end
    if used + f * avg >= tlimit then
      return {2, 1000, window}
    end
  end
  if cap > 0 then
    if not held then held = redis.call('ZCARD', KEYS[1]) end
    if held >= cap and not swept then  -- full: drop expired leases (crashed workers'), count again
      redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
      held, swept = redis.call('ZCARD', KEYS[1]), true
    end
    if held >= cap then return {3, 0, 0} end
    redis.call('ZADD', KEYS[1], now + ttl, member)
    held = held + 1
  end
  if tkey then
    redis.call('HINCRBY', tkey, 'f', 1)
    redis.call('EXPIRE', tkey, period * 2 + 60)
    return {0, 0, window}
  end
  return {0, 0, 0}
end

local out = {}
for i = 1, (#KEYS - 1) / 3 do
  local k, a = 3 * i - 1, 2 + r + 6 * (i - 1)
  -- one admission's error (another program's key under one of ours) must not fail the others of the batch,
  -- which Lua would not roll back: it is answered {4, 0, the error}
  local ok, res = pcall(admit, KEYS[k], KEYS[k + 1], KEYS[k + 2], tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2]),
                        tonumber(ARGV[a + 3]), tonumber(ARGV[a + 4]), tonumber(ARGV[a + 5]), ARGV[a + 6])
  if ok then out[i] = res else out[i] = {4, 0, type(res) == 'table' and res.err or tostring(res)} end
end
return out
""")

# Token charges of answered requests, batched: KEYS pairs (window prefix, last answer), ARGV triples
# (admitted window, period, tokens). Each takes its request off its admitted window's in-flight
# count and charges its tokens to the current window.
SETTLE = Script("""
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
for i = 1, #KEYS, 2 do
  local j = (i - 1) / 2 * 3
  local period = tonumber(ARGV[j + 2])
  local admitted = KEYS[i] .. ':' .. ARGV[j + 1]
  local f = tonumber(redis.call('HGET', admitted, 'f') or '0')
  if f > 0 then redis.call('HINCRBY', admitted, 'f', -1) end
  local tokens = tonumber(ARGV[j + 3])
  if tokens > 0 then
    local key = KEYS[i] .. ':' .. math.floor(now / period)
    redis.call('HINCRBY', key, 'used', tokens)
    redis.call('HINCRBY', key, 'n', 1)
    redis.call('EXPIRE', key, period * 2 + 60)
    redis.call('SET', KEYS[i + 1], tokens, 'EX', 86400)
  end
end
return #KEYS / 2
""")

# KEYS[1] = lease set; ARGV[1] = ttl; ARGV[2..] = members still held by this worker.
RENEW = Script("""
local t = redis.call('TIME')
local expiry = tonumber(t[1]) + tonumber(t[2]) / 1000000 + tonumber(ARGV[1])
for i = 2, #ARGV do
  redis.call('ZADD', KEYS[1], expiry, ARGV[i])  -- also puts back a lease a Redis restart or failover lost
end
return #ARGV - 1
""")

REDIS_ERRORS: tuple[type[BaseException], ...] = (aioredis.RedisError, RespError, OSError, asyncio.TimeoutError)
try:  # limits wraps storage errors when asked to
    from limits.errors import StorageError

    REDIS_ERRORS = REDIS_ERRORS + (StorageError,)
except ImportError:  # pragma: no cover
    pass

LOCAL_SLOT = LOCAL_LEASE  # a concurrency slot taken under this process's own cap


def revoked_set_key() -> str:
    return f"{PREFIX}:revoked"


def token_keys(bucket: str) -> tuple[str, str]:
    """The token windows' prefix and the last-answer key of a bucket."""
    return f"{PREFIX}:tokens:{bucket}", f"{PREFIX}:tokens:{bucket}:last"


class RedisAdmission:
    def __init__(self, url: str, rate_limit: str, max_concurrent: int, *, fail_open: bool = False) -> None:
        self.url = url
        self.limits = RateLimits(rate_limit)
        self.max_concurrent = max_concurrent
        self.fail_open = fail_open
        self.client = RespClient(url, timeout=REPLY_TIMEOUT_S, connect_timeout=CONNECT_TIMEOUT_S)
        for script in (ADMIT, SETTLE, RENEW):
            self.client.register(script)
        self.client.before_flush.append(self._send_batches)
        # redis-py, for what is off the request's path (usage.py, auth_throttle.py): a pool that
        # waits for a free connection under a burst, and reconnects by itself.
        pool = aioredis.BlockingConnectionPool.from_url(url, max_connections=16, timeout=5.0,
                                                        socket_connect_timeout=1.0, socket_timeout=2.0,
                                                        health_check_interval=10)
        self.redis = aioredis.Redis(connection_pool=pool)
        self._leases_key = f"{PREFIX}:inflight"
        self._held: set[str] = set()
        self._errors_logged: set[str] = set()  # admission errors already logged (_admission_failed)
        self._worker = f"{os.getpid()}-{uuid.uuid4().hex[:8]}:"
        self._seq = itertools.count(1)
        self._fallback = MemoryAdmission(rate_limit, max_concurrent)
        self.tokens = RedisTokens(self)  # TokenGate's limiter: settles into Redis in batches
        self._parts: dict[tuple[Any, ...], tuple[Any, bytes, bytes]] = {}
        self._admits: list[tuple[bytes, bytes, Callable[[Any], None]]] = []  # for this turn's ADMIT
        self._releases: list[str] = []  # answered requests' leases, for the next ADMIT or ZREM
        self._settles: list[tuple[Ticket, int, Callable[[], None]]] = []
        self._batch_timer: asyncio.TimerHandle | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.revoked_hashes: frozenset[str] = frozenset()
        self._redis_ok = True

    async def start(self) -> None:
        try:
            await self.client.call(b"PING")
        except REDIS_ERRORS as e:
            self._note_down(e)
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._renew_loop()), loop.create_task(self._revoked_loop())]

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._disarm()
        if self._held:
            self._releases.extend(self._held)
            self._held.clear()
        if self.client.connected:
            self.client.request_flush()
        await self.client.close()  # waits for the batches in flight
        await self.redis.aclose()

    # ---- state of the connection ---------------------------------------------------------------
    def _note_down(self, e: BaseException) -> None:
        if self._redis_ok:
            # An error reply (WRONGTYPE: another program's key under ours, a read-only replica, OOM...)
            # is not an outage: say what Redis answered, so the operator looks at the right thing.
            what = (f"answered the admission with an error ({e})" if isinstance(e, RespError)
                    else f"unreachable ({e})")
            log.error("Redis at %s %s: %s", _safe_url(self.url), what,
                      "admitting under per-process limits (REDIS_FAIL_OPEN=true)" if self.fail_open
                      else "refusing requests with 503 until it is back")
        self._redis_ok = False

    def _admission_failed(self, error: Any) -> None:
        """One admission that Redis answered with an error: logged (once per distinct error), answered 503;
        Redis is not taken for down, so the other keys go on being admitted."""
        text = error.decode(errors="replace") if isinstance(error, bytes) else str(error)
        if text not in self._errors_logged:
            if len(self._errors_logged) < 100:
                self._errors_logged.add(text)
            log.error("Redis at %s answered the admission with an error (%s): refusing that key's requests "
                      "with 503; the other keys are admitted", _safe_url(self.url), text)

    def _note_up(self) -> None:
        if not self._redis_ok:
            log.warning("Redis at %s reachable again; shared limits restored", _safe_url(self.url))
        self._redis_ok = True

    # ---- Admission protocol --------------------------------------------------------------------
    # While Redis is known to be down no request waits for a timeout: it goes straight to this
    # process's limits (REDIS_FAIL_OPEN=true) or 503, and the revocation poll notices when Redis is back.
    async def admit(self, who: Identity | None, token_limit: TokenLimit | None = None, lease: bool = True, *,
                    rate: bool = True) -> Pass:
        """`who`'s rate limit (unless rate=False or who is None), its token limit (with token_limit), a
        lease (with lease), decided in this turn's ADMIT. 429 for the first gate that refuses; 503 or
        this process's limits while Redis is down."""
        if self._redis_ok:
            item, keys, args = self._admission_parts(who, token_limit, lease, rate)
            member = f"{self._worker}{next(self._seq)}" if lease else ""
            loop = asyncio.get_running_loop()
            fut = loop.create_future()

            def answered(reply: Any) -> None:
                if not fut.done():
                    if isinstance(reply, BaseException):
                        fut.set_exception(reply)
                    else:
                        fut.set_result(reply)
                elif reply.__class__ is list and reply[0] == 0:  # the caller is gone: give back what it took
                    self._give_back(member, who, token_limit, int(reply[2]))

            self._admits.append((keys, args + bulk(member), answered))
            if self.client.connected:
                self.client.request_flush()  # _send_batches puts it in this turn's ADMIT
            else:
                self._send_batches()  # queued now: it waits for the connection, or fails with it
            try:
                code, ms, window = await fut
            except REDIS_ERRORS as e:
                self._note_down(e)
            except asyncio.CancelledError:
                # cancelled in the turn its answer arrived: answered() found the future pending, so give
                # back here what the admission took, or the lease and the token forecast would leak
                if fut.done() and not fut.cancelled() and fut.exception() is None:
                    reply = fut.result()
                    if reply.__class__ is list and reply[0] == 0:
                        self._give_back(member, who, token_limit, int(reply[2]))
                raise
            else:
                if not self._redis_ok:
                    self._note_up()
                if code == 0:
                    ticket = None
                    if token_limit is not None and who is not None:
                        ticket = Ticket(who.bucket or who.name, window, token_limit.period, "redis")
                    if lease:
                        self._held.add(member)
                        return Pass(member, ticket)
                    return Pass(None, ticket)
                if code == 1:
                    raise rate_limited(item, max(1, math.ceil(ms / 1000)))
                if code == 2:
                    assert token_limit is not None
                    raise token_exceeded(token_limit, max(1, math.ceil(ms / 1000)))
                if code == 4:  # Redis refused this admission's commands; the others of its batch stand
                    self._admission_failed(window)
                    raise limits_unavailable()
                raise concurrency_exceeded(self.max_concurrent)
        if not self.fail_open:
            raise limits_unavailable()
        if not rate and who is not None:
            return self._fallback.admit_now(None, None, lease) if token_limit is None else \
                self._fallback_tokens(who, token_limit, lease)
        return self._fallback.admit_now(who, token_limit, lease)

    def _fallback_tokens(self, who: Identity, token_limit: TokenLimit, lease: bool) -> Pass:
        ticket, retry, window = self._fallback.tokens.decide(who.bucket or who.name, token_limit)
        if ticket is None or window is None:
            raise token_exceeded(token_limit, max(1, math.ceil(retry)))
        admitted = self._fallback.admit_now(None, None, lease)
        window[2] += 1
        admitted.ticket = ticket
        return admitted

    def _admission_parts(self, who: Identity | None, token_limit: TokenLimit | None, lease: bool,
                         rate: bool = True) -> tuple[Any, bytes, bytes]:
        """(the rate limit item, its three ADMIT keys, its ADMIT arguments but the member), encoded once
        per key and limits."""
        k = (who.bucket or who.name, who.rate_limit) if who is not None else None
        cache_key = (k, token_limit, lease, rate)
        found = self._parts.get(cache_key)
        if found is None:
            if len(self._parts) > 65536:
                self._parts.clear()
            item, rate_key, amount, expiry = None, "", -1, 0
            if who is not None and rate:
                item, key = self.limits.key_for(who)
                rate_key, amount, expiry = f"{LIMITS_PREFIX}:{key}", item.amount, item.get_expiry()
            prefix, last = token_keys(who.bucket or who.name) if who is not None else ("", "")
            tlimit, period = (token_limit.amount, token_limit.period) if token_limit is not None else (0, 0)
            keys = b"".join(map(bulk, (rate_key, prefix, last)))
            args = b"".join(map(bulk, (amount, expiry, self.max_concurrent if lease else 0, tlimit, period)))
            found = self._parts[cache_key] = (item, keys, args)
        return found

    def _give_back(self, member: str, who: Identity | None, token_limit: TokenLimit | None, window: int) -> None:
        if member:
            self._releases.append(member)
        if token_limit is not None and who is not None:
            self._settles.append((Ticket(who.bucket or who.name, window, token_limit.period, "redis"), 0,
                                  lambda: None))
        self._arm()

    def finish(self, admitted: Pass) -> None:
        """Give the slot back: queued, sent with the next write (the lease expires by itself if that fails)."""
        lease = admitted.lease
        if lease is None:
            return
        admitted.lease = None
        if lease is LOCAL_LEASE:
            self._fallback.finish(Pass(lease, None))
            return
        self._held.discard(lease)
        self._releases.append(lease)
        self._arm()

    def settle_later(self, ticket: Ticket, tokens: int, on_failure: Callable[[], None]) -> None:
        """Charge an answered request's tokens with the next write (TokenGate.settle)."""
        self._settles.append((ticket, tokens, on_failure))
        self._arm()

    def _arm(self) -> None:
        """Make sure what waits for a write goes out within BATCH_WAIT_S even if no request comes."""
        if self._batch_timer is None:
            self._batch_timer = asyncio.get_running_loop().call_later(BATCH_WAIT_S, self._batch_due)

    def _disarm(self) -> None:
        if self._batch_timer is not None:
            self._batch_timer.cancel()
            self._batch_timer = None

    def _batch_due(self) -> None:
        self._batch_timer = None
        if self._releases or self._settles:
            self.client.request_flush()  # runs _send_batches before it writes (not connected: at the reconnect)

    def _send_batches(self) -> None:
        """Just before the client writes: this turn's admissions as one ADMIT (the answered requests'
        leases riding on it), and the releases and charges queued since the last write."""
        while self._admits:
            batch, self._admits = self._admits[:MAX_BATCH], self._admits[MAX_BATCH:]
            riders, self._releases = self._releases[:MAX_RIDERS], self._releases[MAX_RIDERS:]
            self._send_admit(batch, riders)
        if self._releases and self._batch_timer is None:
            members, self._releases = self._releases, []  # no ADMIT to ride on came in time
            self.client.send(b"ZREM", self._leases_key, *members)
        if self._settles:
            batch, self._settles = self._settles, []
            keys: list[str] = []
            args: list[Any] = []
            for ticket, tokens, _ in batch:
                keys.extend(token_keys(ticket.bucket))
                args += [ticket.window, ticket.period, tokens]

            def charged(reply: Any) -> None:
                if isinstance(reply, BaseException):
                    log.error("tokens of %d answered requests could not be charged (%s: %s)", len(batch),
                              type(reply).__name__, reply)
                    for _, _, on_failure in batch:
                        on_failure()

            self.client.script(SETTLE, keys, args, charged)
        if not self._releases:
            self._disarm()  # all went out with this write: no wake-up of their own

    def _send_admit(self, batch: list[tuple[bytes, bytes, Callable[[Any], None]]], riders: list[str]) -> None:
        n = len(batch)
        numkeys = 1 + 3 * n
        tail = b"".join([bulk(numkeys), bulk(self._leases_key), *[keys for keys, _, _ in batch],
                         bulk(LEASE_TTL_S), bulk(len(riders)), *map(bulk, riders), *[args for _, args, _ in batch]])

        def answered(reply: Any) -> None:
            if reply.__class__ is list and len(reply) == n:
                for (_, _, one), r in zip(batch, reply):
                    one(r)
                return
            if not isinstance(reply, BaseException):
                reply = RespError(f"ADMIT answered {reply!r:.200} for {n} admissions")
            for _, _, one in batch:
                one(reply)

        self.client.script_raw(ADMIT, 1 + numkeys + 2 + len(riders) + 6 * n, tail, answered)

    async def enforce_rate_limit(self, who: Identity) -> None:
        await self.admit(who, None, lease=False)

    async def acquire(self) -> object:
        return await self.admit(None, None, lease=True)

    async def release(self, slot: object) -> None:
        if isinstance(slot, Pass):
            self.finish(slot)

    def in_flight(self) -> int:
        return len(self._held) + self._fallback.in_flight()

    # ---- background ------------------------------------------------------------------------------
    async def _renew_loop(self) -> None:
        while True:
            await asyncio.sleep(RENEW_EVERY_S)
            if not self._held:
                continue
            try:
                await self.client.call_script(RENEW, [self._leases_key], [LEASE_TTL_S, *self._held])
            except REDIS_ERRORS as e:
                self._note_down(e)

    async def _revoked_loop(self) -> None:
        while True:
            try:
                members = await self.client.call(b"SMEMBERS", revoked_set_key())
                self.revoked_hashes = frozenset(m.decode() if isinstance(m, bytes) else m for m in members)
                self._note_up()
            except REDIS_ERRORS as e:
                self._note_down(e)
            await asyncio.sleep(REVOKED_POLL_S)


class RedisTokens:
    """TokenGate's limiter with Redis: the check is part of RedisAdmission.admit; charges are batched."""

    def __init__(self, admission: RedisAdmission) -> None:
        self.admission = admission

    async def admit(self, bucket: str, limit: TokenLimit) -> tuple[Ticket | None, float]:
        who = Identity(bucket, "", bucket=bucket)
        try:
            admitted = await self.admission.admit(who, limit, lease=False, rate=False)
        except Exception as e:  # noqa: BLE001 - the 429's Retry-After, or Redis down (raised on)
            if getattr(e, "code", None) == "token_limit_exceeded":
                return None, float(dict(e.headers).get(b"retry-after", b"1"))  # type: ignore[attr-defined]
            raise
        return admitted.ticket, 0.0

    def settle_later(self, ticket: Ticket, tokens: int, on_failure: Callable[[], None]) -> None:
        self.admission.settle_later(ticket, tokens, on_failure)

    async def settle(self, ticket: Ticket, tokens: int) -> None:
        self.admission.settle_later(ticket, tokens, lambda: None)

    async def close(self) -> None:
        return None


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

