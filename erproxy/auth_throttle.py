"""Failed authentication, throttled per client address: no free guessing of keys.

After AUTH_FAILURE_LIMIT failures (an unknown key or a wrong METRICS_TOKEN) within
AUTH_FAILURE_WINDOW seconds, counted from the address's first failure, every request from that address but GET /health gets 429 `too_many_auth_failures` with
Retry-After until the window ends, whatever key it sends: a valid key answered 200 where a wrong
one gets 429 would still tell a guesser which guess was right. Other addresses are never slowed.
Not counted: a missing key, and a revoked or expired one; those are no guesses (it was a real key),
and a client still sending its old key after a rotation must not lock out the others at its address.

Cost on the common path: one truth test of a dict that is empty unless some address is blocked
right now, then one dict lookup; the client's address is only worked out when that dict is not
empty. Counting happens on the failure path only.

The client address is the connecting one; X-Forwarded-For is believed only when the connection
comes from an address in TRUSTED_PROXIES (the rightmost address in it that is not a trusted
proxy is the client). An IPv4 client reaching a dual-stack socket (HOST=::) as ::ffff:a.b.c.d is
its IPv4 address.

IPv6 clients are counted per network of AUTH_FAILURE_IPV6_PREFIX bits (64 by default): one
subscriber gets a whole /64, so counting each address alone would give a guesser 2^64 fresh
addresses. 128 counts every address alone (clouds where unrelated hosts share a /64).

With REDIS_URL the failures are counted in Redis (one atomic script per failure, shared by every
worker and instance), and an address that reaches the limit is put in a shared set of blocked
addresses that each worker reads every BLOCKED_POLL_S. The check stays a local dict lookup, with
no Redis round trip on any request: a worker learns of a block made elsewhere within
BLOCKED_POLL_S, and until then lets that address fail at most once more (its own count then
tells it). While Redis is unreachable each process counts on its own.
"""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import logging
import math
import time
from typing import Any, Callable

from .asgi import Request
from .errors import ApiError, too_many

log = logging.getLogger("erproxy.auth")

MAX_TRACKED = 100_000  # addresses with failures remembered per process; beyond, the oldest are forgotten
SWEEP_EVERY_S = 30.0
BLOCKED_POLL_S = 0.5
POLL_LIMIT = 10_000
MEMO_MAX = 10_000  # addresses whose trust and counted network are remembered (Memo)
PREFIX = "erproxy:authfail:"
BLOCKED_SET = "erproxy:authblocked"

# KEYS[1] = the address's counter, KEYS[2] = the blocked set; ARGV = window ms, limit, address.
# Returns {failures in the window, ms until the window ends}. Server clock, so instances agree.
FAIL = """
local c = redis.call('INCR', KEYS[1])
local ttl = redis.call('PTTL', KEYS[1])
if c == 1 or ttl < 0 then
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
  ttl = tonumber(ARGV[1])
end
if c >= tonumber(ARGV[2]) then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  redis.call('ZADD', KEYS[2], now + ttl, ARGV[3])
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
  redis.call('PEXPIRE', KEYS[2], ARGV[1])
end
return {c, ttl}
"""
# KEYS[1] = the blocked set; ARGV[1] = most entries. Returns {server time ms, {address, until ms, ...}}.
BLOCKED = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
return {now, redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. now, '+inf', 'WITHSCORES', 'LIMIT', 0, ARGV[1])}
"""

COUNTED = frozenset({"invalid", "metrics_token"})  # guesses; not missing, revoked or expired keys


def failure_reason(e: ApiError) -> str:
    """The `reason` label of a 401: missing, invalid, revoked, expired or metrics_token (never the key)."""
    if e.code in ("missing_api_key", "missing_metrics_token"):
        return "missing"
    if e.code == "invalid_metrics_token":
        return "metrics_token"
    if " has been revoked" in e.message:
        return "revoked"
    if " expired at " in e.message:
        return "expired"
    return "invalid"


def too_many_failures(retry_after: int) -> ApiError:
    return too_many(f"Too many failed authentications from this address; retry after {retry_after} s with a valid "
                    "key.", code="too_many_auth_failures", retry_after=retry_after)


class Memo(dict):  # type: ignore[type-arg]
    """`compute(address)` worked out once per address (a dict lookup after that), all forgotten at once past
    MEMO_MAX addresses, so a flood of addresses cannot grow it without bound."""

    def __init__(self, compute: Callable[[str], Any]) -> None:
        super().__init__()
        self.compute = compute

    def __missing__(self, address: str) -> Any:
        value = self.compute(address)
        if len(self) >= MEMO_MAX:
            self.clear()
        self[address] = value
        return value


class TrustedProxies:
    """Which connecting addresses may name the client in X-Forwarded-For."""

    def __init__(self, networks: tuple[str, ...] | list[str]) -> None:
        # ::ffff:10.0.0.1 in TRUSTED_PROXIES is 10.0.0.1: connecting and forwarded addresses are made plain
        nets = [plain_network(ipaddress.ip_network(n, strict=False)) for n in networks]
        self.exact = frozenset(str(n.network_address) for n in nets if n.num_addresses == 1)
        self.nets = tuple(n for n in nets if n.num_addresses > 1)
        self._in_nets = Memo(self._in_networks)

    def __bool__(self) -> bool:
        return bool(self.exact or self.nets)

    def __contains__(self, address: str) -> bool:
        return address in self.exact or (bool(self.nets) and self._in_nets[address])

    def _in_networks(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in n for n in self.nets)

    def client(self, req: Request) -> str:
        """The client's address: the connecting one, or from X-Forwarded-For when a trusted proxy connects."""
        peer = req.scope.get("client")
        address = peer[0] if peer else "-"
        if address.startswith("::ffff:") and "." in address:  # IPv4 on a dual-stack socket: its IPv4 address
            address = address[7:]
        elif "%" in address:  # a link-local peer's zone (fe80::1%eth0): TRUSTED_PROXIES names the address
            address = address.split("%", 1)[0]
        if not (self.exact or self.nets) or address not in self:
            return address
        forwarded = [v for k, v in req.scope["headers"] if k == b"x-forwarded-for"]
        if not forwarded:
            return address
        hops = [h.strip() for h in b",".join(forwarded).decode("latin-1").split(",") if h.strip()]
        hop = address
        for entry in reversed(hops):
            try:
                hop = forwarded_address(entry)
            except ValueError:
                return address  # a forged or garbled entry: nothing left of it can be believed
            if hop not in self:
                return hop
        return hop  # every hop a trusted proxy: the first one named


