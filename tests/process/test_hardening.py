"""Faults injected into a running gateway process (issue 14): a lost or garbled key file, uploads
that must not hold the socket after 413/408, guessing keys, and where the first key goes."""

from __future__ import annotations

import json
import os
import re
import socket
import stat
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.procs import ROOT, RedisServer, gateway_env, spawn, wait_http

KEY_RE = re.compile(r"er-[A-Za-z0-9_-]{40,}")


def client_from(address: str, **kw) -> httpx.Client:
    """A client whose connections leave from `address` (127.0.0.2, 127.0.0.3 ... all route to lo)."""
    return httpx.Client(transport=httpx.HTTPTransport(local_address=address), timeout=10, **kw)


def models(client: httpx.Client, gw, key: str, **headers: str) -> httpx.Response:
    return client.get(gw.url + "/v1/models", headers={"Authorization": f"Bearer {key}", **headers})


def wait_for(check, timeout: float = 5.0, every: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(every)
    raise AssertionError(f"not within {timeout} s")


def log_lines(gw, level: str, text: str) -> list[str]:
    return [ln for ln in gw.log_file().read_text().splitlines() if f" {level} " in ln and text in ln]


def metric(gw, name: str) -> float | None:
    m = re.search(rf"^{re.escape(name)} (\S+)$", httpx.get(gw.url + "/metrics").text, re.M)
    return float(m.group(1)) if m else None


# ---- the key file ---------------------------------------------------------------------------------
def test_key_file_deleted_garbled_and_restored_keeps_the_last_good_keys(make_gateway):
    gw = make_gateway()
    path = Path(gw.env["API_KEYS_FILE"])
    good = path.read_bytes()
    health = httpx.get(gw.url + "/health").json()["keys"]
    assert health["file"] == str(path) and health["error"] is None and health["last_good_load"].endswith("Z")
    assert metric(gw, "erproxy_key_file_ok") == 1.0

    path.unlink()  # a slip with rm
    wait_for(lambda: httpx.get(gw.url + "/health").json()["keys"]["error"])
    time.sleep(1.6)  # three more checks of the file: still one log line
    keys = httpx.get(gw.url + "/health").json()["keys"]
    assert "missing" in keys["error"] and str(path) in keys["error"]
    assert keys["last_good_load"] == health["last_good_load"]
    assert models(httpx, gw, gw.key).status_code == 200  # the keys it had keep working
    errors = log_lines(gw, "ERROR", str(path))
    assert len(errors) == 1 and "missing" in errors[0] and "still serving the 1 keys" in errors[0]
    assert metric(gw, "erproxy_key_file_ok") == 0.0

    path.write_text("this is not JSON")  # a botched deploy
    wait_for(lambda: "not valid JSON" in (httpx.get(gw.url + "/health").json()["keys"]["error"] or ""))
    time.sleep(1.6)
    assert models(httpx, gw, gw.key).status_code == 200
    assert path.read_text() == "this is not JSON"  # never overwritten
    errors = log_lines(gw, "ERROR", str(path))
    assert len(errors) == 2 and "not valid JSON" in errors[1]

    tmp = path.with_name("restore.tmp")
    tmp.write_bytes(good)
    os.replace(tmp, path)  # the backup is back
    wait_for(lambda: httpx.get(gw.url + "/health").json()["keys"]["error"] is None)
    assert models(httpx, gw, gw.key).status_code == 200
    assert len(log_lines(gw, "INFO", f"key file {path} is good again: 1 keys loaded")) == 1
    assert metric(gw, "erproxy_key_file_ok") == 1.0
    assert gw.key not in gw.log_file().read_text()


# ---- 413 and 408 end the connection ----------------------------------------------------------------
def upload(port: int, head: bytes, chunk: bytes, seconds: float = 5.0) -> dict:
    """Send `head`, then `chunk` over and over while reading: when the answer came, when the connection ended."""
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(head)
    s.setblocking(False)
    answer, sent, t0 = bytearray(), 0, time.monotonic()
    out: dict = {"answered": None, "closed": None}
    try:
        while time.monotonic() - t0 < seconds and out["closed"] is None:
            try:
                sent += s.send(chunk)
            except BlockingIOError:
                pass
            except OSError:  # reset or broken pipe: the gateway closed the connection
                out["closed"] = time.monotonic()
            try:
                data = s.recv(65536)
            except BlockingIOError:
                time.sleep(0.0005)
                continue
            except OSError:
                out["closed"] = time.monotonic()
                continue
            if not data:
                out["closed"] = time.monotonic()
            elif out["answered"] is None:
                answer += data
                if b"\r\n\r\n" in answer:
                    out["answered"] = time.monotonic()
            else:
                answer += data
    finally:
        s.close()
    out.update(answer=bytes(answer), sent=sent)
    return out


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_413_closes_the_connection_within_a_second_of_a_50_mib_upload(make_gateway, framing):
    gw = make_gateway(MAX_BODY_BYTES="1MiB")
    total = 50 * 1024 * 1024
    head = b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + gw.key.encode() + b"\r\n"
    if framing == "chunked":
        head += b"Transfer-Encoding: chunked\r\n\r\n"
        chunk = b"10000\r\n" + b"x" * 0x10000 + b"\r\n"
    else:
        head += b"Content-Length: %d\r\n\r\n" % total
        chunk = b"x" * 0x10000
    r = upload(int(gw.env["PORT"]), head, chunk)
    assert r["answer"].startswith(b"HTTP/1.1 413 ") and b"request_too_large" in r["answer"]
    assert b"\r\nconnection: close\r\n" in r["answer"].lower()
    assert r["answered"] is not None and r["closed"] is not None
    closed_after = r["closed"] - r["answered"]
    print(f"413 ({framing}): connection closed {closed_after * 1000:.0f} ms after the answer, "
          f"{r['sent'] / 2**20:.1f} MiB sent")
    assert closed_after < 1.0
    assert r["sent"] < total  # the gateway stopped reading long before the 50 MiB


@pytest.mark.parametrize("request_line, auth", [
    pytest.param(b"POST /nope", False, id="404 unknown path"),
    pytest.param(b"POST /v1/embeddings", False, id="401 no key"),
    pytest.param(b"POST /v1/models", True, id="405 wrong method"),
    pytest.param(b"GET /health", False, id="200 public route with a body"),
])
def test_an_answer_sent_before_the_body_is_read_ends_the_connection_instead_of_reading_any_upload(
        make_gateway, request_line, auth):
    """Left to uvicorn, the rest of a declared 1 PB body was read and dropped at full speed, with no
    MAX_BODY_BYTES and no BODY_TIMEOUT: gigabytes a second from one anonymous connection."""
    gw = make_gateway()
    total = 10**15
    head = request_line + b" HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n" % total
    if auth:
        head += b"Authorization: Bearer " + gw.key.encode() + b"\r\n"
    r = upload(int(gw.env["PORT"]), head + b"\r\n", b"x" * 0x10000, seconds=4.0)
    assert r["answer"].startswith(b"HTTP/1.1 "), r["answer"][:200]
    assert b"\r\nconnection: close\r\n" in r["answer"].lower()
    assert r["answered"] is not None and r["closed"] is not None
    assert r["closed"] - r["answered"] < 1.0
    assert r["sent"] < 256 * 2**20, f"{r['sent'] / 2**20:.0f} MiB read after the answer"


def test_answers_have_a_content_length_and_head_is_served_where_get_is(make_gateway):
    gw = make_gateway()
    s = socket.create_connection(("127.0.0.1", int(gw.env["PORT"])))
    s.sendall(b"GET /health HTTP/1.0\r\n\r\n")  # an HTTP/1.0 client cannot read chunked framing
    s.settimeout(10)
    answer = b""
    while chunk := s.recv(65536):
        answer += chunk
    s.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    headers = dict(line.split(b": ", 1) for line in head.lower().split(b"\r\n")[1:])
    assert b"transfer-encoding" not in headers and int(headers[b"content-length"]) == len(body)
    assert httpx.get(gw.url + "/health").json()["status"] == "ok"
    head_answer = httpx.head(gw.url + "/health")  # monitors that probe with HEAD
    assert head_answer.status_code == 200 and head_answer.content == b""
    assert httpx.head(gw.url + "/v1/models", headers=gw.auth()).status_code == 200


def test_408_closes_the_connection_and_a_late_byte_does_not_keep_it(make_gateway):
    gw = make_gateway(BODY_TIMEOUT="1", KEEP_ALIVE="60")
    s = socket.create_connection(("127.0.0.1", int(gw.env["PORT"])))
    s.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + gw.key.encode() +
              b"\r\nContent-Length: 100\r\n\r\n{\"inp")  # and then nothing
    s.settimeout(10)
    answer = s.recv(65536)
    answered = time.monotonic()
    assert answer.startswith(b"HTTP/1.1 408 ") and b"connection: close" in answer.lower()
    s.sendall(b"u")  # one more byte used to cancel the keep-alive timer for good
    rest = b""
    try:
        while chunk := s.recv(65536):
            rest += chunk
    except ConnectionResetError:
        pass
    closed_after = time.monotonic() - answered
    s.close()
    print(f"408: connection closed {closed_after * 1000:.0f} ms after the answer")
    assert closed_after < 1.0 and b"HTTP/1.1" not in rest


