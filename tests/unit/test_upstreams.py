import random
import time
from collections import Counter

import pytest

from erproxy.errors import ApiError
from erproxy.upstreams import ModelInfo, Replica, Upstreams


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