def plain_network(net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """An IPv4-mapped IPv6 network (::ffff:10.0.0.0/104) as the IPv4 network it maps (10.0.0.0/8)."""
    mapped = getattr(net.network_address, "ipv4_mapped", None)
    if mapped is not None and net.prefixlen >= 96:
        return ipaddress.ip_network((mapped, net.prefixlen - 96))
    return net


def forwarded_address(entry: str) -> str:
    """An X-Forwarded-For entry as an address: `a.b.c.d`, `a.b.c.d:port` (Azure Application Gateway
    and others add the port), an IPv6 address, `[v6]` or `[v6]:port`; ::ffff:a.b.c.d as a.b.c.d.
    ValueError for anything else."""
    if entry.startswith("["):
        end = entry.find("]")
        if end < 0 or (end + 1 < len(entry) and not (entry[end + 1] == ":" and entry[end + 2:].isdigit())):
            raise ValueError(entry)
        entry = entry[1:end]
    elif entry.count(":") == 1:
        entry, port = entry.split(":")
        if not port.isdigit():
            raise ValueError(entry)
    ip = ipaddress.ip_address(entry)
    return str(getattr(ip, "ipv4_mapped", None) or ip)


class CountedAs:
    """What a client address (TrustedProxies.client: IPv4-mapped ones already plain IPv4) is counted as:
    itself (IPv4), or its IPv6 network of `prefix` bits."""

    def __init__(self, prefix: int = 64) -> None:
        self.prefix = prefix
        self._networks = Memo(self._network)

    def __call__(self, address: str) -> str:
        if ":" not in address or self.prefix >= 128:
            return address
        return self._networks[address]

    def _network(self, address: str) -> str:
        try:
            return str(ipaddress.IPv6Network((address, self.prefix), strict=False))
        except ValueError:
            return address


class AuthThrottle:
    """Failure counts and blocks per address (IPv6: per network, CountedAs), in this process."""

    def __init__(self, limit: int, window: float, trusted: TrustedProxies | None = None, *,
                 clock: Any = time.monotonic, ipv6_prefix: int = 64) -> None:
        self.limit = limit
        self.window = window
        self.trusted = trusted or TrustedProxies(())
        self.clock = clock
        self.counted_as = CountedAs(ipv6_prefix)
        self.blocked: dict[str, float] = {}  # address -> blocked until (clock); empty on the common path
        self._failures: dict[str, list[float]] = {}  # address -> [count, window ends]
        self._next_sweep = clock() + SWEEP_EVERY_S

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def client(self, req: Request) -> str:
        return self.trusted.client(req)

    def check(self, req: Request) -> None:
        """429 when the request's address is blocked. Call only when `self.blocked` is not empty."""
        address = self.counted_as(self.trusted.client(req))
        until = self.blocked.get(address)
        now = self.clock()
        if until is not None:
            if until > now:
                raise too_many_failures(math.ceil(until - now))
            del self.blocked[address]
        if now >= self._next_sweep:
            self._sweep(now)

    async def failed(self, address: str) -> tuple[int, float]:
        """Count one failure of `address` (under what it is counted as); returns (failures in its window,
        seconds until the window ends)."""
        return self._count_here(self.counted_as(address))

    def _count_here(self, address: str) -> tuple[int, float]:
        now = self.clock()
        if now >= self._next_sweep:
            self._sweep(now)
        failures = self._failures
        entry = failures.get(address)
        if entry is None or entry[1] <= now:
            if entry is not None:
                del failures[address]  # a new window goes last: the dict stays in the order windows end
            elif len(failures) >= MAX_TRACKED:
                self._make_room(now)
            entry = failures[address] = [0, now + self.window]
        entry[0] += 1
        left = entry[1] - now
        if entry[0] >= self.limit:
            self.blocked[address] = entry[1]
        return int(entry[0]), left

    def _sweep(self, now: float) -> None:
        self._drop_ended(now)
        for address, until in list(self.blocked.items()):
            if until <= now:
                del self.blocked[address]
        self._next_sweep = now + SWEEP_EVERY_S

    def _drop_ended(self, now: float) -> None:
        """Forget the windows that have ended: they are first in the dict (windows are of one length and
        a restarted one is put last), so this stops at the first one still running."""
        failures = self._failures
        while failures:
            first = next(iter(failures))
            if failures[first][1] > now:
                return
            del failures[first]

    def _make_room(self, now: float) -> None:
        """At MAX_TRACKED addresses (a flood of them): the ended windows go, else the oldest tenth at once,
        so that the next new addresses do not each pay for a walk over the whole table."""
        self._drop_ended(now)
        failures = self._failures
        if len(failures) >= MAX_TRACKED:
            for address in list(itertools.islice(failures, max(1, MAX_TRACKED // 10))):
                del failures[address]


class RedisAuthThrottle(AuthThrottle):
    """The same, counted in Redis so every worker and instance shares an address's failures."""

    def __init__(self, redis: Any, limit: int, window: float, trusted: TrustedProxies | None = None, *,
                 ipv6_prefix: int = 64) -> None:
        super().__init__(limit, window, trusted, ipv6_prefix=ipv6_prefix)
        self.redis = redis
        self._fail = redis.register_script(FAIL)
        self._blocked_now = redis.register_script(BLOCKED)
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._poll_blocked())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def failed(self, address: str) -> tuple[int, float]:
        from .redis_admission import REDIS_ERRORS

        address = self.counted_as(address)
        try:
            count, ttl_ms = await self._fail(keys=[PREFIX + address, BLOCKED_SET],
                                             args=[max(1, int(self.window * 1000)), self.limit, address])
        except REDIS_ERRORS:
            return self._count_here(address)  # Redis is down (admission logs it): count in this process
        left = max(0.001, int(ttl_ms) / 1000)
        if int(count) >= self.limit:
            self.blocked[address] = self.clock() + left
        return int(count), left

    async def _poll_blocked(self) -> None:
        from .redis_admission import REDIS_ERRORS

        while True:
            try:
                now_ms, flat = await self._blocked_now(keys=[BLOCKED_SET], args=[POLL_LIMIT])
            except REDIS_ERRORS:
                pass
            except Exception:  # noqa: BLE001 - an unexpected reply must not end the poll for good
                log.exception("reading the blocked addresses from Redis failed; trying again")
            else:
                here = self.clock()
                fresh = {}
                for i in range(0, len(flat) - 1, 2):
                    member = flat[i].decode() if isinstance(flat[i], bytes) else str(flat[i])
                    fresh[member] = here + (float(flat[i + 1]) - int(now_ms)) / 1000
                for address, until in list(self.blocked.items()):  # keep what this worker decided itself
                    if until > here and fresh.get(address, 0) < until:
                        fresh[address] = until
                self.blocked = fresh
            await asyncio.sleep(BLOCKED_POLL_S)


def make_auth_throttle(limit: int, window: float, trusted_proxies: tuple[str, ...], redis: Any = None,
                       ipv6_prefix: int = 64) -> AuthThrottle | None:
    """The throttle for these settings, shared through `redis` when given; None when the limit is 0."""
    if limit <= 0:
        return None
    trusted = TrustedProxies(trusted_proxies)
    if redis is not None:
        return RedisAuthThrottle(redis, limit, window, trusted, ipv6_prefix=ipv6_prefix)
    return AuthThrottle(limit, window, trusted, ipv6_prefix=ipv6_prefix)
