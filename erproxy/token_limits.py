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

`MemoryTokenLimiter` holds the windows in this process (WORKERS=1, and Redis's fail-open fallback);
with Redis (redis_admission.py) the check and the in-flight mark are part of the admission's one Lua
script, and the charges of answered requests go out in batches (one script call per turn of the
event loop), each atomic, with Redis's clock, so every worker and instance shares the same window
exactly. The layout in Redis: a hash `erproxy:tokens:BUCKET:WINDOW` (fields used, n, f) and
`erproxy:tokens:BUCKET:last`.
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

    SWEEP_AT = 4096  # windows kept before ended ones are swept; then twice what is left, so sweeps stay rare

    def __init__(self, clock: Clock = time.time) -> None:
        self.clock = clock
        # (bucket, period, window) -> [used, answered, in flight]. The period is part of the key: window
        # numbers of a day and of a minute are on different scales, and only time says which have ended.
        self.windows: dict[tuple[str, int, int], list[int]] = {}
        self.last: dict[str, int] = {}  # bucket -> tokens of its last answer
        self._sweep_at = self.SWEEP_AT

    def _w(self, bucket: str, period: int, window: int) -> list[int]:
        w = self.windows.get((bucket, period, window))
        if w is None:
            w = self.windows[(bucket, period, window)] = [0, 0, 0]
            if len(self.windows) > self._sweep_at:
                self._sweep()
        return w

    def _sweep(self) -> None:
        """Forget windows that ended more than one of their periods ago (the one before the current is
        kept: its requests still in flight settle there)."""
        now = self.clock()
        for k in [k for k in self.windows if (k[2] + 2) * k[1] <= now]:
            del self.windows[k]
        self._sweep_at = max(self.SWEEP_AT, 2 * len(self.windows))

    def decide(self, bucket: str, limit: TokenLimit) -> tuple[Ticket | None, float, list[int] | None]:
        """(ticket, 0, its window) when admitted, else (None, seconds to wait, None); marks nothing in
        flight: the caller adds 1 to the window's third field once the request is admitted."""
        now = self.clock()
        window = int(now // limit.period)
        w = self._w(bucket, limit.period, window)
        used, answered, in_flight = w
        average = used / answered if answered else self.last.get(bucket, 0)
        if used >= limit.amount:
            return None, (window + 1) * limit.period - now, None
        if used + in_flight * average >= limit.amount:
            return None, 1.0, None
        return Ticket(bucket, window, limit.period, "local"), 0.0, w

    async def admit(self, bucket: str, limit: TokenLimit) -> tuple[Ticket | None, float]:
        ticket, retry, w = self.decide(bucket, limit)
        if w is not None:
            w[2] += 1
        return ticket, retry

    async def settle(self, ticket: Ticket, tokens: int) -> None:
        self.settle_now(ticket, tokens)

    def settle_now(self, ticket: Ticket, tokens: int) -> None:
        w = self.windows.get((ticket.bucket, ticket.period, ticket.window))
        if w is not None and w[2] > 0:
            w[2] -= 1
        if tokens > 0:
            now = self.clock()
            cur = self._w(ticket.bucket, ticket.period, int(now // ticket.period))
            cur[0] += tokens
            cur[1] += 1
            self.last[ticket.bucket] = tokens

    async def close(self) -> None:
        return None


class TokenGate:
    """Each key's limit (`limits`), and `settle` in the record step. The gateway admits through its
    Admission (one call for every gate); `admit` here checks the token limit alone."""

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
        later = getattr(limiter, "settle_later", None)
        if later is not None:  # Redis: queued, sent with the next batch; failures counted by on_failure
            later(ticket, tokens, self.on_failure)
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