def test_httpx_sees_the_413_of_a_large_upload(make_gateway):
    gw = make_gateway(MAX_BODY_BYTES="1MiB")
    r = httpx.post(gw.url + "/v1/embeddings", headers=gw.auth(), content=b"x" * (8 * 1024 * 1024), timeout=10)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert httpx.post(gw.url + "/v1/embeddings", headers=gw.auth(), json={"input": "x"}).status_code == 200


# ---- failed authentication is throttled per address ------------------------------------------------
def test_wrong_keys_from_one_address_get_429_while_other_addresses_are_served(make_gateway):
    gw = make_gateway(AUTH_FAILURE_LIMIT="5", AUTH_FAILURE_WINDOW="60")
    wrong = "er-" + "x" * 43
    with client_from("127.0.0.2") as guesser, client_from("127.0.0.3") as other:
        t0 = time.monotonic()
        codes = [models(guesser, gw, wrong).status_code for _ in range(6)]
        assert codes == [401] * 5 + [429]
        r = models(guesser, gw, wrong)
        assert r.status_code == 429 and r.json()["error"]["code"] == "too_many_auth_failures"
        assert 50 <= int(r.headers["retry-after"]) <= 60
        assert models(guesser, gw, gw.key).status_code == 429  # a valid key too: no oracle for guesses
        assert guesser.get(gw.url + "/health").status_code == 200  # health checks stay open
        ok = models(other, gw, gw.key)
        assert ok.status_code == 200
        assert models(other, gw, wrong).status_code == 401  # another address has its own count
        guesses = sum(models(guesser, gw, wrong).status_code == 401 for _ in range(200))
        print(f"200 more guesses from a blocked address: {guesses} reached a key check, "
              f"{(time.monotonic() - t0) * 1000:.0f} ms in all")
        assert guesses == 0
    log = gw.log_text(until="client=127.0.0.2 auth=invalid auth_failures=5/5")
    assert wrong not in log and gw.key not in log
    assert "client=127.0.0.2 auth=invalid auth_failures=5/5" in log
    assert "auth_failures=6/5" not in log and "status=429 latency_ms=" in log and "client=127.0.0.2 auth=blocked" in log
    text = httpx.get(gw.url + "/metrics").text
    assert 'erproxy_auth_failures_total{reason="invalid"} 6.0' in text  # 5 from the guesser, 1 from the other
    assert re.search(r"^erproxy_auth_throttled_total 203\.0$", text, re.M)


