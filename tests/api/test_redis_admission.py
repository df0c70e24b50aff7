"""Admission through a real redis-server in one round trip: one ADMIT script per request (rate limit, token
limit and lease together), releases and token charges batched and never waited for by the request,
leases of a crashed worker freed by expiry, the gates' order and what a refusal takes (the same in
this process and in Redis), `limits`' moving-window layout kept."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import threading
import time

import pytest
import redis

from erproxy import redis_admission as ra
from erproxy.admission import MemoryAdmission
from erproxy.errors import ApiError
from erproxy.keys import Identity
from erproxy.token_limits import parse_token_limit
from tests.procs import ROOT, RedisServer

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")

BODY = {"input": "one two three four five six seven eight"}  # the fake counts 10 prompt tokens


@pytest.fixture
def server(tmp_path):
    s = RedisServer(tmp_path).start()
    yield s
    s.stop()


class Relay:
    """A TCP relay in front of Redis whose gateway-to-Redis direction can be held (a Redis out of reach)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.open = asyncio.Event()
        self.open.set()
        self.server: asyncio.AbstractServer | None = None
        self.url = ""

    async def start(self) -> "Relay":
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"redis://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/0"
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, gate: asyncio.Event | None) -> None:
            try:
                while data := await src.read(65536):
                    if gate is not None:
                        await gate.wait()
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, asyncio.CancelledError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pump(reader, up_writer, self.open), pump(up_reader, writer, None))

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()


