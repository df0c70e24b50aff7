"""Load benchmark of the gateway against direct access, nginx and LiteLLM's proxy (see bench/README.md).

Run through bench/run.sh, which installs wrk, nginx, redis-server and LiteLLM first. Everything
listens on 127.0.0.1; the fake upstream and every proxy run on core 0 (`taskset -c 0`), wrk and this
script on core 1. Every process started here is in its own process group, killed on exit (also on
Ctrl-C, SIGTERM or an error), and listed in $BENCH_PGID_FILE so that run.sh's trap can kill what a
hard-killed Python left behind.

Results: bench/results/latest.{json,md} and a timestamped copy under bench/results/runs/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
if str(ROOT) not in sys.path:  # devtools/ (shared with tests/) lives at the repository root
    sys.path.append(str(ROOT))

from devtools.procs import Proc, free_port, spawn, tail, wait_until  # noqa: E402
RESULTS = BENCH / "results"
VENV_PY = Path(os.environ.get("BENCH_GATEWAY_PYTHON", ROOT / ".venv" / "bin" / "python"))
LITELLM_VENV = Path(os.environ.get("BENCH_LITELLM_VENV", Path.home() / ".cache" / "erproxy" / "litellm-venv"))
PROXY_CPU = os.environ.get("BENCH_PROXY_CPU", "0")
LOAD_CPU = os.environ.get("BENCH_LOAD_CPU", "1")
MODEL = "bench-embed"
BODY = '{"model": "bench-embed", "input": "hello world"}'
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")

# Targets reported (not asserted); see issue 6 and bench/README.md.
TARGET_ADDED_P50_MS = 0.3
TARGET_ADDED_P99_MS = 1.0
TARGET_VS_NGINX = 0.5
TARGET_VS_LITELLM = 50.0
TARGET_RSS_MB = 150.0
# Issue 15 ("fast at the seed's scale"): per core, the gateway with every feature on against the bare floor
TARGET_VS_FLOOR = 0.9        # throughput at 32 and 256 connections
TARGET_P99_VS_FLOOR = 1.5    # p99 at 256 connections, at most this multiple of the floor's
TARGET_P50_OVER_FLOOR_MS = 0.1  # p50 at 1 connection, at most this much above the floor's
TARGET_REDIS_VS_1W = 0.85    # 2 workers + Redis on one core, against one worker without Redis
TARGET_4W_VS_1W = 1.7        # 4 workers on 2 cores, against one worker on one core
# measured side by side with gateway-1w (Bench.measure_together), in this order
PAIRED = ("gateway-1w", "bare", "gateway-1w-redis", "gateway-2w-redis", "bare-2w", "gateway-4w-2cores")


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def http(method: str, url: str, body: str | None = None, headers: dict[str, str] | None = None,
         timeout: float = 5.0) -> tuple[int, bytes]:
    req = urllib.request.Request(url, method=method, data=body.encode() if body is not None else None,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


# ---- processes ---------------------------------------------------------------------------------

class Procs:
    """Every process the benchmark starts: own session (process group), pinned, killed on exit."""

    def __init__(self, workdir: Path, pgid_file: Path | None) -> None:
        self.workdir = workdir
        self.pgid_file = pgid_file
        self.procs: list[Proc] = []
        self.lock = threading.Lock()

    def _write_pgids(self) -> None:
        if self.pgid_file:
            self.pgid_file.write_text("".join(f"{p.pid}\n" for p in self.procs if p.alive()))

    def start(self, name: str, cmd: list[str], env: dict[str, str] | None = None, cpu: str | None = PROXY_CPU,
              cwd: Path = ROOT) -> Proc:
        full = (["taskset", "-c", cpu] if cpu is not None else []) + cmd
        with self.lock:
            proc = spawn(full, self.workdir / f"{name}.log", cwd=cwd, env=env, name=name, new_session=True)
            self.procs.append(proc)
            self._write_pgids()
        return proc

    def stop(self, proc: Proc, timeout: float = 8.0) -> None:
        proc.stop(timeout=timeout)  # its whole process group: SIGTERM, then SIGKILL
        with self.lock:
            if proc in self.procs:
                self.procs.remove(proc)
            self._write_pgids()

    def stop_all(self) -> None:
        for proc in list(reversed(self.procs)):
            self.stop(proc, timeout=5.0)


def children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = Path(f"/proc/{d}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rfind(")") + 2:].split()[1])
        kids.setdefault(ppid, []).append(int(d))
    return kids


def tree(pid: int) -> list[int]:
    kids = children_map()
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, ()))
    return out


def proc_stats(pid: int) -> tuple[int, float] | None:
    """(RSS bytes, CPU seconds) of one process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        statm = Path(f"/proc/{pid}/statm").read_text()
    except OSError:
        return None
    f = stat[stat.rfind(")") + 2:].split()
    return int(statm.split()[1]) * PAGE, (int(f[11]) + int(f[12])) / CLK_TCK


def cpu_ticks(cpu: str) -> tuple[int, int] | None:
    """(busy, total) jiffies of one CPU (first in a taskset list) from /proc/stat."""
    want = "cpu" + cpu.split(",")[0].split("-")[0]
    for line in Path("/proc/stat").read_text().splitlines():
        f = line.split()
        if f and f[0] == want:
            v = [int(x) for x in f[1:]]
            idle = v[3] + (v[4] if len(v) > 4 else 0)
            return sum(v[:8]) - idle, sum(v[:8])
    return None


class TreeSampler:
    """Samples the RSS of a process tree during a run (max of the sum, max of one process) and its CPU."""

    def __init__(self, pid: int | None, interval: float = 0.5) -> None:
        self.pid, self.interval = pid, interval
        self.max_rss = 0
        self.max_proc_rss = 0
        self.nprocs = 0
        self.cpu0 = self._cpu()
        self.t0 = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _cpu(self) -> float:
        if self.pid is None:
            return 0.0
        return sum(s[1] for p in tree(self.pid) if (s := proc_stats(p)))

    def sample(self) -> None:
        if self.pid is None:
            return
        stats = [s for p in tree(self.pid) if (s := proc_stats(p))]
        if stats:
            self.max_rss = max(self.max_rss, sum(s[0] for s in stats))
            self.max_proc_rss = max(self.max_proc_rss, max(s[0] for s in stats))
            self.nprocs = max(self.nprocs, len(stats))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> "TreeSampler":
        self.cpu0 = self._cpu()
        self.t0 = time.monotonic()
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()
        self.cpu_pct = None if self.pid is None else round(
            100.0 * (self._cpu() - self.cpu0) / max(time.monotonic() - self.t0, 1e-6), 1)


