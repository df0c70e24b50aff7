"""The request flow of create_app's gateway, in-process: each step ends the request with its own error."""

import asyncio

import httpx
import pytest

from erproxy.app import create_app
from erproxy.settings import Settings

TOKEN = "unit-test-token"


class Lifespan:
    def __init__(self, app):
        self.app, self.inbox, self.outbox = app, asyncio.Queue(), asyncio.Queue()

    async def __aenter__(self):
        scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
        self.task = asyncio.create_task(self.app(scope, self.inbox.get, self.outbox.put))
        await self.inbox.put({"type": "lifespan.startup"})
        assert (await self.outbox.get())["type"] == "lifespan.startup.complete"

    async def __aexit__(self, *exc):
        await self.inbox.put({"type": "lifespan.shutdown"})
        assert (await self.outbox.get())["type"] == "lifespan.shutdown.complete"
        await self.task


@pytest.fixture
async def gateway(tmp_path, request):
    overrides = getattr(request, "param", {})
    settings = Settings.from_env({
        "API_KEYS_FILE": str(tmp_path / "keys.json"), "ACCESS_TOKEN": TOKEN, "LOG_DIR": str(tmp_path),
        "EMBEDDING_UPSTREAMS": "http://127.0.0.1:9", "RERANKER_UPSTREAMS": "http://127.0.0.1:9",
        "HEALTH_INTERVAL": "60", **overrides}, env_file="")
    app = create_app(settings)
    async with Lifespan(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://gw") as client:
            yield app, client


AUTH = {"Authorization": f"Bearer {TOKEN}"}


def metric(text: str, line_start: str) -> float:
    return float(next(line for line in text.splitlines() if line.startswith(line_start)).rsplit(" ", 1)[1])


async def test_route_then_auth_each_with_its_error(gateway):
    app, client = gateway
    assert (await client.get("/nope", headers=AUTH)).json()["error"]["code"] == "not_found"
    r = await client.get("/v1/embeddings/", headers=AUTH)
    assert r.status_code == 405 and r.headers["allow"] == "POST"
    r = await client.get("/v1/models")
    assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key"
    assert (await client.get("/v1/models", headers={"Authorization": "Bearer wrong"})).status_code == 401
    assert (await client.get("/v1/models/", headers=AUTH)).status_code == 200
    assert (await client.get("/health")).status_code == 503  # public; no upstream is up
    assert "gateway;dur=" in r.headers["server-timing"]


@pytest.mark.parametrize("gateway", [{"RATE_LIMIT": "1/minute"}], indirect=True)
async def test_rate_limit_refusals_are_counted(gateway):
    app, client = gateway
    assert (await client.get("/v1/models", headers=AUTH)).status_code == 200
    r = await client.get("/v1/models", headers=AUTH)
    assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limit_exceeded"
    text = (await client.get("/metrics")).text
    assert metric(text, 'erproxy_rejections_total{reason="rate_limit"}') == 1
    assert metric(text, 'erproxy_rejections_total{reason="concurrency"}') == 0


@pytest.mark.parametrize("gateway", [{"MAX_CONCURRENT_REQUESTS": "1"}], indirect=True)
async def test_concurrency_refusals_are_counted_and_slots_given_back(gateway):
    app, client = gateway
    assert (await client.post("/v1/embeddings", headers=AUTH, json={"input": "x"})).status_code == 503
    slot = await app.admission.acquire()  # the only slot is busy
    r = await client.get("/v1/models", headers=AUTH)
    assert r.status_code == 429 and r.json()["error"]["code"] == "concurrency_limit_exceeded"
    await app.admission.release(slot)
    assert (await client.get("/v1/models", headers=AUTH)).status_code == 200
    text = (await client.get("/metrics")).text
    assert metric(text, 'erproxy_rejections_total{reason="concurrency"}') == 1
    assert metric(text, "erproxy_in_flight_requests") == 0
    assert app.admission.in_flight() == 0