async def wait_for(check, timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out waiting"
        await asyncio.sleep(0.01)


def token_window(r: redis.Redis) -> dict[bytes, bytes]:
    [key] = [k for k in r.keys("erproxy:tokens:*") if not k.endswith(b":last")]
    return r.hgetall(key)


async def test_each_request_is_one_admission_script_and_the_rest_is_batched(make_gateway, server):
    gw = await make_gateway(REDIS_URL=server.url, RATE_LIMIT="1000/minute", TOKEN_LIMIT="100000/hour")
    r = redis.Redis.from_url(server.url)
    seen: list[dict] = []
    ready = threading.Event()

    def monitor() -> None:
        with r.monitor() as m:
            ready.set()
            while True:
                cmd = m.next_command()
                if "stop-monitor" in cmd["command"]:
                    return
                seen.append(cmd)

    thread = threading.Thread(target=monitor)
    thread.start()
    ready.wait(5)
    await asyncio.sleep(0.1)
    tokens = 0
    for _ in range(6):
        answer = await gw.post("/v1/embeddings", json=BODY, headers=gw.auth())
        assert answer.status_code == 200
        tokens += answer.json()["usage"]["prompt_tokens"]
    for _ in range(3):
        assert (await gw.get("/v1/models", headers=gw.auth())).status_code == 200
    await asyncio.sleep(0.1)  # the last release and charge go out with the next write
    r.echo("stop-monitor")
    thread.join(5)

    client = gw.app.admission.client
    port = client._proto.transport.get_extra_info("sockname")[1]
    ours = [c["command"] for c in seen if str(c.get("client_port")) == str(port)]
    admits = [c for c in ours if c.startswith(f"EVALSHA {ra.ADMIT.sha.decode()}")]
    settles = [c for c in ours if c.startswith(f"EVALSHA {ra.SETTLE.sha.decode()}")]
    releases = [c for c in ours if c.startswith("ZREM")]
    assert len(admits) == 9  # one script per request, POST or GET: the request's only round trip
    assert 1 <= len(settles) <= 6 and len(releases) <= 9  # leases go back on their own or ride on an ADMIT
    others = {c.split()[0] for c in ours} - {"EVALSHA", "ZREM"}
    assert others <= {"SMEMBERS", "PING"}, others  # the revocation poll, nothing per request
    # no other connection touches the limits (the `limits` library's scripts, lease commands of old)
    assert not [c for c in seen if str(c.get("client_port")) != str(port) and c.get("client_type") != "lua"
                and ("LIMITS:" in c["command"] or "erproxy:inflight" in c["command"]
                     or "erproxy:tokens" in c["command"])]
    window = token_window(r)
    assert int(window[b"used"]) == tokens and int(window[b"n"]) == 6 and int(window[b"f"]) == 0
    assert r.zcard("erproxy:inflight") == 0


async def test_the_answer_does_not_wait_for_the_release_or_the_token_charge(make_gateway, fakes, server):
    relay = await Relay(server.port).start()
    slow = await fakes.start("embed", delay=0.6)
    gw = await make_gateway(embed=slow.url, REDIS_URL=relay.url, TOKEN_LIMIT="100000/hour")
    r = redis.Redis.from_url(server.url)
    try:
        started = time.monotonic()
        request = asyncio.create_task(gw.post("/v1/embeddings", json=BODY, headers=gw.auth()))
        await wait_for(lambda: r.zcard("erproxy:inflight") == 1)  # admitted, now at the upstream
        relay.open.clear()  # from now on nothing the gateway sends reaches Redis
        answer = await asyncio.wait_for(request, 5)
        assert answer.status_code == 200
        # the upstream's delay, well short of what waiting for Redis would add (its reply timeout)
        assert time.monotonic() - started < 0.6 + 0.8 * ra.REPLY_TIMEOUT_S
        assert r.zcard("erproxy:inflight") == 1 and int(token_window(r)[b"f"]) == 1  # neither reached Redis
        relay.open.set()
        await wait_for(lambda: r.zcard("erproxy:inflight") == 0 and int(token_window(r)[b"f"]) == 0)
        assert int(token_window(r)[b"used"]) == answer.json()["usage"]["prompt_tokens"]
    finally:
        relay.open.set()
        await relay.stop()


async def test_releases_ride_on_an_admission_of_the_same_turn_or_go_out_at_once(server):
    adm = ra.RedisAdmission(server.url, "1000/minute", 100)
    r = redis.Redis.from_url(server.url)
    await adm.start()
    try:
        who = Identity("k", "er-k", bucket="b1")
        r.config_resetstat()
        passes = await asyncio.gather(*(adm.admit(who) for _ in range(50)))  # one turn: one ADMIT for all
        assert r.zcard("erproxy:inflight") == 50 and adm.in_flight() == 50
        for p in passes:
            adm.finish(p)  # returns at once: nothing awaited
        assert adm.in_flight() == 0
        one = await adm.admit(who)  # the same turn: it carries the 50 releases, removed before it counts
        assert r.zcard("erproxy:inflight") == 1
        stats = r.info("commandstats")
        assert stats["cmdstat_evalsha"]["calls"] == 2 and stats["cmdstat_zrem"]["calls"] == 1  # in the script
        passes = await asyncio.gather(*(adm.admit(who) for _ in range(20)))
        t0 = time.monotonic()
        for p in [one, *passes]:
            adm.finish(p)
        await wait_for(lambda: r.zcard("erproxy:inflight") == 0)  # no admission came: they go on their own
        assert time.monotonic() - t0 < 0.5
        stats = r.info("commandstats")
        assert stats["cmdstat_evalsha"]["calls"] == 3 and stats["cmdstat_zrem"]["calls"] == 2  # all 21 in one
    finally:
        await adm.close()


async def test_admissions_of_one_turn_share_one_script_and_are_decided_in_order(server):
    """Concurrent admissions go out as one ADMIT (at most MAX_BATCH each) and are decided one after the
    other: exactly the limit is admitted, whatever the batching, and each refusal is the first gate's."""
    adm = ra.RedisAdmission(server.url, "10/minute", 6)
    r = redis.Redis.from_url(server.url)
    await adm.start()
    try:
        r.config_resetstat()
        who = Identity("k", "er-k", bucket="b3")
        outcomes = await asyncio.gather(*(adm.admit(who) for _ in range(25)), return_exceptions=True)
        admitted = [o for o in outcomes if not isinstance(o, BaseException)]
        refused = [o.code for o in outcomes if isinstance(o, ApiError)]
        assert len(admitted) == 6 and refused == ["concurrency_limit_exceeded"] * 4 + ["rate_limit_exceeded"] * 15
        assert outcomes[:6] == admitted  # in the order asked
        assert r.zcard("erproxy:inflight") == 6 and r.llen(next(iter(r.keys("LIMITS:*")))) == 10
        assert r.info("commandstats")["cmdstat_evalsha"]["calls"] == 1
        for p in admitted:
            adm.finish(p)
        other = Identity("o", "er-o", bucket="b4")  # another key: its own rate window, the same slots
        passes = await asyncio.gather(*(adm.admit(other, lease=False) for _ in range(10)),
                                      adm.admit(other, lease=False), return_exceptions=True)
        assert [isinstance(p, ApiError) for p in passes] == [False] * 10 + [True]
        assert r.info("commandstats")["cmdstat_evalsha"]["calls"] == 2
        big = ra.RedisAdmission(server.url, "100000/minute", 10000)
        await big.start()
        try:
            many = await asyncio.gather(*(big.admit(Identity(f"k{i % 7}", "er", bucket=f"m{i % 7}"))
                                          for i in range(ra.MAX_BATCH * 2 + 10)))
            assert r.zcard("erproxy:inflight") == len(many) and r.info("commandstats")["cmdstat_evalsha"]["calls"] == 5
            for p in many:
                big.finish(p)
        finally:
            await big.close()
        assert r.zcard("erproxy:inflight") == 0
    finally:
        await adm.close()


async def test_an_error_reply_is_logged_as_what_redis_answered_not_as_an_outage(server, caplog):
    adm = ra.RedisAdmission(server.url, "1000/minute", 5)
    r = redis.Redis.from_url(server.url)
    r.set("erproxy:inflight", "another program's string")  # our lease set's name, the wrong type
    await adm.start()
    try:
        with caplog.at_level("ERROR", logger="erproxy.redis"):
            with pytest.raises(ApiError) as e:
                await adm.admit(Identity("k", "er-k", bucket="b5"))
        assert e.value.status == 503 and e.value.code == "limits_unavailable"  # fail closed, as for an outage
        [line] = [rec.getMessage() for rec in caplog.records if rec.name == "erproxy.redis"]
        assert "answered the admission with an error (WRONGTYPE" in line and "unreachable" not in line
    finally:
        await adm.close()


async def test_a_cancelled_admission_gives_back_what_it_took(server):
    adm = ra.RedisAdmission(server.url, "1000/minute", 5)
    r = redis.Redis.from_url(server.url)
    await adm.start()
    try:
        who = Identity("k", "er-k", bucket="b2")
        limit = parse_token_limit("1000/hour")
        task = asyncio.create_task(adm.admit(who, limit))
        await asyncio.sleep(0)  # the script is queued (and will run)...
        task.cancel()  # ... but its caller is gone before the answer
        await cancelled_took_nothing(task, adm, r)
    finally:
        await adm.close()


async def cancelled_took_nothing(task: asyncio.Task, adm: ra.RedisAdmission, r: redis.Redis) -> None:
    """The cancelled admission `task` left no lease in Redis or in the worker, and no token forecast."""
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0.2)
    assert r.zcard("erproxy:inflight") == 0 and adm.in_flight() == 0
    assert int(token_window(r).get(b"f", 0)) == 0


