"""The gateway image: Dockerfile through the official Dockerfile parser, .dockerignore, and its start replayed.

The Dockerfile goes through the official BuildKit Dockerfile parser (PyPI `dockerfile`); its COPY
sources, user, port, health check and command are checked, and the image's start is replayed
locally: the copied files alone, the image's environment and CMD, then its HEALTHCHECK command.
The parser is a dev dependency (requirements-dev.txt); a missing one fails these tests, never skips them.
"""

from __future__ import annotations

import fnmatch
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.deploy.common import ROOT, dockerfile_env, instructions

DOCKERIGNORE = ROOT / ".dockerignore"


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
    from tests.procs import free_port, spawn, wait_http

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
    proc = spawn([sys.executable, *cmd[1:]], log, cwd=app, env=env, url=f"http://127.0.0.1:{env['PORT']}")
    healthcheck = " ".join(instructions("HEALTHCHECK")[0].value[1:])
    try:
        try:
            wait_http(proc.url + "/health", timeout=30, proc=proc, ok=(200,))
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
