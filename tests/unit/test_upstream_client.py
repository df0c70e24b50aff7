"""The upstream hot path's HTTP client (erproxy/upstream_client.py) against real loopback servers:
keep-alive reuse, chunked answers, and each failure typed so that upstreams.py can retry or eject."""

from __future__ import annotations

import asyncio

import pytest
from aiohttp import web

from erproxy.upstream_client import AnswerTooLarge, ConnectFailed, ConnectionDropped, InvalidResponse, UpstreamClient
from devtools.procs import free_port

pytestmark = pytest.mark.asyncio


async def aiohttp_server(handler) -> tuple[web.AppRunner, str, list[object]]:
    """An aiohttp server on a loopback port; the list collects the transport of each request."""
    seen: list[object] = []

    async def wrapped(request: web.Request) -> web.StreamResponse:
        seen.append(request.transport)
        return await handler(request)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", wrapped)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    return runner, f"http://{host}:{port}", seen


async def raw_server(answer: bytes, *, close: bool = False) -> tuple[asyncio.base_events.Server, str]:
    """A server that answers every request with the bytes given (then closes, if asked)."""

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(next((line.split(b":")[1] for line in head.split(b"\r\n")
                                   if line.lower().startswith(b"content-length")), b"0"))
                await reader.readexactly(length)
                writer.write(answer)
                await writer.drain()
                if close:
                    writer.close()
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    server = await asyncio.start_server(on_client, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"http://127.0.0.1:{port}"


async def test_answers_come_back_whole_and_connections_are_reused() -> None:
    async def echo(request: web.Request) -> web.Response:
        body = await request.read()
        return web.Response(body=b'{"path": "%s", "got": %d}' % (request.path.encode(), len(body)),
                            content_type="application/json")

    runner, url, seen = await aiohttp_server(echo)
    client = UpstreamClient(idle_timeout=4.0)
    try:
        for _ in range(3):
            status, body = await client.post(url, "/v1/embeddings", b'{"input": "x"}', 5.0)
            assert (status, body) == (200, b'{"path": "/v1/embeddings", "got": 14}')
        assert len({id(t) for t in seen}) == 1, "three requests in a row must share one keep-alive connection"
    finally:
        client.close()
        await runner.cleanup()


async def test_a_url_path_prefix_and_a_large_body_reach_the_server() -> None:
    async def echo(request: web.Request) -> web.Response:
        body = await request.read()
        return web.Response(body=request.path.encode() + b" " + str(len(body)).encode())

    runner, url, _ = await aiohttp_server(echo)
    client = UpstreamClient(idle_timeout=4.0)
    try:
        status, body = await client.post(url + "/vllm", "/v1/rerank", b"x" * 300_000, 5.0)
        assert (status, body) == (200, b"/vllm/v1/rerank 300000")
    finally:
        client.close()
        await runner.cleanup()


async def test_a_chunked_answer_is_read_to_its_end() -> None:
    async def chunked(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(status=200)
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for part in (b'{"data": [', b"1, 2, 3", b"]}"):
            await resp.write(part)
        await resp.write_eof()
        return resp

    runner, url, _ = await aiohttp_server(chunked)
    client = UpstreamClient(idle_timeout=4.0)
    try:
        assert await client.post(url, "/x", b"{}", 5.0) == (200, b'{"data": [1, 2, 3]}')
    finally:
        client.close()
        await runner.cleanup()


async def test_an_error_status_is_an_answer_not_a_failure() -> None:
    async def fail(request: web.Request) -> web.Response:
        return web.Response(status=503, body=b'{"error": "busy"}')

    runner, url, _ = await aiohttp_server(fail)
    client = UpstreamClient(idle_timeout=4.0)
    try:
        assert await client.post(url, "/x", b"{}", 5.0) == (503, b'{"error": "busy"}')
    finally:
        client.close()
        await runner.cleanup()


async def test_an_endless_answer_is_cut_at_the_size_bound_not_read_until_the_timeout() -> None:
    sent = [0]

    async def endless(request: web.Request) -> web.StreamResponse:  # an upstream gone wrong: it never ends
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        block = b"0.123456789, " * 5000
        try:
            while True:
                await resp.write(block)
                sent[0] += len(block)
        except (ConnectionError, RuntimeError):
            return resp

    runner, url, seen = await aiohttp_server(endless)
    client = UpstreamClient(idle_timeout=4.0)
    try:
        t0 = asyncio.get_running_loop().time()
        with pytest.raises(AnswerTooLarge):
            await client.post(url, "/x", b"{}", 30.0, limit=1 << 20)
        assert asyncio.get_running_loop().time() - t0 < 10
        assert not client.pool(url).idle  # the connection is closed, never reused
        # an answer under the bound still comes back whole on a new connection
        small = UpstreamClient(idle_timeout=4.0)
        runner2, url2, _ = await aiohttp_server(lambda request: _sized(900_000))
        try:
            status, body = await small.post(url2, "/x", b"{}", 5.0, limit=1 << 20)
            assert status == 200 and len(body) == 900_000
        finally:
            small.close()
            await runner2.cleanup()
    finally:
        client.close()
        await runner.cleanup()


async def _sized(n: int) -> web.Response:
    return web.Response(body=b"x" * n)


async def test_a_refused_connection_is_connect_failed() -> None:
    client = UpstreamClient(idle_timeout=4.0)
    with pytest.raises(ConnectFailed) as e:
        await client.post(f"http://127.0.0.1:{free_port()}", "/x", b"{}", 5.0)
    assert isinstance(e.value.os_error, ConnectionRefusedError)


async def test_a_drop_says_whether_the_connection_had_served_before() -> None:
    async def once_then_silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n{}")  # the first request: answered, kept alive
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await reader.readuntil(b"\r\n\r\n{}")  # the second: the server goes away without an answer
        writer.close()

    server = await asyncio.start_server(once_then_silent, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    silent, silent_url = await raw_server(b"", close=True)
    client = UpstreamClient(idle_timeout=4.0)
    try:
        with pytest.raises(ConnectionDropped) as new:
            await client.post(silent_url, "/x", b"{}", 5.0)
        assert new.value.reused is False
        assert await client.post(url, "/x", b"{}", 5.0) == (200, b"ok")
        with pytest.raises(ConnectionDropped) as kept:
            await client.post(url, "/x", b"{}", 5.0)
        assert kept.value.reused is True
    finally:
        client.close()
        server.close()
        silent.close()


@pytest.mark.parametrize("answer, close, failure", [
    pytest.param(b"", True, ConnectionDropped, id="closed without an answer"),
    pytest.param(b'HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{"da', True, ConnectionDropped, id="half an answer"),
    pytest.param(b"SSH-2.0-OpenSSH_9.6\r\n\r\n", False, InvalidResponse, id="not HTTP"),
])
async def test_an_answer_that_is_not_a_whole_http_answer_is_a_typed_failure(answer, close, failure) -> None:
    server, url = await raw_server(answer, close=close)
    client = UpstreamClient(idle_timeout=4.0)
    try:
        with pytest.raises(failure):
            await client.post(url, "/x", b"{}", 5.0)
        assert not client.pool(url).idle
    finally:
        server.close()


async def test_connection_close_in_the_answer_is_honoured() -> None:
    server, url = await raw_server(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}", close=True)
    client = UpstreamClient(idle_timeout=4.0)
    try:
        assert await client.post(url, "/x", b"{}", 5.0) == (200, b"{}")
        assert not client.pool(url).idle, "a connection the server closes must not be kept"
        assert await client.post(url, "/x", b"{}", 5.0) == (200, b"{}")  # a fresh one
    finally:
        server.close()


async def test_a_slow_answer_times_out_and_its_connection_is_not_reused() -> None:
    release = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        if request.path == "/slow":
            await release.wait()
        return web.Response(body=b"ok")

    runner, url, seen = await aiohttp_server(slow)
    client = UpstreamClient(idle_timeout=4.0)
    try:
        with pytest.raises(asyncio.TimeoutError):
            await client.post(url, "/slow", b"{}", 0.2)
        assert not client.pool(url).idle
        assert await client.post(url, "/fast", b"{}", 5.0) == (200, b"ok")
        assert seen[0] is not seen[1], "the timed-out connection must be closed, not reused"
    finally:
        release.set()
        client.close()
        await runner.cleanup()


async def test_a_cancelled_request_closes_its_connection() -> None:
    started, gone = asyncio.Event(), asyncio.Event()

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        started.set()
        while await reader.read(1024):  # never answers; b"" once the client has closed
            pass
        gone.set()
        writer.close()

    server = await asyncio.start_server(on_client, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    client = UpstreamClient(idle_timeout=4.0)
    try:
        task = asyncio.ensure_future(client.post(url, "/x", b"{}", 60.0))
        await asyncio.wait_for(started.wait(), 5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.wait_for(gone.wait(), 5)  # the server saw the connection close
        assert not client.pool(url).idle
    finally:
        client.close()
        server.close()


async def test_an_idle_connection_past_its_keep_alive_is_not_used() -> None:
    runner, url, seen = await aiohttp_server(lambda request: _ok())
    client = UpstreamClient(idle_timeout=0.05)
    try:
        await client.post(url, "/a", b"{}", 5.0)
        await asyncio.sleep(0.1)
        await client.post(url, "/b", b"{}", 5.0)
        assert seen[0] is not seen[1]
    finally:
        client.close()
        await runner.cleanup()


async def _ok() -> web.Response:
    return web.Response(body=b"ok")
