"""Issue 14's parts on their own: the failed-authentication throttle, the client address behind
proxies, a key store whose file goes missing or bad, the bounded read before a closing answer ends."""

from __future__ import annotations

import asyncio
import time

import pytest

from erproxy import asgi
from erproxy.asgi import Request, Response, finish_closing, start_closing
from erproxy.auth_throttle import AuthThrottle, TrustedProxies, failure_reason, make_auth_throttle
from erproxy.errors import unauthorized
from erproxy.keys import KeyStore, ensure_key_file
from erproxy.settings import Settings, SettingsError


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def request(client: str = "10.0.0.1", headers: list[tuple[bytes, bytes]] | None = None) -> Request:
    return Request({"type": "http", "path": "/v1/models", "method": "GET", "client": (client, 5555),
                    "headers": headers or [], "query_string": b""}, None)  # type: ignore[arg-type]


async def test_an_address_is_blocked_after_the_limit_until_its_window_ends():
    clock = Clock()
    t = AuthThrottle(3, 60, clock=clock)
    assert not t.blocked  # the common path only tests this
    assert [await t.failed("10.0.0.1") for _ in range(2)] == [(1, 60.0), (2, 60.0)]
    t.check(request())  # not yet
    clock.now += 10
    assert await t.failed("10.0.0.1") == (3, 50.0)
    with pytest.raises(Exception) as e:
        t.check(request())
    assert e.value.status == 429 and e.value.code == "too_many_auth_failures"
    assert (b"retry-after", b"50") in e.value.headers
    t.check(request("10.0.0.2"))  # other addresses are not touched
    clock.now += 50
    t.check(request())  # the window has passed
    assert await t.failed("10.0.0.1") == (1, 60.0)  # and a new one starts at the next failure


async def test_failures_of_many_addresses_are_forgotten_when_their_window_ends():
    clock = Clock()
    t = AuthThrottle(2, 5, clock=clock)
    for i in range(1000):
        await t.failed(f"10.1.{i // 256}.{i % 256}")
    clock.now += 31  # past the window and the sweep interval
    await t.failed("10.9.9.9")
    assert len(t._failures) == 1


async def test_an_ipv6_guesser_is_counted_with_its_whole_64_not_address_by_address():
    clock = Clock()
    t = AuthThrottle(3, 60, clock=clock)
    for host in ("1", "2", "3"):  # three addresses of one /64: one guesser
        await t.failed(f"2001:db8:1:2::{host}")
    with pytest.raises(Exception) as e:
        t.check(request("2001:db8:1:2:ffff:ffff:ffff:fffe"))  # a fresh address of that /64 is still blocked
    assert e.value.code == "too_many_auth_failures"
    t.check(request("2001:db8:1:3::1"))  # the next /64 is someone else
    t.check(request("10.0.0.1"))


async def test_ipv6_prefix_128_counts_every_address_alone():
    t = AuthThrottle(2, 60, clock=Clock(), ipv6_prefix=128)
    for host in ("1", "2"):
        await t.failed(f"2001:db8:1:2::{host}")
    t.check(request("2001:db8:1:2::3"))
    await t.failed("2001:db8:1:2::1")
    with pytest.raises(Exception):
        t.check(request("2001:db8:1:2::1"))


async def test_ipv4_clients_of_a_dual_stack_socket_are_counted_as_their_ipv4_address():
    """HOST=:: shows IPv4 clients as ::ffff:a.b.c.d: each is its own IPv4 address, not one shared /64."""
    t = AuthThrottle(2, 60, clock=Clock())
    for _ in range(2):
        await t.failed(t.client(request("::ffff:192.0.2.1")))
    with pytest.raises(Exception):
        t.check(request("::ffff:192.0.2.1"))
    with pytest.raises(Exception):
        t.check(request("192.0.2.1"))  # the same client
    t.check(request("::ffff:192.0.2.2"))  # another IPv4 client is not touched
    assert t.client(request("::ffff:192.0.2.1")) == "192.0.2.1"


def test_a_trusted_ipv4_proxy_is_recognised_on_a_dual_stack_socket():
    trusted = TrustedProxies(("192.168.0.0/16",))
    headers = [(b"x-forwarded-for", b"203.0.113.7")]
    assert trusted.client(request("::ffff:192.168.1.5", headers)) == "203.0.113.7"


def test_a_zero_limit_turns_the_throttle_off():
    assert make_auth_throttle(0, 60, ()) is None
    assert isinstance(make_auth_throttle(10, 60, ()), AuthThrottle)


