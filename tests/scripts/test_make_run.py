"""`make run` on a simulated GPU host (the fake nvidia-smi and the vLLM stand-in of tests/scripts): it
reads the gateway's settings as the gateway does, and restarts a gateway that died while the models
stayed up."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import httpx

from tests.procs import ROOT, free_port


def make(target: str, env: dict[str, str], *variables: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "--no-print-directory", "-C", str(ROOT), target, *variables], env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_make_run_polls_the_port_of_the_env_file_and_restarts_a_dead_gateway_with_the_models_up(sim, tmp_path):
    s = sim("h100x2")
    port = free_port()
    keys_file = tmp_path / "my keys" / "er_api_keys.json"  # a space: the path must stay whole
    env_file = tmp_path / "gateway.env"  # what an operator writes in .env (ENV_FILE names it here)
    env_file.write_text(
        f"PORT={port}\n"
        f"API_KEYS_FILE='{keys_file}'\n"
        f"EMBEDDING_UPSTREAMS=http://127.0.0.1:{s.env['EMBEDDING_PORT']}\n"
        f"RERANKER_UPSTREAMS=http://127.0.0.1:{s.env['RERANKER_PORT']}\n")
    env = {k: v for k, v in s.env.items() if k != "PORT"}
    env["ENV_FILE"] = str(env_file)
    pid_file = Path(env["LOG_DIR"]) / "gateway.pid"
    try:
        first = make("run", env)
        assert first.returncode == 0, first.stdout + first.stderr
        assert f"Gateway: http://127.0.0.1:{port}" in first.stdout
        assert httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200
        # no terminal here: the first key went to a file, and make run says where, path whole
        assert f"The first key is in {keys_file}.new-key" in first.stdout
        os.kill(int(pid_file.read_text()), signal.SIGKILL)  # the gateway dies; the models stay up
        time.sleep(0.5)
        again = make("run", env)
        assert again.returncode == 0, again.stdout + again.stderr
        assert "models already up" in again.stdout and "already running" not in again.stderr
        assert httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200
        # a port given on make's command line wins over .env, as it does for the gateway make starts
        os.kill(int(pid_file.read_text()), signal.SIGKILL)
        time.sleep(0.5)
        other = free_port()
        moved = make("run", env, f"PORT={other}")
        assert moved.returncode == 0, moved.stdout + moved.stderr
        assert f"Gateway: http://127.0.0.1:{other}" in moved.stdout
    finally:
        stopped = make("stop", env)
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
