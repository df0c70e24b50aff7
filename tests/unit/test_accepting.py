"""The gateway's event loop (erproxy/accepting.py): a worker whose loop is busy still takes every
connection waiting for it at once, instead of one per loop turn (uvloop's own server), which at 500
connections left clients waiting past their timeout before the gateway ever saw their request."""

from __future__ import annotations

import asyncio
import logging
import socket
import time

import pytest

from erproxy import accepting, cli
from erproxy.accepting import GatewayLoop, new_event_loop
from erproxy.settings import Settings

N_CLIENTS = 40


class Counted(asyncio.Protocol):
    """Records the loop turn its connection was handed over in, answers one byte per byte received."""

    made: list[int] = []
    turn = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        Counted.made.append(Counted.turn)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[attr-defined]


def listening(loop: asyncio.AbstractEventLoop, backlog: int = 128) -> tuple[asyncio.AbstractServer, int]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))  # bound, not listening: what uvicorn hands over (Config.bind_socket)
    server = loop.run_until_complete(loop.create_server(Counted, sock=sock, backlog=backlog))
    return server, sock.getsockname()[1]


def busy_turns(loop: asyncio.AbstractEventLoop, until: int, max_turns: int = 400) -> None:
    """Run the loop as a saturated worker does: every turn takes 5 ms of work."""

    async def busy() -> None:
        while len(Counted.made) < until and Counted.turn < max_turns:
            Counted.turn += 1
            time.sleep(0.005)
            await asyncio.sleep(0)

    loop.run_until_complete(busy())


@pytest.fixture()
def loop():
    Counted.made, Counted.turn = [], 0
    loop = new_event_loop()
    yield loop
    loop.close()


def test_a_busy_worker_takes_every_waiting_connection_in_one_turn(loop) -> None:
    assert isinstance(loop, GatewayLoop)
    server, port = listening(loop)
    clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(N_CLIENTS)]  # queued in the kernel
    try:
        busy_turns(loop, until=N_CLIENTS)
        assert len(Counted.made) == N_CLIENTS
        # uvloop's own server takes one per turn: 40 turns, 200 ms of waiting for the last client here,
        # seconds on a real saturated worker
        assert max(Counted.made) <= 3, Counted.made
        for c in clients:  # and each one is served
            c.sendall(b"x")
        busy_turns(loop, until=N_CLIENTS, max_turns=Counted.turn + 3)
        for c in clients:
            c.settimeout(5)
            assert c.recv(1) == b"x"
    finally:
        for c in clients:
            c.close()
        server.close()


class Shutdown(asyncio.Protocol):
    """A protocol with uvicorn's shutdown(): records that it was asked to shut down."""

    told: list[str] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def shutdown(self) -> None:
        Shutdown.told.append("shutdown")
        self.transport.close()


def test_a_connection_handed_over_after_close_is_told_to_shut_down(loop) -> None:
    """uvicorn's shutdown closes the servers, then asks every connection it knows of to shut down; one
    accepted just before that is handed to its protocol a turn later and must be told as well, or it is
    served with keep-alive until the end of the shutdown grace."""
    Shutdown.told = []
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = loop.run_until_complete(loop.create_server(Shutdown, sock=sock))
    client = socket.create_connection(("127.0.0.1", sock.getsockname()[1]))
    try:
        deadline = time.monotonic() + 5
        while not server._handshakes and time.monotonic() < deadline:  # accepted, not yet handed over
            server._accept_waiting()
            time.sleep(0.01)
        assert server._handshakes
        server.close()
        loop.run_until_complete(asyncio.gather(*server._handshakes))
        assert Shutdown.told == ["shutdown"]
        client.settimeout(5)
        assert client.recv(1) == b""  # closed by the gateway
    finally:
        client.close()


def test_no_more_than_backlog_connections_are_taken_per_turn(loop) -> None:
    server, port = listening(loop, backlog=8)
    clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(8)]
    try:
        busy_turns(loop, until=8)
        clients += [socket.create_connection(("127.0.0.1", port)) for _ in range(8)]
        first = Counted.turn
        busy_turns(loop, until=16)
        # a flood cannot hold the loop: at most `backlog` per readiness, the rest on the next turns
        assert len(Counted.made) == 16 and Counted.turn - first <= 4
    finally:
        for c in clients:
            c.close()
        server.close()