@pytest.mark.parametrize("peer,xff,client", [
    ("10.0.0.9", None, "10.0.0.9"),  # no proxy: the connecting address
    ("10.0.0.9", b"203.0.113.7", "10.0.0.9"),  # untrusted: its header is ignored
    ("127.0.0.4", b"203.0.113.7", "203.0.113.7"),
    ("127.0.0.4", b"198.51.100.1, 203.0.113.7", "203.0.113.7"),  # the rightmost hop the proxy saw
    ("127.0.0.4", b"203.0.113.7, 192.168.1.5", "203.0.113.7"),  # a trusted inner proxy is skipped
    ("127.0.0.4", b"203.0.113.7, not-an-ip", "127.0.0.4"),  # a garbled hop: believe nothing
    ("127.0.0.4", None, "127.0.0.4"),
    ("::1", b"2001:db8::1", "2001:db8::1"),
    # proxies that write the client's port (Azure Application Gateway among them), bracketed IPv6
    ("127.0.0.4", b"203.0.113.7:50123", "203.0.113.7"),
    ("127.0.0.4", b"[2001:db8::7]:443", "2001:db8::7"),
    ("127.0.0.4", b"[2001:db8::7]", "2001:db8::7"),
    ("127.0.0.4", b"203.0.113.7:https", "127.0.0.4"),  # not a port: garbled
    ("127.0.0.4", b"[2001:db8::7]x", "127.0.0.4"),
    ("127.0.0.4", b"::ffff:192.168.1.1", "192.168.1.1"),  # every hop trusted: the first, made plain
    ("fe80::1%eth0", b"203.0.113.7", "203.0.113.7"),  # a link-local proxy arrives with its zone
])
def test_x_forwarded_for_is_believed_only_from_trusted_proxies(peer, xff, client):
    trusted = TrustedProxies(("127.0.0.4", "192.168.0.0/16", "::1", "fe80::1"))
    headers = [(b"x-forwarded-for", xff)] if xff else []
    assert trusted.client(request(peer, headers)) == client


def test_a_proxy_that_adds_ports_does_not_make_its_clients_one_address():
    """Behind a trusted proxy writing `ip:port`, one guesser blocks itself, not everyone behind the proxy."""
    t = AuthThrottle(3, 60, TrustedProxies(("10.0.0.1",)), clock=Clock())

    def via_proxy(client: str) -> Request:
        return request("10.0.0.1", [(b"x-forwarded-for", client.encode())])

    async def guess() -> None:
        for _ in range(3):
            await t.failed(t.client(via_proxy("203.0.113.7:50123")))

    asyncio.run(guess())
    with pytest.raises(Exception):
        t.check(via_proxy("203.0.113.7:50999"))
    t.check(via_proxy("198.51.100.9:40000"))  # someone else behind the same proxy


def test_trusted_proxies_written_as_ipv4_mapped_match_the_ipv4_peer():
    trusted = TrustedProxies(("::ffff:10.0.0.1", "::ffff:192.168.0.0/112"))
    headers = [(b"x-forwarded-for", b"203.0.113.7")]
    assert trusted.client(request("10.0.0.1", headers)) == "203.0.113.7"
    assert trusted.client(request("192.168.3.4", headers)) == "203.0.113.7"
    assert trusted.client(request("10.0.0.2", headers)) == "10.0.0.2"


async def test_a_flood_of_addresses_makes_room_a_tenth_at_a_time(monkeypatch):
    """At MAX_TRACKED addresses the oldest tenth is forgotten at once: a flood of new addresses does not
    make every further failure walk the whole table."""
    from erproxy import auth_throttle

    monkeypatch.setattr(auth_throttle, "MAX_TRACKED", 100)
    clock = Clock()
    t = AuthThrottle(5, 60, clock=clock)
    made_room = []
    make_room = t._make_room
    monkeypatch.setattr(t, "_make_room", lambda now: (made_room.append(now), make_room(now)))
    for i in range(100):
        await t.failed(f"10.2.0.{i}")
    assert len(t._failures) == 100 and made_room == []
    await t.failed("10.3.0.0")
    assert len(t._failures) == 91 and "10.2.0.0" not in t._failures and "10.2.0.10" in t._failures
    for i in range(1, 10):
        await t.failed(f"10.3.0.{i}")
    assert len(made_room) == 1  # the next nine fit without another walk
    await t.failed("10.2.0.50")  # a known address counts on, whatever the table's size
    assert t._failures["10.2.0.50"][0] == 2


async def test_a_restarted_window_goes_last_so_ended_ones_are_forgotten_from_the_front():
    clock = Clock()
    t = AuthThrottle(5, 5, clock=clock)
    await t.failed("10.0.0.1")  # its window ends at 1005
    clock.now += 3
    await t.failed("10.0.0.2")  # ends at 1008
    clock.now += 3
    await t.failed("10.0.0.1")  # its window had ended: a new one, ending at 1011
    clock.now += 3
    t._sweep(clock.now)  # 1009: 10.0.0.2's window has ended, 10.0.0.1's new one has not
    assert set(t._failures) == {"10.0.0.1"}


