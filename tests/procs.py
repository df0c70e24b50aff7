"""Start and stop real processes for tests: fake vLLM upstreams, the gateway itself, redis-server.

free_port, Proc, spawn and the wait loop are devtools/procs.py's, shared with bench/.
"""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from devtools.procs import Proc, free_port, spawn, wait_until
from erproxy.keys import KeyRecord, display_prefix, generate_key, hash_key, utc_now, write_key_file

ROOT = Path(__file__).resolve().parents[1]

__all__ = ["ROOT", "Proc", "free_port", "spawn", "wait_http", "start_fake", "set_fake_mode", "fake_stats",
           "make_key_file", "Gateway", "gateway_env", "start_gateway", "RedisServer"]


def wait_http(url: str, timeout: float = 20.0, proc: Proc | subprocess.Popen | None = None,
              ok=(200, 503)) -> httpx.Response:
    """The first answer of `url` with a status in `ok`; fails early when `proc` exits."""
    def answer() -> httpx.Response | None:
        r = httpx.get(url, timeout=2.0)
        return r if r.status_code in ok else None

    return wait_until(url, answer, timeout, proc, errors=(httpx.HTTPError,))


def start_fake(tmp: Path, role: str, model: str | None = None, port: int | None = None,
               delay: float = 0.0) -> Proc:
    port = port or free_port()
    log_path = tmp / f"fake_{role}_{port}.log"
    cmd = [sys.executable, "-m", "tests.fakes.fake_vllm", "--role", role, "--port", str(port)]
    if model:
        cmd += ["--model", model]
    if delay:
        cmd += ["--delay", str(delay)]
    proc = spawn(cmd, log_path, cwd=ROOT, url=f"http://127.0.0.1:{port}")
    wait_http(proc.url + "/health", proc=proc)
    return proc


def set_fake_mode(fake: Proc, mode: str = "normal", delay: float = 0.0) -> None:
    httpx.post(fake.url + "/_fake/mode", json={"mode": mode, "delay": delay}, timeout=5).raise_for_status()


def fake_stats(fake: Proc) -> dict:
    return httpx.get(fake.url + "/_fake/stats", timeout=5).json()


def make_key_file(path: Path, names: tuple[str, ...] = ("tester",), **fields) -> dict[str, str]:
    """A key file holding fresh keys made by the test; returns name -> plaintext key."""
    keys: dict[str, str] = {}
    records = []
    for name in names:
        key = generate_key()
        keys[name] = key
        records.append(KeyRecord(name=name, prefix=display_prefix(key), hash=hash_key(key), created=utc_now(),
                                 **fields))
    write_key_file(path, records)
    return keys


@dataclass
class Gateway:
    proc: Proc
    env: dict[str, str]
    keys: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return self.proc.url

    @property
    def key(self) -> str:
        return next(iter(self.keys.values()))

    def auth(self, key: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {key or self.key}"}

    def log_file(self) -> Path:
        return Path(self.env["LOG_DIR"]) / "embedding_reranker_proxy.log"

    def log_text(self, until: str, timeout: float = 5.0, count: int = 1) -> str:
        """The gateway's log once it holds `until` `count` times (or after `timeout`): access lines are
        written in batches, within 10 ms of the answer (erproxy/flushing.py), so a test can read the
        file before them."""
        deadline = time.monotonic() + timeout
        while True:
            path = self.log_file()
            text = path.read_text() if path.exists() else ""
            if text.count(until) >= count or time.monotonic() > deadline:
                return text
            time.sleep(0.05)


def gateway_env(tmp: Path, embed_urls: str, rerank_urls: str, **overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "LC_ALL", "PYTHONPATH", "TMPDIR")}
    env.update({
        "ENV_FILE": "",
        "HOST": "127.0.0.1",
        "PORT": str(free_port()),
        "EMBEDDING_UPSTREAMS": embed_urls,
        "RERANKER_UPSTREAMS": rerank_urls,
        "API_KEYS_FILE": str(tmp / "keys.json"),
        "LOG_DIR": str(tmp / "logs"),
        "HEALTH_INTERVAL": "0.5",
        # the item cache off: tests count the requests vLLM gets; tests of the cache turn it on
        "CACHE_MAX_BYTES": "0",
    })
    if os.environ.get("ERPROXY_TEST_SERVER"):  # e.g. ERPROXY_TEST_SERVER=granian: the process tests on that server
        env["SERVER"] = os.environ["ERPROXY_TEST_SERVER"]
    env.update(overrides)
    return env


def start_gateway(tmp: Path, env: dict[str, str], wait: bool = True, timeout: float = 30.0) -> Proc:
    log_path = tmp / f"gateway_{env['PORT']}.out"
    proc = spawn([sys.executable, str(ROOT / "embedding_reranker_proxy.py")], log_path, cwd=ROOT, env=env,
                 url=f"http://127.0.0.1:{env['PORT']}")
    if wait:
        try:
            wait_http(proc.url + "/health", timeout=timeout, proc=proc)
        except Exception:
            proc.stop()
            raise RuntimeError(f"gateway did not start:\n{proc.output()}")
        workers = env.get("WORKERS", "1")
        if workers.isdigit() and int(workers) > 1:  # /health answers once the first worker is up: wait for all
            deadline = time.monotonic() + timeout
            while proc.output().count("Application startup complete") < int(workers) and time.monotonic() < deadline:
                time.sleep(0.05)
    return proc


def self_signed(tmp: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and localhost, and its key (openssl)."""
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True, timeout=60)
    return cert, key


@dataclass
class TlsGateway:
    proc: Proc
    url: str  # https://127.0.0.1:PORT
    ctx: ssl.SSLContext  # trusts the gateway's certificate
    env: dict[str, str]
    keys: dict[str, str]


def start_tls_gateway(tmp: Path, embed_urls: str, rerank_urls: str, **overrides: str) -> TlsGateway:
    """A gateway serving HTTPS with a fresh self-signed certificate, once /health answers (stop its proc)."""
    cert, key = self_signed(tmp)
    env = gateway_env(tmp, embed_urls, rerank_urls, SSL_CERTFILE=str(cert), SSL_KEYFILE=str(key), **overrides)
    keys = make_key_file(Path(env["API_KEYS_FILE"]))
    proc = start_gateway(tmp, env, wait=False)
    url = f"https://127.0.0.1:{env['PORT']}"
    ctx = ssl.create_default_context(cafile=str(cert))
    try:
        wait_until(url + "/health", lambda: httpx.get(url + "/health", verify=ctx, timeout=1), 15, proc,
                   errors=(httpx.HTTPError,))
    except BaseException:
        proc.stop()
        raise
    return TlsGateway(proc, url, ctx, env, keys)


class RedisServer:
    """A real redis-server on a loopback port, restartable on the same port."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.popen: subprocess.Popen | None = None

    def start(self) -> "RedisServer":
        self.popen = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.tmp)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return self
            except OSError:
                time.sleep(0.05)
        raise TimeoutError("redis-server did not start")

    def stop(self) -> None:
        if self.popen and self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait()
