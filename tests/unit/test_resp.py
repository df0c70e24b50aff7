"""resp.py, the admission's pipelined Redis client, against a real redis-server: many commands in flight on
one connection matched to their callers in order, one write per turn of the loop, NOSCRIPT, AUTH and
SELECT, a silent server, a restart."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import time

import pytest
import redis

from erproxy.resp import RespClient, RespConnectionError, RespError, Script
from tests.procs import RedisServer, free_port

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")


@pytest.fixture
def server(tmp_path):
    s = RedisServer(tmp_path).start()
    yield s
    s.stop()


async def test_many_commands_in_flight_each_get_their_own_reply_in_one_write(server):
    client = RespClient(server.url)
    try:
        assert await client.call(b"PING") == b"PONG"  # connected
        writes = []
        transport = client._proto.transport
        real_write = transport.write
        transport.write = lambda data: (writes.append(data), real_write(data))[1]
        futures = [client.call(b"ECHO", f"reply {i}") for i in range(500)]
        replies = await asyncio.gather(*futures)
        assert replies == [f"reply {i}".encode() for i in range(500)]
        assert len(writes) == 1  # the 500 commands of one turn of the loop left in one write
        with pytest.raises(RespError, match="WRONGTYPE|ERR"):  # an error reply goes to its own caller only
            await asyncio.gather(client.call(b"SET", "k", "v"), client.call(b"LPUSH", "k", "x"))
        assert await client.call(b"GET", "k") == b"v"
    finally:
        await client.close()


async def test_scripts_are_loaded_on_connect_and_sent_again_after_noscript(server):
    script = Script("return {tonumber(ARGV[1]) + 1, KEYS[1]}")
    client = RespClient(server.url)
    client.register(script)
    try:
        assert await client.call_script(script, ["a-key"], [41]) == [42, b"a-key"]
        r = redis.Redis.from_url(server.url)
        assert r.script_exists(script.sha.decode()) == [True]
        r.script_flush()  # the server forgets it (as after a restart): NOSCRIPT, then EVAL
        assert await asyncio.gather(*(client.call_script(script, ["k"], [i]) for i in range(3))) == \
            [[1, b"k"], [2, b"k"], [3, b"k"]]
    finally:
        await client.close()


def wait_for_port(port: int, timeout: float = 10.0) -> None:
    """Until a server listens on the loopback port."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            assert time.monotonic() < deadline
            time.sleep(0.05)


async def test_password_and_database_from_the_url(tmp_path):
    port = free_port()
    p = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                          "--requirepass", "s3cret", "--dir", str(tmp_path)], stdout=subprocess.DEVNULL)
    try:
        wait_for_port(port)
        good = RespClient(f"redis://:s3cret@127.0.0.1:{port}/3")
        assert await good.call(b"SET", "where", "db3") == b"OK"
        await good.close()
        assert redis.Redis(port=port, password="s3cret", db=3).get("where") == b"db3"
        bad = RespClient(f"redis://:wrong@127.0.0.1:{port}/0")
        with pytest.raises(RespConnectionError, match="WRONGPASS|invalid"):
            await bad.call(b"PING")
        await bad.close()
    finally:
        p.kill()
        p.wait()


async def test_a_server_that_never_answers_fails_the_commands_after_the_timeout_then_reconnects():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)  # accepts, never answers
    port = listener.getsockname()[1]
    client = RespClient(f"redis://127.0.0.1:{port}/0", timeout=0.3)
    try:
        t0 = time.monotonic()
        results = await asyncio.gather(*(client.call(b"PING") for _ in range(5)), return_exceptions=True)
        took = time.monotonic() - t0
        assert all(isinstance(r, RespConnectionError) for r in results), results
        assert 0.3 <= took < 1.0
        assert not client.connected
        with pytest.raises(RespConnectionError):  # the next command connects again (and times out again)
            await client.call(b"PING")
    finally:
        await client.close()
        listener.close()


