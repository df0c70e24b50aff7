"""start / check / stop for real on every simulated GPU layout (fake nvidia-smi + vLLM stand-in)."""
from __future__ import annotations

import json
import subprocess
import time
import sys
from pathlib import Path

import pytest

from tests.scripts.conftest import LAYOUTS, ROOT, Sim

# layout -> model -> (GPU index, dtype, --gpu-memory-utilization)
EXPECTED = {
    "h100x1": {"embedding": (0, "bfloat16", 0.45), "reranker": (0, "bfloat16", 0.45)},
    "h100x2": {"embedding": (1, "bfloat16", 0.90), "reranker": (0, "bfloat16", 0.97)},
    "h100x4": {"embedding": (1, "bfloat16", 0.90), "reranker": (0, "bfloat16", 0.97)},
    "t4": {"embedding": (0, "float16", 0.45), "reranker": (0, "float16", 0.45)},
    "h100-busy": {"embedding": (0, "bfloat16", 0.25), "reranker": (0, "bfloat16", 0.25)},
}
STATIC_PIDS = {429, 430}  # the other processes of the recorded busy H100


def assert_nothing_started(s: Sim) -> None:
    assert s.launched() == [], "a vLLM server was launched"
    assert not (s.log_dir / "embedding.pid").exists() and not (s.log_dir / "reranker.pid").exists()
    assert set(s.held_mib()) <= STATIC_PIDS