def test_the_block_ends_with_the_window_and_missing_keys_are_not_guesses(make_gateway):
    gw = make_gateway(AUTH_FAILURE_LIMIT="2", AUTH_FAILURE_WINDOW="1.5")
    with client_from("127.0.0.2") as c:
        assert [c.get(gw.url + "/v1/models").status_code for _ in range(4)] == [401] * 4  # no key: not counted
        assert [models(c, gw, "wrong").status_code for _ in range(3)] == [401, 401, 429]
        time.sleep(1.6)
        assert models(c, gw, gw.key).status_code == 200


def test_x_forwarded_for_counts_only_behind_a_trusted_proxy(make_gateway):
    gw = make_gateway(AUTH_FAILURE_LIMIT="3", TRUSTED_PROXIES="127.0.0.4")
    with client_from("127.0.0.4") as proxy, client_from("127.0.0.5") as untrusted:
        for _ in range(3):
            assert models(proxy, gw, "wrong", **{"X-Forwarded-For": "203.0.113.7"}).status_code == 401
        assert models(proxy, gw, gw.key, **{"X-Forwarded-For": "203.0.113.7"}).status_code == 429
        assert models(proxy, gw, gw.key, **{"X-Forwarded-For": "198.51.100.1, 203.0.113.8"}).status_code == 200
        assert models(proxy, gw, gw.key).status_code == 200  # the proxy itself is not blocked
        # from an untrusted address the header is the client's own claim: ignored
        assert models(untrusted, gw, gw.key, **{"X-Forwarded-For": "203.0.113.7"}).status_code == 200
        for _ in range(3):
            models(untrusted, gw, "wrong", **{"X-Forwarded-For": f"192.0.2.{_}"})
        assert models(untrusted, gw, gw.key).status_code == 429
    assert "client=203.0.113.7 auth=invalid auth_failures=3/3" in gw.log_text(until="auth_failures=3/3")


