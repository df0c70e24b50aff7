"""Per-request bookkeeping handed over in batches: the access log (logs.AccessBatch) and the metrics
(metrics.Pending) queue what each request adds and write it together at most FLUSH_WINDOW_S later,
from one timer per event loop.

Writing once per event-loop turn was not enough: a worker with few connections (several workers on
few cores, or a quiet hour) answers one request per turn, and each turn then paid its own log write,
rotation check and metrics-file updates (about a tenth of such a worker's CPU, bench/results/ANALYSIS.md).
The price is that an access line or a metric sample of another worker shows FLUSH_WINDOW_S late at
most; a scrape always includes the scraped worker's own samples (metrics.render flushes first).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Callable

FLUSH_WINDOW_S = 0.01

log = logging.getLogger("erproxy")


class _Due:
    """The flushes waiting for one loop's timer."""

    def __init__(self, loop: asyncio.AbstractEventLoop, fns: list[Callable[[], None]]) -> None:
        self.loop = loop
        self.fns = fns
        self.timer: asyncio.TimerHandle | None = None

    def run(self) -> None:
        self.timer = None
        fns, self.fns = self.fns, []
        for fn in fns:
            try:
                fn()
            except Exception:  # noqa: BLE001 - one failing flush must not keep the others from running
                log.exception("a batched flush failed")


_due: _Due | None = None


def flush_later(fn: Callable[[], None]) -> asyncio.AbstractEventLoop | None:
    """Run `fn` within FLUSH_WINDOW_S, with the other flushes asked for meanwhile (one timer): the loop
    whose timer runs it. None when no event loop runs (a command-line use): the caller flushes at once."""
    global _due
    loop = asyncio._get_running_loop()
    if loop is None:
        return None
    due = _due
    if due is None or due.loop is not loop:
        # a new loop (tests run one per test): what the old one still owed is run from this one
        due = _due = _Due(loop, due.fns if due is not None else [])
    due.fns.append(fn)
    if due.timer is None:
        due.timer = loop.call_later(FLUSH_WINDOW_S, due.run)
    return loop


def due_on(loop: asyncio.AbstractEventLoop | None) -> bool:
    """Whether a flush asked for on `loop` (flush_later's answer) will still come: that loop is the one
    running. A batch whose loop has ended (asyncio.run returned) must ask again, or flush at once."""
    return loop is not None and loop is asyncio._get_running_loop()
