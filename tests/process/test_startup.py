"""Starting the gateway process: the first key handed over once, and start-ups refused with a reason."""

import os
import stat
import sys
from pathlib import Path

import httpx
import pytest

from tests.procs import ROOT, gateway_env, spawn, start_gateway, wait_http


def test_first_start_creates_key_file_and_hands_over_the_key_once(tmp_path, fake_embed, fake_rerank):
    env = gateway_env(tmp_path, fake_embed.url, fake_rerank.url)
    keys_file = Path(env["API_KEYS_FILE"])
    # its own session, so no terminal: the key goes to a file beside the key file, never to the output
    proc = spawn([sys.executable, str(ROOT / "embedding_reranker_proxy.py")], tmp_path / "first.out", cwd=ROOT,
                 env=env, url=f"http://127.0.0.1:{env['PORT']}", new_session=True)
    try:
        wait_http(proc.url + "/health", proc=proc)
        new_key = keys_file.with_name(keys_file.name + ".new-key").read_text()
        key = next(w for w in new_key.split() if w.startswith("er-") and len(w) > 30)
        assert key not in proc.output()
        assert stat.S_IMODE(os.stat(keys_file).st_mode) == 0o600
        assert key not in keys_file.read_text()
        assert key not in (Path(env["LOG_DIR"]) / "embedding_reranker_proxy.log").read_text()
        r = httpx.get(proc.url + "/v1/models", headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 200
    finally:
        proc.stop()
    before = keys_file.read_bytes()
    proc = start_gateway(tmp_path, env)  # second start: same file, no new key printed
    try:
        assert keys_file.read_bytes() == before
        assert "A new API key" not in proc.output()
    finally:
        proc.stop()


def test_corrupt_key_file_stops_start_up_untouched(tmp_path, fake_embed, fake_rerank):
    env = gateway_env(tmp_path, fake_embed.url, fake_rerank.url)
    Path(env["API_KEYS_FILE"]).write_text('{"keys": [oops')
    proc = start_gateway(tmp_path, env, wait=False)
    assert proc.popen.wait(30) != 0
    assert "not valid JSON" in proc.output() and env["API_KEYS_FILE"] in proc.output()
    assert Path(env["API_KEYS_FILE"]).read_text() == '{"keys": [oops'


@pytest.mark.parametrize("variable, value", [("RATE_LIMIT", "fast please"), ("HOST", "127.0.0.l")])
def test_bad_configuration_stops_start_up_naming_the_variable(tmp_path, fake_embed, fake_rerank, variable, value):
    env = gateway_env(tmp_path, fake_embed.url, fake_rerank.url, **{variable: value})
    proc = start_gateway(tmp_path, env, wait=False)
    assert proc.popen.wait(30) == 2
    assert f"{variable}" in proc.output() and "Traceback" not in proc.output()