def test_ipv6_guessers_are_counted_per_64_across_gateways_sharing_redis(make_gateway, tmp_path):
    """IPv6 clients (named by a trusted proxy here: loopback has one IPv6 address) count per /64, in Redis."""
    redis = RedisServer(tmp_path).start()
    try:
        common = dict(REDIS_URL=redis.url, AUTH_FAILURE_LIMIT="3", TRUSTED_PROXIES="127.0.0.4")
        a, b = make_gateway(**common), make_gateway(**common)
        with client_from("127.0.0.4") as proxy:
            for host, gw in (("1", a), ("2", b), ("3", a)):  # one /64, three addresses, two gateways
                assert models(proxy, gw, "wrong", **{"X-Forwarded-For": f"2001:db8:7:1::{host}"}).status_code == 401
            assert models(proxy, a, a.key, **{"X-Forwarded-For": "2001:db8:7:1::99"}).status_code == 429
            assert wait_for(lambda: models(proxy, b, b.key,
                                           **{"X-Forwarded-For": "2001:db8:7:1::98"}).status_code == 429)
            assert models(proxy, a, a.key, **{"X-Forwarded-For": "2001:db8:7:2::1"}).status_code == 200
        assert ("client=2001:db8:7:1::3 counted_as=2001:db8:7:1::/64 auth=invalid auth_failures=3/3"
                in a.log_text(until="auth_failures=3/3"))
    finally:
        redis.stop()


