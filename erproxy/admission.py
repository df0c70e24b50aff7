"""Admission: may this caller be served now?

Three gates, checked in this order after authentication (and after the body is read), in one call,
`admit(who, token_limit, lease)`:
- a per-key rate limit (moving window, `limits`' semantics), 429 `rate_limit_exceeded` + Retry-After;
- a per-key token limit (POST requests of keys with one; token_limits.py), 429 `token_limit_exceeded`;
- a global concurrency cap, 429 `concurrency_limit_exceeded`.
It returns a `Pass`: the lease of a concurrency slot and the request's token ticket. `finish(pass)` gives
the slot back without waiting for anything. A refused request takes nothing but its rate-limit hit
(as when the gates were separate calls: the hit counts even when the token limit or the cap refuses).
State lives in this process (`MemoryAdmission`, on `LocalWindowStorage`, no I/O) or in Redis when
several workers or gateway instances must share exact limits (see `redis_admission.py`: one Lua
script, one round trip). Time comes from an injected clock (`time.time` unless a test passes its own).
"""

from __future__ import annotations

import math
import time
from collections import deque
from typing import Any, Callable, Protocol

from limits import RateLimitItem, parse as parse_rate
from limits.aio.storage import MovingWindowSupport, Storage

from .errors import concurrency_exceeded, rate_limited
from .keys import Identity
from .token_limits import MemoryTokenLimiter, Ticket, TokenLimit, token_exceeded

Clock = Callable[[], float]

LOCAL_LEASE = "local"  # a concurrency slot taken under this process's own cap


class Pass:
    """An admitted request: its concurrency lease (None: it took none) and its token ticket (None: no limit)."""

    __slots__ = ("lease", "ticket")

    def __init__(self, lease: Any, ticket: Ticket | None) -> None:
        self.lease = lease
        self.ticket = ticket


class Admission(Protocol):
    async def start(self) -> None: ...
    async def close(self) -> None: ...
    async def admit(self, who: Identity, token_limit: TokenLimit | None = None, lease: bool = True) -> Pass: ...
    def finish(self, admitted: Pass) -> None: ...
    async def enforce_rate_limit(self, who: Identity) -> None: ...
    async def acquire(self) -> object: ...
    async def release(self, slot: object) -> None: ...
    def in_flight(self) -> int: ...


class RateLimits:
    """Parses and caches the RateLimitItem of each key (its own limit or the default)."""

    def __init__(self, default: str) -> None:
        self.default = parse_rate(default)
        self._cache: dict[str, RateLimitItem] = {}
        self._keys: dict[tuple[str, str | None], tuple[RateLimitItem, str]] = {}

    def key_for(self, who: Identity) -> tuple[RateLimitItem, str]:
        """The key's RateLimitItem and its window's name, LIMITER/bucket. The name is the key's alone, not
        its limit's (as `limits` would name it, LIMITER/bucket/amount/multiples/unit): a key whose limit
        the operator lowers keeps the hits it already made, rather than getting a whole new allowance;
        a window holds hit times, and each check counts those inside the limit of the moment."""
        k = (who.bucket or who.name, who.rate_limit)
        found = self._keys.get(k)
        if found is None:
            if len(self._keys) > 65536:
                self._keys.clear()
            found = self._keys[k] = (self.item_for(who), f"LIMITER/{k[0]}")
        return found

    def item_for(self, who: Identity) -> RateLimitItem:
        if not who.rate_limit:
            return self.default
        item = self._cache.get(who.rate_limit)
        if item is None:
            try:
                item = parse_rate(who.rate_limit)
            except ValueError:
                item = self.default
            self._cache[who.rate_limit] = item
        return item


def retry_after_s(reset_time: float, now: float) -> int:
    """Whole seconds until the window frees a hit, at least 1 (the Retry-After header)."""
    return max(1, math.ceil(reset_time - now))


