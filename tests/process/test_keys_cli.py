"""The `keys` command against a running gateway: create, list, revoke, rotate, allow-lists, audit."""

import concurrent.futures as cf
import json
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.procs import ROOT


def keys_cmd(env, *args):
    return subprocess.run([sys.executable, str(ROOT / "embedding_reranker_proxy.py"), "keys", *args],
                          env=env, capture_output=True, text=True, timeout=60)


def new_key(out: str) -> str:
    return next(w for w in out.split() if w.startswith("er-") and len(w) > 30)


def wait_status(gw, key, want, path="/v1/models", timeout=3.0):
    deadline = time.monotonic() + timeout
    while True:
        r = httpx.get(gw.url + path, headers={"Authorization": f"Bearer {key}"})
        if r.status_code == want or time.monotonic() > deadline:
            return r
        time.sleep(0.05)


def test_key_lifecycle_against_a_running_gateway(make_gateway):
    gw = make_gateway()
    env = gw.env
    created = keys_cmd(env, "create", "--name", "team-a", "--rate-limit", "2/minute")
    assert created.returncode == 0, created.stderr
    key = new_key(created.stdout)
    assert key not in Path(env["API_KEYS_FILE"]).read_text()
    assert wait_status(gw, key, 200).status_code == 200          # picked up without restart
    assert wait_status(gw, key, 200).status_code == 200
    assert httpx.get(gw.url + "/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 429

    listing = keys_cmd(env, "list").stdout
    assert "team-a" in listing and "2/minute" in listing and key not in listing and key[:10] in listing

    rotated = keys_cmd(env, "rotate", "team-a")
    new = new_key(rotated.stdout)
    assert wait_status(gw, key, 401).status_code == 401
    assert new != key

    assert keys_cmd(env, "revoke", "team-a").returncode == 0
    r = wait_status(gw, new, 401)
    assert r.status_code == 401 and "revoked" in r.json()["error"]["message"]
    assert "revoked" in keys_cmd(env, "list").stdout

    audit = [json.loads(line) for line in (Path(env["LOG_DIR"]) / "key_audit.log").read_text().splitlines()]
    assert [a["action"] for a in audit] == ["create", "rotate", "revoke"]
    assert all(a["key_name"] == "team-a" and "user" in a and "time" in a for a in audit)
    text = (Path(env["LOG_DIR"]) / "key_audit.log").read_text()
    assert key not in text and new not in text


def test_model_allow_list_is_403_and_expired_key_401(make_gateway):
    gw = make_gateway()
    key = new_key(keys_cmd(gw.env, "create", "--name", "embed-only", "--models", "minilm").stdout)
    r = wait_status(gw, key, 200)
    ok = httpx.post(gw.url + "/v1/embeddings", json={"model": "minilm", "input": "x"},
                    headers={"Authorization": f"Bearer {key}"})
    assert ok.status_code == 200
    denied = httpx.post(gw.url + "/v1/rerank", json={"query": "q", "documents": ["a"]},
                        headers={"Authorization": f"Bearer {key}"})
    assert denied.status_code == 403 and denied.json()["error"]["code"] == "model_not_allowed"

    short = new_key(keys_cmd(gw.env, "create", "--name", "brief", "--expires-in", "2s").stdout)
    assert wait_status(gw, short, 200).status_code == 200
    time.sleep(2.2)
    r = httpx.get(gw.url + "/v1/models", headers={"Authorization": f"Bearer {short}"})
    assert r.status_code == 401 and "expired" in r.json()["error"]["message"]


def test_concurrent_key_commands_never_corrupt_the_file(make_gateway):
    gw = make_gateway()
    with cf.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda i: keys_cmd(gw.env, "create", "--name", f"k{i}"), range(16)))
    assert all(r.returncode == 0 for r in results), [r.stderr for r in results]
    doc = json.loads(Path(gw.env["API_KEYS_FILE"]).read_text())
    assert {k["name"] for k in doc["keys"]} == {"tester"} | {f"k{i}" for i in range(16)}
    for r in results[:3]:
        assert wait_status(gw, new_key(r.stdout), 200).status_code == 200


def test_bad_arguments_are_refused(make_gateway):
    gw = make_gateway()
    assert keys_cmd(gw.env, "create", "--name", "tester").returncode == 1      # duplicate name
    assert keys_cmd(gw.env, "create", "--name", "x", "--rate-limit", "lots").returncode == 1
    assert keys_cmd(gw.env, "create", "--name", "y", "--expires-in", "soon").returncode == 1
    assert keys_cmd(gw.env, "revoke", "nobody").returncode == 1
    refused = keys_cmd(gw.env, "create", "--name", "z", "--models", " , ")  # not "every model" by accident
    assert refused.returncode == 1 and "at least one model" in refused.stderr


def test_an_unwritable_audit_log_changes_nothing_and_never_loses_a_new_key(make_gateway, tmp_path):
    gw = make_gateway()
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where LOG_DIR should be\n")  # the audit log cannot be created under it
    env = {**gw.env, "LOG_DIR": str(blocked)}
    before = Path(gw.env["API_KEYS_FILE"]).read_bytes()
    for args in (("create", "--name", "team-b"), ("rotate", "tester"), ("revoke", "tester"),
                 ("update", "tester", "--rate-limit", "5/minute")):
        r = keys_cmd(env, *args)
        assert r.returncode == 1 and "cannot write the audit log" in r.stderr and "nothing was changed" in r.stderr
        assert "Traceback" not in r.stderr and "er-" not in r.stdout
    assert Path(gw.env["API_KEYS_FILE"]).read_bytes() == before
    assert httpx.get(gw.url + "/v1/models", headers=gw.auth()).status_code == 200  # the old key still works
