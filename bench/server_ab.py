"""The server under the gateway, A/B: uvicorn against Granian, the bare floor and the gateway.

Every target is started at once (pinned to core 0 like bench.py's, idle between turns), then each
round runs a short wrk row per target and connection count in a shuffled order, so that load from
elsewhere on a shared machine falls on every target alike; the table gives medians over the rounds.
Run through bench/server_ab.sh (the benchmark lock, the pinning, clean-up on exit).

Results: bench/results/runs/server-ab-STAMP.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import bench as B  # noqa: E402

TARGETS = {
    "bare": ("bare uvicorn+aiohttp (floor)", B.Bench.start_bare),
    "bare-granian": ("bare Granian ASGI+aiohttp", B.Bench.start_bare_granian),
    "bare-granian-rsgi": ("bare Granian RSGI+aiohttp", B.Bench.start_bare_granian_rsgi),
    "gateway-1w-uvicorn": ("gateway, 1 worker, uvicorn", B.Bench.start_gateway1_uvicorn),
    "gateway-1w-granian": ("gateway, 1 worker, Granian", B.Bench.start_gateway1_granian),
}


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="bench/server_ab.sh", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--duration", type=float, default=3.0, help="seconds per row")
    p.add_argument("--connections", default="1,32,256")
    p.add_argument("--targets", default=",".join(TARGETS), help=f"comma-separated subset of: {', '.join(TARGETS)}")
    a = p.parse_args(argv)
    names = [n.strip() for n in a.targets.split(",") if n.strip()]
    conns = [int(c) for c in a.connections.split(",")]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    work = B.RESULTS / "tmp" / f"server-ab-{stamp}"
    work.mkdir(parents=True, exist_ok=True)
    bench = B.Bench(B.parse_args(["--quick"]), work)
    samples: dict[str, dict[int, list[dict]]] = {n: {c: [] for c in conns} for n in names}
    try:
        bench.start_upstream()
        targets = {}
        for n in names:
            t = B.Target(n, TARGETS[n][0], TARGETS[n][1])
            t.start(bench, t)
            B.run_wrk(t.url, 32, 2, 5, t.auth)  # warm-up
            targets[n] = t
        for r in range(a.rounds):
            order = random.sample(names, len(names))
            for c in conns:
                for n in order:
                    t = targets[n]
                    with B.TreeSampler(t.proc.pid) as s:
                        w = B.run_wrk(t.url, c, a.duration, 5, t.auth)
                    w["proxy_cpu_pct"] = s.cpu_pct
                    samples[n][c].append(w)
                    B.log(f"round {r + 1}/{a.rounds} {n:<20} c={c:<4} {w['rps']:8.0f} req/s  p50 {w['p50_ms']:.2f} ms  "
                          f"p99 {w['p99_ms']:.1f} ms  cpu {w['proxy_cpu_pct']}%  non2xx {w['non_2xx']}")
    finally:
        bench.procs.stop_all()
    md = markdown(samples, names, conns, a, stamp)
    out = B.RESULTS / "runs"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"server-ab-{stamp}.json").write_text(json.dumps({"args": vars(a), "machine": B.machine_info(),
                                                             "samples": samples}, indent=1) + "\n")
    (out / f"server-ab-{stamp}.md").write_text(md)
    print("\n" + md)
    return 0


def markdown(samples: dict, names: list[str], conns: list[int], a: argparse.Namespace, stamp: str) -> str:
    med = statistics.median
    lines = [f"# Server A/B — {stamp}", "",
             f"{a.rounds} rounds of {a.duration:g} s rows per target, shuffled; medians (req/s: all samples in "
             "brackets). Proxy and fake upstream on core 0, wrk on core 1. CPU %: the proxy's process tree.", "",
             "| target | conns | req/s | p50 ms | p99 ms | CPU % | req/s samples | non-2xx |",
             "|---|---:|---:|---:|---:|---:|---|---:|"]
    for c in conns:
        for n in names:
            ws = samples[n][c]
            lines.append(f"| {TARGETS[n][0]} | {c} | {med(w['rps'] for w in ws):,.0f} | {med(w['p50_ms'] for w in ws):.2f} | "
                         f"{med(w['p99_ms'] for w in ws):.1f} | {med(w['proxy_cpu_pct'] or 0 for w in ws):.0f} | "
                         f"{', '.join(str(round(w['rps'])) for w in sorted(ws, key=lambda w: w['rps']))} | "
                         f"{sum(w['non_2xx'] for w in ws)} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
