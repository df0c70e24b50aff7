"""The vLLM scripts on simulated GPUs: a fake nvidia-smi and a vLLM stand-in, no GPU needed.

`sim(layout)` gives a Sim: an environment in which start_vllm_models.sh, check_models_status.sh and
stop_vllm_models.sh run for real against the fake nvidia-smi (tests/fakes/nvidia_smi, layout
FAKE_NVIDIA_SMI_LAYOUT) and start the stand-in vLLM (tests/fakes/vllm_standin, first on PYTHONPATH),
which holds its memory in a per-test FAKE_GPU_STATE folder. Teardown stops whatever was started.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from tests.procs import free_port

ROOT = Path(__file__).resolve().parents[2]
FAKE_SMI_DIR = ROOT / "tests/fakes/nvidia_smi"
STANDIN = ROOT / "tests/fakes/vllm_standin"
RECORDED = ROOT / "tests/fixtures/nvidia-smi-h100"
LAYOUTS = ("h100x1", "h100x2", "h100x4", "t4", "h100-busy")

# Everything the scripts read; a developer's shell must not leak into these tests.
SCRIPT_VARS = set((
    "LOG_DIR EMBEDDING_MODEL_PATH EMBEDDING_MODEL_NAME EMBEDDING_GPU EMBEDDING_PORT EMBEDDING_GPU_MEMORY "
    "EMBEDDING_MAX_SEQ_LENGTH RERANKER_MODEL_PATH RERANKER_MODEL_NAME RERANKER_GPU RERANKER_PORT "
    "RERANKER_GPU_MEMORY RERANKER_MAX_SEQ_LENGTH RERANKER_KIND MODEL_PRECISION MAX_SEQ_LENGTH "
    "MAX_MEMORY_PERCENTAGE BATCH_SIZE VLLM_PYTHON VLLM_EXTRA_ARGS VLLM_HOST VLLM_DEVICE VLLM_START_TIMEOUT "
    "VLLM_STOP_TIMEOUT VLLM_CPU_KVCACHE_SPACE PORT HOST ENV_FILE MODEL_NAME_OR_PATH MODEL_DEVICE WORKERS "
    "WORKER_CLASS WORKER_CONNECTIONS TIMEOUT KEEP_ALIVE ACCESS_TOKEN TOKENIZERS_PARALLELISM "
    "PYTORCH_CUDA_ALLOC_CONF CUDA_VISIBLE_DEVICES CUDA_DEVICE_ORDER HF_HUB_OFFLINE PYTHONPATH NVIDIA_SMI_TIMEOUT"
).split())


def fake_smi(layout: str, *args: str, state: Path | None = None, **env: str) -> subprocess.CompletedProcess:
    """Run the fake nvidia-smi with a layout."""
    e = {**os.environ, "FAKE_NVIDIA_SMI_LAYOUT": layout, **env}
    e.pop("FAKE_GPU_STATE", None)
    if state is not None:
        e["FAKE_GPU_STATE"] = str(state)
    return subprocess.run([str(FAKE_SMI_DIR / "nvidia-smi"), *args], capture_output=True, text=True, env=e)


@dataclass
class Sim:
    tmp: Path
    env: dict[str, str]

    @property
    def log_dir(self) -> Path:
        return Path(self.env["LOG_DIR"])

    @property
    def state(self) -> Path:
        return Path(self.env["FAKE_GPU_STATE"])

    def run(self, script: str, *args: str, timeout: float = 120, **extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(ROOT / script), *args], cwd=ROOT, env={**self.env, **extra},
                              capture_output=True, text=True, timeout=timeout)

    def smi(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["nvidia-smi", *args], capture_output=True, text=True, env=self.env)

    def launch(self, model: str) -> dict:
        """What the stand-in of `model` was started with (argv, env, GPU, dtype, memory)."""
        port = self.env["EMBEDDING_PORT" if model == "embedding" else "RERANKER_PORT"]
        return json.loads((self.state / f"launch-{port}.json").read_text())

    def launched(self) -> list[Path]:
        return sorted(self.state.glob("launch-*.json"))

    def held_mib(self) -> dict[int, int]:
        """pid -> MiB held, as the fake nvidia-smi lists compute processes."""
        out = self.smi("--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits")
        assert out.returncode == 0, out.stdout
        return {int(p): int(m) for p, m in (line.split(", ") for line in out.stdout.splitlines())}


def script_env(tmp: Path, layout: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in SCRIPT_VARS and not k.startswith("FAKE_")}
    eport, rport, gport = free_port(), free_port(), free_port()
    while len({eport, rport, gport}) < 3:
        rport, gport = free_port(), free_port()
    state = tmp / "gpu-state"
    state.mkdir(parents=True, exist_ok=True)
    env.update({
        "ENV_FILE": "",  # ignore the repository's .env
        "LOG_DIR": str(tmp / "logs"),
        # the scripts' python3: this interpreter's base install (a version-manager shim adds 0.2 s a call)
        "PATH": os.pathsep.join([str(FAKE_SMI_DIR), os.path.dirname(os.path.realpath(sys.executable)),
                                 env.get("PATH", "")]),
        "PYTHONPATH": str(STANDIN),
        "VLLM_PYTHON": sys.executable,
        "FAKE_NVIDIA_SMI_LAYOUT": layout,
        "FAKE_GPU_STATE": str(state),
        "FAKE_VLLM_LOAD_SECONDS": "0.2",
        "EMBEDDING_PORT": str(eport),
        "RERANKER_PORT": str(rport),
        "PORT": str(gport),
        "VLLM_START_TIMEOUT": "60",
        "VLLM_STOP_TIMEOUT": "10",
    })
    return env


@pytest.fixture
def sim(tmp_path: Path) -> Iterator:
    """sim(layout) -> Sim; everything it started is stopped afterwards."""
    made: list[Sim] = []

    def make(layout: str = "h100x1") -> Sim:
        s = Sim(tmp_path / f"sim{len(made)}", script_env(tmp_path / f"sim{len(made)}", layout))
        made.append(s)
        return s

    yield make
    for s in made:
        s.run("stop_vllm_models.sh", "all", timeout=60)
        for f in s.launched():  # a stand-in started outside the PID files, or one stop missed
            pid = json.loads(f.read_text())["pid"]
            try:
                if "vllm.entrypoints" not in Path(f"/proc/{pid}/cmdline").read_text(errors="replace"):
                    continue  # gone, and the PID is someone else's now
            except OSError:
                continue
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