# ---- load generator ------------------------------------------------------------------------------

def run_wrk(url: str, conns: int, duration: float, timeout_s: float, auth: str = "", body: str = BODY,
            path: str = "/v1/embeddings", header: str = "") -> dict[str, Any]:
    env = {**os.environ, "BENCH_BODY": body, "BENCH_AUTH": auth, "BENCH_PATH": path, "BENCH_HEADER": header}
    cmd = ["taskset", "-c", LOAD_CPU, "wrk", "-t1", f"-c{conns}", f"-d{max(1, round(duration))}s",
           f"--timeout", f"{timeout_s:g}s", "-s", str(BENCH / "post.lua"), url]
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
    try:
        out, _ = p.communicate(timeout=duration + timeout_s + 30)
        ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)  # wrk is the only child reaped meanwhile
    except BaseException:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait()
        raise
    m = re.search(r"^BENCH_JSON (\{.*\})$", out, re.M)
    if not m:
        raise RuntimeError(f"wrk gave no result (exit {p.returncode}): {out[-800:]}")
    r = json.loads(m.group(1))
    r["rps"] = round(r["requests"] / (r["duration_us"] / 1e6), 1) if r["duration_us"] else 0.0
    r["socket_errors"] = r["connect_errors"] + r["read_errors"] + r["write_errors"] + r["timeouts"]
    wrk_cpu_s = (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime)
    r["load_cpu_pct"] = round(100.0 * wrk_cpu_s / (r["duration_us"] / 1e6), 1) if r["duration_us"] else None
    return r


# ---- targets ---------------------------------------------------------------------------------------

@dataclass
class Target:
    """One system under test: how to start it, the URL wrk hits, the key, the process to measure."""

    name: str
    label: str
    start: Callable[["Bench"], None]
    url: str = ""
    auth: str = ""
    body: str = BODY
    proc: Proc | None = None
    extra: list[Proc] = field(default_factory=list)
    note: str = ""
    connections: list[int] | None = None
    header: str = ""  # one extra request header, "Name: value"


def post_ok(url: str, auth: str, body: str = BODY, timeout: float = 10.0) -> bool:
    status, _ = http("POST", url + "/v1/embeddings", body, {"Authorization": f"Bearer {auth}"} if auth else {},
                     timeout=timeout)
    return status == 200


