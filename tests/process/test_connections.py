"""Real client connections to a gateway process: a stalled upload, a client that hangs up, curl."""

import signal
import socket
import subprocess
import threading
import time

import httpx
import pytest

from tests.procs import set_fake_mode


def post_embed(gw, **kw):
    return httpx.post(gw.url + "/v1/embeddings", json={"model": "minilm", "input": "hello world"},
                      headers=kw.pop("headers", gw.auth()), timeout=kw.pop("timeout", 30), **kw)


def test_slow_body_gets_408_and_holds_no_concurrency_slot(make_gateway):
    gw = make_gateway(MAX_CONCURRENT_REQUESTS="1", BODY_TIMEOUT="1.5")
    port = int(gw.env["PORT"])
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + gw.key.encode() +
              b"\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"inp")  # and then nothing
    time.sleep(0.3)
    ok = httpx.post(gw.url + "/v1/embeddings", headers=gw.auth(), json={"input": "x"})
    assert ok.status_code == 200  # the stalled upload does not hold the only slot
    s.settimeout(10)
    answer = b""  # headers and body may come in two segments; the 408 closes the connection after them
    while chunk := s.recv(4096):
        answer += chunk
    answer = answer.decode()
    s.close()
    assert answer.startswith("HTTP/1.1 408") and "request_timeout" in answer


def test_client_disconnect_cancels_the_upstream_request(own_fakes, make_gateway):
    embed, rerank = own_fakes
    gw = make_gateway(embed=embed.url, rerank=rerank.url, TIMEOUT="120")
    set_fake_mode(embed, "hang")
    with pytest.raises(httpx.ReadTimeout):
        post_embed(gw, timeout=1.0)

    def in_flight():
        return httpx.get(gw.url + "/health").json()["upstreams"]["embedding"]["replicas"][0]["in_flight"]

    deadline = time.monotonic() + 5
    while in_flight() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert in_flight() == 0  # without cancellation it would stay 1 for TIMEOUT=120 s
    assert "status=499" in gw.log_text(until="status=499")


def test_curl_works_with_api_key_in_query(shared_gateway):
    out = subprocess.run(
        ["curl", "-sS", "-w", "\\n%{http_code}", f"{shared_gateway.url}/v1/rerank?api_key={shared_gateway.key}",
         "-H", "Content-Type: application/json",
         "-d", '{"query": "What is AI?", "documents": ["Bananas are yellow", "AI is artificial intelligence"]}'],
        capture_output=True, text=True, timeout=30, check=True).stdout
    body, status = out.rsplit("\n", 1)
    assert status == "200" and '"index":1' in body


def test_sigterm_while_clients_keep_connecting_stops_at_once_not_after_the_grace(make_gateway):
    """Connections accepted just before SIGTERM are shut down like the others: the gateway stops as soon
    as nothing is in flight instead of serving them with keep-alive until SHUTDOWN_GRACE runs out."""
    gw = make_gateway(SHUTDOWN_GRACE="10", KEEP_ALIVE="30")
    port = int(gw.env["PORT"])
    until = time.monotonic() + 2.5
    opened: list[socket.socket] = []

    def keep_connecting() -> None:  # a new keep-alive connection, one request on it, left open
        while time.monotonic() < until:
            try:
                c = socket.create_connection(("127.0.0.1", port), timeout=5)
                opened.append(c)
                c.sendall(b"GET /health HTTP/1.1\r\nHost: gw\r\n\r\n")
                c.recv(4096)
            except OSError:
                time.sleep(0.01)

    threads = [threading.Thread(target=keep_connecting, daemon=True) for _ in range(32)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.8)
        t0 = time.monotonic()
        gw.proc.popen.send_signal(signal.SIGTERM)
        assert gw.proc.popen.wait(20) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal it stopped for
        stopped = time.monotonic() - t0
        assert len(opened) > 50  # connections kept coming up to the signal
        assert stopped < 5, f"stopped {stopped:.1f} s after SIGTERM (SHUTDOWN_GRACE=10)"
        assert "timeout graceful shutdown exceeded" not in gw.proc.output()
    finally:
        for t in threads:
            t.join(10)
        for c in opened:
            c.close()


@pytest.mark.parametrize("server", ["uvicorn", "granian"])
def test_a_request_cut_off_by_shutdown_grace_gets_a_503_in_the_openai_shape_and_is_recorded(
        own_fakes, make_gateway, server):
    embed, rerank = own_fakes
    gw = make_gateway(embed=embed.url, rerank=rerank.url, TIMEOUT="120", SHUTDOWN_GRACE="1", SERVER=server)
    set_fake_mode(embed, "normal", delay=60)  # outlasts the grace
    answer: dict[str, httpx.Response] = {}
    caller = threading.Thread(target=lambda: answer.update(r=post_embed(gw)))
    caller.start()
    time.sleep(0.5)
    gw.proc.popen.send_signal(signal.SIGTERM)
    gw.proc.popen.wait(20)
    caller.join(20)
    r = answer["r"]
    assert r.status_code == 503, r.text  # not the server's own plain-text 500
    assert r.json()["error"]["code"] == "shutting_down" and r.headers["retry-after"] == "1"
    access = [line for line in gw.log_file().read_text().splitlines() if "erproxy.access" in line]
    assert any("status=503" in line for line in access), access
    out = gw.proc.output()
    assert "Exception in ASGI application" not in out and "Traceback" not in out
