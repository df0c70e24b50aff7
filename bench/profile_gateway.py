"""Profile the gateway under load with py-spy (run through bench/profile.sh; see bench/README.md).

Starts the fast fake upstream and the gateway (1 worker by default; or 2 workers + Redis) pinned to
core 0, drives it with wrk at 32 connections (core 1), and while the load runs records with py-spy:
  1. a flame graph (SVG) for --seconds;
  2. the raw collapsed stacks for another --seconds, summarised like `py-spy top`: the functions
     with the most samples on-CPU, by own time and by total (inclusive) time.
Writes bench/results/profiles/profile-<stamp>.{svg,collapsed,txt} and copies as profile-latest.*
(git-ignored: py-spy's stacks carry this machine's absolute paths; ANALYSIS.md quotes what they show).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench as b  # noqa: E402


def summarise(collapsed: Path, top: int) -> str:
    """A `py-spy top`-like table from py-spy's raw (collapsed) output: own and total share of samples."""
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    samples = idle = 0
    for line in collapsed.read_text(errors="replace").splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        count = int(n)
        frames = stack.split(";")
        # drop the thread/process header frames py-spy adds, keep "function (file:line)" frames
        frames = [f for f in frames if "(" in f] or frames
        if _idle_pool_thread(frames):
            idle += count
            continue
        samples += count
        own[_func(frames[-1])] += count
        for f in {_func(x) for x in frames}:
            total[f] += count
    if not samples:
        return "no samples recorded\n"
    lines = [f"{samples} samples" + (f" ({idle} more of idle thread-pool threads waiting for work left out)"
                                     if idle else ""), "", "  %Own  %Total  function (file)", "------  ------  " + "-" * 60]
    for name, n in own.most_common(top):
        lines.append(f"{100 * n / samples:6.1f}  {100 * total[name] / samples:6.1f}  {name}")
    lines += ["", "By total (inclusive) time:", "", "%Total   %Own  function (file)", "------  ------  " + "-" * 60]
    for name, n in total.most_common(top):
        lines.append(f"{100 * n / samples:6.1f}  {100 * own[name] / samples:6.1f}  {name}")
    return "\n".join(lines) + "\n"


def _idle_pool_thread(frames: list[str]) -> bool:
    """A thread-pool thread blocked on its queue: py-spy sometimes counts it as active; it is not."""
    return bool(frames) and frames[-1].startswith("_worker (") and "concurrent/futures/thread.py" in frames[-1] \
        and all("threading.py" in f or "concurrent/futures/thread.py" in f for f in frames)


def _func(frame: str) -> str:
    """`handle (erproxy/app.py:120)` -> `handle (erproxy/app.py)`: group a function's lines together."""
    name, sep, rest = frame.partition(" (")
    if not sep:
        return frame
    path = rest.rstrip(")").rsplit(":", 1)[0]
    for marker in ("site-packages/", "/lib/python3"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    else:
        path = path.replace(str(b.ROOT) + "/", "")
    return f"{name} ({path})"


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="bench/profile.sh", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=10.0, help="seconds of each py-spy recording (default 10)")
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--workers", type=int, choices=(1, 2), default=1, help="1, or 2 with Redis")
    p.add_argument("--rate", type=int, default=100, help="py-spy samples per second")
    p.add_argument("--top", type=int, default=40, help="lines in the text summary")
    p.add_argument("--py-spy", default=os.environ.get("BENCH_PY_SPY", "py-spy"))
    p.add_argument("--upstream-delay-ms", type=float, default=2.0)
    a = p.parse_args(argv)

    stamp = time.strftime("%Y%m%d-%H%M%S")
    workdir = b.RESULTS / "tmp" / f"profile-{stamp}"
    workdir.mkdir(parents=True, exist_ok=True)
    args = b.parse_args(["--duration", "1", "--warmup", "2"])
    args.upstream_delay_ms = a.upstream_delay_ms
    bench = b.Bench(args, workdir)

    def on_signal(signum: int, _frame: object) -> None:
        for s in (b.signal.SIGINT, b.signal.SIGTERM, b.signal.SIGHUP):
            b.signal.signal(s, b.signal.SIG_IGN)
        raise KeyboardInterrupt(f"signal {signum}")

    for s in (b.signal.SIGINT, b.signal.SIGTERM, b.signal.SIGHUP):
        b.signal.signal(s, on_signal)

    out = b.RESULTS / "profiles"
    out.mkdir(parents=True, exist_ok=True)
    svg, raw, txt = (out / f"profile-{stamp}.{ext}" for ext in ("svg", "collapsed", "txt"))
    load: dict[str, object] = {}
    try:
        bench.start_upstream()
        name = "gateway-1w" if a.workers == 1 else "gateway-2w-redis"
        t = b.Target(name, name, b.Bench.start_gateway1 if a.workers == 1 else b.Bench.start_gateway2)
        b.log(f"starting {name}")
        t.start(bench, t)
        b.run_wrk(t.url, a.connections, 2, args.wrk_timeout, t.auth)  # warm-up
        load_s = 2 * a.seconds + 4

        def drive() -> None:
            try:
                load["wrk"] = b.run_wrk(t.url, a.connections, load_s, args.wrk_timeout, t.auth)
            except Exception as e:  # noqa: BLE001 - reported below
                load["error"] = str(e)

        th = threading.Thread(target=drive, daemon=True)
        th.start()
        time.sleep(1.0)
        assert t.proc is not None
        spy = ["taskset", "-c", b.LOAD_CPU, a.py_spy, "record", "--pid", str(t.proc.pid), "--rate", str(a.rate),
               "--duration", str(max(1, round(a.seconds))), "--subprocesses"]
        for fmt, path in (("flamegraph", svg), ("raw", raw)):
            b.log(f"py-spy record --format {fmt} for {a.seconds:g} s -> {path}")
            r = subprocess.run(spy + ["--format", fmt, "--output", str(path)], capture_output=True, text=True,
                               timeout=a.seconds + 60)
            if r.returncode != 0:
                raise RuntimeError(f"py-spy failed ({r.returncode}): {(r.stdout + r.stderr)[-1500:]}")
        th.join(load_s + 60)
    except KeyboardInterrupt as e:
        b.log(f"interrupted ({e})")
        return 130
    finally:
        bench.procs.stop_all()

    w = load.get("wrk")
    head = [f"py-spy profile of the gateway ({a.workers} worker{'s + Redis' if a.workers > 1 else ''}) under "
            f"{a.connections} connections of wrk, {stamp}",
            f"upstream: bench/fast_upstream.py ({a.upstream_delay_ms:g} ms); gateway and upstream on core "
            f"{b.PROXY_CPU}, wrk and py-spy on core {b.LOAD_CPU}; {a.rate} samples/s, idle time excluded",
            (f"load while profiling: {w['rps']:.0f} req/s, p50 {w['p50_ms']:.2f} ms, p99 {w['p99_ms']:.2f} ms, "
             f"non-2xx {w['non_2xx']}, socket errors {w['socket_errors']} (py-spy's sampling slows the process)"
             if isinstance(w, dict) else f"load: {load.get('error', 'no result')}"),
            f"flame graph: {svg.name}; raw stacks: {raw.name}", ""]
    txt.write_text("\n".join(head) + "\n" + summarise(raw, a.top))
    for path in (svg, raw, txt):
        shutil.copyfile(path, out / f"profile-latest{path.suffix}")
    print(txt.read_text())
    b.log(f"wrote {svg}, {raw}, {txt} (and profile-latest.*)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
