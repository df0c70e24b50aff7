"""The splitting rows of the benchmark (target `split`, see bench/README.md): a 256-input embeddings request
and a 1,000-document rerank through a 1-worker gateway in front of 1 vs 2 replicas of
bench/fast_upstream.py in its per-item mode (its answer comes `--per-item-ms` later per item, as a
GPU's would). Requests are sent one after another for the row's duration; the goal is 2 replicas
taking at most 0.6x the time of one (SPLIT_EMBEDDING_INPUTS / SPLIT_RERANK_DOCUMENTS = 32, the cache
off so every request reaches the upstreams).
"""

from __future__ import annotations

import json
import statistics
import time
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from devtools.procs import free_port, wait_until

if TYPE_CHECKING:
    from bench import Bench

GOAL_RATIO = 0.6
CASES = (  # (name, path, body, per-item ms of the fake upstream)
    ("embeddings, 256 inputs", "/v1/embeddings",
     {"model": "bench-embed", "input": [f"input number {i}" for i in range(256)]}, 0.5),
    ("rerank, 1,000 documents", "/v1/rerank",
     {"model": "bench-embed", "query": "which one", "documents": [f"document {i}" for i in range(1000)]}, 0.2),
)


def _post(url: str, path: str, body: bytes, token: str) -> float:
    req = urllib.request.Request(url + path, data=body, method="POST", headers={
        "Content-Type": "application/json", "Authorization": f"Bearer {token}"})
    t0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=30) as r:
        r.read()
        if r.status != 200:
            raise RuntimeError(f"{path} answered {r.status}")
    return time.perf_counter() - t0


def split_rows(bench: "Bench", duration: float, *, python: Path, bench_dir: Path, root: Path, cpu: str,
               http: Callable[..., tuple[int, Any]]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for name, path, doc, per_item_ms in CASES:
        body = json.dumps(doc).encode()
        for replicas in (1, 2):
            procs = []
            row: dict[str, Any] = {"case": name, "replicas": replicas, "per_item_ms": per_item_ms}
            try:
                urls = []
                for i in range(replicas):
                    port = free_port()
                    procs.append(bench.procs.start(f"split-upstream-{i}", [
                        str(python), str(bench_dir / "fast_upstream.py"), "--port", str(port), "--delay-ms", "2",
                        "--per-item-ms", str(per_item_ms), "--dim", "1024"]))
                    urls.append(f"http://127.0.0.1:{port}")
                env = bench.gateway_env(",".join(urls), WORKERS="1", CACHE_MAX_BYTES="0",
                                        SPLIT_EMBEDDING_INPUTS="32", SPLIT_RERANK_DOCUMENTS="32")
                env["RERANKER_UPSTREAMS"] = env["EMBEDDING_UPSTREAMS"]
                gw = bench.procs.start("split-gateway", [str(python), str(root / "embedding_reranker_proxy.py")],
                                       env=env, cpu=cpu)
                procs.append(gw)
                url = f"http://127.0.0.1:{env['PORT']}"
                wait_until("split gateway", lambda: http("GET", url + "/health")[0] == 200, 60, gw)
                time.sleep(1.0)  # every replica healthy (HEALTH_INTERVAL) before measuring
                _post(url, path, body, bench.token)  # warm-up
                times = []
                end = time.monotonic() + duration
                while time.monotonic() < end or len(times) < 5:
                    times.append(_post(url, path, body, bench.token))
                row.update({"requests": len(times), "mean_ms": round(1000 * statistics.mean(times), 1),
                            "p50_ms": round(1000 * statistics.median(times), 1)})
            except Exception as e:  # noqa: BLE001 - recorded in the row
                row["error"] = str(e)[:800]
            finally:
                for p in procs:
                    bench.procs.stop(p)
            rows.append(row)
        one, two = rows[-2], rows[-1]
        if "mean_ms" in one and "mean_ms" in two:
            two["ratio_vs_1"] = round(two["mean_ms"] / one["mean_ms"], 2)
            two["goal_met"] = two["ratio_vs_1"] <= GOAL_RATIO
    return rows


def markdown_rows(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["", "## Splitting across replicas", "",
             f"1-worker gateway, cache off, requests one after another; fake upstream per-item delay. "
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