async def test_a_restarted_server_is_reached_again(server):
    client = RespClient(server.url)
    try:
        assert await client.call(b"PING") == b"PONG"
        server.stop()
        with pytest.raises(RespConnectionError):
            await client.call(b"PING")
        with pytest.raises(RespConnectionError):  # refused at once while it is down
            await client.call(b"PING")
        server.start()
        assert await client.call(b"PING") == b"PONG"
    finally:
        await client.close()


async def test_a_closed_client_refuses_at_once(server):
    client = RespClient(server.url)
    assert await client.call(b"PING") == b"PONG"
    await client.close()
    with pytest.raises(RespConnectionError):
        await client.call(b"PING")


def _ca_signed(tmp, name: str, ca: tuple | None = None) -> tuple:
    """A key and certificate for 127.0.0.1, signed by `ca` (its cert and key), else self-signed (a CA)."""
    key, cert = tmp / f"{name}.key", tmp / f"{name}.crt"
    run = lambda *args: subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)  # noqa: E731
    if ca is None:
        run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", f"/CN={name}",
            "-keyout", str(key), "-out", str(cert))
    else:
        csr = tmp / f"{name}.csr"
        ext = tmp / f"{name}.ext"
        ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
        run("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", str(key), "-out", str(csr))
        run("x509", "-req", "-in", str(csr), "-CA", str(ca[0]), "-CAkey", str(ca[1]), "-CAcreateserial",
            "-days", "1", "-extfile", str(ext), "-out", str(cert))
    return cert, key


async def test_rediss_urls_verify_and_present_certificates_as_redis_py_does(tmp_path):
    ca = _ca_signed(tmp_path, "ca")
    srv = _ca_signed(tmp_path, "server", ca)
    cli = _ca_signed(tmp_path, "client", ca)
    other_ca = _ca_signed(tmp_path, "other-ca")
    port = free_port()
    p = subprocess.Popen(["redis-server", "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
                          "--save", "", "--dir", str(tmp_path), "--tls-cert-file", str(srv[0]),
                          "--tls-key-file", str(srv[1]), "--tls-ca-cert-file", str(ca[0]),
                          "--tls-auth-clients", "yes"], stdout=subprocess.DEVNULL)
    base = f"rediss://127.0.0.1:{port}/0"
    mtls = f"{base}?ssl_ca_certs={ca[0]}&ssl_certfile={cli[0]}&ssl_keyfile={cli[1]}"
    try:
        wait_for_port(port)
        assert redis.Redis.from_url(mtls).ping()  # what the gateway's redis-py clients do with the URL
        good = RespClient(mtls)
        assert await good.call(b"PING") == b"PONG"  # the client certificate is presented
        await good.close()
        # `optional` still verifies the server, as with redis-py: a server certificate from a CA the URL does
        # not trust is refused, and the password never goes over that connection
        untrusted = RespClient(f"{base}?ssl_ca_certs={other_ca[0]}&ssl_certfile={cli[0]}&ssl_keyfile={cli[1]}"
                               "&ssl_cert_reqs=optional")
        with pytest.raises(RespConnectionError, match="CERTIFICATE_VERIFY_FAILED"):
            await untrusted.call(b"PING")
        await untrusted.close()
    finally:
        p.kill()
        p.wait()


async def test_a_command_queued_by_a_failure_callback_starts_a_new_attempt_and_is_answered(tmp_path):
    port = free_port()  # nothing listens there yet
    client = RespClient(f"redis://127.0.0.1:{port}/0", timeout=1.0, connect_timeout=0.5)
    retries: list[asyncio.Future] = []

    def on_reply(reply):
        if isinstance(reply, BaseException) and not retries:
            retries.append(client.call(b"PING"))  # a caller that tries once more when its command fails

    client.send(b"SET", "a", "1", on_reply=on_reply)
    while not retries:
        await asyncio.sleep(0.01)
    p = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                          "--dir", str(tmp_path)], stdout=subprocess.DEVNULL)
    try:
        # the retry is either answered (Redis came up in time) or fails: it never waits forever
        try:
            reply = await asyncio.wait_for(retries[0], 5)
            assert reply == b"PONG"
        except RespConnectionError:
            pass
    finally:
        await client.close()
        p.kill()
        p.wait()
