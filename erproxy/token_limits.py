"""Limits by tokens: a key's prompt tokens per window (`--token-limit 100000/minute`, default TOKEN_LIMIT).

Tokens are charged when the answer arrives (vLLM's `usage.prompt_tokens`); a request is admitted
while its window has budget left. Windows are fixed (aligned to the clock: a minute limit resets
at each whole minute). So that a burst of concurrent requests cannot all slip in before any of
them is charged, admission also counts the key's requests in flight at the window's average size:
a request is admitted while

    used + in_flight x average < limit      (average: tokens per answered request of the window,
                                             else of the key's last answer; none yet: 0)

so the tokens admitted in a window exceed the limit by about one request's own tokens (by more
only when requests in flight are much larger than the average). A key refused with budget left
only because of requests in flight gets Retry-After: 1.

`MemoryTokenLimiter` holds the windows in this process (WORKERS=1); `RedisTokenLimiter` in Redis,
one Lua script per admission and one per answer, each atomic, with Redis's clock, so every
worker and instance shares the same window exactly.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from limits import parse as parse_rate

from .errors import limits_unavailable, too_many
from .keys import Identity, KeyRecord, _find, locked, read_records, write_key_file

log = logging.getLogger("erproxy.tokens")

Clock = Callable[[], float]


@dataclass(frozen=True)
class TokenLimit:
    amount: int
    period: int  # seconds
    text: str


def parse_token_limit(text: str) -> TokenLimit:
    """'100000/minute' -> TokenLimit; ValueError otherwise (also used by `keys create --token-limit`)."""
    t = text.strip()
    if any(sep in t for sep in ";,|"):
        raise ValueError(f"give one token limit such as 100000/minute, got {text!r}")
    try:
        item = parse_rate(t)
    except Exception:
        raise ValueError(f"a token limit looks like 100000/minute or 5000000/day, got {text!r}") from None
    if item.amount < 1:
        raise ValueError(f"a token limit must allow at least one token, got {text!r}")
    return TokenLimit(item.amount, int(item.get_expiry()), t)


def token_exceeded(limit: TokenLimit, retry_after: int) -> Any:
    return too_many(f"Token limit of {limit.text} exceeded for this API key; retry after {retry_after} s "
                    "or ask the operator for a higher limit.", code="token_limit_exceeded", retry_after=retry_after)


@dataclass(frozen=True)
class Ticket:
    """An admitted request: where its in-flight mark is, to take it back when it is answered."""

    bucket: str
    window: int
    period: int
    where: str  # "redis" or "local"


class TokenLimits:
    """Each key's TokenLimit (its own `token_limit`, else TOKEN_LIMIT, else none)."""

    def __init__(self, default: str | None) -> None:
        self.default = parse_token_limit(default) if default else None
        self._cache: dict[str, TokenLimit | None] = {}

    def for_key(self, who: Identity) -> TokenLimit | None:
        own = getattr(who, "token_limit", None)
        if not own:
            return self.default
        if own not in self._cache:
            try:
                self._cache[own] = parse_token_limit(own)
            except ValueError:
                self._cache[own] = self.default
        return self._cache[own]


def _bucket(who: Identity) -> str:
    return who.bucket or who.name


