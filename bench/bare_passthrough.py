"""Reference floor for the benchmark: the barest uvicorn + aiohttp pass-through (no auth, limits,
metrics, logs or validation), on the same server and client stack as the gateway. The gap between
this row and the gateway's is what the gateway's own features cost.

Run: python bench/bare_passthrough.py --port P --upstream http://127.0.0.1:U
"""

import argparse

import aiohttp
import uvicorn


def make_app(upstream: str):
    state: dict = {}

    async def app(scope, receive, send):
        if scope["type"] == "lifespan":
            while True:
                msg = await receive()
                if msg["type"] == "lifespan.startup":
                    state["s"] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1000, keepalive_timeout=4))
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


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--upstream", required=True)
    a = p.parse_args()
    uvicorn.run(make_app(a.upstream), host="127.0.0.1", port=a.port, loop="uvloop", http="httptools",
                access_log=False, log_level="warning", proxy_headers=False)
