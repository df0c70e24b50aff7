"""Admission: may this caller be served now?

Two gates, checked in this order after authentication:
- a per-key rate limit (moving window, `limits` async API), 429 `rate_limit_exceeded` + Retry-After;
- a global concurrency cap, 429 `concurrency_limit_exceeded`.
State lives in this process (`MemoryAdmission`, on `LocalWindowStorage`) or in Redis when several
workers or gateway instances must share exact limits (see `redis_admission.py`). Time comes
from an injected clock (`time.time` unless a test passes its own).
"""

from __future__ import annotations

import math
import time
from collections import deque
from typing import Callable, Protocol

from limits import RateLimitItem, parse as parse_rate
from limits.aio.storage import MovingWindowSupport, Storage
from limits.aio.strategies import MovingWindowRateLimiter

from .errors import concurrency_exceeded, rate_limited
from .keys import Identity

Clock = Callable[[], float]


class Admission(Protocol):
    async def start(self) -> None: ...
    async def close(self) -> None: ...
    async def enforce_rate_limit(self, who: Identity) -> None: ...
    async def acquire(self) -> object: ...
    async def release(self, slot: object) -> None: ...
    def in_flight(self) -> int: ...


class RateLimits:
    """Parses and caches the RateLimitItem of each key (its own limit or the default)."""

    def __init__(self, default: str) -> None:
        self.default = parse_rate(default)
        self._cache: dict[str, RateLimitItem] = {}

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
        now = self.clock()
        if now >= self._next_sweep:
            self._sweep(now)
        if amount > limit:
            return False
        q = self._live(key, expiry, now)
        if q is None:
            q = self._new_window(key, expiry)
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
        now = self.clock()
        q = self._live(key, expiry, now)
        return (q[0], len(q)) if q else (now, 0)

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
    """Exact limits for one process (WORKERS=1 without Redis)."""

    def __init__(self, rate_limit: str, max_concurrent: int, *, clock: Clock = time.time) -> None:
        self.limits = RateLimits(rate_limit)
        self.max_concurrent = max_concurrent
        self.clock = clock
        self._limiter = MovingWindowRateLimiter(LocalWindowStorage(clock=clock))
        self._in_flight = 0

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def enforce_rate_limit(self, who: Identity) -> None:
        item = self.limits.item_for(who)
        if not await self._limiter.hit(item, who.bucket or who.name):
            stats = await self._limiter.get_window_stats(item, who.bucket or who.name)
            raise rate_limited(item, retry_after_s(stats.reset_time, self.clock()))

    async def acquire(self) -> object:
        if self._in_flight >= self.max_concurrent:
            raise concurrency_exceeded(self.max_concurrent)
        self._in_flight += 1
        return None

    async def release(self, slot: object) -> None:
        self._in_flight -= 1

    def in_flight(self) -> int:
        return self._in_flight

