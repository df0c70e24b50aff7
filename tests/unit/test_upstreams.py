import random
import time
from collections import Counter

import pytest

from erproxy.errors import ApiError
from erproxy.upstream_client import ConnectionDropped
from erproxy.upstreams import DROPS_TO_EJECT, ModelInfo, Replica, Upstreams, _ConnectionFailed


def ups(n_embed=2, n_rerank=1) -> Upstreams:
    u = Upstreams(tuple(f"http://e{i}" for i in range(n_embed)), tuple(f"http://r{i}" for i in range(n_rerank)),
                  timeout=5, health_interval=10)
    for r in u.replicas["embedding"]:
        r.healthy, r.discovered, r.models = True, True, {"emb": ModelInfo("emb")}
    for r in u.replicas["reranker"]:
        r.healthy, r.discovered, r.models = True, True, {"rr": ModelInfo("rr")}
    return u


def test_least_in_flight_wins_ties_at_random():
    u = ups(3)
    a, b, c = u.replicas["embedding"]
    a.in_flight, b.in_flight, c.in_flight = 5, 1, 1
    random.seed(1)
    picks = Counter(u.pick_replica([a, b, c], []).url for _ in range(400))
    assert set(picks) == {"http://e1", "http://e2"} and min(picks.values()) > 120


def test_unhealthy_and_excluded_replicas_are_skipped():
    u = ups(3)
    a, b, c = u.replicas["embedding"]
    b.healthy = False
    assert u.pick_replica([a, b, c], [a]) is c
    a.healthy = c.healthy = False
    a.next_check, b.next_check, c.next_check = 9, 3, 5
    assert u.pick_replica([a, b, c], []) is b  # none healthy: the one due for a probe soonest is tried


def test_ejection_backs_off_exponentially():
    u = ups(1)
    (r,) = u.replicas["embedding"]
    delays = []
    u.mark_failed(r, "refused")          # a request fails: ejected, first probe soon
    delays.append(round(r.next_check - time.monotonic(), 1))
    for _ in range(3):                   # more requests failing on it meanwhile change nothing
        u.mark_failed(r, "refused")
    assert r.failures == 1
    for _ in range(7):                   # each failed probe doubles the wait
        before = time.monotonic()
        u.mark_failed(r, "refused", probe=True)
        delays.append(round(r.next_check - before, 1))
    assert r.healthy is False
    assert delays[:5] == [0.5, 1.0, 2.0, 4.0, 8.0] and delays[-1] == 30.0


def test_models_route_to_the_replicas_that_serve_them():
    u = ups(2, 1)
    assert u.candidates("embedding", "emb") == u.replicas["embedding"]
    assert u.candidates("reranker", "emb") == u.replicas["embedding"]  # rerank with an embedding model
    assert u.candidates("embedding", None) == u.replicas["embedding"]
    with pytest.raises(ApiError) as e:
        u.candidates("embedding", "nope")
    assert e.value.status == 404 and "emb" in e.value.message
    u.replicas["embedding"][1].discovered = False  # not known yet: let that upstream answer
    assert u.candidates("embedding", "nope") == u.replicas["embedding"]


def test_default_model_is_configured_or_discovered():
    u = ups()
    assert u.default_model("embedding") == "emb"
    u.default_models["embedding"] = "configured"
    assert u.default_model("embedding") == "configured"


class _DroppingClient:
    """Stands in for the keep-alive client: every request's connection closes without an answer."""

    def __init__(self) -> None:
        self.reused = False
        self.answers = False

    async def post(self, url, path, body, timeout, limit=None):
        if self.answers:
            return 200, b"{}"
        raise ConnectionDropped("connection closed before a complete answer", reused=self.reused)


async def test_a_replica_that_drops_new_connections_is_ejected_and_kept_out_longer_each_time():
    u = ups(1)
    (r,) = u.replicas["embedding"]
    u.client = client = _DroppingClient()

    async def drop(times: int) -> None:
        for _ in range(times):
            with pytest.raises(_ConnectionFailed):
                await u._post_once(r, "/v1/embeddings", b"{}", 5)

    client.reused = True  # kept-alive connections the server had closed: normal, never an ejection
    await drop(2 * DROPS_TO_EJECT)
    assert r.healthy
    client.reused = False
    waits = []
    for _ in range(3):
        await drop(DROPS_TO_EJECT - 1)
        assert r.healthy  # one dropped request may be that request's fault
        await drop(1)
        assert not r.healthy and "new connections in a row" in r.last_error
        waits.append(round(r.next_check - time.monotonic(), 1))
        r.healthy = True  # its probe passed: /health answers, but requests still get nothing
    assert waits == [0.5, 1.0, 2.0]
    client.answers = True  # it serves again: forgiven
    assert (await u._post_once(r, "/v1/embeddings", b"{}", 5)).status == 200
    client.answers = False
    await drop(DROPS_TO_EJECT)
    assert round(r.next_check - time.monotonic(), 1) == 0.5
