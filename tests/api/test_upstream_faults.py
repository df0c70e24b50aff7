"""vLLM misbehaving, down or slow: the answer a client gets, and health checks that keep working."""

import asyncio
import socket
import time

import pytest

from tests.procs import free_port


async def post_embed(gw, **kw):
    return await gw.post("/v1/embeddings", json={"model": "minilm", "input": "hello world"},
                         headers=kw.pop("headers", gw.auth()), timeout=kw.pop("timeout", 30), **kw)


@pytest.mark.parametrize("mode", ["error500", "garbage", "badjson", "reset", "redirect"])
async def test_upstream_garbage_or_5xx_is_502(fake_embed, fake_rerank, make_gateway, mode):
    gw = await make_gateway(embed=fake_embed.url, rerank=fake_rerank.url)
    fake_embed.set_mode(mode)
    fake_rerank.set_mode(mode)
    r = await post_embed(gw)
    assert r.status_code == 502, r.text
    assert r.json()["error"]["type"] == "upstream_error"
    r = await gw.post("/v1/rerank", headers=gw.auth(), json={"query": "q", "documents": ["a"]})
    assert r.status_code == 502


async def test_unreachable_upstream_is_503_and_health_degraded(make_gateway, fake_rerank):
    closed = f"http://127.0.0.1:{free_port()}"
    gw = await make_gateway(embed=closed)
    r = await post_embed(gw)
    assert r.status_code == 503 and r.json()["error"]["code"] == "upstream_unavailable"
    assert "check_models_status" in r.json()["error"]["message"]
    h = await gw.get("/health")
    assert h.status_code == 503 and h.json()["status"] == "degraded" and h.json()["unavailable"] == ["embedding"]
    ok = await gw.post("/v1/rerank", headers=gw.auth(), json={"query": "q", "documents": ["a"]})
    assert ok.status_code == 200  # the other model still serves


async def test_hanging_upstream_is_504_at_timeout(fake_embed, fake_rerank, make_gateway):
    gw = await make_gateway(embed=fake_embed.url, rerank=fake_rerank.url, TIMEOUT="1")
    fake_embed.set_mode("hang")
    t0 = time.monotonic()
    r = await post_embed(gw)
    elapsed = time.monotonic() - t0
    assert r.status_code == 504 and r.json()["error"]["code"] == "upstream_timeout"
    assert 0.9 <= elapsed < 5


async def test_vllm_auth_errors_are_502_not_the_clients_401(fake_embed, make_gateway):
    gw = await make_gateway(embed=fake_embed.url)
    fake_embed.set_mode("unauthorized")
    r = await gw.post("/v1/embeddings", headers=gw.auth(), json={"input": "x"})
    assert r.status_code == 502 and "--api-key" in r.json()["error"]["message"]


async def test_upstream_is_never_asked_to_compress(fake_embed, make_gateway):
    gw = await make_gateway(embed=fake_embed.url)
    assert (await gw.post("/v1/embeddings", headers=gw.auth(), json={"input": "x"})).status_code == 200
    headers = {k.lower(): v for k, v in fake_embed.stats()["last_headers"].items()}
    assert "gzip" not in headers.get("accept-encoding", "")


async def test_health_checks_do_not_queue_behind_busy_request_connections(fakes, make_gateway):
    slow = await fakes.start("embed", delay=7)
    gw = await make_gateway(embed=slow.url, MAX_CONCURRENT_REQUESTS="2", TIMEOUT="30")
    busy = [asyncio.create_task(gw.post("/v1/embeddings", json={"input": f"s{i}"}, headers=gw.auth(), timeout=30))
            for i in range(2)]
    await asyncio.sleep(6)  # both pooled connections busy for longer than a health check's 5 s timeout
    h = await gw.get("/health")
    assert h.status_code == 200 and h.json()["upstreams"]["embedding"]["replicas"][0]["healthy"] is True
    await asyncio.gather(*busy)