class Bench:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        pgid_file = os.environ.get("BENCH_PGID_FILE")
        self.procs = Procs(workdir, Path(pgid_file) if pgid_file else None)
        self.token = "bench-" + secrets.token_urlsafe(24)
        self.upstream_url = ""
        self.upstream: Proc | None = None
        self.rows: list[dict[str, Any]] = []
        self.notes: list[str] = []

    # -- the fake upstream --
    def start_upstream(self) -> None:
        port = free_port()
        self.upstream = self.procs.start("fast_upstream", [
            str(VENV_PY), str(BENCH / "fast_upstream.py"), "--port", str(port), "--delay-ms",
            str(self.args.upstream_delay_ms)])
        self.upstream_url = f"http://127.0.0.1:{port}"
        wait_until("fast upstream", lambda: http("GET", self.upstream_url + "/health")[0] == 200, 20,
                   self.upstream)

    # -- the systems under test --
    def start_direct(self, t: Target) -> None:
        t.url = self.upstream_url

    def gateway_env(self, upstream: str, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR")}
        # a folder of its own: a private Redis lives beside the key file, and only one gateway per folder
        data = self.workdir / f"gateway-{secrets.token_hex(4)}"
        data.mkdir(parents=True)
        env.update({
            "ENV_FILE": "", "HOST": "127.0.0.1", "PORT": str(free_port()),
            "EMBEDDING_UPSTREAMS": upstream, "RERANKER_UPSTREAMS": upstream,
            "API_KEYS_FILE": str(data / "keys.json"),
            "LOG_DIR": str(self.workdir / "gateway-logs"), "RATE_LIMIT": "100000000/minute",
            "MAX_CONCURRENT_REQUESTS": "1000", "LOG_LEVEL": "info", "ACCESS_TOKEN": self.token,
            "CACHE_MAX_BYTES": "0",  # the pass-through rows; gateway-cache-hit turns the item cache on
        })
        env.update(extra)
        return env

    def _start_gateway(self, t: Target, name: str, env: dict[str, str], timeout: float = 60.0,
                       cpu: str | None = PROXY_CPU) -> None:
        t.proc = self.procs.start(name, [str(VENV_PY), str(ROOT / "embedding_reranker_proxy.py")], env=env, cpu=cpu)
        t.url = f"http://127.0.0.1:{env['PORT']}"
        t.auth = self.token
        wait_until(f"{name} /health", lambda: http("GET", t.url + "/health")[0] == 200, timeout, t.proc)
        wait_until(f"{name} embeddings", lambda: post_ok(t.url, t.auth, t.body), 30, t.proc, interval=0.3)

    def start_gateway1(self, t: Target) -> None:
        self._start_gateway(t, "gateway-1w", self.gateway_env(self.upstream_url, WORKERS="1"))

    def start_gateway_cache(self, t: Target) -> None:
        t.note = "item cache on: every request a hit after the first, no upstream call"
        self._start_gateway(t, "gateway-cache-hit", self.gateway_env(self.upstream_url, WORKERS="1",
                                                                      CACHE_MAX_BYTES="64MiB"))

    def start_gateway_miss(self, t: Target) -> None:
        t.note = "item cache on, every request Cache-Control: no-cache: the miss path (upstream, cut, parse, cache write)"
        t.header = "Cache-Control: no-cache"
        self._start_gateway(t, "gateway-cache-miss", self.gateway_env(self.upstream_url, WORKERS="1",
                                                                       CACHE_MAX_BYTES="64MiB"))

    def _start_redis(self, t: Target) -> str:
        """A redis-server on core 0 for `t` (stopped with it): its URL."""
        rport = free_port()
        redis = self.procs.start("redis", ["redis-server", "--bind", "127.0.0.1", "--port", str(rport),
                                           "--save", "", "--appendonly", "no", "--daemonize", "no",
                                           "--protected-mode", "no", "--dir", str(self.workdir)])
        t.extra.append(redis)
        wait_until("redis", lambda: _redis_ping(rport), 15, redis)
        return f"redis://127.0.0.1:{rport}/0"

    def start_gateway2(self, t: Target) -> None:
        t.note = "2 workers + Redis on core 0"
        self._start_gateway(t, "gateway-2w-redis", self.gateway_env(
            self.upstream_url, WORKERS="2", REDIS_URL=self._start_redis(t)))

    def start_gateway1_redis(self, t: Target) -> None:
        t.note = "1 worker with its admission in Redis, on core 0: what the Redis round trip costs alone"
        self._start_gateway(t, "gateway-1w-redis", self.gateway_env(
            self.upstream_url, WORKERS="1", REDIS_URL=self._start_redis(t)))

    def start_gateway4(self, t: Target) -> None:
        t.note = "4 workers (private Redis) on cores 0 and 1; wrk shares core 1, the upstream core 0"
        self._start_gateway(t, "gateway-4w-2cores", self.gateway_env(self.upstream_url, WORKERS="4"), cpu="0,1")

    def start_bare(self, t: Target) -> None:
        self._start_bare(t, "bare", [], "reference floor: same uvicorn + aiohttp stack, no features")

    def start_bare2(self, t: Target) -> None:
        self._start_bare(t, "bare-2w", ["--workers", "2"],
                         "the bare floor with 2 worker processes on core 0: what sharing one core costs without the gateway")

    def start_bare_granian(self, t: Target) -> None:
        self._start_bare(t, "bare-granian", ["--server", "granian"], "same ASGI pass-through served by Granian")

    def start_bare_granian_rsgi(self, t: Target) -> None:
        self._start_bare(t, "bare-granian-rsgi", ["--server", "granian-rsgi"],
                         "same pass-through on Granian's RSGI interface")

    def _start_bare(self, t: Target, name: str, args: list[str], note: str) -> None:
        """bench/bare_passthrough.py with `args`, on core 0, as target `t`."""
        port = free_port()
        t.proc = self.procs.start(name, [str(VENV_PY), str(BENCH / "bare_passthrough.py"), "--port", str(port),
                                         "--upstream", self.upstream_url, *args])
        t.url = f"http://127.0.0.1:{port}"
        t.note = note
        wait_until(f"{name} pass-through", lambda: post_ok(t.url, ""), 20, t.proc)

    def start_gateway1_uvicorn(self, t: Target) -> None:
        self._start_gateway(t, "gateway-1w-uvicorn", self.gateway_env(self.upstream_url, WORKERS="1", SERVER="uvicorn"))

    def start_gateway1_granian(self, t: Target) -> None:
        self._start_gateway(t, "gateway-1w-granian", self.gateway_env(self.upstream_url, WORKERS="1", SERVER="granian"))

    def start_nginx(self, t: Target) -> None:
        if not shutil.which("nginx"):
            raise RuntimeError("nginx is not installed")
        port = free_port()
        d = self.workdir / "nginx"
        for sub in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        up = self.upstream_url.removeprefix("http://")
        conf = d / "nginx.conf"
        conf.write_text(textwrap.dedent(f"""\
            # generated by bench/bench.py: 1 worker, upstream keep-alive
            worker_processes 1;
            daemon off;
            pid {d}/nginx.pid;
            error_log {d}/error.log warn;
            worker_rlimit_nofile 65536;
            events {{ worker_connections 8192; }}
            http {{
                access_log off;
                client_body_temp_path {d}/client_body;
                proxy_temp_path {d}/proxy;
                fastcgi_temp_path {d}/fastcgi;
                uwsgi_temp_path {d}/uwsgi;
                scgi_temp_path {d}/scgi;
                keepalive_requests 1000000;
                keepalive_timeout 75s;
                upstream fake {{
                    server {up};
                    keepalive 64;
                    keepalive_requests 1000000;
                }}
                server {{
                    listen 127.0.0.1:{port} backlog=4096;
                    location / {{
                        proxy_pass http://fake;
                        proxy_http_version 1.1;
                        proxy_set_header Connection "";
                    }}
                }}
            }}
            """))
        t.proc = self.procs.start("nginx", ["nginx", "-p", str(d), "-c", str(conf)])
        t.url = f"http://127.0.0.1:{port}"
        wait_until("nginx", lambda: post_ok(t.url, ""), 20, t.proc)

    def start_litellm(self, t: Target) -> None:
        exe = LITELLM_VENV / "bin" / "litellm"
        if not exe.exists():
            raise RuntimeError(f"LiteLLM is not installed ({exe} missing; run bench/run.sh without --no-install)")
        port = free_port()
        key = "sk-bench-" + secrets.token_hex(12)
        cfg = self.workdir / "litellm.yaml"
        cfg.write_text(textwrap.dedent(f"""\
            model_list:
              - model_name: {MODEL}
                litellm_params:
                  model: openai/{MODEL}
                  api_base: {self.upstream_url}/v1
                  api_key: x
            general_settings:
              master_key: {key}
            litellm_settings:
              telemetry: false
            """))
        env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR",
               "LITELLM_TELEMETRY": "False", "LITELLM_MODE": "PRODUCTION"}
        env.pop("DATABASE_URL", None)
        t.proc = self.procs.start("litellm", [str(exe), "--config", str(cfg), "--host", "127.0.0.1",
                                              "--port", str(port), "--num_workers", "1"], env=env)
        t.url, t.auth = f"http://127.0.0.1:{port}", key
        wait_until("litellm /health/liveliness", lambda: http("GET", t.url + "/health/liveliness")[0] == 200,
                   self.args.litellm_start_timeout, t.proc, interval=0.5)
        wait_until("litellm embeddings", lambda: post_ok(t.url, t.auth, timeout=30), 60, t.proc, interval=0.5)

    def start_vllm_direct(self, t: Target) -> None:
        t.url = self.args.vllm_url.rstrip("/")
        wait_until("vLLM embeddings", lambda: post_ok(t.url, "", t.body, timeout=30), 30)

    def start_vllm_gateway(self, t: Target) -> None:
        # Not pinned: vLLM-CPU binds one busy-waiting OpenMP thread per core, and a gateway pinned onto
        # one of those cores stalls vLLM's parallel regions (p99 of seconds at 1 connection), which
        # measures the pinning, not the gateway. Unpinned, the scheduler keeps them apart.
        self._start_gateway(t, "gateway-1w-vllm", self.gateway_env(self.args.vllm_url.rstrip("/"), WORKERS="1"),
                            cpu=None)

    # -- measuring --
    def measure(self, t: Target, conns: list[int]) -> None:
        self.measure_together([t], conns)

    def measure_together(self, targets: list[Target], conns: list[int], rounds: int = 1) -> None:
        """Start every target, then at each connection count measure one after the other, so that rows to be
        compared are seconds apart rather than minutes (this shared VM drifts over minutes), `rounds` times
        in turn; each target's row is its median round (median_row). Rows are recorded target by target."""
        started: list[tuple[Target, float]] = []
        for t in targets:
            start_s = self._start_measured(t, conns)
            if start_s is not None:
                started.append((t, start_s))
        rows: dict[str, list[dict[str, Any]]] = {t.name: [] for t, _ in started}
        dead: set[str] = set()
        for c in conns:
            samples: dict[str, list[dict[str, Any]]] = {t.name: [] for t, _ in started}
            for _ in range(max(1, rounds)):
                for t, start_s in started:
                    if t.name in dead:
                        continue
                    row = self._measure_row(t, c, start_s)
                    samples[t.name].append(row)
                    if "process died" in row.get("error", ""):
                        dead.add(t.name)
                    time.sleep(self.args.pause)
            for name, taken in samples.items():
                if taken:
                    rows[name].append(median_row(taken))
        for t, _ in started:
            self.rows.extend(rows[t.name])
            self.stop_target(t)

    def _start_measured(self, t: Target, conns: list[int]) -> float | None:
        """Start `t` and warm it up: its start time in seconds, or None (its rows record the error)."""
        try:
            log(f"starting {t.label}")
            t0 = time.monotonic()
            t.start(self, t)
            start_s = round(time.monotonic() - t0, 1)
            warmup = max(self.args.warmup, 3.0) if t.name == "litellm" and self.args.warmup > 0 else self.args.warmup
            if warmup > 0:
                run_wrk(t.url, min(32, max(conns)), warmup, self.args.wrk_timeout, t.auth, t.body, header=t.header)
            return start_s
        except Exception as e:  # record, don't crash: the other rows still run
            log(f"{t.label} failed to start: {e}")
            for c in conns:
                self.rows.append(self.row(t, c, error=f"failed to start: {str(e)[:1500]}"))
            self.stop_target(t)
            return None

    def _measure_row(self, t: Target, c: int, start_s: float) -> dict[str, Any]:
        try:
            measured = t.proc.pid if t.proc else None
            c0 = cpu_ticks(PROXY_CPU)
            with TreeSampler(measured) as rs, TreeSampler(self.upstream.pid if self.upstream else None) as us:
                r = run_wrk(t.url, c, self.args.duration, self.args.wrk_timeout, t.auth, t.body, header=t.header)
            c1 = cpu_ticks(PROXY_CPU)
            row = self.row(t, c, wrk=r, start_s=start_s)
            if c0 and c1 and c1[1] > c0[1]:
                # how busy the proxies' core was, all processes together: if far above proxy + upstream,
                # something else on the machine disturbed this row
                row["core_busy_pct"] = round(100.0 * (c1[0] - c0[0]) / (c1[1] - c0[1]), 1)
            row["loadavg_1m"] = float(Path("/proc/loadavg").read_text().split()[0])
            if measured is not None:
                row["rss_mb"] = round(rs.max_rss / 2**20, 1)
                row["rss_max_process_mb"] = round(rs.max_proc_rss / 2**20, 1)
                row["processes"] = rs.nprocs
                row["proxy_cpu_pct"] = rs.cpu_pct
            if not t.name.startswith("vllm"):
                row["upstream_cpu_pct"] = us.cpu_pct
            if t.proc is not None and not t.proc.alive():
                row["error"] = f"process died: {tail(t.proc.log_path, 800)}"
            log(f"{t.label:<24} c={c:<4} {r['rps']:>9.1f} req/s  p50 {r['p50_ms']:.3f} ms  "
                f"p99 {r['p99_ms']:.3f} ms  non2xx {r['non_2xx']}  sockerr {r['socket_errors']}"
                + (f"  rss {row.get('rss_mb')} MB" if measured else ""))
            return row
        except Exception as e:
            log(f"{t.label} c={c} failed: {e}")
            return self.row(t, c, error=str(e)[:1500])

    def stop_target(self, t: Target) -> None:
        for p in ([t.proc] if t.proc else []) + t.extra:
            self.procs.stop(p)
        t.proc, t.extra = None, []

    def row(self, t: Target, conns: int, wrk: dict[str, Any] | None = None, error: str | None = None,
            start_s: float | None = None) -> dict[str, Any]:
        row: dict[str, Any] = {"target": t.name, "label": t.label, "connections": conns,
                               "duration_s": self.args.duration}
        if wrk:
            row.update({k: wrk[k] for k in ("rps", "requests", "p50_ms", "p90_ms", "p99_ms", "p999_ms", "mean_ms",
                                            "max_ms", "non_2xx", "connect_errors", "read_errors", "write_errors",
                                            "timeouts", "socket_errors", "statuses", "load_cpu_pct")})
            if wrk.get("non_2xx"):
                row["first_non_2xx"] = wrk.get("first_error", "")
        if start_s is not None:
            row["start_s"] = start_s
        if t.note:
            row["note"] = t.note
        if error:
            row["error"] = error
        return row