def test_a_closed_server_refuses_new_connections_and_keeps_the_ones_it_serves(loop) -> None:
    server, port = listening(loop)
    kept = socket.create_connection(("127.0.0.1", port))
    busy_turns(loop, until=1)
    server.close()
    assert not server.is_serving() and server.sockets == ()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2)
    kept.sendall(b"y")
    busy_turns(loop, until=2, max_turns=Counted.turn + 3)
    kept.settimeout(5)
    assert kept.recv(1) == b"y"
    kept.close()


class OutOfFiles(socket.socket):
    """A listening socket whose first accept fails as it does when the process has no descriptor left."""

    failures = 1

    def accept(self):  # type: ignore[override]
        if OutOfFiles.failures:
            OutOfFiles.failures -= 1
            raise OSError(24, "Too many open files")
        return super().accept()


def test_out_of_descriptors_pauses_accepting_and_resumes_without_losing_the_connection(loop, monkeypatch,
                                                                                        caplog) -> None:
    monkeypatch.setattr(accepting, "ACCEPT_RETRY_DELAY_S", 0.05)
    sock = OutOfFiles()
    sock.bind(("127.0.0.1", 0))
    server = loop.run_until_complete(loop.create_server(Counted, sock=sock, backlog=16))
    client = socket.create_connection(("127.0.0.1", sock.getsockname()[1]))
    try:
        with caplog.at_level(logging.ERROR, logger="erproxy"):
            busy_turns(loop, until=1, max_turns=4)
            assert Counted.made == [] and not server.is_serving()  # paused, not spinning on the error
            assert "cannot accept connections" in caplog.text and "Too many open files" in caplog.text
            loop.run_until_complete(asyncio.sleep(0.1))
            busy_turns(loop, until=1)
        assert len(Counted.made) == 1 and server.is_serving()
    finally:
        client.close()
        server.close()


class Refusing(socket.socket):
    """A listening socket whose every accept fails with an error that is not about resources."""

    def accept(self):  # type: ignore[override]
        raise OSError(1, "Operation not permitted")


def test_an_accept_error_is_logged_once_per_readiness_not_once_per_backlog_slot(loop, caplog) -> None:
    sock = Refusing()
    sock.bind(("127.0.0.1", 0))
    server = loop.run_until_complete(loop.create_server(Counted, sock=sock, backlog=64))
    try:
        with caplog.at_level(logging.WARNING, logger="erproxy"):
            server._accept_waiting()
        assert caplog.text.count("accept failed") == 1
        assert server.is_serving()  # as asyncio's server: the next readiness tries again
    finally:
        server.close()


def bound_by_run_server(monkeypatch, host: str) -> dict:
    """What cli.run_server hands uvicorn's Server.run for one worker on `host` (Server.run not run)."""
    seen: dict = {}

    def fake_run(self, sockets=None):
        seen["loop"] = self.config.get_loop_factory()()
        seen["sockets"] = sockets
        self.started = True

    monkeypatch.setattr("uvicorn.Server.run", fake_run)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as probe:
        probe.bind((host, 0))
        seen["port"] = probe.getsockname()[1]
    cli.run_server(Settings(embedding_upstreams="http://127.0.0.1:9", reranker_upstreams="http://127.0.0.1:9",
                            host=host, port=seen["port"]))
    return seen


def test_one_worker_runs_on_the_gateway_loop_with_the_socket_it_bound(monkeypatch) -> None:
    """cli.run_server hands uvicorn a bound socket, so its create_server goes through GatewayLoop."""
    seen = bound_by_run_server(monkeypatch, "127.0.0.1")
    port = seen["port"]
    try:
        assert isinstance(seen["loop"], GatewayLoop)
        assert len(seen["sockets"]) == 1 and seen["sockets"][0].getsockname() == ("127.0.0.1", port)
    finally:
        seen["loop"].close()
        for s in seen["sockets"]:
            s.close()


def ipv6_works() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not ipv6_works(), reason="IPv6 is off on this machine")
def test_host_any_ipv6_listens_on_ipv6_and_ipv4_alike(monkeypatch) -> None:
    """HOST=:: is dual-stack with one worker as with several (uvicorn binds the socket in both cases)."""
    seen = bound_by_run_server(monkeypatch, "::")
    sock = seen["sockets"][0]
    try:
        sock.listen(8)
        for address in ("::1", "127.0.0.1"):
            socket.create_connection((address, seen["port"]), timeout=5).close()
    finally:
        seen["loop"].close()
        sock.close()
