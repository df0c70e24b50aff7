"""After start-up the gateway's long-lived objects are frozen out of the garbage collector's full
passes (a full collection walking them under load is a pause every client waits on)."""

from __future__ import annotations

import gc


async def test_start_up_freezes_what_it_built(make_gateway) -> None:
    gc.unfreeze()
    assert gc.get_freeze_count() == 0
    gw = await make_gateway()
    assert gc.get_freeze_count() > 1000  # the gateway's modules, routes, schemas and services
    assert (await gw.get("/health")).status_code == 200
