"""CPU cost per upstream request: aiohttp's client against the gateway's own (erproxy/upstream_client.py).

Starts bench/fast_upstream.py (no delay) pinned to core 1, then from core 0 sends the same POST with
32 requests in flight through each client, several rounds alternating, and prints the process CPU
time per request (the number that decides a proxy's throughput when its core is the bottleneck).

Run: .venv/bin/python bench/client_bench.py [--requests 20000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from devtools.procs import free_port  # noqa: E402
from erproxy.upstream_client import UpstreamClient  # noqa: E402

BODY = b'{"model": "bench-embed", "input": "hello world"}'


async def measure(kind: str, url: str, n: int, concurrency: int = 32) -> tuple[float, float]:
    if kind == "aiohttp":
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1000), auto_decompress=False,
                                        timeout=aiohttp.ClientTimeout(total=300))

        async def one() -> int:
            async with session.post(url + "/v1/embeddings", data=BODY,
                                    headers={"Content-Type": "application/json"}) as r:
                await r.read()
                return r.status
    else:
        client = UpstreamClient(idle_timeout=4.0)

        async def one() -> int:
            return (await client.post(url, "/v1/embeddings", BODY, 300.0))[0]

    per = n // concurrency

    async def worker() -> None:
        for _ in range(per):
            assert await one() == 200

    await asyncio.gather(*[worker() for _ in range(concurrency)])  # warm-up: connections open
    c0, t0 = time.process_time(), time.perf_counter()
    await asyncio.gather(*[worker() for _ in range(concurrency)])
    cpu, wall = time.process_time() - c0, time.perf_counter() - t0
    if kind == "aiohttp":
        await session.close()
    else:
        client.close()
    return cpu / (per * concurrency) * 1e6, per * concurrency / wall


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=20000)
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args()
    port = free_port()
    upstream = subprocess.Popen(["taskset", "-c", "1", sys.executable, str(ROOT / "bench" / "fast_upstream.py"),
                                 "--port", str(port), "--delay-ms", "0"], stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(url + "/health", timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        os.sched_setaffinity(0, {0})
        try:
            import uvloop
            run = uvloop.run
        except ImportError:
            run = asyncio.run
        print("client     CPU us/request   req/s")
        for _ in range(a.rounds):
            for kind in ("aiohttp", "erproxy"):
                cpu, rps = run(measure(kind, url, a.requests))
                print(f"{kind:<10} {cpu:>14.1f} {rps:>8.0f}", flush=True)
    finally:
        upstream.terminate()
        upstream.wait(5)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
