import time

import pytest
from limits import parse
from limits.aio.storage import MemoryStorage
from limits.aio.strategies import FixedWindowRateLimiter, MovingWindowRateLimiter

from erproxy.admission import LocalWindowStorage, MemoryAdmission
from erproxy.errors import ApiError
from erproxy.keys import Identity


class Clock:
    """A clock the test moves by hand: no real sleeping, no poking at private fields."""

    def __init__(self, now: float = 1_700_000_000.25) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


async def test_moving_window_is_exact_per_key():
    clock = Clock()
    adm = MemoryAdmission("5/second", 10, clock=clock)
    alice, bob = Identity("alice", "er-a"), Identity("bob", "er-b")
    results = []
    for _ in range(7):
        try:
            await adm.enforce_rate_limit(alice)
            results.append(True)
        except ApiError as e:
            assert e.status == 429 and e.code == "rate_limit_exceeded"
            assert dict(e.headers)[b"retry-after"] == b"1"
            results.append(False)
    assert results == [True] * 5 + [False] * 2
    await adm.enforce_rate_limit(bob)  # another key has its own window
    clock.advance(1.05)
    await adm.enforce_rate_limit(alice)  # the window moved on


async def test_window_moves_hit_by_hit_not_all_at_once():
    clock = Clock()
    adm = MemoryAdmission("3/minute", 10, clock=clock)
    who = Identity("k", "er-k")
    for _ in range(3):
        await adm.enforce_rate_limit(who)
        clock.advance(20)
    clock.advance(0.5)
    # hits at t=0, 20, 40; now t=60.5: the first has left the window, the others have not
    await adm.enforce_rate_limit(who)
    with pytest.raises(ApiError) as e:
        await adm.enforce_rate_limit(who)
    assert dict(e.value.headers)[b"retry-after"] == b"20"  # when the hit at t=20 leaves


async def test_per_key_limit_overrides_default():
    adm = MemoryAdmission("100/minute", 10, clock=Clock())
    vip = Identity("vip", "er-v", rate_limit="2/minute")
    await adm.enforce_rate_limit(vip)
    await adm.enforce_rate_limit(vip)
    with pytest.raises(ApiError):
        await adm.enforce_rate_limit(vip)


async def test_concurrency_cap_and_release():
    adm = MemoryAdmission("100/minute", 2)
    a, b = await adm.acquire(), await adm.acquire()
    with pytest.raises(ApiError) as e:
        await adm.acquire()
    assert e.value.code == "concurrency_limit_exceeded"
    await adm.release(a)
    await adm.acquire()
    assert adm.in_flight() == 2


async def test_window_storage_counts_every_hit_and_sweeps_idle_keys():
    clock = Clock()
    s = LocalWindowStorage(clock=clock)
    for _ in range(200_000):  # a huge limit: every hit is kept, oldest first
        assert await s.acquire_entry("k", 10**9, 60)
    start, count = await s.get_moving_window("k", 10**9, 60)
    assert count == 200_000 and start <= clock()
    await s.acquire_entry("idle", 5, 1)
    clock.advance(LocalWindowStorage.SWEEP_EVERY_S)  # "idle" has been idle for longer than its window
    await s.acquire_entry("k", 10**9, 60)
    assert "idle" not in s.windows and "k" in s.windows


# ---- LocalWindowStorage against limits' own MemoryStorage ------------------------------------------
# The same calls, on the same clock, must give the same answers: every method of limits' async
# storage interface, not only the two the moving window limiter uses.

@pytest.fixture(params=["limits.MemoryStorage", "LocalWindowStorage"])
def storage_and_clock(request, monkeypatch):
    clock = Clock()
    if request.param == "LocalWindowStorage":
        return LocalWindowStorage(clock=clock), clock
    monkeypatch.setattr(time, "time", clock)  # limits' MemoryStorage reads time.time()
    return MemoryStorage(), clock


