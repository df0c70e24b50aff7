"""The event loop uvicorn runs the gateway on: uvloop, with a listening socket that takes every
connection waiting in the kernel's queue each time it becomes readable.

uvloop's own server accepts one connection per event-loop iteration (libuv since 1.45 does so to
spread connections over processes that share a socket). A worker whose loop is saturated iterates only
every 50-100 ms, so at 500 connections it accepted 10-30 connections a second: the last ones waited
in the kernel's queue for more than wrk's 5 s timeout although every request the gateway saw was
answered within 0.25 s (bench/results/ANALYSIS.md). asyncio's own loop accepts up to `backlog`
connections per readiness; this does the same on uvloop, so a saturated worker still takes a burst
of new connections at once and serves them alongside the ones it has.

Workers that share the socket still share the connections: every worker waiting in epoll is woken and
each accepts until the queue is empty, the first one awake taking the most.

A connection is handed to its protocol one loop turn after it was accepted (a task awaits
`connect_accepted_socket`). One that arrives after uvicorn's shutdown has closed the server and told
the connections it knew of to shut down is told the same at once, so SIGTERM under traffic stops as
soon as nothing is in flight rather than at the end of SHUTDOWN_GRACE.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from typing import Any, Callable

import uvloop

log = logging.getLogger("erproxy")

# errors that mean "out of a resource": stop accepting for a moment instead of spinning (as asyncio does)
RESOURCE_ERRNOS = frozenset((errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM))
ACCEPT_RETRY_DELAY_S = 1.0


class AcceptAllServer(asyncio.AbstractServer):
    """One listening socket served by this loop; what uvicorn needs of asyncio.Server (close, sockets)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket,
                 protocol_factory: Callable[[], asyncio.BaseProtocol], ssl: Any, backlog: int,
                 ssl_handshake_timeout: float | None) -> None:
        self._loop = loop
        self._sock = sock
        self._protocol_factory = protocol_factory
        # uvloop refuses a handshake timeout without TLS
        self._tls = {} if ssl is None else {"ssl": ssl, "ssl_handshake_timeout": ssl_handshake_timeout}
        self._backlog = max(1, backlog)
        self._serving = False
        self._closed = False
        self._resume: asyncio.TimerHandle | None = None
        self._handshakes: set[asyncio.Task[Any]] = set()
        sock.setblocking(False)
        sock.listen(self._backlog)

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        return () if self._closed else (self._sock,)

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def is_serving(self) -> bool:
        return self._serving

    def _start(self) -> None:
        if not self._serving and not self._closed:
            self._serving = True
            self._loop.add_reader(self._sock.fileno(), self._accept_waiting)

    def _pause(self) -> None:
        if self._serving:
            self._serving = False
            self._loop.remove_reader(self._sock.fileno())

    def _accept_waiting(self) -> None:
        """Accept what the queue holds, at most `backlog` at a time so a flood cannot hold the loop."""
        for _ in range(self._backlog):
            try:
                conn, _addr = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:  # the client gave up while queued: next one
                continue
            except OSError as exc:
                if exc.errno in RESOURCE_ERRNOS:
                    log.error("cannot accept connections (%s); trying again in %gs", exc, ACCEPT_RETRY_DELAY_S)
                    self._pause()
                    self._resume = self._loop.call_later(ACCEPT_RETRY_DELAY_S, self._start)
                    return
                log.warning("accept failed: %s", exc)  # once per readiness, as asyncio's server
                return
            self._serve(conn)

    def _serve(self, conn: socket.socket) -> None:
        conn.setblocking(False)  # TCP_NODELAY: set by uvloop's transport, as for its own server's connections
        task = self._loop.create_task(self._connect(conn))
        self._handshakes.add(task)
        task.add_done_callback(self._handshakes.discard)

    async def _connect(self, conn: socket.socket) -> None:
        try:
            transport, protocol = await self._loop.connect_accepted_socket(self._protocol_factory, conn,
                                                                           **self._tls)
        except (ConnectionError, OSError, asyncio.TimeoutError) as exc:
            # a client that left, or a TLS handshake that failed: nothing to answer, as uvloop's server
            log.debug("connection dropped before it was served: %r", exc)
            conn.close()
            return
        if self._closed:
            # Handed over after close(): uvicorn has already told the connections it knew of to shut down
            # and would serve this one with keep-alive until the end of its shutdown grace. The same for it.
            shutdown = getattr(protocol, "shutdown", None)
            if shutdown is not None:
                shutdown()

    def close(self) -> None:
        """Stop accepting and close the listening socket; connections already served go on."""
        if self._closed:
            return
        self._pause()
        if self._resume is not None:
            self._resume.cancel()
        self._closed = True
        self._sock.close()

    async def wait_closed(self) -> None:
        return None


class GatewayLoop(uvloop.Loop):  # type: ignore[misc]
    """uvloop; a server on a socket uvicorn bound (always, see cli.run_server) accepts everything waiting."""

    async def create_server(self, protocol_factory: Callable[[], asyncio.BaseProtocol], host: Any = None,
                            port: Any = None, *, sock: socket.socket | None = None, backlog: int = 100,
                            ssl: Any = None, ssl_handshake_timeout: float | None = None,
                            start_serving: bool = True, **kwargs: Any) -> asyncio.AbstractServer:
        if sock is None or kwargs or sock.family not in (socket.AF_INET, socket.AF_INET6, socket.AF_UNIX):
            return await super().create_server(protocol_factory, host, port, sock=sock, backlog=backlog, ssl=ssl,
                                               ssl_handshake_timeout=ssl_handshake_timeout,
                                               start_serving=start_serving, **kwargs)
        server = AcceptAllServer(self, sock, protocol_factory, ssl, backlog, ssl_handshake_timeout)
        if start_serving:
            server._start()
        return server


def new_event_loop() -> asyncio.AbstractEventLoop:
    """The loop factory uvicorn is given (`loop="erproxy.accepting:new_event_loop"`)."""
    return GatewayLoop()
