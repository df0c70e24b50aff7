"""usage.py and token_limits.py without a gateway: batching, a failing store, SQLite with several writers,
the token window's arithmetic."""

from __future__ import annotations

import asyncio
import multiprocessing
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from erproxy.token_limits import MemoryTokenLimiter, TokenGate, TokenLimits, parse_token_limit
from erproxy.keys import Identity
from erproxy.usage import SqliteUsageStore, Usage, by_key_and_model, parse_day


class FailingStore:
    def __init__(self) -> None:
        self.fail = True
        self.batches: list[dict] = []

    async def add(self, batch, batch_id=""):
        if self.fail:
            raise OSError("disk full")
        self.batches.append(batch)

    async def query(self, *a):
        return []

    async def close(self):
        return None


async def test_a_failing_store_costs_a_metric_and_keeps_the_counts():
    registry = CollectorRegistry()
    store = FailingStore()
    usage = Usage(store, registry=registry)
    usage.record("k", "m", 200, 3, 30, 1, ts=0)
    usage.record("k", "m", 503, 1, 0, 0, ts=0)
    assert await usage.flush() is False
    assert registry.get_sample_value("erproxy_usage_record_failures_total") == 1
    usage.record("k", "m", 404, 1, 0, 0, ts=0)
    store.fail = False
    assert await usage.flush() is True
    # the failed batch goes again as it was (the store may have applied it: its id makes that once),
    # then what was answered meanwhile
    assert store.batches == [{("k", "m", "1970-01-01"): [2, 4, 30, 1, 0, 1]}, {("k", "m", "1970-01-01"): [1, 1, 0, 0, 1, 0]}]
    assert registry.get_sample_value("erproxy_key_tokens_total", {"key": "k", "model": "m"}) == 30


def _writer(path: str, n: int) -> None:
    store = SqliteUsageStore(path)
    for _ in range(n):
        store.add_sync({("k", "m", "2026-11-26"): [1, 2, 3, 0, 0, 0]})