def test_failure_reasons_never_name_the_key():
    assert failure_reason(unauthorized("Missing API key.", code="missing_api_key")) == "missing"
    assert failure_reason(unauthorized("Invalid API key.")) == "invalid"
    assert failure_reason(unauthorized("API key er-abc… has been revoked. Ask...")) == "revoked"
    assert failure_reason(unauthorized("API key er-abc… expired at 2001-01-01. Ask...")) == "expired"
    assert failure_reason(unauthorized("GET /metrics needs", code="invalid_metrics_token")) == "metrics_token"


def test_throttle_settings_are_checked():
    s = Settings(trusted_proxies="10.0.0.1, 192.168.0.0/16")
    assert s.trusted_proxies == ("10.0.0.1/32", "192.168.0.0/16") and s.auth_failure_limit == 10
    with pytest.raises(SettingsError, match="TRUSTED_PROXIES"):
        Settings(trusted_proxies="proxy.example")
    with pytest.raises(SettingsError, match="AUTH_FAILURE_LIMIT"):
        Settings(auth_failure_limit="-1")
    with pytest.raises(SettingsError, match="AUTH_FAILURE_WINDOW"):
        Settings(auth_failure_window="0")
    assert s.auth_failure_ipv6_prefix == 64 and Settings(auth_failure_ipv6_prefix="128").auth_failure_ipv6_prefix == 128
    with pytest.raises(SettingsError, match="AUTH_FAILURE_IPV6_PREFIX"):
        Settings(auth_failure_ipv6_prefix="129")


def test_key_store_keeps_the_last_good_keys_when_the_file_goes_missing_or_bad(tmp_path):
    path = tmp_path / "k.json"
    key = ensure_key_file(path)
    store = KeyStore(path)
    store.load()
    loaded = store.last_good_load
    assert store.status() == {"file": str(path), "last_good_load": store.last_good_load_iso, "error": None}
    good = path.read_bytes()

    path.unlink()
    assert store.reload_if_changed() is False
    assert "missing" in store.error and store.authenticate(key).name == "default"
    assert store.reload_if_changed() is False  # unchanged: nothing read again
    path.write_text("garbage")
    assert store.reload_if_changed() is False
    assert "not valid JSON" in store.error and store.authenticate(key).name == "default"
    assert store.last_good_load == loaded

    path.write_bytes(good)
    assert store.reload_if_changed() is True
    assert store.error is None and store.last_good_load >= loaded


def test_a_missing_key_file_at_load_is_reported(tmp_path):
    store = KeyStore(tmp_path / "none.json")
    store.load()
    assert "missing" in store.error and store.last_good_load is None and store.size == 0


class Conn:
    """A client that keeps sending `chunk` (or nothing, when None) after the answer."""

    def __init__(self, chunk: bytes | None) -> None:
        self.chunk = chunk
        self.read = 0
        self.sent: list[dict] = []

    async def receive(self) -> dict:
        if self.chunk is None:
            await asyncio.sleep(3600)
        await asyncio.sleep(0)
        self.read += len(self.chunk)
        return {"type": "http.request", "body": self.chunk, "more_body": True}

    async def send(self, message: dict) -> None:
        self.sent.append(message)


@pytest.mark.parametrize("chunk", [b"x" * 65536, None])
async def test_a_closing_answer_reads_on_for_a_bounded_time_and_size(chunk):
    conn = Conn(chunk)
    req = request()
    req.receive = conn.receive
    response = Response(413, b'{"error": {}}', [(b"connection", b"close")])
    t0 = time.monotonic()
    await start_closing(req, response, conn.send)
    await finish_closing(req, conn.send)
    took = time.monotonic() - t0
    start, body, end = conn.sent
    assert (b"content-length", b"13") in start["headers"] and body["more_body"] is True
    assert end == {"type": "http.response.body", "body": b"", "more_body": False}
    assert took < asgi.LINGER_S + 0.2
    assert conn.read <= asgi.LINGER_BYTES + len(chunk or b"")


async def test_a_complete_body_is_not_waited_for():
    conn = Conn(None)
    req = request()
    req.receive = conn.receive
    req.body_complete = True
    t0 = time.monotonic()
    await start_closing(req, Response(413, b"{}"), conn.send)
    await finish_closing(req, conn.send)
    assert time.monotonic() - t0 < 0.1


class DownRedis:
    """A redis client whose every script call fails as if Redis were unreachable."""

    def register_script(self, _source: str):
        async def call(**_kw):
            raise ConnectionError("Redis is down")
        return call


async def test_redis_throttle_counts_in_process_while_redis_is_down():
    from erproxy.auth_throttle import RedisAuthThrottle

    t = RedisAuthThrottle(DownRedis(), 2, 60)
    await t.start()
    try:
        assert [(await t.failed("10.0.0.1"))[0] for _ in range(2)] == [1, 2]
        with pytest.raises(Exception) as e:
            t.check(request())
        assert e.value.code == "too_many_auth_failures"
    finally:
        await t.close()
