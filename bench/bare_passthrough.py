"""Reference floor for the benchmark: the barest uvicorn + aiohttp pass-through (no auth, limits,
metrics, logs or validation), on the same server and client stack as the gateway. The gap between
this row and the gateway's is what the gateway's own features cost.

--server granian serves the same ASGI app with Granian (the gateway's SERVER=granian);
--server granian-rsgi serves the same pass-through through Granian's own RSGI interface, to show
what ASGI itself costs on Granian.

Run: python bench/bare_passthrough.py --port P --upstream http://127.0.0.1:U [--server uvicorn|granian|granian-rsgi]
                                      [--workers N]   (uvicorn: N worker processes on one socket)
"""

import argparse
import os
import sys

import aiohttp


def new_session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1000, keepalive_timeout=4))


def make_app(upstream: str):
    state: dict = {}

    async def app(scope, receive, send):
        if scope["type"] == "lifespan":
            while True:
                msg = await receive()
                if msg["type"] == "lifespan.startup":
                    state["s"] = new_session()
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await state["s"].close()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        body = b""
        more = True
        while more:
            msg = await receive()
            body += msg.get("body", b"")
            more = msg.get("more_body", False)
        async with state["s"].post(upstream + scope["path"], data=body,
                                   headers={"Content-Type": "application/json"}) as r:
            data = await r.read()
        await send({"type": "http.response.start", "status": r.status,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": data})

    return app


def app_from_env():
    """make_app for uvicorn's worker processes (--workers): the upstream comes from BARE_UPSTREAM."""
    return make_app(os.environ["BARE_UPSTREAM"])


class RSGIPassThrough:
    """The same pass-through as an RSGI application (Granian's native interface)."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.session: aiohttp.ClientSession | None = None

    def __rsgi_init__(self, loop) -> None:
        pass

    def __rsgi_del__(self, loop) -> None:
        if self.session is not None:
            loop.run_until_complete(self.session.close())

    async def __rsgi__(self, scope, protocol) -> None:
        if self.session is None:  # made on the worker's running loop
            self.session = new_session()
        body = await protocol()
        async with self.session.post(self.upstream + scope.path, data=body,
                                     headers={"Content-Type": "application/json"}) as r:
            data = await r.read()
        protocol.response_bytes(r.status, [("content-type", "application/json")], data)


def serve_granian(port: int, upstream: str, rsgi: bool) -> None:
    from granian.constants import Interfaces, Loops
    from granian.log import LogLevels
    from granian.server import Server

    server = Server("bare_passthrough", address="127.0.0.1", port=port, loop=Loops.uvloop, websockets=False,
                    interface=Interfaces.RSGI if rsgi else Interfaces.ASGI, log_level=LogLevels.warning,
                    backlog=2048)
    app = RSGIPassThrough(upstream) if rsgi else make_app(upstream)
    server.serve(target_loader=lambda _target: app)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--upstream", required=True)
    p.add_argument("--server", choices=("uvicorn", "granian", "granian-rsgi"), default="uvicorn")
    p.add_argument("--workers", type=int, default=1)
    a = p.parse_args()
    if a.server == "uvicorn":
        import uvicorn

        app = make_app(a.upstream)
        if a.workers > 1:  # worker processes import the app by name; it reads the upstream from the environment
            os.environ["BARE_UPSTREAM"] = a.upstream
            sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
            app = "bare_passthrough:app_from_env"
        uvicorn.run(app, factory=a.workers > 1, workers=a.workers, host="127.0.0.1", port=a.port, loop="uvloop",
                    http="httptools", access_log=False, log_level="warning", proxy_headers=False)
    else:
        serve_granian(a.port, a.upstream, rsgi=a.server == "granian-rsgi")
