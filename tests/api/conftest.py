"""In-process harness: the gateway's ASGI app and the fake vLLM servers in the test's own event loop.

- The gateway is `erproxy.app.create_app(settings)`, with settings read by `Settings.from_env` from
  the same environment a gateway process gets (tests.procs.gateway_env) and a key file made by
  tests.procs.make_key_file; its ASGI lifespan runs around the test and it is driven through
  `httpx.AsyncClient(transport=httpx.ASGITransport(app))`: no socket and no process in between.
- The fake vLLM servers are tests/fakes/fake_vllm.py's aiohttp app on a loopback port, because the
  gateway's upstream client needs a URL; faults are switched on the FakeVLLM object directly.

What needs a real process (several workers, signals, TLS, start-up output, log files, the key
command line, raw sockets) is tested in tests/process/.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable

import httpx
import pytest
from aiohttp import web

from erproxy.app import create_app
from erproxy.settings import Settings
from tests.fakes.fake_vllm import FakeVLLM
from tests.procs import gateway_env, make_key_file

GATEWAY_URL = "http://gateway.test"


# ---- fake vLLM servers -------------------------------------------------------------------------
@dataclass
class FakeServer:
    """A FakeVLLM served on 127.0.0.1 inside the running event loop."""

    fake: FakeVLLM
    runner: web.AppRunner
    url: str

    def set_mode(self, mode: str = "normal", delay: float = 0.0) -> None:
        """What POST /_fake/mode does: switch the fault mode and the delay."""
        self.fake.mode, self.fake.delay = mode, delay

    def stats(self) -> dict[str, Any]:
        """What GET /_fake/stats answers."""
        return {"requests": dict(self.fake.requests), "mode": self.fake.mode, "last_headers": self.fake.last_headers}


async def serve_fake(role: str, model: str | None = None, delay: float = 0.0) -> FakeServer:
    fake = FakeVLLM(role, model)
    fake.delay = delay
    runner = web.AppRunner(fake.app(), access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    return FakeServer(fake, runner, f"http://{host}:{port}")


class Fakes:
    """The fake servers a test started; all stopped when it ends."""

    def __init__(self) -> None:
        self.started: list[FakeServer] = []

    async def start(self, role: str, model: str | None = None, delay: float = 0.0) -> FakeServer:
        server = await serve_fake(role, model, delay)
        self.started.append(server)
        return server

    async def stop(self) -> None:
        for server in reversed(self.started):
            await server.runner.cleanup()


@pytest.fixture
async def fakes() -> AsyncIterator[Fakes]:
    started = Fakes()
    yield started
    await started.stop()


@pytest.fixture
async def fake_embed(fakes: Fakes) -> FakeServer:
    return await fakes.start("embed")


@pytest.fixture
async def fake_rerank(fakes: Fakes) -> FakeServer:
    return await fakes.start("rerank")


# ---- the gateway ---------------------------------------------------------------------------------
class Lifespan:
    """Runs an ASGI app's lifespan: startup on enter, shutdown on exit."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.to_app: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.from_app: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> "Lifespan":
        scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"}, "state": {}}
        self.task = asyncio.create_task(self.app(scope, self.to_app.get, self.from_app.put))
        await self.to_app.put({"type": "lifespan.startup"})
        answer = await self.from_app.get()
        if answer["type"] != "lifespan.startup.complete":
            await self.task
            raise RuntimeError(f"gateway start-up failed: {answer.get('message')}")
        return self

    async def __aexit__(self, *exc: Any) -> None:
        assert self.task is not None
        await self.to_app.put({"type": "lifespan.shutdown"})
        answer = await self.from_app.get()
        assert answer["type"] == "lifespan.shutdown.complete", answer
        await self.task


@dataclass
class AppGateway:
    """A started in-process gateway: its app, an HTTP client bound to it, its environment and keys."""

    app: Any
    client: httpx.AsyncClient
    env: dict[str, str]
    keys: dict[str, str] = field(default_factory=dict)
    url: str = GATEWAY_URL

    @property
    def key(self) -> str:
        return next(iter(self.keys.values()))

    def auth(self, key: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {key or self.key}"}

    async def get(self, path: str, **kw: Any) -> httpx.Response:
        return await self.client.get(path, **kw)

    async def post(self, path: str, **kw: Any) -> httpx.Response:
        return await self.client.post(path, **kw)


GatewayFactory = Callable[..., Awaitable[AppGateway]]


@pytest.fixture
async def make_gateway(tmp_path: Path, fake_embed: FakeServer, fake_rerank: FakeServer
                       ) -> AsyncIterator[GatewayFactory]:
    """`await make_gateway(embed=URL, rerank=URL, key_names=..., VAR=value, ...)`: an in-process gateway
    configured like a gateway process (tests.procs.gateway_env), with a test-made key file."""
    stack: list[tuple[Lifespan, httpx.AsyncClient]] = []

    async def factory(embed: str | None = None, rerank: str | None = None, key_names=("tester",),
                      key_fields=None, **overrides: str) -> AppGateway:
        d = tmp_path / f"gw{len(stack)}"
        d.mkdir()
        env = gateway_env(d, embed or fake_embed.url, rerank or fake_rerank.url, **overrides)
        keys = make_key_file(Path(env["API_KEYS_FILE"]), key_names, **(key_fields or {})) if key_names else {}
        app = create_app(Settings.from_env(env, env_file=""))
        lifespan = Lifespan(app)
        await lifespan.__aenter__()
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=GATEWAY_URL)
        stack.append((lifespan, client))
        return AppGateway(app, client, env, keys)

    yield factory
    for lifespan, client in reversed(stack):
        await client.aclose()
        await lifespan.__aexit__(None, None, None)


@pytest.fixture
async def gateway(make_gateway: GatewayFactory, tmp_path: Path) -> AppGateway:
    """A gateway for read-only API tests: generous rate limit and a static ACCESS_TOKEN."""
    return await make_gateway(RATE_LIMIT="100000/minute", ACCESS_TOKEN="static-test-token-" + tmp_path.name)
