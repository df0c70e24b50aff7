"""Shared fixtures: fake vLLM upstreams and gateway processes on loopback.

For tests that need processes (tests/process, tests/scale, tests/deploy); tests/api drives the app
in-process with its own fixtures of the same names (tests/api/conftest.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import pytest

from tests.procs import Gateway, Proc, gateway_env, make_key_file, start_fake, start_gateway


@pytest.fixture(scope="session")
def session_tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("procs")


@pytest.fixture(scope="session")
def fake_embed(session_tmp: Path) -> Iterator[Proc]:
    p = start_fake(session_tmp, "embed")
    yield p
    p.stop()


@pytest.fixture(scope="session")
def fake_rerank(session_tmp: Path) -> Iterator[Proc]:
    p = start_fake(session_tmp, "rerank")
    yield p
    p.stop()


GatewayFactory = Callable[..., Gateway]


@pytest.fixture
def make_gateway(tmp_path: Path, fake_embed: Proc, fake_rerank: Proc) -> Iterator[GatewayFactory]:
    """Start a gateway process against the fakes (or given upstreams), with a test-made key file."""
    started: list[Proc] = []

    def factory(embed: str | None = None, rerank: str | None = None, key_names=("tester",), key_fields=None,
                **overrides: str) -> Gateway:
        d = tmp_path / f"gw{len(started)}"
        d.mkdir()
        env = gateway_env(d, embed or fake_embed.url, rerank or fake_rerank.url, **overrides)
        keys = make_key_file(Path(env["API_KEYS_FILE"]), key_names, **(key_fields or {})) if key_names else {}
        proc = start_gateway(d, env)
        started.append(proc)
        return Gateway(proc, env, keys)

    yield factory
    for p in started:
        p.stop()


@pytest.fixture(scope="module")
def shared_gateway(tmp_path_factory: pytest.TempPathFactory, fake_embed: Proc, fake_rerank: Proc) -> Iterator[Gateway]:
    """One gateway process for the read-only tests of a module."""
    d = tmp_path_factory.mktemp("shared_gw")
    env = gateway_env(d, fake_embed.url, fake_rerank.url, RATE_LIMIT="100000/minute",
                      ACCESS_TOKEN="static-test-token-" + d.name)
    keys = make_key_file(Path(env["API_KEYS_FILE"]))
    proc = start_gateway(d, env)
    yield Gateway(proc, env, keys)
    proc.stop()