def blackhole(port: int = 0) -> tuple[socket.socket, list[socket.socket]]:
    """A port whose connections get no answer at all, like a host that is gone: a listening socket with a
    full queue (the kernel then drops new SYNs)."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", port))
    s.listen(0)
    fillers = []
    for _ in range(4):
        c = socket.socket()
        c.setblocking(False)
        try:
            c.connect(s.getsockname())
        except BlockingIOError:
            pass
        fillers.append(c)
    return s, fillers


async def test_a_replica_that_stops_answering_connections_fails_over_within_the_connect_timeout(
        fakes, fake_rerank, make_gateway, monkeypatch):
    from erproxy import upstream_client

    monkeypatch.setattr(upstream_client, "CONNECT_TIMEOUT_S", 0.3)
    doomed, good = await fakes.start("embed"), await fakes.start("embed")
    gw = await make_gateway(embed=f"{doomed.url},{good.url}", rerank=fake_rerank.url, TIMEOUT="20",
                            HEALTH_INTERVAL="60")
    port = int(doomed.url.rsplit(":", 1)[1])
    await doomed.runner.cleanup()  # the host goes away while the gateway still counts it healthy
    fakes.started.remove(doomed)
    hole, fillers = blackhole(port)
    try:
        t0 = time.monotonic()
        answers = await asyncio.gather(*(post_embed(gw) for _ in range(6)))
        elapsed = time.monotonic() - t0
        assert [r.status_code for r in answers] == [200] * 6
        assert elapsed < 5, f"{elapsed:.1f} s: the requests waited for TIMEOUT, not for the connect timeout"
        replicas = (await gw.get("/health")).json()["upstreams"]["embedding"]["replicas"]
        assert [x["healthy"] for x in replicas] == [False, True]
        assert "no connection within 0.3 s" in replicas[0]["last_error"]
    finally:
        for c in fillers + [hole]:
            c.close()


async def test_with_every_replica_hanging_a_request_gets_503_at_once_not_after_timeout(fakes, fake_rerank,
                                                                                      make_gateway):
    one, two = await fakes.start("embed"), await fakes.start("embed")
    gw = await make_gateway(embed=f"{one.url},{two.url}", rerank=fake_rerank.url, TIMEOUT="1")
    one.set_mode("hang")
    two.set_mode("hang")
    first = await asyncio.gather(post_embed(gw), post_embed(gw))  # one on each: both time out, both ejected
    assert [r.status_code for r in first] == [504, 504]
    t0 = time.monotonic()
    r = await post_embed(gw)
    elapsed = time.monotonic() - t0
    assert r.status_code == 503 and r.json()["error"]["code"] == "upstream_unavailable", r.text
    assert elapsed < 0.4, f"{elapsed:.2f} s"


async def test_a_replica_that_closes_every_connection_unanswered_is_ejected_and_the_other_serves(
        fakes, fake_rerank, make_gateway):
    from erproxy.upstreams import DROPS_TO_EJECT

    broken, good = await fakes.start("embed"), await fakes.start("embed")
    gw = await make_gateway(embed=f"{broken.url},{good.url}", rerank=fake_rerank.url, HEALTH_INTERVAL="60")
    broken.set_mode("reset")  # takes each request and closes the connection; its /health still answers 200
    answers = [await post_embed(gw) for _ in range(30)]
    assert [r.status_code for r in answers] == [200] * 30  # each dropped request was retried on the other
    hits = broken.stats()["requests"].get("/v1/embeddings", 0)
    assert DROPS_TO_EJECT <= hits <= 2 * DROPS_TO_EJECT, f"the broken replica got {hits} of 30 requests"


async def test_an_upstream_answer_over_max_answer_bytes_is_502_and_the_replica_keeps_serving(
        fake_embed, fake_rerank, make_gateway):
    gw = await make_gateway(embed=fake_embed.url, rerank=fake_rerank.url, MAX_ANSWER_BYTES="4KiB")
    r = await gw.post("/v1/embeddings", headers=gw.auth(), json={"model": "minilm", "input": ["big", "answer"]})
    assert r.status_code == 502, r.text  # two vectors of 384 floats: ~16 KB of JSON
    error = r.json()["error"]
    assert error["type"] == "upstream_error" and error["code"] == "upstream_answer_too_large"
    assert "MAX_ANSWER_BYTES=4096" in error["message"]
    small = await gw.post("/v1/rerank", headers=gw.auth(), json={"query": "q", "documents": ["a"]})
    assert small.status_code == 200
    replicas = (await gw.get("/health")).json()["upstreams"]["embedding"]["replicas"]
    assert replicas[0]["healthy"] is True  # a large answer is that request's, not a broken replica


async def test_max_answer_bytes_bounds_a_split_request_whole_not_each_part(fakes, fake_rerank, make_gateway):
    """Split across three replicas, each part's answer was checked alone: the same request passed with three
    healthy replicas and failed with one. The parts now share the bound."""
    replicas = [await fakes.start("embed") for _ in range(3)]
    gw = await make_gateway(embed=",".join(r.url for r in replicas), rerank=fake_rerank.url,
                            SPLIT_EMBEDDING_INPUTS="4", MAX_ANSWER_BYTES="64KiB")
    texts = [f"text number {i}" for i in range(12)]  # 12 vectors of 384 floats: ~96 KB, ~32 KB a part
    r = await gw.post("/v1/embeddings", headers=gw.auth(), json={"model": "minilm", "input": texts})
    assert r.status_code == 502 and r.json()["error"]["code"] == "upstream_answer_too_large", r.text
    small = await gw.post("/v1/embeddings", headers=gw.auth(), json={"model": "minilm", "input": texts[:6]})
    assert small.status_code == 200 and len(small.json()["data"]) == 6


async def test_parts_failing_together_leave_no_never_retrieved_error_on_stderr(fakes, fake_rerank, make_gateway,
                                                                              caplog):
    import gc

    replicas = [await fakes.start("embed") for _ in range(3)]
    gw = await make_gateway(embed=",".join(r.url for r in replicas), rerank=fake_rerank.url,
                            SPLIT_EMBEDDING_INPUTS="2", HEALTH_INTERVAL="60")
    for fake in replicas:
        fake.set_mode("error500")
    r = await gw.post("/v1/embeddings", headers=gw.auth(), json={"model": "minilm", "input": [f"t{i}" for i in range(6)]})
    assert r.status_code == 502
    await asyncio.sleep(0.1)
    gc.collect()
    assert not [rec for rec in caplog.records if "never retrieved" in rec.getMessage()]