@pytest.mark.parametrize("layout", LAYOUTS)
def test_start_check_stop_bring_both_models_up_where_the_plan_says(sim, layout: str) -> None:
    s = sim(layout)
    started = s.run("start_vllm_models.sh", "all")
    assert started.returncode == 0, started.stdout + started.stderr
    assert "all requested models are up" in started.stdout
    for model, (gpu, dtype, fraction) in EXPECTED[layout].items():
        launch = s.launch(model)
        assert launch["env"]["CUDA_VISIBLE_DEVICES"] == str(gpu)
        assert launch["env"]["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
        assert launch["gpu_index"] == gpu
        assert launch["dtype"] == dtype and f"--dtype {dtype}" in " ".join(launch["argv"])
        assert launch["gpu_memory_utilization"] == fraction
        assert (s.log_dir / f"{model}.gpu").read_text().strip() == str(gpu)

    status = s.run("check_models_status.sh", "--json", "--no-gateway")
    assert status.returncode == 0, status.stdout + status.stderr
    report = json.loads(status.stdout)
    assert report["up"] is True
    for model, (gpu, _, _) in EXPECTED[layout].items():
        r = report["models"][model]
        assert r["up"] and r["pid_alive"] and r["served_models"] == [f"Qwen3-{model.capitalize()}-0.6B"]
        assert r["gpu"]["index"] == str(gpu)
        assert r["gpu"]["server_memory_mib"] == s.launch(model)["memory_mib"]
        assert r["gpu"]["memory_used_mib"] >= r["gpu"]["server_memory_mib"]
    table = s.run("check_models_status.sh", "--no-gateway")
    assert table.returncode == 0 and table.stdout.count("this server") == 2

    stopped = s.run("stop_vllm_models.sh", "all")
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert stopped.stdout.count("stopped") == 2
    assert set(s.held_mib()) <= STATIC_PIDS  # the memory is given back
    assert not list(s.log_dir.glob("*.pid")) and not list(s.log_dir.glob("*.gpu"))
    down = s.run("check_models_status.sh", "--json", "--no-gateway")
    assert down.returncode == 1 and json.loads(down.stdout)["up"] is False


@pytest.mark.parametrize("layout,env,names", [
    ("h100x1", {"EMBEDDING_GPU": "1"}, ["EMBEDDING_GPU=1", "1 GPU", "Set EMBEDDING_GPU to 0"]),
    ("h100x2", {"RERANKER_GPU": "2"}, ["RERANKER_GPU=2", "2 GPUs"]),
    ("h100x1", {"EMBEDDING_GPU_MEMORY": "0.90", "RERANKER_GPU_MEMORY": "0.97"},
     ["RERANKER_GPU_MEMORY=0.97", "78647 MiB", "at most 0.08"]),
    ("h100-busy", {"MAX_MEMORY_PERCENTAGE": "40"}, ["MAX_MEMORY_PERCENTAGE=40", "31771 MiB"]),
    ("t4", {"MODEL_PRECISION": "bfloat16"}, ["MODEL_PRECISION=bfloat16", "Tesla T4", "compute capability 7.5"]),
])
def test_a_plan_that_cannot_work_is_refused_before_anything_starts(sim, layout, env, names) -> None:
    s = sim(layout)
    result = s.run("start_vllm_models.sh", "all", **env)
    assert result.returncode == 1
    assert "launch plan refused, nothing started" in result.stderr
    for text in names:
        assert text in result.stderr
    assert_nothing_started(s)


def standin(s: Sim, port: int, *args: str, **env: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--port", str(port),
                             "--host", "127.0.0.1", *args], env={**s.env, **env}, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_without_a_plan_the_simulated_vllm_fails_as_reported_on_real_hosts(sim) -> None:
    """The stand-in refuses what vLLM refuses: the failures the plan now predicts."""
    from tests.procs import free_port, wait_http
    s = sim("h100x1")
    # CUDA_VISIBLE_DEVICES=1 on a one-GPU host
    p = standin(s, free_port(), "--model", "Qwen/Qwen3-Embedding-0.6B", CUDA_VISIBLE_DEVICES="1")
    assert p.wait(30) == 1 and "RuntimeError: No CUDA GPUs are available" in p.stdout.read()
    # --dtype auto on a T4 for a bfloat16 Qwen3 checkpoint
    p = standin(s, free_port(), "--model", "Qwen/Qwen3-Reranker-0.6B", "--dtype", "auto",
                CUDA_VISIBLE_DEVICES="0", FAKE_NVIDIA_SMI_LAYOUT="t4")
    assert p.wait(30) == 1
    assert ("ValueError: Bfloat16 is only supported on GPUs with compute capability of at least 8.0. Your Tesla T4 "
            "GPU has compute capability 7.5.") in p.stdout.read()
    # 0.90 then 0.97 of one card: the second dies
    port = free_port()
    first = standin(s, port, "--model", "Qwen/Qwen3-Embedding-0.6B", "--gpu-memory-utilization", "0.90",
                    CUDA_VISIBLE_DEVICES="0")
    try:
        wait_http(f"http://127.0.0.1:{port}/health", proc=first, ok=(200,))
        second = standin(s, free_port(), "--model", "Qwen/Qwen3-Reranker-0.6B", "--gpu-memory-utilization", "0.97",
                         CUDA_VISIBLE_DEVICES="0")
        assert second.wait(30) == 1
        assert ("ValueError: Free memory on device cuda:0 (7.39/79.18 GiB) on startup is less than desired GPU memory "
                "utilization (0.97, 76.80 GiB). Decrease GPU memory utilization or reduce GPU memory used by other "
                "processes.") in second.stdout.read()
    finally:
        first.terminate()
        first.wait(10)
    assert s.held_mib() == {}


def test_dry_run_prints_the_plan_table_and_command_lines_and_starts_nothing(sim) -> None:
    s = sim("h100x1")
    result = s.run("start_vllm_models.sh", "--dry-run")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:5] == ["model", "GPU", "compute", "cap", "dtype"])
    assert lines[header].split()[-3:] == ["port", "served", "name"]
    emb, rer = lines[header + 1].split(), lines[header + 2].split()
    assert emb[:9] == ["embedding", "0", "NVIDIA", "H100", "80GB", "HBM3", "9.0", "bfloat16", "0.45"]
    assert rer[:9] == ["reranker", "0", "NVIDIA", "H100", "80GB", "HBM3", "9.0", "bfloat16", "0.45"]
    assert emb[-2:] == [s.env["EMBEDDING_PORT"], "Qwen3-Embedding-0.6B"]
    commands = [line for line in lines if line.startswith("CUDA_DEVICE_ORDER=PCI_BUS_ID CUDA_VISIBLE_DEVICES=0 ")]
    assert len(commands) == 2
    assert all("--dtype bfloat16" in c and "--gpu-memory-utilization 0.45" in c for c in commands)
    assert "started once the servers before it are up" in result.stdout  # the reranker waits for the embedding
    assert not s.log_dir.exists() and s.launched() == []