class LocalWindowStorage(Storage, MovingWindowSupport):
    """In-process storage for `limits`' async limiters: moving windows, plus fixed-window counters.

    limits' own MemoryStorage inserts each hit at the front of a list (O(window) per hit) and
    prunes it in a task that hops to a thread while holding the key's lock, so every request of
    a busy key queued behind a thread round trip: throughput plateaued near 1,000 req/s with the
    CPU half idle (bench/results). Here each key is a deque of hit times, oldest first: a hit
    drops expired entries from the left and appends on the right, amortised O(1), with no await
    and therefore no lock. Idle keys are swept every SWEEP_EVERY_S. Every method of limits'
    storage interface works on this state; the tests run the same calls against MemoryStorage.
    """

    STORAGE_SCHEME = None  # not registered under a URI scheme: built directly
    SWEEP_EVERY_S = 30.0

    def __init__(self, uri: str | None = None, wrap_exceptions: bool = False, *, clock: Clock = time.time,
                 **options: float | str | bool) -> None:
        super().__init__(uri, wrap_exceptions=wrap_exceptions, **options)
        self.clock = clock
        self.windows: dict[str, tuple[deque[float], int]] = {}  # key -> (hit times, oldest first; expiry)
        self.counters: dict[str, tuple[int, float]] = {}  # key -> (count, expires at)
        self._next_sweep = clock() + self.SWEEP_EVERY_S

    @property
    def base_exceptions(self) -> type[Exception] | tuple[type[Exception], ...]:
        return ValueError

    # ---- moving window ---------------------------------------------------------------------------
    def _live(self, key: str, expiry: int, now: float) -> deque[float] | None:
        entry = self.windows.get(key)
        if entry is None:
            return None
        q = entry[0]
        cutoff = now - expiry
        while q and q[0] < cutoff:
            q.popleft()
        return q

    async def acquire_entry(self, key: str, limit: int, expiry: int, amount: int = 1) -> bool:
        return self.hit(key, limit, expiry, amount)

    def hit(self, key: str, limit: int, expiry: int, amount: int = 1) -> bool:
        """acquire_entry without the coroutine: for MemoryAdmission, which never waits."""
        now = self.clock()
        if now >= self._next_sweep:
            self._sweep(now)
        if amount > limit:
            return False
        entry = self.windows.get(key)
        if entry is None:
            q = self._new_window(key, expiry)
        else:
            q = entry[0]
            if entry[1] != expiry:  # the key's limit changed: its hits stay, swept by the new expiry
                self.windows[key] = (q, expiry)
            cutoff = now - expiry
            while q and q[0] < cutoff:
                q.popleft()
        if len(q) + amount > limit:
            return False
        if amount == 1:
            q.append(now)
        else:
            q.extend([now] * amount)
        return True

    def _new_window(self, key: str, expiry: int) -> deque[float]:
        q: deque[float] = deque()
        self.windows[key] = (q, expiry)
        return q

    async def get_moving_window(self, key: str, limit: int, expiry: int) -> tuple[float, int]:
        return self.window(key, expiry)

    def window(self, key: str, expiry: int) -> tuple[float, int]:
        now = self.clock()
        q = self._live(key, expiry, now)
        return (q[0], len(q)) if q else (now, 0)

    def frees_at(self, key: str, limit: int, expiry: int) -> float:
        """When a refused key may hit again: once the hit that puts it at its limit has expired (the oldest,
        unless the limit was lowered under the hits the window already holds)."""
        now = self.clock()
        q = self._live(key, expiry, now)
        return q[len(q) - limit] + expiry if q and len(q) >= limit > 0 else now + expiry

    async def get_num_acquired(self, key: str, expiry: int) -> int:
        """Hits still inside the window (the name limits < 5 gave this query)."""
        q = self._live(key, expiry, self.clock())
        return len(q) if q else 0

    # ---- fixed-window counters -------------------------------------------------------------------
    def _counter(self, key: str, now: float) -> tuple[int, float]:
        entry = self.counters.get(key)
        if entry is not None and entry[1] <= now:
            del self.counters[key]
            return (0, now)
        return entry or (0, now)

    async def incr(self, key: str, expiry: int, amount: int = 1) -> int:
        now = self.clock()
        count, expires = self._counter(key, now)
        self.counters[key] = (count + amount, expires if count else now + expiry)
        return count + amount

    async def get(self, key: str) -> int:
        return self._counter(key, self.clock())[0]

    async def get_expiry(self, key: str) -> float:
        entry = self.counters.get(key)
        return entry[1] if entry is not None else self.clock()

    # ---- the whole store -------------------------------------------------------------------------
    async def check(self) -> bool:
        return True

    async def clear(self, key: str) -> None:
        self.windows.pop(key, None)
        self.counters.pop(key, None)

    async def reset(self) -> int | None:
        removed = max(len(self.windows), len(self.counters))
        self.windows.clear()
        self.counters.clear()
        return removed

    def _sweep(self, now: float) -> None:
        for key, (q, expiry) in list(self.windows.items()):
            if not q or q[-1] < now - expiry:
                del self.windows[key]
        for key, (_, expires) in list(self.counters.items()):
            if expires <= now:
                del self.counters[key]
        self._next_sweep = now + self.SWEEP_EVERY_S


class MemoryAdmission:
    """Exact limits for one process (WORKERS=1 without Redis); also RedisAdmission's fallback."""

    def __init__(self, rate_limit: str, max_concurrent: int, *, clock: Clock = time.time) -> None:
        self.limits = RateLimits(rate_limit)
        self.max_concurrent = max_concurrent
        self.clock = clock
        self._storage = LocalWindowStorage(clock=clock)
        self.tokens = MemoryTokenLimiter(clock)  # the token windows (TokenGate settles into them)
        self._in_flight = 0

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def admit(self, who: Identity, token_limit: TokenLimit | None = None, lease: bool = True) -> Pass:
        return self.admit_now(who, token_limit, lease)

    def admit_now(self, who: Identity | None, token_limit: TokenLimit | None = None, lease: bool = True) -> Pass:
        """Rate limit, token limit, concurrency slot: in that order, all in this process, no waiting."""
        if who is not None:
            item, key = self.limits.key_for(who)
            expiry = item.get_expiry()
            if not self._storage.hit(key, item.amount, expiry):
                raise rate_limited(item, retry_after_s(self._storage.frees_at(key, item.amount, expiry), self.clock()))
        ticket = window = None
        if token_limit is not None and who is not None:
            ticket, retry, window = self.tokens.decide(who.bucket or who.name, token_limit)
            if ticket is None:
                raise token_exceeded(token_limit, max(1, math.ceil(retry)))
        if lease:
            if self._in_flight >= self.max_concurrent:
                raise concurrency_exceeded(self.max_concurrent)
            self._in_flight += 1
        if window is not None:
            window[2] += 1  # in flight in its token window until settled
        return Pass(LOCAL_LEASE if lease else None, ticket)

    def finish(self, admitted: Pass) -> None:
        if admitted.lease is not None:
            admitted.lease = None
            self._in_flight -= 1

    async def enforce_rate_limit(self, who: Identity) -> None:
        self.admit_now(who, None, lease=False)

    async def acquire(self) -> object:
        return self.admit_now(None, None, lease=True)

    async def release(self, slot: object) -> None:
        if isinstance(slot, Pass):
            self.finish(slot)
        else:
            self._in_flight -= 1

    def in_flight(self) -> int:
        return self._in_flight
