import asyncio
import time

import pytest

from erproxy.admission import LocalWindowStorage, MemoryAdmission
from erproxy.errors import ApiError
from erproxy.keys import Identity


async def test_moving_window_is_exact_per_key():
    adm = MemoryAdmission("5/second", 10)
    alice, bob = Identity("alice", "er-a"), Identity("bob", "er-b")
    results = []
    for _ in range(7):
        try:
            await adm.check_rate(alice)
            results.append(True)
        except ApiError as e:
            assert e.status == 429 and e.code == "rate_limit_exceeded"
            assert dict(e.headers)[b"retry-after"] == b"1"
            results.append(False)
    assert results == [True] * 5 + [False] * 2
    await adm.check_rate(bob)  # another key has its own window
    await asyncio.sleep(1.05)
    await adm.check_rate(alice)  # the window moved on


async def test_per_key_limit_overrides_default():
    adm = MemoryAdmission("100/minute", 10)
    vip = Identity("vip", "er-v", rate_limit="2/minute")
    await adm.check_rate(vip)
    await adm.check_rate(vip)
    with pytest.raises(ApiError):
        await adm.check_rate(vip)


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
    s = LocalWindowStorage()
    for _ in range(200_000):  # a huge limit: every hit is kept, oldest first
        assert await s.acquire_entry("k", 10**9, 60)
    start, count = await s.get_moving_window("k", 10**9, 60)
    assert count == 200_000 and start <= time.time()
    await s.acquire_entry("idle", 5, 1)
    s.windows["idle"][0][0] -= 10  # pretend it is old
    s._next_sweep = 0
    await s.acquire_entry("k", 10**9, 60)
    assert "idle" not in s.windows and "k" in s.windows