class MemoryTokenLimiter:
    """Token windows of this process: exact for one worker."""

    def __init__(self, clock: Clock = time.time) -> None:
        self.clock = clock
        self.windows: dict[tuple[str, int], list[int]] = {}  # (bucket, window) -> [used, answered, in flight]
        self.last: dict[str, int] = {}  # bucket -> tokens of its last answer

    def _w(self, bucket: str, window: int) -> list[int]:
        w = self.windows.get((bucket, window))
        if w is None:
            w = self.windows[(bucket, window)] = [0, 0, 0]
            if len(self.windows) > 4096:
                self._sweep(window)
        return w

    def _sweep(self, window: int) -> None:
        for k in [k for k in self.windows if k[1] < window - 1]:
            del self.windows[k]

    async def admit(self, bucket: str, limit: TokenLimit) -> tuple[Ticket | None, float]:
        now = self.clock()
        window = int(now // limit.period)
        w = self._w(bucket, window)
        used, answered, in_flight = w
        average = used / answered if answered else self.last.get(bucket, 0)
        if used >= limit.amount:
            return None, (window + 1) * limit.period - now
        if used + in_flight * average >= limit.amount:
            return None, 1.0
        w[2] += 1
        return Ticket(bucket, window, limit.period, "local"), 0.0

    async def settle(self, ticket: Ticket, tokens: int) -> None:
        self.settle_now(ticket, tokens)

    def settle_now(self, ticket: Ticket, tokens: int) -> None:
        w = self.windows.get((ticket.bucket, ticket.window))
        if w is not None and w[2] > 0:
            w[2] -= 1
        if tokens > 0:
            now = self.clock()
            cur = self._w(ticket.bucket, int(now // ticket.period))
            cur[0] += tokens
            cur[1] += 1
            self.last[ticket.bucket] = tokens

    async def close(self) -> None:
        return None


# KEYS[1] = the window's hash, KEYS[2] = the key's last answer; ARGV = limit, period.
# Returns {1, 0, window} when admitted, else {0, retry_after_ms, window}.
ADMIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local period = tonumber(ARGV[2])
local window = math.floor(now / period)
local key = KEYS[1] .. ':' .. window
local v = redis.call('HMGET', key, 'used', 'n', 'f')
local used, n, f = tonumber(v[1]) or 0, tonumber(v[2]) or 0, tonumber(v[3]) or 0
local limit = tonumber(ARGV[1])
if used >= limit then
  return {0, math.floor(((window + 1) * period - now) * 1000), window}
end
local avg = 0
if n > 0 then avg = used / n else avg = tonumber(redis.call('GET', KEYS[2]) or '0') end
if used + f * avg >= limit then
  return {0, 1000, window}
end
redis.call('HINCRBY', key, 'f', 1)
redis.call('EXPIRE', key, period * 2 + 60)
return {1, 0, window}
"""
# KEYS[1] = the window hash prefix, KEYS[2] = last answer; ARGV = admitted window, period, tokens.
SETTLE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local period = tonumber(ARGV[2])
local admitted = KEYS[1] .. ':' .. ARGV[1]
local f = tonumber(redis.call('HGET', admitted, 'f') or '0')
if f > 0 then redis.call('HINCRBY', admitted, 'f', -1) end
local tokens = tonumber(ARGV[3])
if tokens > 0 then
  local key = KEYS[1] .. ':' .. math.floor(now / period)
  redis.call('HINCRBY', key, 'used', tokens)
  redis.call('HINCRBY', key, 'n', 1)
  redis.call('EXPIRE', key, period * 2 + 60)
  redis.call('SET', KEYS[2], tokens, 'EX', 86400)
end
return 1
"""


class RedisTokenLimiter:
    """Token windows in Redis: one window per key shared by every worker and instance."""

    def __init__(self, redis: Any, prefix: str = "erproxy:tokens") -> None:
        self.redis = redis
        self.prefix = prefix
        self._admit = redis.register_script(ADMIT)
        self._settle = redis.register_script(SETTLE)

    def _keys(self, bucket: str) -> list[str]:
        return [f"{self.prefix}:{bucket}", f"{self.prefix}:{bucket}:last"]

    async def admit(self, bucket: str, limit: TokenLimit) -> tuple[Ticket | None, float]:
        ok, retry_ms, window = await self._admit(keys=self._keys(bucket), args=[limit.amount, limit.period])
        if not ok:
            return None, int(retry_ms) / 1000
        return Ticket(bucket, int(window), limit.period, "redis"), 0.0

    async def settle(self, ticket: Ticket, tokens: int) -> None:
        await self._settle(keys=self._keys(ticket.bucket), args=[ticket.window, ticket.period, tokens])

    async def close(self) -> None:
        return None


class TokenGate:
    """What the gateway calls: `admit` before the body is read, `settle` in the record step."""

    def __init__(self, limits: TokenLimits, limiter: Any, *, fallback: MemoryTokenLimiter | None = None,
                 fail_open: bool = False, on_failure: Callable[[], None] | None = None,
                 is_up: Callable[[], bool] | None = None) -> None:
        self.limits = limits
        self.is_up = is_up or (lambda: True)  # False while the admission knows Redis is down: no waiting on it
        self.limiter = limiter
        self.fallback = fallback
        self.fail_open = fail_open
        self.on_failure = on_failure or (lambda: None)
        self._tasks: set[asyncio.Task[None]] = set()

    async def admit(self, who: Identity) -> Ticket | None:
        """None for a key without a token limit; raises 429 token_limit_exceeded (or 503) otherwise."""
        limit = self.limits.for_key(who)
        if limit is None:
            return None
        bucket = _bucket(who)
        try:
            if self.fallback is not None and not self.is_up():
                raise ConnectionError("Redis is down")
            ticket, retry = await self.limiter.admit(bucket, limit)
        except Exception as e:  # noqa: BLE001 - Redis down
            if self.fallback is None:
                raise
            if not self.fail_open:
                log.warning("token limit check failed (%s); answering 503", e)
                raise limits_unavailable() from None
            ticket, retry = await self.fallback.admit(bucket, limit)
        if ticket is None:
            raise token_exceeded(limit, max(1, math.ceil(retry)))
        return ticket

    def settle(self, ticket: Ticket, tokens: int) -> None:
        """Charge an answered request's tokens (in the background: the answer is already sent)."""
        limiter = self.fallback if ticket.where == "local" and self.fallback is not None else self.limiter
        if isinstance(limiter, MemoryTokenLimiter):  # no I/O: at once, so the next admission sees it
            limiter.settle_now(ticket, tokens)
            return
        task = asyncio.get_running_loop().create_task(self._settle(limiter, ticket, tokens))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _settle(self, limiter: Any, ticket: Ticket, tokens: int) -> None:
        try:
            await limiter.settle(ticket, tokens)
        except Exception as e:  # noqa: BLE001
            self.on_failure()
            log.error("tokens of an answered request could not be charged (%s: %s)", type(e).__name__, e)

    async def close(self) -> None:
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)


# ---- key management: `keys update` --------------------------------------------------------------
def update_key(path: Path, ref: str, *, rate_limit: str | None = None, token_limit: str | None = None,
               models: list[str] | None = None) -> KeyRecord:
    """Change a key's limits or models under the file lock ("" clears a limit; None leaves it)."""
    with locked(path):
        records = read_records(path)
        record = _find(records, ref)
        if rate_limit is not None:
            record.rate_limit = rate_limit or None
        if token_limit is not None:
            if token_limit:
                record.extra["token_limit"] = token_limit
            else:
                record.extra.pop("token_limit", None)
        if models is not None:
            record.models = models or None
        write_key_file(path, records)
        return record
