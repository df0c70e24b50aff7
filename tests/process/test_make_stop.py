"""`make stop` signals the PID in $LOG_DIR/gateway.pid only when that process is the gateway.

A PID file outlives a crash or a reboot, and its PID can be reused by an unrelated process; the
Makefile checks /proc/PID/cmdline like scripts/common.sh's vllm_server does for the models.
With an empty LOG_DIR, the `./stop_vllm_models.sh all` that `make stop` also runs finds no PID file.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.procs import ROOT, gateway_env, make_key_file, start_gateway


def make_stop(log_dir: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "LOG_DIR": str(log_dir), "ENV_FILE": ""}
    return subprocess.run(["make", "--no-print-directory", "-C", str(ROOT), "stop", f"LOG_DIR={log_dir}"],
                          env=env, capture_output=True, text=True, timeout=60)


@pytest.fixture
def log_dir(tmp_path: Path) -> Path:
    d = tmp_path / "logs"
    d.mkdir()
    return d


def test_make_stop_leaves_an_unrelated_process_with_a_reused_pid_alive(log_dir):
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        (log_dir / "gateway.pid").write_text(f"{other.pid}\n")
        r = make_stop(log_dir)
        assert r.returncode == 0, r.stdout + r.stderr
        assert other.poll() is None, "make stop killed a process that is not the gateway"
        assert "gateway stopped" not in r.stdout
        assert "stale" in r.stdout and not (log_dir / "gateway.pid").exists()
    finally:
        other.kill()
        other.wait()


def test_make_stop_removes_the_pid_file_of_a_gateway_that_is_gone(log_dir):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (log_dir / "gateway.pid").write_text(f"{gone.pid}\n")
    r = make_stop(log_dir)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "gateway stopped" not in r.stdout
    assert "stale" in r.stdout and not (log_dir / "gateway.pid").exists()


def test_make_stop_stops_the_gateway_named_in_the_pid_file(tmp_path, log_dir, fake_embed, fake_rerank):
    env = gateway_env(tmp_path, fake_embed.url, fake_rerank.url)
    make_key_file(Path(env["API_KEYS_FILE"]))
    gateway = start_gateway(tmp_path, env)
    try:
        (log_dir / "gateway.pid").write_text(f"{gateway.pid}\n")
        r = make_stop(log_dir)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "gateway stopped" in r.stdout
        assert gateway.popen.wait(30) is not None
        assert not (log_dir / "gateway.pid").exists()
    finally:
        gateway.stop()
