"""SERVER=granian: HTTP/2 with real clients (h2c by prior knowledge, h2 over TLS by ALPN), and the
behaviours the gateway had on uvicorn, checked again on Granian (disconnects, SIGTERM, keep-alive)."""

import asyncio
import json
import select
import signal
import socket
import ssl
import subprocess
import threading
import time

import h2.config
import h2.connection
import h2.events
import httpx
import pytest

from erproxy import server as granian_server
from tests.procs import set_fake_mode, start_tls_gateway

BODY = {"model": "minilm", "input": "hello world"}


def granian(make_gateway, **env):
    return make_gateway(SERVER="granian", **env)


def curl(*args: str) -> tuple[str, str]:
    """curl's body and, after it, the HTTP version it used."""
    out = subprocess.run(["curl", "-sS", "-w", "\\n%{http_version}", *args], capture_output=True, text=True,
                         timeout=30, check=True).stdout
    body, version = out.rsplit("\n", 1)
    return body, version


def in_flight(gw) -> int:
    return httpx.get(gw.url + "/health", timeout=5).json()["upstreams"]["embedding"]["replicas"][0]["in_flight"]


# ---- HTTP/2 with real clients ----------------------------------------------------------------------
def test_h2c_by_prior_knowledge_and_http11_on_the_same_port(make_gateway):
    gw = granian(make_gateway)
    with httpx.Client(http1=False, http2=True) as c:  # http:// + http2 only: prior knowledge (h2c)
        r = c.post(gw.url + "/v1/embeddings", json=BODY, headers=gw.auth())
        assert r.http_version == "HTTP/2" and r.status_code == 200
        assert len(r.json()["data"][0]["embedding"]) == 384
        assert c.get(gw.url + "/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401

    async def many_streams() -> list[httpx.Response]:  # several streams at once on one connection
        async with httpx.AsyncClient(http1=False, http2=True) as ac:
            return await asyncio.gather(*(ac.post(gw.url + "/v1/embeddings", headers=gw.auth(),
                                                  json={"input": [f"text {i}", "more"]}) for i in range(8)))

    answers = asyncio.run(many_streams())
    assert [(a.http_version, a.status_code) for a in answers] == [("HTTP/2", 200)] * 8
    assert all(len(a.json()["data"]) == 2 for a in answers)
    body, version = curl("--http2-prior-knowledge", gw.url + "/v1/rerank", "-H", f"Authorization: Bearer {gw.key}",
                         "-H", "Content-Type: application/json",
                         "-d", '{"query": "What is AI?", "documents": ["Bananas are yellow", "AI is artificial intelligence"]}')
    assert version == "2" and json.loads(body)["results"][0]["index"] == 1
    r = httpx.post(gw.url + "/v1/embeddings", json=BODY, headers=gw.auth())  # HTTP/1.1 still served
    assert r.http_version == "HTTP/1.1" and r.status_code == 200
    body, version = curl(gw.url + "/health")
    assert version == "1.1" and json.loads(body)["status"] == "ok"
    log = gw.log_text(until="POST /v1/embeddings", count=10)  # lines are written within 10 ms, not at once
    assert log.count("POST /v1/embeddings") >= 10 and "status=401" in log  # h2 requests are access-logged too


def test_h2_over_tls_by_alpn(tmp_path, fake_embed, fake_rerank):
    gw = start_tls_gateway(tmp_path, fake_embed.url, fake_rerank.url, SERVER="granian")
    url, ctx, keys, env, proc, cert = gw.url, gw.ctx, gw.keys, gw.env, gw.proc, tmp_path / "cert.pem"
    try:
        with socket.create_connection(("127.0.0.1", int(env["PORT"]))) as raw:  # what the server picks by ALPN
            alpn = ssl.create_default_context(cafile=str(cert))
            alpn.set_alpn_protocols(["h2", "http/1.1"])
            with alpn.wrap_socket(raw, server_hostname="localhost") as tls:
                assert tls.selected_alpn_protocol() == "h2"
        with httpx.Client(http2=True, verify=ctx) as c:  # offers h2 and http/1.1; the server picks h2
            r = c.post(url + "/v1/embeddings", json=BODY, headers={"Authorization": f"Bearer {keys['tester']}"})
            assert r.http_version == "HTTP/2" and r.status_code == 200 and r.json()["data"][0]["embedding"]
        with httpx.Client(verify=ctx) as c:  # a client that offers only http/1.1 gets it
            r = c.post(url + "/v1/embeddings", json=BODY, headers={"Authorization": f"Bearer {keys['tester']}"})
            assert r.http_version == "HTTP/1.1" and r.status_code == 200
        body, version = curl("--http2", "--cacert", str(cert), url + "/v1/embeddings", "-H",
                             f"Authorization: Bearer {keys['tester']}", "-H", "Content-Type: application/json",
                             "-d", json.dumps(BODY))
        assert version == "2" and len(json.loads(body)["data"][0]["embedding"]) == 384
        with pytest.raises(httpx.HTTPError):  # plain HTTP on the TLS port does not work
            httpx.get(f"http://127.0.0.1:{env['PORT']}/health", timeout=2)
    finally:
        proc.stop()


# ---- a client that goes away cancels the upstream call -----------------------------------------------
class H2C:
    """A bare HTTP/2 client connection (h2c, prior knowledge) that can reset one stream and keep the others."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.conn.initiate_connection()
        self.flush()

    def flush(self) -> None:
        self.sock.sendall(self.conn.data_to_send())

    def post(self, path: str, key: str, body: bytes) -> int:
        sid = self.conn.get_next_available_stream_id()
        self.conn.send_headers(sid, [(":method", "POST"), (":path", path), (":scheme", "http"),
                                     (":authority", "127.0.0.1"), ("authorization", f"Bearer {key}"),
                                     ("content-type", "application/json")])
        self.conn.send_data(sid, body, end_stream=True)
        self.flush()
        return sid

    def reset(self, sid: int) -> None:
        self.conn.reset_stream(sid, error_code=8)  # CANCEL
        self.flush()

    def answer(self, sid: int) -> tuple[int, bytes]:
        status, body = 0, b""
        while True:
            data = self.sock.recv(65536)
            assert data, "connection closed"
            for ev in self.conn.receive_data(data):
                if isinstance(ev, h2.events.ResponseReceived) and ev.stream_id == sid:
                    status = int(dict(ev.headers)[b":status"])
                elif isinstance(ev, h2.events.DataReceived):
                    self.conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                    if ev.stream_id == sid:
                        body += ev.data
                elif isinstance(ev, h2.events.StreamEnded) and ev.stream_id == sid:
                    self.flush()
                    return status, body
            self.flush()

    def close(self) -> None:
        self.sock.close()


def test_h2_stream_reset_cancels_the_upstream_call_and_the_connection_serves_on(own_fakes, make_gateway):
    embed, rerank = own_fakes
    gw = granian(make_gateway, embed=embed.url, rerank=rerank.url, TIMEOUT="120")
    set_fake_mode(embed, "normal", delay=60)  # inference takes a minute; /health stays fast
    client = H2C(int(gw.env["PORT"]))
    try:
        sid = client.post("/v1/embeddings", gw.key, json.dumps(BODY).encode())
        deadline = time.monotonic() + 5
        while in_flight(gw) == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert in_flight(gw) == 1
        client.reset(sid)  # RST_STREAM(CANCEL): the stream is gone, the connection stays
        deadline = time.monotonic() + 5
        while in_flight(gw) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert in_flight(gw) == 0  # without the cancellation it would stay 1 for a minute
        assert "status=499" in gw.log_text(until="status=499")
        set_fake_mode(embed, "normal")
        status, body = client.answer(client.post("/v1/embeddings", gw.key, json.dumps(BODY).encode()))
        assert status == 200 and len(json.loads(body)["data"][0]["embedding"]) == 384
    finally:
        client.close()


def test_h1_client_disconnect_cancels_the_upstream_call(own_fakes, make_gateway):
    embed, rerank = own_fakes
    gw = granian(make_gateway, embed=embed.url, rerank=rerank.url, TIMEOUT="120")
    set_fake_mode(embed, "normal", delay=60)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(gw.url + "/v1/embeddings", json=BODY, headers=gw.auth(), timeout=1.0)
    deadline = time.monotonic() + 5
    while in_flight(gw) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert in_flight(gw) == 0
    assert "status=499" in gw.log_text(until="status=499")


# ---- connections: keep-alive, 408/413 closing, SIGTERM ---------------------------------------------
@pytest.mark.parametrize("server", ["uvicorn", "granian"])
def test_an_idle_keep_alive_connection_is_closed_after_keep_alive(make_gateway, server):
    gw = make_gateway(SERVER=server, KEEP_ALIVE="2")
    with socket.create_connection(("127.0.0.1", int(gw.env["PORT"]))) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        s.settimeout(10)
        assert s.recv(65536).startswith(b"HTTP/1.1 200")
        t0 = time.monotonic()
        while s.recv(65536):
            pass
        idle = time.monotonic() - t0
    print(f"{server}: idle connection closed after {idle:.2f} s")
    assert 1.5 < idle < 4


def test_an_h2_client_that_stops_answering_pings_is_disconnected(make_gateway):
    """Granian has no idle timeout for HTTP/2: it pings every KEEP_ALIVE seconds instead, so the
    connection of a client that is gone without a FIN (answers no ping) is closed, a live one kept."""
    gw = granian(make_gateway, KEEP_ALIVE="1")
    live, dead = H2C(int(gw.env["PORT"])), H2C(int(gw.env["PORT"]))
    try:
        for client in (live, dead):
            status, _ = client.answer(client.post("/v1/embeddings", gw.key, json.dumps(BODY).encode()))
            assert status == 200
        t0 = time.monotonic()
        closed = None
        while time.monotonic() - t0 < 8 and (closed is None or time.monotonic() - t0 < closed + 2):
            ready, _, _ = select.select([live.sock] + ([dead.sock] if closed is None else []), [], [], 0.2)
            for sock in ready:
                data = sock.recv(65536)
                if sock is live.sock:  # the live client answers its pings
                    assert data, "the live connection was closed"
                    live.conn.receive_data(data)
                    live.flush()
                elif not data or any(isinstance(ev, h2.events.ConnectionTerminated)
                                     for ev in dead.conn.receive_data(data)):  # read, never acknowledge
                    closed = time.monotonic() - t0
        assert closed is not None, "the silent client's connection stayed open"
        status, _ = live.answer(live.post("/v1/embeddings", gw.key, json.dumps(BODY).encode()))
        print(f"silent h2 client disconnected {closed:.1f} s after its answer")
        assert status == 200 and closed < 6
    finally:
        live.close()
        dead.close()


def test_413_and_408_close_the_connection_on_granian(make_gateway):
    from tests.process import test_hardening

    make = lambda **env: make_gateway(SERVER="granian", **env)  # noqa: E731
    for framing in ("content-length", "chunked"):
        test_hardening.test_413_closes_the_connection_within_a_second_of_a_50_mib_upload(make, framing)
    test_hardening.test_408_closes_the_connection_and_a_late_byte_does_not_keep_it(make)


def test_sigterm_drains_then_cancels_what_outlasts_shutdown_grace(own_fakes, make_gateway):
    embed, rerank = own_fakes
    gw = granian(make_gateway, embed=embed.url, rerank=rerank.url, TIMEOUT="120", SHUTDOWN_GRACE="3")
    answers: dict[str, object] = {}

    def call(name: str, path: str, doc: dict) -> None:
        try:
            answers[name] = httpx.post(gw.url + path, json=doc, headers=gw.auth(), timeout=30).status_code
        except httpx.HTTPError as e:
            answers[name] = type(e).__name__

    set_fake_mode(embed, "normal", delay=60)  # this one outlasts the grace
    set_fake_mode(rerank, "normal", delay=1.5)  # this one finishes within it
    slow = threading.Thread(target=call, args=("slow", "/v1/embeddings", BODY))
    quick = threading.Thread(target=call, args=("quick", "/v1/rerank", {"query": "q", "documents": ["a", "b"]}))
    slow.start()
    quick.start()
    time.sleep(0.5)
    t0 = time.monotonic()
    gw.proc.popen.send_signal(signal.SIGTERM)
    assert gw.proc.popen.wait(15) == 0
    stopped = time.monotonic() - t0
    slow.join()
    quick.join()
    out = gw.proc.output()
    print(f"stopped {stopped:.1f} s after SIGTERM; answers {answers}")
    assert answers["quick"] == 200  # in flight at the signal, finished within the grace
    assert answers["slow"] != 200
    assert 2.5 < stopped < 8  # the grace, not the minute the upstream would take
    assert "cancelling 1 request(s) still running" in out
    assert out.index("cancelling 1 request") < out.index("Application shutdown complete")  # the lifespan still ran
    with pytest.raises(httpx.ConnectError):
        httpx.get(gw.url + "/health", timeout=2)


def test_granian_runs_requests_as_the_tasks_the_grace_cancels():
    """SHUTDOWN_GRACE finds the requests by the name of Granian's task coroutine: a Granian release that
    renames it must fail here, not silently stop cancelling."""
    import inspect

    from granian import _futures

    src = inspect.getsource(_futures._future_watcher_wrapper)
    assert f"async def {granian_server.REQUEST_CORO}(" in src