def test_models_started_one_at_a_time_share_one_gpu(sim) -> None:
    s = sim("h100x1")
    first = s.run("start_vllm_models.sh", "embedding")
    assert first.returncode == 0, first.stdout + first.stderr
    assert s.launch("embedding")["gpu_memory_utilization"] == 0.45   # room kept for the reranker
    second = s.run("start_vllm_models.sh", "reranker")
    assert second.returncode == 0, second.stdout + second.stderr
    assert s.launch("reranker")["gpu_memory_utilization"] == 0.44    # the rest of the 90 % budget
    # restarting the reranker alone while the embedding runs works the same way
    assert s.run("stop_vllm_models.sh", "reranker").returncode == 0
    again = s.run("start_vllm_models.sh", "reranker")
    assert again.returncode == 0, again.stdout + again.stderr
    assert json.loads(s.run("check_models_status.sh", "--json", "--no-gateway").stdout)["up"] is True


def write_model(folder: Path, architecture: str, dtype: str, max_len: int) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"architectures": [architecture], "torch_dtype": dtype,
                                                    "max_position_embeddings": max_len}))
    return folder


def test_per_model_max_seq_length_lets_a_512_token_model_and_a_32k_model_share_a_setting(sim, tmp_path) -> None:
    s = sim("h100x1")
    minilm = write_model(tmp_path / "all-MiniLM-L6-v2", "BertModel", "float32", 512)
    qwen = write_model(tmp_path / "Qwen3-Reranker-0.6B", "Qwen3ForCausalLM", "bfloat16", 40960)
    env = {"EMBEDDING_MODEL_PATH": str(minilm), "RERANKER_MODEL_PATH": str(qwen), "MAX_SEQ_LENGTH": "32768"}
    # one shared value: vLLM refuses the MiniLM
    shared = s.run("start_vllm_models.sh", "embedding", **env)
    assert shared.returncode == 1
    assert "User-specified max_model_len (32768) is greater than the derived max_model_len" in shared.stderr
    # a per-model override fixes it
    result = s.run("start_vllm_models.sh", "all", EMBEDDING_MAX_SEQ_LENGTH="512", **env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert s.launch("embedding")["max_model_len"] == 512
    assert s.launch("reranker")["max_model_len"] == 32768
    assert s.launch("embedding")["dtype"] == "bfloat16"   # auto on compute capability 9.0, passed explicitly


def test_cpu_profile_keeps_its_command_line_and_has_no_gpu_columns(sim, tmp_path) -> None:
    s = sim("h100x1")
    minilm = write_model(tmp_path / "minilm", "BertModel", "float32", 512)
    env = {"VLLM_DEVICE": "cpu", "EMBEDDING_MODEL_PATH": str(minilm), "RERANKER_MODEL_PATH": str(minilm),
           "RERANKER_KIND": "embedding"}
    dry = s.run("start_vllm_models.sh", "--dry-run", **env)
    assert dry.returncode == 0, dry.stderr
    commands = [line for line in dry.stdout.splitlines() if line.startswith("VLLM_CPU_KVCACHE_SPACE=1 ")]
    assert len(commands) == 2 and all("--dtype auto" in c and "gpu-memory" not in c for c in commands)
    assert any(line.split()[:3] == ["embedding", "cpu", "-"] for line in dry.stdout.splitlines())
    started = s.run("start_vllm_models.sh", "all", **env)
    assert started.returncode == 0, started.stdout + started.stderr
    report = json.loads(s.run("check_models_status.sh", "--json", "--no-gateway", **env).stdout)
    assert report["up"] is True and report["models"]["embedding"]["gpu"] is None


@pytest.mark.parametrize("script", ["start_vllm_models.sh", "stop_vllm_models.sh", "check_models_status.sh"])
def test_scripts_share_one_command_line(sim, script: str) -> None:
    s = sim("h100x1")
    helped = s.run(script, "--help")
    assert helped.returncode == 0 and helped.stdout.startswith(f"Usage: ./{script}")
    wrong = s.run(script, "--bogus")
    assert wrong.returncode == 2 and "unknown argument: --bogus (see --help)" in wrong.stderr
    assert s.run(script, "--dry-run" if script != "start_vllm_models.sh" else "--json").returncode == 2


def test_when_the_first_server_on_a_gpu_fails_the_second_is_not_started(sim, tmp_path) -> None:
    s = sim("h100x1")
    minilm = write_model(tmp_path / "all-MiniLM-L6-v2", "BertModel", "float32", 512)
    result = s.run("start_vllm_models.sh", "all", EMBEDDING_MODEL_PATH=str(minilm), MAX_SEQ_LENGTH="1024")
    assert result.returncode == 1
    assert "embedding: vLLM exited during start-up" in result.stderr
    assert "User-specified max_model_len (1024)" in result.stderr          # the log tail shows vLLM's reason
    assert "not started: reranker" in result.stderr and "failed to start: embedding" in result.stderr
    assert (s.log_dir / "embedding_model.log").exists() and not (s.log_dir / "reranker_model.log").exists()
    assert not list(s.log_dir.glob("*.pid")) and not list(s.log_dir.glob("*.gpu"))
    assert s.held_mib() == {}


def foreign(s: Sim, *cmd: str) -> subprocess.Popen:
    """Another program of the machine, in a process group of its own (as a daemon started by a script)."""
    return subprocess.Popen(list(cmd), start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def test_a_pid_file_whose_pid_now_belongs_to_another_program_is_not_taken_for_vllm(sim) -> None:
    """After a reboot the PID in a PID file can belong to anything: start must not refuse, status must not
    say alive, stop must not signal it, even when its command line mentions vllm."""
    s = sim("h100x2")
    s.log_dir.mkdir(parents=True)
    notes = s.tmp / "vllm-notes.txt"
    notes.write_text("")
    other = foreign(s, "tail", "-f", str(notes))
    try:
        time.sleep(1.5)  # it started well before the PID file below was written...
        (s.log_dir / "embedding.pid").write_text(f"{other.pid}\n")
        status = s.run("check_models_status.sh", "--json")
        assert json.loads(status.stdout)["models"]["embedding"]["pid_alive"] is False, status.stdout
        stop = s.run("stop_vllm_models.sh", "embedding")
        assert stop.returncode == 0 and other.poll() is None, stop.stdout + stop.stderr  # left alone
        (s.log_dir / "embedding.pid").write_text(f"{other.pid}\n")
        started = s.run("start_vllm_models.sh", "embedding")
        assert started.returncode == 0, started.stdout + started.stderr
        assert other.poll() is None
    finally:
        other.kill()
        s.run("stop_vllm_models.sh")


def test_stop_leaves_alone_a_process_group_of_other_programs_under_a_stale_pid(sim) -> None:
    s = sim("h100x2")
    s.log_dir.mkdir(parents=True)
    leader = subprocess.run(["setsid", "bash", "-c", "sleep 600 >/dev/null 2>&1 & echo $$"],
                            capture_output=True, text=True)
    group = int(leader.stdout.strip())  # its leader has exited; the sleep remains in group `group`
    try:
        (s.log_dir / "embedding.pid").write_text(f"{group}\n")
        stop = s.run("stop_vllm_models.sh", "embedding")
        assert stop.returncode == 0 and "leaving them alone" in stop.stdout + stop.stderr
        assert subprocess.run(["pgrep", "-g", str(group)], capture_output=True).returncode == 0  # still there
    finally:
        subprocess.run(["pkill", "-g", str(group)])


def test_two_starts_at_once_never_start_two_servers(sim) -> None:
    s = sim("h100x2")
    env = {**s.env, "FAKE_VLLM_LOAD_SECONDS": "2"}
    first = subprocess.Popen(["bash", str(ROOT / "start_vllm_models.sh"), "embedding"], cwd=ROOT, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 20
        while not (s.log_dir / ".start.lock").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
        second = s.run("start_vllm_models.sh", "embedding")
        assert second.returncode == 1 and "another start_vllm_models.sh is running" in second.stderr + second.stdout
        out, _ = first.communicate(timeout=60)
        assert first.returncode == 0, out
        assert len(s.launched()) == 1
        assert s.run("start_vllm_models.sh", "embedding").returncode == 1  # running: refused as before
    finally:
        first.kill()
        s.run("stop_vllm_models.sh")


def test_dry_run_of_the_cpu_profile_installs_nothing(sim) -> None:
    s = sim("h100x2")
    venv = s.tmp / "no-venv-yet"
    env = {k: v for k, v in s.env.items() if k != "VLLM_PYTHON"}
    dry = subprocess.run(["bash", str(ROOT / "start_vllm_models.sh"), "--dry-run"], cwd=ROOT,
                         env={**env, "VLLM_DEVICE": "cpu", "VLLM_CPU_VENV": str(venv)},
                         capture_output=True, text=True, timeout=120)
    assert not venv.exists(), dry.stdout + dry.stderr  # nothing installed
    assert "a real start runs scripts/setup_vllm_cpu.sh" in dry.stderr + dry.stdout


def test_a_hung_nvidia_smi_neither_hangs_the_status_check_nor_lets_start_guess_the_device(sim) -> None:
    s = sim("h100x2")
    started = s.run("start_vllm_models.sh", "all")
    assert started.returncode == 0, started.stdout + started.stderr
    hung = {"FAKE_NVIDIA_SMI_HANG": "1", "NVIDIA_SMI_TIMEOUT": "1"}
    t0 = time.monotonic()
    status = s.run("check_models_status.sh", "--json", "--no-gateway", timeout=60, **hung)
    assert time.monotonic() - t0 < 20  # one time-out, not one per question asked of nvidia-smi
    report = json.loads(status.stdout)
    assert status.returncode == 0 and report["up"] is True  # the servers answer: they are up
    assert "nvidia-smi did not answer within 1 s" in report["gpu_error"]
    assert all(m["gpu"] is None for m in report["models"].values())
    table = s.run("check_models_status.sh", "--no-gateway", timeout=60, **hung)
    assert "GPU memory not shown: nvidia-smi did not answer" in table.stdout, table.stdout
    s.run("stop_vllm_models.sh", "all")
    # VLLM_DEVICE=auto must not take a wedged GPU host for one without GPUs and start the CPU profile
    again = s.run("start_vllm_models.sh", "all", "--dry-run", timeout=60, VLLM_DEVICE="auto", **hung)
    assert again.returncode != 0
    assert "nvidia-smi did not answer within 1 s" in again.stdout + again.stderr
    assert "VLLM_DEVICE=cpu" in again.stdout + again.stderr


@pytest.mark.parametrize("value", ["20s", "abc", "0"])
def test_a_bad_nvidia_smi_timeout_is_refused_by_name_not_read_as_no_gpu(sim, value) -> None:
    s = sim("h100x2")
    r = s.run("start_vllm_models.sh", "all", "--dry-run", timeout=60, VLLM_DEVICE="auto", NVIDIA_SMI_TIMEOUT=value)
    assert r.returncode != 0 and "NVIDIA_SMI_TIMEOUT must be a number of seconds" in r.stderr, r.stdout + r.stderr
    assert "Traceback" not in r.stderr and "device profile" not in r.stdout  # refused before choosing one