def test_sqlite_adds_from_several_processes(tmp_path: Path):
    path = str(tmp_path / "er_usage.db")
    SqliteUsageStore(path).add_sync({("k", "m", "2026-11-25"): [1, 1, 1, 1, 1, 1]})
    ctx = multiprocessing.get_context("spawn")
    workers = [ctx.Process(target=_writer, args=(path, 50)) for _ in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
        assert w.exitcode == 0
    rows = SqliteUsageStore(path).query_sync("k")
    assert [(r.day, r.requests, r.items, r.prompt_tokens) for r in rows] == [
        ("2026-11-25", 1, 1, 1), ("2026-11-26", 200, 400, 600)]
    assert SqliteUsageStore(path).query_sync("k", since="2026-11-26")[0].requests == 200
    assert SqliteUsageStore(path).query_sync("other") == []
    [total] = by_key_and_model(rows)
    assert (total.requests, total.prompt_tokens, total.day) == (201, 601, "2026-11-26")


def test_days_and_limits_are_checked():
    assert parse_day("2026-11-26", "since") == "2026-11-26" and parse_day(None, "since") is None
    for bad in ("26.11.2026", "2026-13-01", "2026-02-30", "today"):
        with pytest.raises(ValueError, match="since"):
            parse_day(bad, "since")
    assert parse_token_limit("100000/minute").period == 60
    assert parse_token_limit("5000000/day").amount == 5000000
    for bad in ("lots", "0/minute", "1/minute;2/hour"):
        with pytest.raises(ValueError):
            parse_token_limit(bad)


async def test_the_window_admits_while_budget_is_left_counting_requests_in_flight():
    now = [1000.0]
    limiter = MemoryTokenLimiter(clock=lambda: now[0])
    gate = TokenGate(TokenLimits("100/minute"), limiter)
    who = Identity("k", "er-k", bucket="b")
    first = await gate.admit(who)
    gate.settle(first, 30)                    # the window learns requests are ~30 tokens
    # in flight at ~30 each: 30 + 0, 30 + 30, 30 + 60 are under 100, so three are admitted (the third
    # overshoots by its own size); 30 + 90 >= 100 refuses the fourth until one is answered
    tickets = [await gate.admit(who) for _ in range(3)]
    with pytest.raises(Exception) as refused:
        await gate.admit(who)
    assert refused.value.code == "token_limit_exceeded" and (b"retry-after", b"1") in refused.value.headers
    for t in tickets:
        gate.settle(t, 30)                    # used 120: the window is used up
    with pytest.raises(Exception) as used_up:
        await gate.admit(who)
    assert (b"retry-after", b"20") in used_up.value.headers  # until the next whole minute (1000 -> 1020)
    now[0] = 1020.0
    assert await gate.admit(who) is not None  # a new window
    assert await TokenGate(TokenLimits(None), limiter).admit(who) is None  # no limit: nothing to track
    own = Identity("k", "er-k", bucket="c", token_limit="10/hour")
    gate.settle(await gate.admit(own), 10)
    with pytest.raises(Exception):
        await gate.admit(own)
    await asyncio.sleep(0)


async def test_a_day_budget_used_up_stays_used_up_however_many_minute_windows_other_keys_open():
    now = [86400.0 * 20000 + 3600]
    limiter = MemoryTokenLimiter(clock=lambda: now[0])
    gate = TokenGate(TokenLimits("100000/minute"), limiter)
    daily = Identity("d", "er-d", bucket="day", token_limit="1000/day")
    gate.settle(await gate.admit(daily), 1000)          # the day's budget, used up
    for i in range(2 * MemoryTokenLimiter.SWEEP_AT):    # other keys, each opening its minute window
        now[0] += 1
        gate.settle(await gate.admit(Identity(f"m{i}", f"er-m{i}", bucket=f"m{i}")), 5)
    with pytest.raises(Exception) as refused:
        await gate.admit(daily)                         # the same day: still refused
    assert refused.value.code == "token_limit_exceeded"
    # ended minute windows were forgotten; what is left is the last two minutes' and the day's
    assert len(limiter.windows) < MemoryTokenLimiter.SWEEP_AT
    now[0] = 86400.0 * 20001                            # the next day
    assert await gate.admit(daily) is not None


class SlowStore(FailingStore):
    """A store whose write takes a while, like a Redis pipeline over the network."""

    def __init__(self) -> None:
        super().__init__()
        self.fail = False
        self.writing = asyncio.Event()

    async def add(self, batch, batch_id=""):
        self.writing.set()
        await asyncio.sleep(0.2)
        self.batches.append(batch)


async def test_a_stop_during_a_background_write_loses_no_count_and_writes_none_twice():
    store = SlowStore()
    usage = Usage(store, registry=CollectorRegistry(), flush_every=0.01)
    for _ in range(8):
        usage.record("k", "m", 200, 1, 10, 0, ts=0)
    await usage.start()
    await asyncio.wait_for(store.writing.wait(), 5)  # the background flush is writing its batch
    usage.record("k", "m", 200, 1, 10, 0, ts=0)  # one more, left for the stop's own flush
    await usage.close()
    assert sum(b[("k", "m", "1970-01-01")][0] for b in store.batches) == 9


class AppliedThenTimedOut:
    """Redis ran the write, but its reply did not come back in time (a stall, a dropped connection): the
    gateway cannot tell it from a write that never arrived."""

    def __init__(self, store) -> None:
        self.store = store
        self.lose_replies = 1

    async def add(self, batch, batch_id):
        await self.store.add(batch, batch_id)
        if self.lose_replies:
            self.lose_replies -= 1
            raise TimeoutError("Timeout reading from 127.0.0.1")

    async def query(self, *args):
        return await self.store.query(*args)

    async def close(self):
        return None


async def test_a_batch_whose_reply_was_lost_is_counted_once_in_redis(tmp_path: Path):
    from redis import asyncio as aioredis

    from erproxy.usage import RedisUsageStore
    from tests.procs import RedisServer

    server = RedisServer(tmp_path).start()
    client = aioredis.Redis.from_url(server.url)
    try:
        usage = Usage(AppliedThenTimedOut(RedisUsageStore(client)))
        for _ in range(3):
            usage.record("alpha", "minilm", 200, 2, 10, 0, ts=86400.0 * 20000)
        assert await usage.flush() is False               # applied, but the gateway does not know it
        usage.record("alpha", "minilm", 200, 2, 10, 0, ts=86400.0 * 20000)
        assert await usage.flush() is True                # the same batch again, then the newer one
        [row] = await usage.query("alpha")
        assert (row.requests, row.items, row.prompt_tokens) == (4, 8, 40)
    finally:
        await client.aclose()
        server.stop()


async def test_a_row_whose_redis_key_holds_other_data_is_skipped_alone_and_the_batch_is_applied_once(tmp_path: Path,
                                                                                                 caplog):
    """Lua does not roll a script back: a WRONGTYPE half-way used to leave the rows before it applied, the
    batch marked, and the rows after it lost without a word."""
    from redis import asyncio as aioredis

    from erproxy.usage import RedisUsageStore
    from tests.procs import RedisServer

    server = RedisServer(tmp_path).start()
    client = aioredis.Redis.from_url(server.url)
    day = "2024-10-04"
    try:
        await client.set(f"erproxy:usage:{day}:bob", "another program's value")
        usage = Usage(RedisUsageStore(client))
        for name in ("alice", "bob", "carol"):
            usage.record(name, "m", 200, 1, 5, 0, ts=86400.0 * 20000)
        assert await usage.flush() is True
        assert await usage.flush() is True  # nothing in doubt: the batch is done, bob's row given up
        got = {(r.key, r.requests) for r in await RedisUsageStore(client).query(since=day, until=day, key="alice")}
        got |= {(r.key, r.requests) for r in await RedisUsageStore(client).query(since=day, until=day, key="carol")}
        assert got == {("alice", 1), ("carol", 1)}
        assert await client.get(f"erproxy:usage:{day}:bob") == b"another program's value"
        assert any("usage of key 'bob'" in rec.getMessage() for rec in caplog.records)
    finally:
        await client.aclose()
        server.stop()