async def test_storage_moving_window(storage_and_clock):
    s, clock = storage_and_clock
    assert await s.get_moving_window("k", 3, 10) == (clock(), 0)
    assert await s.acquire_entry("k", 3, 10)
    first = clock()
    clock.advance(1)
    assert await s.acquire_entry("k", 3, 10, amount=2)
    assert not await s.acquire_entry("k", 3, 10)
    assert not await s.acquire_entry("k", 3, 10, amount=4)  # more than the limit: never
    assert await s.get_moving_window("k", 3, 10) == (first, 3)
    clock.advance(9.5)  # the first hit has left the window, the other two have not
    assert await s.get_moving_window("k", 3, 10) == (first + 1, 2)
    assert await s.acquire_entry("k", 3, 10)
    assert not await s.acquire_entry("k", 3, 10)
    if hasattr(s, "get_num_acquired"):
        assert await s.get_num_acquired("k", 10) == 3


async def test_storage_fixed_window_counters(storage_and_clock):
    s, clock = storage_and_clock
    assert await s.get("c") == 0
    assert await s.get_expiry("c") == clock()
    assert await s.incr("c", 10) == 1
    expires = clock() + 10
    clock.advance(4)
    assert await s.incr("c", 10, amount=3) == 4
    assert await s.get("c") == 4
    assert await s.get_expiry("c") == expires  # the window does not restart on later hits
    clock.advance(6.5)
    assert await s.get("c") == 0
    assert await s.incr("c", 10) == 1


async def test_storage_clear_reset_check(storage_and_clock):
    s, clock = storage_and_clock
    assert await s.check() is True
    await s.acquire_entry("a", 5, 10)
    await s.acquire_entry("b", 5, 10)
    await s.incr("c", 10)
    await s.incr("d", 10)
    await s.clear("a")
    assert await s.get_moving_window("a", 5, 10) == (clock(), 0)
    assert (await s.get_moving_window("b", 5, 10))[1] == 1
    assert await s.reset() == 2  # the larger of: keys with windows, keys with counters
    assert (await s.get_moving_window("b", 5, 10))[1] == 0
    assert await s.get("c") == 0


async def test_storage_serves_limits_strategies(storage_and_clock):
    s, clock = storage_and_clock
    item = parse("2/second")
    moving, fixed = MovingWindowRateLimiter(s), FixedWindowRateLimiter(s)
    assert [await moving.hit(item, "m") for _ in range(3)] == [True, True, False]
    assert (await moving.get_window_stats(item, "m")).remaining == 0
    assert [await fixed.hit(item, "f") for _ in range(3)] == [True, True, False]
    assert await fixed.test(item, "f") is False
    clock.advance(1.5)
    assert await moving.hit(item, "m") and await fixed.hit(item, "f")
    await moving.clear(item, "m")
    assert (await moving.get_window_stats(item, "m")).remaining == 2


# ---- RedisAdmission when Redis cannot be reached ---------------------------------------------------
@pytest.mark.parametrize("fail_open", [False, True])
async def test_redis_down_is_503_or_per_process_limits(fail_open):
    from erproxy.redis_admission import RedisAdmission

    adm = RedisAdmission("redis://127.0.0.1:1/0", "1/minute", 1, fail_open=fail_open)  # nothing listens there
    who = Identity("k", "er-k")
    try:
        for _ in range(2):  # the first call finds Redis down, the second already knows
            if not fail_open:
                with pytest.raises(ApiError) as e:
                    await adm.enforce_rate_limit(who)
                assert (e.value.status, e.value.code) == (503, "limits_unavailable")
                with pytest.raises(ApiError) as e:
                    await adm.acquire()
                assert (e.value.status, e.value.code) == (503, "limits_unavailable")
        if fail_open:
            await adm.enforce_rate_limit(who)
            with pytest.raises(ApiError) as e:
                await adm.enforce_rate_limit(who)  # this process's own window: 1/minute
            assert e.value.code == "rate_limit_exceeded"
            slot = await adm.acquire()
            with pytest.raises(ApiError) as e:
                await adm.acquire()
            assert e.value.code == "concurrency_limit_exceeded"
            assert adm.in_flight() == 1
            await adm.release(slot)
            assert adm.in_flight() == 0
    finally:
        await adm.close()
