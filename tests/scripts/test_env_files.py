""".env files: the scripts read them with the gateway's rules, and a single-service .env works unchanged."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from dotenv import dotenv_values

from erproxy.settings import Settings
from tests.scripts.conftest import ROOT, Sim

SEED_ENV = ROOT / "tests/fixtures/seed-reranker-api.env"

TRICKY = (
    "# a comment line\n"
    "export EXPORTED=exported value\n"
    "PLAIN=plain value   # an inline comment\n"
    "HASH_NO_SPACE=abc#def\n"
    "EMPTY=\n"
    "EMPTY_COMMENT= # only a comment\n"
    "SQ='single ${PLAIN} \\n stays \\' quote'\n"
    'DQ="double\\ttab \\"quoted\\" ${PLAIN} \\n newline"\n'
    'MULTI="line one\nline two"\n'
    "REF=${EXPORTED}/sub\n"
    "DEFAULTED=${ERP_TEST_NOT_SET_ANYWHERE:-fall back}\n"
    "EMPTY_DEFAULT=${ERP_TEST_NOT_SET_ANYWHERE}\n"
    "FROM_ENV=${ERP_TEST_OUTSIDE}-x\n"
    "LATER_REF=${DEFINED_LATER}\n"
    "DEFINED_LATER=late\n"
    "OVERRIDDEN=from the file\n"
    "SPACED = spaced value \n"
    "DOLLARS=cost $5 and $PLAIN and ${\n"
    "   INDENTED=indented\n"
    "KEY_WITHOUT_VALUE\n"
    'QUOTED_HASH="a # is no comment here"\n'
    'TRAILING_AFTER_QUOTE="quoted" trailing words\n'
    "CRLF=windows line\r\n"
    "UNICODE=é 中文\n"
    "BACKSLASH=C:\\path\\n\n"
    "ACCESS_TOKEN=${PLAIN}-token\n"
    'LOG_FORMAT="%(asctime)s # %(message)s"\n'
)
KEYS = ["EXPORTED", "PLAIN", "HASH_NO_SPACE", "EMPTY", "EMPTY_COMMENT", "SQ", "DQ", "MULTI", "REF", "DEFAULTED",
        "EMPTY_DEFAULT", "FROM_ENV", "LATER_REF", "DEFINED_LATER", "OVERRIDDEN", "SPACED", "DOLLARS", "INDENTED",
        "KEY_WITHOUT_VALUE", "QUOTED_HASH", "TRAILING_AFTER_QUOTE", "CRLF", "UNICODE", "BACKSLASH", "ACCESS_TOKEN",
        "LOG_FORMAT"]
UNSET = "<unset>"


def scripts_view(env: dict[str, str], keys: list[str]) -> dict[str, str]:
    """The variables as the shell scripts see them after sourcing scripts/common.sh."""
    code = ('source "$ERP_ROOT_FOR_TEST/scripts/common.sh"\n'
            'for k in "$@"; do printf "%s=%s\\0" "$k" "${!k-<unset>}"; done')
    out = subprocess.run(["bash", "-c", code, "bash", *keys], env={**env, "ERP_ROOT_FOR_TEST": str(ROOT)},
                         capture_output=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr.decode()
    return dict(item.split("=", 1) for item in out.stdout.decode().split("\0") if item)


def test_scripts_read_a_tricky_env_file_exactly_as_the_gateway_does(sim, tmp_path, monkeypatch) -> None:
    env_file = tmp_path / "tricky.env"
    env_file.write_bytes(TRICKY.encode())
    s: Sim = sim("h100x1")
    env = {**{k: v for k, v in s.env.items() if k not in KEYS}, "ENV_FILE": str(env_file),
           "ERP_TEST_OUTSIDE": "from the environment", "OVERRIDDEN": "from the environment"}
    env.pop("ERP_TEST_NOT_SET_ANYWHERE", None)

    # the gateway: python-dotenv's dotenv_values, the environment winning over the file
    for k in ("ERP_TEST_OUTSIDE", "OVERRIDDEN"):
        monkeypatch.setenv(k, env[k])
    monkeypatch.delenv("ERP_TEST_NOT_SET_ANYWHERE", raising=False)
    file_values = dotenv_values(env_file)
    gateway = {k: env[k] if k in env else (file_values.get(k) if file_values.get(k) is not None else UNSET)
               for k in KEYS}

    scripts = scripts_view(env, KEYS)
    assert scripts == gateway
    # spot checks of the rules themselves
    assert scripts["SQ"] == "single plain value \\n stays ' quote"
    assert scripts["DQ"] == 'double\ttab "quoted" plain value \n newline'
    assert scripts["DEFAULTED"] == "fall back" and scripts["FROM_ENV"] == "from the environment-x"
    assert scripts["OVERRIDDEN"] == "from the environment" and scripts["KEY_WITHOUT_VALUE"] == UNSET
    assert scripts["TRAILING_AFTER_QUOTE"] == UNSET and scripts["MULTI"] == "line one\nline two"

    settings = Settings.from_env(environ={"ERP_TEST_OUTSIDE": env["ERP_TEST_OUTSIDE"]}, env_file=env_file)
    assert settings.access_token == scripts["ACCESS_TOKEN"] == "plain value-token"
    assert settings.log_format == scripts["LOG_FORMAT"] == "%(asctime)s # %(message)s"


def seed_env_dir(tmp_path: Path) -> Path:
    """The single-service API's example .env beside its ./models folder, as that service is laid out."""
    home = tmp_path / "reranker-api"
    (home / "models/Qwen3-Reranker-4B").mkdir(parents=True)
    (home / "models/Qwen3-Reranker-4B/config.json").write_text(json.dumps({
        "architectures": ["Qwen3ForCausalLM"], "torch_dtype": "bfloat16", "max_position_embeddings": 40960}))
    shutil.copy(SEED_ENV, home / ".env")
    return home


