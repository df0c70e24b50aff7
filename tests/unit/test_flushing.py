"""Batched flushes (erproxy/flushing.py): everything asked for within the window runs once, together,
from one timer; a flush owed by an event loop that ended runs from the next one (nothing is lost)."""

from __future__ import annotations

import asyncio

from erproxy.flushing import FLUSH_WINDOW_S, flush_later


def test_flushes_asked_for_within_the_window_run_together_from_one_timer() -> None:
    ran: list[tuple[str, float]] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        assert flush_later(lambda: ran.append(("log", loop.time() - t0)))
        await asyncio.sleep(FLUSH_WINDOW_S / 4)
        assert flush_later(lambda: ran.append(("metrics", loop.time() - t0)))
        assert ran == []
        await asyncio.sleep(FLUSH_WINDOW_S * 3)

    asyncio.run(main())
    assert [name for name, _ in ran] == ["log", "metrics"]
    # one timer: the second ran with the first at the first one's deadline, not a quarter window later
    assert abs(ran[1][1] - ran[0][1]) < FLUSH_WINDOW_S / 8 and FLUSH_WINDOW_S * 0.9 <= ran[0][1] < FLUSH_WINDOW_S * 2


def test_a_flush_owed_by_a_finished_loop_runs_from_the_next_one() -> None:
    ran: list[str] = []

    async def ask() -> None:
        assert flush_later(lambda: ran.append("owed"))

    asyncio.run(ask())  # the loop ends before the window does
    assert ran == []

    async def later() -> None:
        assert flush_later(lambda: ran.append("new"))
        await asyncio.sleep(FLUSH_WINDOW_S * 3)

    asyncio.run(later())
    assert ran == ["owed", "new"]


def test_a_failing_flush_does_not_keep_the_others_from_running() -> None:
    ran: list[str] = []

    def broken() -> None:
        raise RuntimeError("boom")

    async def main() -> None:
        flush_later(broken)
        flush_later(lambda: ran.append("after"))
        await asyncio.sleep(FLUSH_WINDOW_S * 3)

    asyncio.run(main())
    assert ran == ["after"]


def test_without_an_event_loop_the_caller_is_told_to_flush_at_once() -> None:
    assert flush_later(lambda: None) is None
