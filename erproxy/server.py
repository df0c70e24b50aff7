"""Granian under the gateway (SERVER=granian): HTTP/1.1 and HTTP/2 on one port.

Without SSL_CERTFILE the port speaks HTTP/1.1 and h2c (HTTP/2 by prior knowledge, as
`curl --http2-prior-knowledge` or `httpx.Client(http2=True)` against http:// do); with it, TLS offers
h2 and http/1.1 by ALPN. What cli.run_server does with uvicorn, this does with Granian:

- WORKERS: Granian's worker processes share the port; each is a fresh interpreter (spawned, not
  forked) that builds the gateway from the environment (`granian_app`), as uvicorn's workers do
  (app.app_from_env). A supervising process runs even with one worker.
- KEEP_ALIVE: an idle HTTP/1.1 connection is closed after KEEP_ALIVE seconds (Granian's header
  read timeout, which also bounds how long a client may take to send a request's headers). An
  HTTP/2 connection gets a ping every KEEP_ALIVE seconds and is closed when the client stops
  answering them; Granian has no idle timeout for HTTP/2, so a live idle one stays open.
- SIGTERM: Granian stops accepting, closes idle connections and waits for the running requests.
  Requests still running SHUTDOWN_GRACE seconds after the signal are cancelled, so that the
  lifespan's shutdown (the last usage flush, Redis, the multiprocess metrics) still runs, as
  uvicorn's timeout_graceful_shutdown does.
- A client that disconnects: Granian delivers `http.disconnect` to `receive()`, which is what
  handlers.Forwarder waits for to cancel the upstream call.
- 408 and 413 end the connection: Granian (hyper) closes it after an answer that says
  `Connection: close`.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import signal
from pathlib import Path
from typing import Any

from .settings import Settings

log = logging.getLogger("erproxy.server")

# Granian runs each request as an asyncio task of this coroutine function (granian/_futures.py);
# a test (tests/process/test_http2.py) fails if a Granian release names it otherwise.
REQUEST_CORO = "future_watcher"


class GranianGateway:
    """The gateway as Granian's workers serve it: HTTP straight to the gateway's request flow; the
    lifespan with uvicorn's start and stop lines and SHUTDOWN_GRACE enforced at SIGTERM."""

    __slots__ = ("app", "http", "grace", "_grace_timer")

    def __init__(self, app: Any, grace: float) -> None:
        self.app = app
        # Gateway.__call__ only dispatches on the scope type; going to its handler saves a coroutine per request
        self.http = getattr(app, "handle", app)
        self.grace = grace
        self._grace_timer: asyncio.TimerHandle | None = None

    def __call__(self, scope: dict, receive: Any, send: Any) -> Any:
        if scope["type"] == "http":
            return self.http(scope, receive, send)
        if scope["type"] == "lifespan":
            return self.lifespan(scope, receive, send)
        return self.app(scope, receive, send)

    async def lifespan(self, scope: dict, receive: Any, send: Any) -> None:
        async def send_and_log(message: dict) -> None:
            await send(message)
            if message["type"] == "lifespan.startup.complete":
                self.bound_the_drain(asyncio.get_running_loop())
                log.info("Application startup complete.")
            elif message["type"] == "lifespan.shutdown.complete":
                log.info("Application shutdown complete.")

        await self.app(scope, receive, send_and_log)

    def bound_the_drain(self, loop: asyncio.AbstractEventLoop) -> None:
        """SIGTERM: Granian's own graceful stop, plus a timer that cancels what still runs after the grace."""
        def on_sigterm() -> None:
            if self._grace_timer is None:
                self._grace_timer = loop.call_later(self.grace, self.cancel_requests, loop)
            # Granian's handler, left on SIGINT, starts its graceful stop (it took SIGTERM too until now)
            os.kill(os.getpid(), signal.SIGINT)

        loop.add_signal_handler(signal.SIGTERM, on_sigterm)

    def cancel_requests(self, loop: asyncio.AbstractEventLoop) -> None:
        running = [t for t in asyncio.all_tasks(loop)
                   if getattr(t.get_coro(), "__name__", "") == REQUEST_CORO and not t.done()]
        if running:
            log.warning("SHUTDOWN_GRACE (%gs) is over: cancelling %d request(s) still running", self.grace,
                        len(running))
        for task in running:
            task.cancel()


def granian_app() -> GranianGateway:
    """Factory each Granian worker calls: the gateway from the environment, Granian's log lines in ours."""
    from .app import app_from_env

    app = app_from_env()
    attach_granian_logs()
    return GranianGateway(app, Settings.from_env().shutdown_grace)


def attach_granian_logs() -> None:
    """Granian's start, stop and error lines go to the gateway's handlers (console and log file)."""
    ours = logging.getLogger("erproxy")
    theirs = logging.getLogger("_granian")
    for h in list(theirs.handlers):
        theirs.removeHandler(h)
    for h in ours.handlers:
        theirs.addHandler(h)
    theirs.propagate = False
    theirs.setLevel(ours.level or logging.INFO)


def run_granian(settings: Settings) -> None:
    """Serve until SIGTERM/SIGINT; WORKERS>1 needs PROMETHEUS_MULTIPROC_DIR set before (cli.run_server)."""
    from granian.constants import HTTPModes, Interfaces, Loops, SSLProtocols
    from granian.http import HTTP1Settings, HTTP2Settings
    from granian.log import LogLevels
    from granian.server import Server

    server = Server(
        "erproxy.server:granian_app", factory=True, address=settings.host, port=settings.port,
        interface=Interfaces.ASGI, workers=settings.workers, loop=Loops.uvloop,
        http=HTTPModes.auto,  # HTTP/1.1 and HTTP/2 (prior knowledge in clear, ALPN over TLS)
        websockets=False, backlog=2048,
        # a worker that dies (the OOM killer, a crash) is started again, as uvicorn does; Granian's default
        # stops the whole server instead
        respawn_failed_workers=True,
        http1_settings=HTTP1Settings(header_read_timeout=max(1000, round(settings.keep_alive * 1000))),
        # HTTP/2 has no idle timeout in Granian: a ping every KEEP_ALIVE seconds closes the connection of a
        # client that no longer answers (gone without a FIN); live idle h2 connections stay open
        http2_settings=HTTP2Settings(keep_alive_interval=max(1000, round(settings.keep_alive * 1000)),
                                     keep_alive_timeout=max(1, min(20, round(settings.keep_alive)))),
        ssl_cert=Path(settings.ssl_certfile) if settings.ssl_certfile else None,
        ssl_key=Path(settings.ssl_keyfile) if settings.ssl_keyfile else None,
        ssl_protocol_min=SSLProtocols.tls12,
        log_level=LogLevels(settings.log_level.lower()),
        # incremental: keep the handlers setup_logging made (a full dictConfig would close them)
        log_dictconfig={"incremental": True, "handlers": {}, "formatters": {}, "loggers": {}},
    )
    attach_granian_logs()
    # Workers start as fresh interpreters, as uvicorn's do: forked ones would inherit modules imported
    # here before PROMETHEUS_MULTIPROC_DIR was set (prometheus_client picks its value class at import).
    multiprocessing.set_start_method("spawn", force=True)
    server.serve()
