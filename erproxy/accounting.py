"""What the gateway calls for usage and token limits: one object, three calls.

- `token_limit(who)`: the key's TokenLimit, which the gateway hands to its Admission: one call checks
  the rate limit, the token limit (429 `token_limit_exceeded`, token_limits.py) and the concurrency
  cap, and returns the request's ticket with its slot. (`admit(who)` checks the token limit alone.)
- `record(req, model, status)` in the record step, after the answer was sent: the request's usage
  (usage.py, batched in this process) and, for a token-limited key, the charge of its tokens.
- `start()` / `close()` with the services: the background flush, the last flush at shutdown.
"""

from __future__ import annotations

import logging
from typing import Any

from .asgi import Request
from .keys import Identity
from .metrics import Metrics
from .settings import Settings
from .token_limits import MemoryTokenLimiter, Ticket, TokenGate, TokenLimit, TokenLimits
from .usage import Usage, make_store

log = logging.getLogger("erproxy.usage")


class Accounting:
    def __init__(self, usage: Usage, gate: TokenGate) -> None:
        self.usage = usage
        self.gate = gate

    async def start(self) -> None:
        await self.usage.start()

    async def close(self) -> None:
        await self.gate.close()
        await self.usage.close()

    def token_limit(self, who: Identity) -> TokenLimit | None:
        return self.gate.limits.for_key(who)

    async def admit(self, who: Identity) -> Ticket | None:
        return await self.gate.admit(who)

    def record(self, req: Request, model: str, status: int) -> None:
        """Never raises: recording must not touch the client's answer (already sent)."""
        try:
            if req.who is None:
                return
            self.usage.record_request(req, model, status)
            ticket = req.token_ticket
            if ticket is not None:
                req.token_ticket = None
                self.gate.settle(ticket, req.tokens or 0)
        except Exception:  # noqa: BLE001
            self.usage.failures.inc()
            log.exception("usage of a request could not be recorded")


def make_accounting(settings: Settings, admission: Any, metrics: Metrics) -> Accounting:
    """SQLite beside the key file, or Redis (the admission's client) when REDIS_URL is set. The token
    windows are the admission's (`admission.tokens`), so what the record step settles is what it admits."""
    redis = getattr(admission, "redis", None) if settings.redis_url else None
    usage = Usage(make_store(settings, redis), registry=metrics.registry)
    limits = TokenLimits(settings.token_limit)
    tokens = getattr(admission, "tokens", None) or MemoryTokenLimiter()
    fallback = getattr(getattr(admission, "_fallback", None), "tokens", None)
    if fallback is not None:  # Redis: while it is down, REDIS_FAIL_OPEN admits into this process's windows
        gate = TokenGate(limits, tokens, fallback=fallback, fail_open=settings.redis_fail_open,
                         on_failure=usage.failures.inc, is_up=lambda: getattr(admission, "_redis_ok", True))
    else:
        gate = TokenGate(limits, tokens, on_failure=usage.failures.inc)
    return Accounting(usage, gate)