def median_row(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """The round with the median throughput (the lower middle of an even count), carrying every round's
    req/s and p99 and the socket errors of all rounds together (an error in any round stays visible)."""
    good = [r for r in rounds if "rps" in r and "error" not in r]
    if not good:
        return rounds[0]
    row = dict(sorted(good, key=lambda r: r["rps"])[(len(good) - 1) // 2])
    if len(rounds) > 1:
        row["rounds_rps"] = [r.get("rps") for r in rounds]
        row["rounds_p99_ms"] = [r.get("p99_ms") for r in rounds]
        row["rounds_socket_errors"] = sum(r.get("socket_errors", 0) for r in good)
        row["rounds_non_2xx"] = sum(r.get("non_2xx", 0) for r in good)
        failed = [r["error"] for r in rounds if "error" in r]
        if failed:
            row["error"] = f"{len(failed)} of {len(rounds)} rounds failed: {failed[0][:300]}"
    return row


def _redis_ping(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
        s.sendall(b"PING\r\n")
        return s.recv(64).startswith(b"+PONG")


# ---- results -----------------------------------------------------------------------------------

def add_deltas(rows: list[dict[str, Any]], base: str = "direct", vllm_base: str = "vllm-direct") -> None:
    by = {(r["target"], r["connections"]): r for r in rows if "rps" in r}
    for r in rows:
        if "rps" not in r or r["target"] in (base, vllm_base):
            continue
        ref = by.get((vllm_base if r["target"].startswith("vllm") else base, r["connections"]))
        if ref:
            r["added_p50_ms"] = round(r["p50_ms"] - ref["p50_ms"], 3)
            r["added_p99_ms"] = round(r["p99_ms"] - ref["p99_ms"], 3)
            r["rps_vs_direct"] = round(r["rps"] / ref["rps"], 3) if ref["rps"] else None


def target_checks(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by = {(r["target"], r["connections"]): r for r in rows}
    checks: list[dict[str, Any]] = []

    def get(t: str, c: int) -> dict[str, Any] | None:
        r = by.get((t, c))
        return r if r and "rps" in r else None

    def add(name: str, status: str, detail: str) -> None:
        checks.append({"target": name, "status": status, "detail": detail})

    gw = "gateway-1w"
    r1 = get(gw, 1)
    if r1 and "added_p50_ms" in r1:
        ok = r1["added_p50_ms"] <= TARGET_ADDED_P50_MS and r1["added_p99_ms"] <= TARGET_ADDED_P99_MS
        add("added latency at 1 connection: p50 <= 0.3 ms and p99 <= 1 ms", "met" if ok else "not met",
            f"+{r1['added_p50_ms']:.3f} ms p50, +{r1['added_p99_ms']:.3f} ms p99 (gateway 1 worker vs direct)")
    else:
        add("added latency at 1 connection: p50 <= 0.3 ms and p99 <= 1 ms", "n/a", "no gateway or direct row at 1")

    for c in (32, 256):
        g, n = get(gw, c), get("nginx", c)
        name = f"throughput >= 50% of nginx at {c} connections"
        if g and n and n["rps"]:
            ratio = g["rps"] / n["rps"]
            extra = ""
            g2 = get("gateway-2w-redis", c)
            if g2:
                extra = f"; 2 workers + Redis: {g2['rps']:.0f} req/s = {g2['rps'] / n['rps']:.0%}"
            add(name, "met" if ratio >= TARGET_VS_NGINX else "not met",
                f"gateway {g['rps']:.0f} req/s vs nginx {n['rps']:.0f} req/s = {ratio:.0%}{extra}")
        else:
            add(name, "n/a", "missing gateway or nginx row")

    parts, ok, have = [], True, False
    for c in (256, 500):
        g = get(gw, c)
        if g:
            have = True
            bad = g.get("rounds_socket_errors", g["socket_errors"]) + g.get("rounds_non_2xx", g["non_2xx"])
            ok = ok and bad == 0
            parts.append(f"{c}: connect {g['connect_errors']}, read {g['read_errors']}, write {g['write_errors']}, "
                         f"timeout {g['timeouts']}, non-2xx {g['non_2xx']}")
        else:
            ok = False
            parts.append(f"{c}: no row")
    add("zero socket errors / timeouts at 256 and 500 connections", ("met" if ok else "not met") if have else "n/a",
        "; ".join(parts))

    g, lt = get(gw, 32), get("litellm", 32)
    if g and lt and lt["rps"]:
        ratio = g["rps"] / lt["rps"]
        add(">= 50x LiteLLM's throughput at 32 connections", "met" if ratio >= TARGET_VS_LITELLM else "not met",
            f"gateway {g['rps']:.0f} req/s vs LiteLLM {lt['rps']:.1f} req/s = {ratio:.0f}x")
    else:
        add(">= 50x LiteLLM's throughput at 32 connections", "n/a", "missing gateway or LiteLLM row at 32")

    floor_checks(get, add)

    rss = [(r["target"], r["connections"], r["rss_max_process_mb"]) for r in rows
           if r["target"].startswith("gateway") and "rss_max_process_mb" in r]
    if rss:
        worst = max(rss, key=lambda x: x[2])
        add("RSS <= 150 MB per worker", "met" if worst[2] <= TARGET_RSS_MB else "not met",
            f"largest gateway process {worst[2]:.1f} MB ({worst[0]} at {worst[1]} connections)")
    else:
        add("RSS <= 150 MB per worker", "n/a", "no gateway row")
    return checks


def round_by_round(row: dict[str, Any], ref: dict[str, Any]) -> str:
    """The ratio of two side-by-side rows in each round (a round's rows are taken seconds apart, the rounds
    minutes apart on a VM that drifts): how far the median's verdict can be trusted. Empty if not paired."""
    a, b = row.get("rounds_rps") or [], ref.get("rounds_rps") or []
    if len(a) < 2 or len(a) != len(b) or not all(a) or not all(b):
        return ""
    return " (round by round " + ", ".join(f"{x / y:.2f}x" for x, y in zip(a, b)) + ")"


def floor_checks(get: Callable[[str, int], dict[str, Any] | None], add: Callable[[str, str, str], None]) -> None:
    """Issue 15's goals: the gateway's features at the bare floor's cost, and how workers scale."""
    gw, floor = "gateway-1w", "bare"
    for c in (32, 256):
        g, f = get(gw, c), get(floor, c)
        name = f"features at the floor's cost: gateway >= {TARGET_VS_FLOOR:g}x the bare floor at {c} connections"
        if g and f and f["rps"]:
            ratio = g["rps"] / f["rps"]
            add(name, "met" if ratio >= TARGET_VS_FLOOR else "not met",
                f"gateway {g['rps']:.0f} req/s vs floor {f['rps']:.0f} req/s = {ratio:.2f}x{round_by_round(g, f)}")
        else:
            add(name, "n/a", "missing gateway-1w or bare row")
    g, f = get(gw, 256), get(floor, 256)
    name = f"p99 at 256 connections <= {TARGET_P99_VS_FLOOR:g}x the floor's"
    if g and f and f["p99_ms"]:
        ratio = g["p99_ms"] / f["p99_ms"]
        add(name, "met" if ratio <= TARGET_P99_VS_FLOOR else "not met",
            f"gateway {g['p99_ms']:.1f} ms vs floor {f['p99_ms']:.1f} ms = {ratio:.2f}x")
    else:
        add(name, "n/a", "missing gateway-1w or bare row at 256")
    g, f = get(gw, 1), get(floor, 1)
    name = f"p50 at 1 connection <= the floor's + {TARGET_P50_OVER_FLOOR_MS:g} ms"
    if g and f:
        over = g["p50_ms"] - f["p50_ms"]
        add(name, "met" if over <= TARGET_P50_OVER_FLOOR_MS else "not met",
            f"gateway {g['p50_ms']:.2f} ms vs floor {f['p50_ms']:.2f} ms = {over:+.2f} ms")
    else:
        add(name, "n/a", "missing gateway-1w or bare row at 1")
    for other, goal, what in (("gateway-2w-redis", TARGET_REDIS_VS_1W, "2 workers + Redis on one core"),
                              ("gateway-4w-2cores", TARGET_4W_VS_1W, "4 workers on 2 cores")):
        name = f"{what} >= {goal:g}x one worker"
        parts, ok, have = [], True, False
        for c in (32, 256):
            o, one = get(other, c), get(gw, c)
            if o and one and one["rps"]:
                have = True
                ratio = o["rps"] / one["rps"]
                ok = ok and ratio >= goal
                parts.append(f"{c} connections: {o['rps']:.0f} vs {one['rps']:.0f} req/s = {ratio:.2f}x"
                             + round_by_round(o, one))
            else:
                ok = False
                parts.append(f"{c}: no row")
        add(name, ("met" if ok else "not met") if have else "n/a", "; ".join(parts))
    # Not goals: what the workers' shortfall is made of (each against its own one-worker row).
    for other, one_row, what in (("gateway-1w-redis", gw, "the Redis round trip alone: 1 worker + Redis vs 1 worker"),
                                 ("bare-2w", floor, "sharing one core: the bare floor, 2 workers vs 1")):
        parts = []
        for c in (32, 256):
            o, one = get(other, c), get(one_row, c)
            if o and one and one["rps"]:
                parts.append(f"{c} connections: {o['rps']:.0f} vs {one['rps']:.0f} req/s = {o['rps'] / one['rps']:.2f}x"
                             + round_by_round(o, one))
        if parts:
            add(what, "context", "; ".join(parts))
    # The 4-worker row shares its 2 cores with wrk and the upstream; one worker had a core of its own, wrk
    # another. At one worker's CPU per request (gateway + upstream + wrk) those 2 cores give at most this.
    parts = []
    for c in (32, 256):
        one = get(gw, c)
        spent = [one.get(k) for k in ("proxy_cpu_pct", "upstream_cpu_pct", "load_cpu_pct")] if one else []
        if spent and all(spent):
            parts.append(f"{c} connections: 200 / ({spent[0]:.0f} + {spent[1]:.0f} + {spent[2]:.0f}) % "
                         f"= {200.0 / sum(spent):.2f}x")
    if parts:
        add("the most 2 cores allow 4 workers: 2 cores over one worker's CPU per request "
            "(gateway + upstream + wrk)", "context", "; ".join(parts))


def _cmd(cmd: list[str]) -> str:
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
        return (p.stdout + p.stderr).strip()
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unavailable ({e})"


def machine_info() -> dict[str, Any]:
    cpu = ""
    try:
        m = re.search(r"^model name\s*:\s*(.*)$", Path("/proc/cpuinfo").read_text(), re.M)
        cpu = m.group(1) if m else ""
    except OSError:
        pass
    pkgs = "import importlib.metadata as m, json\nout = {}\nfor n in %r:\n    try: out[n] = m.version(n)\n" \
           "    except Exception: out[n] = None\nprint(json.dumps(out))"
    gw_pkgs: dict[str, Any] = {}
    try:
        gw_pkgs = json.loads(_cmd([str(VENV_PY), "-c", pkgs % (
            ["aiohttp", "uvicorn", "uvloop", "httptools", "limits", "orjson", "redis"],)]))
    except ValueError:
        pass
    lt_py = LITELLM_VENV / "bin" / "python"
    litellm_v = None
    if lt_py.exists():
        try:
            litellm_v = json.loads(_cmd([str(lt_py), "-c", pkgs % (["litellm"],)])).get("litellm")
        except ValueError:
            pass
    wrk_v = _cmd(["wrk", "-v"]).splitlines()
    mem = re.search(r"MemTotal:\s*(\d+)", Path("/proc/meminfo").read_text())
    return {
        "nproc": os.cpu_count(), "cpu_affinity_available": sorted(os.sched_getaffinity(0)),
        "cpu_model": cpu, "mem_gib": round(int(mem.group(1)) / 2**20, 1) if mem else None,
        "kernel": platform.release(), "os": _cmd(["sh", "-c", ". /etc/os-release && echo $PRETTY_NAME"]),
        "python": _cmd([str(VENV_PY), "-c", "import sys; print(sys.version.split()[0])"]),
        "packages": {**gw_pkgs, "litellm": litellm_v},
        "nginx": _cmd(["nginx", "-v"]), "wrk": wrk_v[0] if wrk_v else "", "redis": _cmd(["redis-server", "--version"]),
        "loadavg_at_start": Path("/proc/loadavg").read_text().split()[:3],
        "pinning": {"upstream_and_proxies": f"core {PROXY_CPU}", "wrk": f"core {LOAD_CPU}"},
    }


def fmt(v: Any, spec: str = ".2f", dash: str = "–") -> str:
    if v is None:
        return dash
    if isinstance(v, (int, float)):
        return format(v, spec)
    return str(v)


def markdown(doc: dict[str, Any]) -> str:
    m = doc["machine"]
    a = doc["args"]
    lines = [
        f"# Gateway benchmark — {doc['started']}{' (quick)' if a['quick'] else ''}",
        "",
        f"Machine: {m['nproc']} cores ({m['cpu_model']}), {m['mem_gib']} GiB, Linux {m['kernel']}, "
        f"Python {m['python']}; load average at start {' '.join(m['loadavg_at_start'])}.  ",
        f"Upstream: bench/fast_upstream.py, {a['upstream_delay_ms']:g} ms delay, ~22 KB embeddings body "
        f"(1024 floats). Upstream and proxy pinned to {m['pinning']['upstream_and_proxies']}, "
        f"wrk (1 thread, --timeout {a['wrk_timeout']:g}s) to {m['pinning']['wrk']}; {a['duration']:g} s per row "
        f"after a {a['warmup']:g} s warm-up.  ",
        f"Versions: {', '.join(f'{k} {v}' for k, v in m['packages'].items() if v)}; {m['nginx']}; {m['wrk']}.",
        "",
        "+p50/+p99: added latency versus direct at the same connections. RSS: sum over the proxy's process "
        "tree (largest single process in brackets), max during the row. CPU %: share of one core. Core busy %: "
        "how busy core 0 was, all processes together; well above proxy + upstream means other work on the "
        "machine disturbed that row. wrk CPU %: the load generator's own.",
        "",
        "| target | conns | req/s | p50 ms | p99 ms | +p50 ms | +p99 ms | non-2xx | socket errors c/r/w/t | "
        "RSS MB (max process) | proxy CPU % | upstream CPU % | wrk CPU % | core busy % | note |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in doc["rows"]:
        if "rps" not in r:
            lines.append(f"| {r['label']} | {r['connections']} | – | – | – | – | – | – | – | – | – | – | – | "
                         f"**{_md_cell(r.get('error', 'no result'))}** |")
            continue
        rss = "–" if "rss_mb" not in r else (
            f"{r['rss_mb']:.0f}" + (f" ({r['rss_max_process_mb']:.0f})" if r.get("processes", 1) > 1 else ""))
        note = r.get("note", "")
        if r.get("rounds_rps"):
            spread = ", ".join(f"{x:,.0f}" for x in r["rounds_rps"] if x is not None)
            note = (note + "; " if note else "") + f"median of {len(r['rounds_rps'])} rounds (req/s {spread})"
            if r.get("rounds_socket_errors"):
                note += f"; socket errors in all rounds: {r['rounds_socket_errors']}"
        if r.get("non_2xx"):
            codes = ", ".join(f"{k}: {v}" for k, v in sorted(r.get("statuses", {}).items()) if not k.startswith("2"))
            note = (note + "; " if note else "") + f"statuses {codes}; first: {r.get('first_non_2xx', '')[:160]}"
        if r.get("error"):
            note = (note + "; " if note else "") + "**" + r["error"] + "**"
        lines.append(
            f"| {r['label']} | {r['connections']} | {r['rps']:,.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | "
            f"{fmt(r.get('added_p50_ms'), '+.2f')} | {fmt(r.get('added_p99_ms'), '+.2f')} | {r['non_2xx']} | "
            f"{r['connect_errors']}/{r['read_errors']}/{r['write_errors']}/{r['timeouts']} | {rss} | "
            f"{fmt(r.get('proxy_cpu_pct'), '.0f')} | {fmt(r.get('upstream_cpu_pct'), '.0f')} | "
            f"{fmt(r.get('load_cpu_pct'), '.0f')} | "
            f"{fmt(r.get('core_busy_pct'), '.0f')} | {_md_cell(note)} |")
    lines += ["", "## Targets", "", "| target | status | numbers |", "|---|---|---|"]
    for c in doc["targets"]:
        lines.append(f"| {c['target']} | **{c['status']}** | {_md_cell(c['detail'])} |")
    if doc.get("split_rows"):
        from split_bench import markdown_rows
        lines += markdown_rows(doc["split_rows"])
    if doc.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in doc["notes"]]
    lines += ["", f"Command: `{doc['command']}`; took {doc['took_s']:.0f} s. Raw data: `{doc['json']}`; "
              "logs of the processes (not committed): `bench/results/tmp/`.", ""]
    return "\n".join(lines)


def _md_cell(s: str) -> str:
    return " ".join(str(s).split()).replace("|", "\\|")[:400]


# ---- main ----------------------------------------------------------------------------------------

def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/run.sh", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="short rows (3 s, 1 s warm-up) for a smoke test")
    p.add_argument("--duration", type=float, help="seconds per row (default 10, --quick 3)")
    p.add_argument("--warmup", type=float, help="seconds of warm-up load per target (default 2, --quick 1)")
    p.add_argument("--connections", default="1,32,256,500", help="comma-separated connection counts")
    p.add_argument("--targets", default="direct,gateway-1w,gateway-1w-redis,gateway-2w-redis,gateway-4w-2cores,"
                                        "gateway-cache-hit,gateway-cache-miss,bare,bare-2w,nginx,litellm,split",
                   help="comma-separated subset of: direct, gateway-1w, gateway-1w-redis, gateway-2w-redis, "
                        "gateway-4w-2cores, gateway-cache-hit, gateway-cache-miss, bare, bare-2w, "
                        "nginx, litellm, split")
    p.add_argument("--vllm-url", help="base URL of a running vLLM embedding server for the end-to-end rows")
    p.add_argument("--vllm-connections", default="1,8", help="connection counts of the end-to-end rows")
    p.add_argument("--upstream-delay-ms", type=float, default=2.0)
    p.add_argument("--wrk-timeout", type=float, default=5.0, help="wrk's per-request timeout in seconds")
    p.add_argument("--litellm-start-timeout", type=float, default=180.0)
    p.add_argument("--pause", type=float, default=0.5, help="seconds between rows")
    p.add_argument("--rounds", type=int, default=None,
                   help="rounds of the side-by-side group (gateway-1w, bare, the worker rows): each row is the "
                        "median round (default 3, --quick 1)")
    p.add_argument("--out", default=str(RESULTS), help="results directory")
    p.add_argument("--no-latest", action="store_true", help="only write the timestamped copy")
    p.add_argument("--no-install", action="store_true", help="(bench/run.sh) skip the installs")
    p.add_argument("--render", metavar="JSON", help="only rewrite the markdown of a results JSON (no run)")
    a = p.parse_args(argv)
    if a.duration is None:
        a.duration = 3.0 if a.quick else 10.0
    if a.rounds is None:
        a.rounds = 1 if a.quick else 3
    if a.warmup is None:
        a.warmup = 1.0 if a.quick else 2.0
    return a


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.render:
        src = Path(args.render)
        doc = json.loads(src.read_text())
        doc["targets"] = target_checks(doc["rows"])
        src.with_suffix(".md").write_text(markdown(doc) + "\n")
        print(f"wrote {src.with_suffix('.md')}")
        return 0
    conns = [int(c) for c in args.connections.split(",") if c.strip()]
    names = [n.strip() for n in args.targets.split(",") if n.strip()]
    out = Path(args.out)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    workdir = RESULTS / "tmp" / stamp
    workdir.mkdir(parents=True, exist_ok=True)
    for old in sorted((RESULTS / "tmp").iterdir(), key=lambda d: d.stat().st_mtime)[:-5]:  # last few runs only
        shutil.rmtree(old, ignore_errors=True)
    bench = Bench(args, workdir)

    def on_signal(signum: int, _frame: Any) -> None:
        for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # a second signal must not cut the clean-up
            signal.signal(s, signal.SIG_IGN)
        raise KeyboardInterrupt(f"signal {signum}")

    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, on_signal)
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    t0 = time.monotonic()
    all_targets = {
        "direct": Target("direct", "direct (no proxy)", Bench.start_direct),
        "gateway-1w": Target("gateway-1w", "gateway, 1 worker", Bench.start_gateway1),
        "gateway-2w-redis": Target("gateway-2w-redis", "gateway, 2 workers + Redis", Bench.start_gateway2),
        "gateway-1w-redis": Target("gateway-1w-redis", "gateway, 1 worker + Redis", Bench.start_gateway1_redis),
        "bare-2w": Target("bare-2w", "bare pass-through, 2 workers", Bench.start_bare2),
        "gateway-4w-2cores": Target("gateway-4w-2cores", "gateway, 4 workers on 2 cores", Bench.start_gateway4),
        "gateway-cache-hit": Target("gateway-cache-hit", "gateway, 1 worker, cache hits", Bench.start_gateway_cache),
        "gateway-cache-miss": Target("gateway-cache-miss", "gateway, 1 worker, cache misses",
                                     Bench.start_gateway_miss),
        "bare": Target("bare", "bare uvicorn+aiohttp pass-through", Bench.start_bare),
        "bare-granian": Target("bare-granian", "bare Granian (ASGI)+aiohttp pass-through", Bench.start_bare_granian),
        "bare-granian-rsgi": Target("bare-granian-rsgi", "bare Granian (RSGI)+aiohttp pass-through",
                                    Bench.start_bare_granian_rsgi),
        "gateway-1w-uvicorn": Target("gateway-1w-uvicorn", "gateway, 1 worker, uvicorn", Bench.start_gateway1_uvicorn),
        "gateway-1w-granian": Target("gateway-1w-granian", "gateway, 1 worker, Granian", Bench.start_gateway1_granian),
        "nginx": Target("nginx", "nginx (1 worker, keep-alive)", Bench.start_nginx),
        "litellm": Target("litellm", "LiteLLM proxy (1 worker)", Bench.start_litellm),
    }
    split = "split" in names  # not a wrk target: bench/split_bench.py
    names = [n for n in names if n != "split"]
    unknown = [n for n in names if n not in all_targets]
    if unknown:
        print(f"unknown target(s): {', '.join(unknown)}", file=sys.stderr)
        return 2
    if "direct" not in names and names:
        names.insert(0, "direct")
        bench.notes.append("direct rows added: the added latency is measured against them")
    machine = machine_info()
    log(f"results: {out}; logs of this run: {workdir}")
    try:
        bench.start_upstream()
        # The floor's and the workers' goals compare rows with gateway-1w: measured side by side,
        # connection count by connection count (this VM drifts by more than the goals over minutes).
        paired = [n for n in PAIRED if n in names] if "gateway-1w" in names else []
        if len(paired) < 2:
            paired = []
        if paired:
            bench.notes.append(f"{', '.join(paired)} measured side by side: all started, their rows at each "
                               "connection count taken one after the other")
        for n in names:
            if n not in paired:
                bench.measure(all_targets[n], conns)
            elif n == next(p for p in names if p in paired):  # the group, where its first member is named
                bench.measure_together([all_targets[p] for p in paired], conns, args.rounds)
        if split:
            from split_bench import split_rows  # bench/ is the script's directory
            bench.split_rows = split_rows(bench, args.duration, python=VENV_PY, bench_dir=BENCH, root=ROOT,
                                          cpu=PROXY_CPU, http=http)
        if args.vllm_url:
            vconns = [int(c) for c in args.vllm_connections.split(",") if c.strip()]
            try:
                vbody = json.dumps({"model": _vllm_model(args.vllm_url), "input": "hello world"})
            except Exception as e:  # noqa: BLE001 - recorded in the rows
                vbody = BODY
                bench.notes.append(f"vLLM at {args.vllm_url} unusable: {e}")
            for t in (Target("vllm-direct", "vLLM-CPU direct", Bench.start_vllm_direct, body=vbody,
                             note=f"real vLLM at {args.vllm_url} (not pinned)"),
                      Target("vllm-gateway", "gateway 1w → vLLM-CPU", Bench.start_vllm_gateway, body=vbody,
                             note="end-to-end through the gateway")):
                bench.measure(t, vconns)
        else:
            bench.notes.append("end-to-end rows through real vLLM-CPU skipped: no --vllm-url given "
                               "(start one with ./start_vllm_models.sh embed, then --vllm-url http://127.0.0.1:8000)")
    except KeyboardInterrupt as e:
        log(f"interrupted ({e}); stopping everything")
        bench.notes.append(f"run interrupted ({e}); partial results")
    finally:
        bench.procs.stop_all()
    add_deltas(bench.rows)
    doc = {
        "started": started, "took_s": round(time.monotonic() - t0, 1),
        "command": " ".join(["bench/run.sh", *argv]),
        "args": {**vars(args), "out": _rel(out)}, "machine": machine, "rows": bench.rows,
        "targets": target_checks(bench.rows), "notes": bench.notes, "logs": _rel(workdir),
        "split_rows": getattr(bench, "split_rows", []),
        "json": _rel(out / ("runs/" + stamp + ("-quick" if args.quick else "") + ".json")),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "runs").mkdir(exist_ok=True)
    md = markdown(doc)
    suffix = "-quick" if args.quick else ""
    for path, text in ((out / "runs" / f"{stamp}{suffix}.json", json.dumps(doc, indent=1)),
                       (out / "runs" / f"{stamp}{suffix}.md", md)):
        path.write_text(text + "\n")
    if not args.no_latest:
        (out / "latest.json").write_text(json.dumps(doc, indent=1) + "\n")
        (out / "latest.md").write_text(md + "\n")
    print()
    print(md)
    log(f"wrote {out / 'latest.md'} and {out / 'latest.json'} (copy in {out / 'runs'}/{stamp}{suffix}.*)")
    return 130 if any("interrupted" in n for n in bench.notes) else 0


def _rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def _vllm_model(url: str) -> str:
    status, body = http("GET", url.rstrip("/") + "/v1/models", timeout=10)
    if status != 200:
        raise RuntimeError(f"{url}/v1/models answered {status}")
    return json.loads(body)["data"][0]["id"]


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
