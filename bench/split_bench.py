"""The splitting rows of the benchmark (target `split`, see bench/README.md): a 256-input embeddings request
and a 1,000-document rerank through a 1-worker gateway in front of 1 vs 2 replicas of
bench/fast_upstream.py in its per-item mode (its answer comes `--per-item-ms` later per item, as a
GPU's would). The goal is 2 replicas taking at most 0.6x the time of one (SPLIT_EMBEDDING_INPUTS /
SPLIT_RERANK_DOCUMENTS = 32, the cache off so every request reaches the upstreams).

The 1- and the 2-replica setups of a case run side by side and their requests alternate, one in
flight at a time, so that other work on the machine slows both rows alike. Pinning, the same for
both: the gateway on the proxy core (core 0), the fake replicas on the load core (core 1,
BENCH_LOAD_CPU) with this driver, which waits while they work. A deployment has each replica on its
own GPU host; what is measured is the gateway, so its core is its own, as in the other rows. The
client keeps one connection (as an SDK does) and reads each answer into one reused buffer; the
warm-up answers are checked (one vector or score per item).
"""

from __future__ import annotations

import http.client
import json
import os
import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from devtools.procs import free_port, wait_until

if TYPE_CHECKING:
    from bench import Bench

GOAL_RATIO = 0.6
REPLICA_CPU = os.environ.get("BENCH_LOAD_CPU", "1")  # bench.py's LOAD_CPU: the fake replicas and this driver
CASES = (  # (name, path, body, per-item ms of the fake upstream)
    ("embeddings, 256 inputs", "/v1/embeddings",
     {"model": "bench-embed", "input": [f"input number {i}" for i in range(256)]}, 0.5),
    ("rerank, 1,000 documents", "/v1/rerank",
     {"model": "bench-embed", "query": "which one", "documents": [f"document {i}" for i in range(1000)]}, 0.2),
)


class Client:
    """One keep-alive connection to the gateway; each answer read whole into one reused buffer."""

    def __init__(self, port: int, token: str) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        self.headers = {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}
        self.buf = bytearray(1 << 20)

    def post(self, path: str, body: bytes) -> tuple[float, memoryview]:
        """(seconds from sending the request to the answer's last byte, the answer)."""
        t0 = time.perf_counter()
        self.conn.request("POST", path, body=body, headers=self.headers)
        r = self.conn.getresponse()
        if r.status != 200:
            raise RuntimeError(f"{path} answered {r.status}: {r.read()[:300]!r}")
        length = r.getheader("content-length")  # or chunked: http.client reads either into the buffer
        if length is not None and int(length) >= len(self.buf):
            self.buf = bytearray(int(length) + 65536)
        got = 0
        while True:
            if got == len(self.buf):
                self.buf.extend(bytes(len(self.buf)))
            k = r.readinto(memoryview(self.buf)[got:])
            if not k:
                break
            got += k
        if length is not None and got != int(length):
            raise RuntimeError(f"{path}: the answer ended after {got} of {length} bytes")
        view = memoryview(self.buf)[:got]
        return time.perf_counter() - t0, view

    def close(self) -> None:
        self.conn.close()


def _check(path: str, answer: memoryview, items: int) -> None:
    doc = json.loads(bytes(answer))
    got = len(doc["data"]) if path == "/v1/embeddings" else len(doc["results"])
    if got != items:
        raise RuntimeError(f"{path} answered {got} items for {items}")