def seed_sim(sim, tmp_path: Path, layout: str) -> tuple[Sim, Path]:
    s: Sim = sim(layout)
    home = seed_env_dir(tmp_path)
    s.env["ENV_FILE"] = str(home / ".env")
    del s.env["PORT"]  # the file's PORT applies
    return s, home


def test_single_service_env_file_starts_both_models_unchanged(sim, tmp_path) -> None:
    s, home = seed_sim(sim, tmp_path, "h100x1")
    result = s.run("start_vllm_models.sh", "all")
    assert result.returncode == 0, result.stdout + result.stderr

    reranker = s.launch("reranker")
    argv = " ".join(reranker["argv"])
    assert f"--model {home}/models/Qwen3-Reranker-4B" in argv                 # MODEL_NAME_OR_PATH, relative to the .env
    assert reranker["served_model_name"] == "Qwen3-Reranker-4B"
    assert "is_original_qwen3_reranker" in argv                               # a Qwen3 causal-LM reranker
    for model in ("embedding", "reranker"):
        launch = s.launch(model)
        assert launch["dtype"] == "bfloat16"                                  # MODEL_PRECISION
        assert launch["max_model_len"] == 256                                 # MAX_SEQ_LENGTH
        assert "--max-num-seqs 1" in " ".join(launch["argv"])                  # BATCH_SIZE
        assert launch["gpu_memory_utilization"] == 0.25                       # MAX_MEMORY_PERCENTAGE=50, shared
        assert launch["env"]["TOKENIZERS_PARALLELISM"] == "false"
        assert launch["env"]["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:128"
    out = result.stdout
    assert out.count("WORKER_CLASS=uvicorn.workers.UvicornWorker") == 1 and out.count("WORKER_CONNECTIONS=1000") == 1
    assert "not applicable to the vLLM servers" in out

    status = json.loads(s.run("check_models_status.sh", "--json").stdout)
    assert status["gateway"]["url"].endswith(":6006")                         # PORT: the gateway's port
    assert status["models"]["reranker"]["up"] and status["models"]["embedding"]["up"]
    assert Settings.from_env(environ={}, env_file=home / ".env").port == 6006  # the gateway reads it alike


def test_single_service_env_file_asking_bfloat16_on_a_t4_is_refused_before_launch(sim, tmp_path) -> None:
    s, _ = seed_sim(sim, tmp_path, "t4")
    result = s.run("start_vllm_models.sh", "all")
    assert result.returncode == 1
    assert "MODEL_PRECISION=bfloat16" in result.stderr and "compute capability 7.5" in result.stderr
    assert s.launched() == []


@pytest.mark.parametrize("override,expected", [
    ({"RERANKER_MODEL_PATH": "BAAI/bge-reranker-v2-m3"}, "--model BAAI/bge-reranker-v2-m3"),
    ({"VLLM_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": "2", "EMBEDDING_MODEL_PATH": "intfloat/e5-small-v2"},
     "VLLM_CPU_KVCACHE_SPACE=2 "),
    ({"RERANKER_MAX_SEQ_LENGTH": "8192"}, "--max-model-len 8192"),
])
def test_our_own_names_win_over_the_single_service_ones(sim, tmp_path, override, expected) -> None:
    s, _ = seed_sim(sim, tmp_path, "h100x1")
    result = s.run("start_vllm_models.sh", "reranker", "--dry-run", **override)
    assert result.returncode == 0, result.stderr
    assert expected in result.stdout


def test_a_env_file_naming_bash_own_variables_does_not_break_the_scripts(sim, tmp_path) -> None:
    env_file = tmp_path / "odd.env"
    env_file.write_text("UID=5\nSECONDS=3\nBASH_ENV=/nonexistent\nEMBEDDING_PORT=18555\n")
    s: Sim = sim("h100x1")
    env = {**{k: v for k, v in s.env.items() if k != "EMBEDDING_PORT"}, "ENV_FILE": str(env_file)}
    result = subprocess.run(["bash", str(ROOT / "start_vllm_models.sh"), "embedding", "--dry-run"], env=env,
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "--port 18555" in result.stdout
    assert "UID in" in result.stderr and "the shell owns that name" in result.stderr


@pytest.mark.parametrize("layout,gpus", [("h100x1", [0, 0]), ("h100x2", [1, 0])])
def test_env_example_copied_to_env_lets_the_plan_place_the_models(sim, tmp_path, layout, gpus) -> None:
    s: Sim = sim(layout)
    env_file = tmp_path / ".env"
    shutil.copy(ROOT / ".env.example", env_file)
    env = {k: v for k, v in s.env.items() if k not in ("EMBEDDING_PORT", "RERANKER_PORT", "VLLM_START_TIMEOUT",
                                                       "VLLM_STOP_TIMEOUT")}
    result = subprocess.run(["bash", str(ROOT / "start_vllm_models.sh"), "all", "--dry-run"], cwd=ROOT,
                            env={**env, "ENV_FILE": str(env_file)}, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    placed = [line for line in result.stdout.splitlines() if line.startswith("CUDA_DEVICE_ORDER")]
    assert [int(line.split("CUDA_VISIBLE_DEVICES=")[1].split()[0]) for line in placed] == gpus


def test_the_scripts_refuse_an_env_file_that_does_not_exist(sim, tmp_path) -> None:
    s: Sim = sim("h100x1")
    for script, args in (("start_vllm_models.sh", ("all", "--dry-run")), ("check_models_status.sh", ("--json",))):
        r = s.run(script, *args, ENV_FILE=str(tmp_path / "erproxy.emv"))
        assert r.returncode != 0 and "no such file" in r.stderr, r.stdout + r.stderr