CRASHER = """
import asyncio, sys
from erproxy import redis_admission as ra
ra.LEASE_TTL_S, ra.RENEW_EVERY_S = 1.0, 0.25

async def main():
    adm = ra.RedisAdmission(sys.argv[1], "1000/minute", 1)
    await adm.start()
    await adm.acquire()
    print("admitted", flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


async def test_a_crashed_workers_lease_expires_and_a_live_ones_is_renewed(server, monkeypatch):
    monkeypatch.setattr(ra, "LEASE_TTL_S", 1.0)
    worker = subprocess.Popen([sys.executable, "-c", CRASHER, server.url], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    adm = ra.RedisAdmission(server.url, "1000/minute", 1)
    try:
        assert worker.stdout is not None and worker.stdout.readline().strip() == "admitted"
        t0 = time.monotonic()
        while time.monotonic() - t0 < 2.5:  # well past the TTL: the live worker renews its lease
            with pytest.raises(ApiError) as e:
                await adm.acquire()
            assert e.value.code == "concurrency_limit_exceeded"
            await asyncio.sleep(0.2)
        worker.kill()  # a crash: no release, no more renewals
        worker.wait()
        killed = time.monotonic()
        while True:
            try:
                slot = await adm.acquire()
                break
            except ApiError as e:
                assert e.code == "concurrency_limit_exceeded"
                assert time.monotonic() - killed < 3, "the dead worker's lease never expired"
                await asyncio.sleep(0.1)
        assert time.monotonic() - killed <= 1.0 + 1.0  # about its TTL after its last renewal
        await adm.release(slot)
    finally:
        worker.kill()
        await adm.close()


@pytest.mark.parametrize("where", ["memory", "redis"])
async def test_gates_in_order_and_a_refusal_takes_only_its_rate_hit(where, server):
    r = redis.Redis.from_url(server.url)
    adm = MemoryAdmission("3/minute", 1) if where == "memory" else ra.RedisAdmission(server.url, "3/minute", 1)
    await adm.start()
    who = Identity("k", "er-k", bucket="b3")
    limit = parse_token_limit("10/hour")

    def in_flight_tokens() -> int:
        if where == "memory":
            return sum(w[2] for w in adm.tokens.windows.values())
        return int(token_window(r).get(b"f", 0))

    try:
        first = await adm.admit(who, limit)
        assert first.ticket is not None and in_flight_tokens() == 1
        with pytest.raises(ApiError) as e:  # the only slot is taken (tokens: 0 of 10 used)
            await adm.admit(who, limit)
        assert e.value.code == "concurrency_limit_exceeded"
        assert in_flight_tokens() == 1  # the refused request left no mark in the token window
        adm.finish(first)
        if where == "memory":
            adm.tokens.settle_now(first.ticket, 10)
        else:
            adm.settle_later(first.ticket, 10, lambda: None)
            await asyncio.sleep(0.05)
        assert in_flight_tokens() == 0
        with pytest.raises(ApiError) as e:  # 10 of 10 tokens used
            await adm.admit(who, limit)
        assert e.value.code == "token_limit_exceeded"
        with pytest.raises(ApiError) as e:  # three hits so far, refused ones included: the rate limit
            await adm.admit(who, limit)
        assert e.value.code == "rate_limit_exceeded" and "3 per 1 minute" in e.value.message
        retry = int(dict(e.value.headers)[b"retry-after"])
        assert 58 <= retry <= 60
        assert adm.in_flight() == 0
        if where == "redis":  # `limits`' own moving-window layout: a list of the hit times, newest first
            [key] = r.keys("LIMITS:LIMITER/b3")
            hits = [float(x) for x in r.lrange(key, 0, -1)]
            assert len(hits) == 3 and hits == sorted(hits, reverse=True) and 0 < r.ttl(key) <= 60
            assert abs(hits[0] - time.time()) < 5
    finally:
        await adm.close()


@pytest.mark.parametrize("where", ["memory", "redis"])
async def test_a_lowered_rate_limit_counts_the_hits_the_key_already_made(where, server):
    """An operator lowers an abusive key's limit (`keys update --rate-limit`): it must not get a fresh
    allowance on top of what it already used in the window."""
    adm = MemoryAdmission("1000/minute", 100) if where == "memory" else ra.RedisAdmission(server.url, "1000/minute", 100)
    await adm.start()
    try:
        for _ in range(20):
            adm.finish(await adm.admit(Identity("k", "er-k", bucket="b20", rate_limit="20/minute")))
        lowered = Identity("k", "er-k", bucket="b20", rate_limit="5/minute")
        with pytest.raises(ApiError) as e:
            await adm.admit(lowered)
        assert e.value.code == "rate_limit_exceeded" and "5 per 1 minute" in e.value.message
        assert 55 <= int(dict(e.value.headers)[b"retry-after"]) <= 60
    finally:
        await adm.close()


async def test_an_admission_cancelled_in_the_turn_its_answer_arrives_gives_back_what_it_took(server):
    """The answer resolves the admission, and in the same loop turn its caller is cancelled (a shutdown
    grace running out, say): the lease and the token forecast must not leak."""
    adm = ra.RedisAdmission(server.url, "1000/minute", 5)
    r = redis.Redis.from_url(server.url)
    await adm.start()
    try:
        who = Identity("k", "er-k", bucket="b3")
        task = asyncio.create_task(adm.admit(who, parse_token_limit("1000/hour")))
        received = adm.client._received

        def answer_then_cancel(*args):
            received(*args)  # the ADMIT reply resolves the admission's future...
            task.cancel()  # ... and its caller is cancelled before it resumes
            adm.client._received = received

        adm.client._received = answer_then_cancel
        await cancelled_took_nothing(task, adm, r)
    finally:
        await adm.close()


async def test_one_keys_error_in_redis_fails_that_key_alone_not_its_batch_or_the_worker(server, caplog):
    adm = ra.RedisAdmission(server.url, "1000/minute", 5)
    r = redis.Redis.from_url(server.url)
    await adm.start()
    try:
        good, bad, other = (Identity(n, f"er-{n}", bucket=n) for n in ("good", "bad", "other"))
        r.hset(f"LIMITS:{adm.limits.key_for(bad)[1]}", "x", "1")  # another program's hash under bad's window
        with caplog.at_level("ERROR", logger="erproxy.redis"):
            answers = await asyncio.gather(adm.admit(good, parse_token_limit("1000/hour")), adm.admit(bad),
                                           return_exceptions=True)  # one turn: one ADMIT for both
        assert isinstance(answers[0], ra.Pass) and answers[0].lease is not None
        assert isinstance(answers[1], ApiError) and answers[1].code == "limits_unavailable"
        assert "WRONGTYPE" in caplog.text and "unreachable" not in caplog.text
        assert isinstance(await adm.admit(other), ra.Pass)  # Redis is not taken for down
        adm.finish(answers[0])
    finally:
        await adm.close()


async def test_a_lease_lost_by_a_redis_restart_is_put_back_by_the_next_renewal(server, monkeypatch):
    """Without persistence (or after a failover) a restart forgets the lease set; the requests still
    running must be counted again, or more than MAX_CONCURRENT_REQUESTS get in."""
    monkeypatch.setattr(ra, "RENEW_EVERY_S", 0.2)
    adm = ra.RedisAdmission(server.url, "1000/minute", 1)
    r = redis.Redis.from_url(server.url)
    await adm.start()
    try:
        slot = await adm.acquire()
        r.delete("erproxy:inflight")  # what a restart without the lease set leaves
        await asyncio.sleep(0.6)  # renewals
        assert r.zcard("erproxy:inflight") == 1
        with pytest.raises(ApiError) as e:
            await adm.acquire()
        assert e.value.code == "concurrency_limit_exceeded"
        await adm.release(slot)
    finally:
        await adm.close()