def split_rows(bench: "Bench", duration: float, *, python: Path, bench_dir: Path, root: Path, cpu: str,
               http: Callable[..., tuple[int, Any]]) -> list[dict[str, Any]]:
    """Per case, the 1-replica and the 2-replica setups run side by side and their requests alternate (one
    request in flight at a time), so that other work on the machine slows both rows alike; each row gets
    `duration` seconds of requests."""
    rows: list[dict[str, Any]] = []
    for name, path, doc, per_item_ms in CASES:
        body = json.dumps(doc).encode()
        items = len(doc.get("input") or doc.get("documents"))
        procs: list[Any] = []
        pair = [{"case": name, "replicas": replicas, "per_item_ms": per_item_ms, "gateway_cpu": cpu,
                 "replica_cpu": REPLICA_CPU} for replicas in (1, 2)]
        clients: list[Client] = []
        try:
            for row in pair:
                urls = []
                for i in range(row["replicas"]):
                    port = free_port()
                    procs.append(bench.procs.start(f"split-upstream-{row['replicas']}-{i}", [
                        str(python), str(bench_dir / "fast_upstream.py"), "--port", str(port), "--delay-ms", "2",
                        "--per-item-ms", str(per_item_ms), "--dim", "1024"], cpu=REPLICA_CPU))
                    urls.append(f"http://127.0.0.1:{port}")
                env = bench.gateway_env(",".join(urls), WORKERS="1", CACHE_MAX_BYTES="0",
                                        SPLIT_EMBEDDING_INPUTS="32", SPLIT_RERANK_DOCUMENTS="32")
                env["RERANKER_UPSTREAMS"] = env["EMBEDDING_UPSTREAMS"]
                gw = bench.procs.start(f"split-gateway-{row['replicas']}",
                                       [str(python), str(root / "embedding_reranker_proxy.py")], env=env, cpu=cpu)
                procs.append(gw)
                url = f"http://127.0.0.1:{env['PORT']}"
                wait_until("split gateway", lambda: http("GET", url + "/health")[0] == 200, 60, gw)
                clients.append(Client(int(env["PORT"]), bench.token))
            time.sleep(1.0)  # every replica healthy (HEALTH_INTERVAL) before measuring
            for client in clients:  # warm-up, checked
                _check(path, client.post(path, body)[1], items)
            times: list[list[float]] = [[], []]
            end = time.monotonic() + 2 * duration
            while time.monotonic() < end or len(times[1]) < 5:
                for client, t in zip(clients, times):
                    t.append(client.post(path, body)[0])
            for row, t in zip(pair, times):
                row.update({"requests": len(t), "mean_ms": round(1000 * statistics.mean(t), 1),
                            "p50_ms": round(1000 * statistics.median(t), 1)})
        except Exception as e:  # noqa: BLE001 - recorded in the rows
            for row in pair:
                row.setdefault("error", str(e)[:800])
        finally:
            for client in clients:
                client.close()
            for p in procs:
                bench.procs.stop(p)
        rows += pair
        one, two = pair
        if "mean_ms" in one and "mean_ms" in two:
            two["ratio_vs_1"] = round(two["mean_ms"] / one["mean_ms"], 2)
            two["goal_met"] = two["ratio_vs_1"] <= GOAL_RATIO
    return rows


def markdown_rows(rows: list[dict[str, Any]]) -> list[str]:
    gw_cpu = rows[0].get("gateway_cpu", "0") if rows else "0"
    rep_cpu = rows[0].get("replica_cpu", REPLICA_CPU) if rows else REPLICA_CPU
    lines = ["", "## Splitting across replicas", "",
             f"1-worker gateway on core {gw_cpu}, cache off, one keep-alive connection, one request at a time, "
             f"the 1- and 2-replica setups side by side with their requests alternating; the fake replicas "
             f"(per-item delay, each answer printed once per item count) on core {rep_cpu} with the client. "
             f"Goal: 2 replicas at most {GOAL_RATIO}x the time of one.", "",
             "| request | replicas | per-item ms | requests | mean ms | p50 ms | vs 1 replica | goal |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['case']} | {r['replicas']} | {r['per_item_ms']} | – | – | – | – | **{r['error'][:200]}** |")
            continue
        ratio = f"{r['ratio_vs_1']:.2f}x" if "ratio_vs_1" in r else "–"
        goal = ("met" if r["goal_met"] else "**missed**") if "goal_met" in r else ""
        lines.append(f"| {r['case']} | {r['replicas']} | {r['per_item_ms']} | {r['requests']} | {r['mean_ms']:.1f} | "
                     f"{r['p50_ms']:.1f} | {ratio} | {goal} |")
    return lines
