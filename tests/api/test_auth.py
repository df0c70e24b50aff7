"""API keys: every way to send one, the 401s in OpenAI's error shape, keys revoked in the key file."""

import asyncio
import time
from pathlib import Path

import openai
import pytest

from erproxy.keys import read_records, write_key_file


@pytest.mark.parametrize("how", ["bearer", "api_key", "access_token"])
async def test_each_auth_form_is_accepted(gateway, how):
    key = gateway.key
    if how == "bearer":
        r = await gateway.get("/v1/models", headers={"Authorization": f"Bearer {key}"})
    else:
        r = await gateway.get(f"/v1/models?{how}={key}")
    assert r.status_code == 200


async def test_static_access_token_is_a_key(gateway):
    token = gateway.env["ACCESS_TOKEN"]
    assert (await gateway.get("/v1/models", params={"access_token": token})).status_code == 200


@pytest.mark.parametrize("headers,params,code", [
    ({}, {}, "missing_api_key"),
    ({"Authorization": "Bearer er-wrong"}, {}, "invalid_api_key"),
    ({}, {"api_key": "er-wrong"}, "invalid_api_key"),
    ({"Authorization": "Basic abc"}, {}, "missing_api_key"),
])
async def test_missing_or_wrong_key_is_401_in_openai_shape(gateway, headers, params, code):
    r = await gateway.post("/v1/embeddings", headers=headers, params=params, json={"input": "x"})
    assert r.status_code == 401
    err = r.json()["error"]
    assert err["code"] == code and err["type"] == "authentication_error" and "key" in err["message"].lower()
    assert set(err) == {"message", "type", "param", "code"}


async def test_openai_sdk_wrong_key_raises_authentication_error(gateway):
    client = openai.AsyncOpenAI(base_url=gateway.url + "/v1", api_key="er-not-a-key", max_retries=0,
                                http_client=gateway.client)
    with pytest.raises(openai.AuthenticationError):
        await client.embeddings.create(model="minilm", input="x")


async def test_key_revoked_in_file_is_refused_without_restart(make_gateway):
    gw = await make_gateway()

    async def post_embed():
        return await gw.post("/v1/embeddings", json={"model": "minilm", "input": "hello world"}, headers=gw.auth())

    assert (await post_embed()).status_code == 200
    path = Path(gw.env["API_KEYS_FILE"])
    records = read_records(path)
    records[0].revoked = True
    write_key_file(path, records)
    deadline = time.monotonic() + 3
    while (await post_embed()).status_code == 200 and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    r = await post_embed()
    assert r.status_code == 401 and "revoked" in r.json()["error"]["message"]


async def test_a_client_still_sending_a_rotated_keys_old_secret_is_told_and_locks_out_nobody(make_gateway):
    """After `keys rotate`, a client not yet given the new secret keeps sending the old one: each is a 401
    saying the key was replaced, never counted as guessing keys (that would lock out its whole address)."""
    from erproxy.keys import rotate_key

    gw = await make_gateway(key_names=("svc", "other-team"), AUTH_FAILURE_LIMIT="3")
    old, other = gw.keys["svc"], gw.keys["other-team"]
    new, _, _ = rotate_key(Path(gw.env["API_KEYS_FILE"]), "svc")
    deadline = time.monotonic() + 3
    while (await gw.get("/v1/models", headers=gw.auth(old))).status_code == 200 and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    for _ in range(6):
        r = await gw.get("/v1/models", headers=gw.auth(old))
        assert r.status_code == 401 and "replaced by a new one" in r.json()["error"]["message"]
    assert (await gw.get("/v1/models", headers=gw.auth(other))).status_code == 200
    assert (await gw.get("/v1/models", headers=gw.auth(new))).status_code == 200