def test_gateways_sharing_redis_share_an_address_failures(make_gateway, tmp_path):
    redis = RedisServer(tmp_path).start()
    try:
        a = make_gateway(REDIS_URL=redis.url, AUTH_FAILURE_LIMIT="5")
        b = make_gateway(REDIS_URL=redis.url, AUTH_FAILURE_LIMIT="5")
        with client_from("127.0.0.2") as guesser, client_from("127.0.0.3") as other:
            assert [models(guesser, a, "wrong").status_code for _ in range(3)] == [401] * 3
            assert [models(guesser, b, "wrong").status_code for _ in range(2)] == [401] * 2  # 5 in all
            assert models(guesser, b, b.key).status_code == 429  # b counted the fifth itself
            assert models(guesser, a, "wrong").status_code == 429  # the sixth, on the other gateway
            assert models(other, a, a.key).status_code == 200 and models(other, b, b.key).status_code == 200
        with client_from("127.0.0.6") as late:
            for _ in range(5):
                models(late, b, "wrong")
            time.sleep(1.0)  # a learns of blocks made elsewhere within BLOCKED_POLL_S
            assert models(late, a, a.key).status_code == 429
    finally:
        redis.stop()


# ---- the first key ---------------------------------------------------------------------------------
def test_first_start_without_a_terminal_writes_the_key_to_a_0600_file_not_to_stdout(tmp_path, fake_embed,
                                                                                     fake_rerank):
    env = gateway_env(tmp_path, fake_embed.url, fake_rerank.url)
    keys_file = Path(env["API_KEYS_FILE"])
    # its own session: no controlling terminal, as under systemd, docker or nohup
    proc = spawn([sys.executable, str(ROOT / "embedding_reranker_proxy.py")], tmp_path / "gw.out", cwd=ROOT,
                 env=env, url=f"http://127.0.0.1:{env['PORT']}", new_session=True)
    try:
        wait_http(proc.url + "/health", proc=proc)
        out = proc.output()
        new_key_file = keys_file.with_name(keys_file.name + ".new-key")
        assert not KEY_RE.search(out), out
        assert str(new_key_file) in out and "A new API key was created" in out
        assert stat.S_IMODE(new_key_file.stat().st_mode) == 0o600
        key = KEY_RE.search(new_key_file.read_text()).group()
        assert new_key_file.read_text() == key + "\n"  # the key alone, so KEY=$(cat FILE) works
        assert f"KEY=$(cat {new_key_file})" in out
        assert key not in (Path(env["LOG_DIR"]) / "embedding_reranker_proxy.log").read_text()
        assert key not in keys_file.read_text()
        r = httpx.get(proc.url + "/v1/models", headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 200
        assert [r["name"] for r in json.loads(keys_file.read_text())["keys"]] == ["default"]
    finally:
        proc.stop()


def test_keys_init_with_a_terminal_shows_the_key_there_only(tmp_path):
    """`make run` in a user's shell: the key appears on the terminal, not in the command's output."""
    import pty

    env = gateway_env(tmp_path, "http://127.0.0.1:9", "http://127.0.0.1:9")
    keys_file = Path(env["API_KEYS_FILE"])
    out_path = tmp_path / "init.out"
    pid, fd = pty.fork()  # the child's controlling terminal is this pseudo-terminal
    if pid == 0:  # pragma: no cover - the child
        out = os.open(out_path, os.O_WRONLY | os.O_CREAT, 0o600)
        os.dup2(out, 1)
        os.dup2(out, 2)
        os.chdir(ROOT)
        os.execve(sys.executable, [sys.executable, "embedding_reranker_proxy.py", "keys", "init"], env)
    screen = b""
    while True:
        try:
            data = os.read(fd, 65536)
        except OSError:  # EIO: the child is gone
            break
        if not data:
            break
        screen += data
    os.close(fd)
    assert os.waitpid(pid, 0)[1] == 0
    key = KEY_RE.search(screen.decode()).group()
    output = out_path.read_text()
    assert key not in output and "shown on the terminal only" in output
    assert not keys_file.with_name(keys_file.name + ".new-key").exists()
    assert key not in keys_file.read_text()
