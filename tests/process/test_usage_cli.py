"""`keys usage`, `keys update`, `keys create --token-limit` and `keys list` against a running gateway."""

import json
import time

import httpx

from tests.process.test_keys_cli import keys_cmd, new_key, wait_status


def post(gw, key, path, body):
    r = httpx.post(gw.url + path, json=body, headers={"Authorization": f"Bearer {key}"}, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def test_keys_usage_and_v1_usage_agree(make_gateway):
    gw = make_gateway(key_names=("team-a", "team-b"), RATE_LIMIT="100000/minute")
    a, b = gw.keys["team-a"], gw.keys["team-b"]
    tokens_a = sum(post(gw, a, "/v1/embeddings", {"input": [f"text {i}", "two words"]})["usage"]["prompt_tokens"]
                   for i in range(3))
    tokens_a += post(gw, a, "/v1/rerank", {"query": "q", "documents": ["x y", "z"]})["usage"]["prompt_tokens"]
    tokens_b = post(gw, b, "/v1/embeddings", {"input": "just b"})["usage"]["prompt_tokens"]
    own = httpx.get(gw.url + "/v1/usage", headers={"Authorization": f"Bearer {a}"}).json()
    assert own["total"]["prompt_tokens"] == tokens_a and own["total"]["requests"] == 4
    time.sleep(1.0)  # the gateway flushes every 0.5 s

    out = keys_cmd(gw.env, "usage", "--json")
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)["data"]
    by_key: dict[str, dict] = {}
    for r in rows:
        acc = by_key.setdefault(r["key"], {"requests": 0, "items": 0, "prompt_tokens": 0})
        for c in acc:
            acc[c] += r[c]
    # GET /v1/usage was answered after it read the counters: the CLI sees it as one more request (model "-")
    assert by_key["team-a"] == {"requests": own["total"]["requests"] + 1, "items": own["total"]["items"],
                                "prompt_tokens": tokens_a}
    assert by_key["team-b"]["prompt_tokens"] == tokens_b
    per_model = {(r["key"], r["model"]): r for r in rows}
    for entry in own["data"]:
        assert per_model[("team-a", entry["model"])]["prompt_tokens"] == entry["prompt_tokens"]

    one = keys_cmd(gw.env, "usage", "team-b")
    assert one.returncode == 0 and "team-b" in one.stdout and "team-a" not in one.stdout
    assert f"{tokens_b:,}" in one.stdout and "PROMPT TOKENS" in one.stdout
    table = keys_cmd(gw.env, "usage", "--since", "2000-01-01", "--model", "minilm").stdout
    assert "team-a" in table and "team-b" in table and "-  " not in table.split("\n", 2)[-1]
    assert "no usage recorded" in keys_cmd(gw.env, "usage", "--until", "2000-01-01").stdout
    assert keys_cmd(gw.env, "usage", "--since", "last week").returncode == 1
    swapped = keys_cmd(gw.env, "usage", "--since", "2026-12-01", "--until", "2026-11-01")
    assert swapped.returncode == 1 and "--since 2026-12-01 is after --until 2026-11-01" in swapped.stderr

    listing = keys_cmd(gw.env, "list").stdout
    assert "TOKEN LIMIT" in listing and "TODAY (UTC)" in listing and f"{tokens_a:,} tok" in listing
    assert a not in listing and b not in listing


def test_token_limit_on_create_update_and_rotate(make_gateway):
    gw = make_gateway(RATE_LIMIT="100000/minute")
    created = keys_cmd(gw.env, "create", "--name", "small", "--token-limit", "25/hour")
    assert created.returncode == 0, created.stderr
    key = new_key(created.stdout)
    assert wait_status(gw, key, 200).status_code == 200
    assert "25/hour" in keys_cmd(gw.env, "list").stdout
    body = {"input": "one two three four five six seven eight"}  # 10 tokens
    codes = [httpx.post(gw.url + "/v1/embeddings", json=body, headers={"Authorization": f"Bearer {key}"}).status_code
             for _ in range(4)]
    assert codes == [200, 200, 200, 429]
    r = httpx.post(gw.url + "/v1/embeddings", json=body, headers={"Authorization": f"Bearer {key}"})
    assert r.json()["error"]["code"] == "token_limit_exceeded" and int(r.headers["retry-after"]) > 1

    rotated = keys_cmd(gw.env, "rotate", "small")  # a new secret keeps the token limit
    new = new_key(rotated.stdout)
    assert "25/hour" in keys_cmd(gw.env, "list").stdout
    assert wait_status(gw, new, 200).status_code == 200

    updated = keys_cmd(gw.env, "update", "small", "--token-limit", "1000000/hour", "--rate-limit", "500/minute")
    assert updated.returncode == 0, updated.stderr
    listing = keys_cmd(gw.env, "list").stdout
    assert "1000000/hour" in listing and "500/minute" in listing
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        r = httpx.post(gw.url + "/v1/embeddings", json=body, headers={"Authorization": f"Bearer {new}"})
        if r.status_code == 200:
            break
        time.sleep(0.1)
    assert r.status_code == 200  # the new limit applies without a restart

    assert keys_cmd(gw.env, "update", "small", "--token-limit", "lots").returncode == 1
    assert keys_cmd(gw.env, "create", "--name", "bad", "--token-limit", "0/minute").returncode == 1
    assert keys_cmd(gw.env, "update", "small").returncode == 1  # nothing to change
    assert keys_cmd(gw.env, "update", "nobody", "--token-limit", "5/minute").returncode == 1
