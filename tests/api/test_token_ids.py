"""Token ids that would embed garbage: refused by default, let through with ACCEPT_TOKEN_IDS=true.

LangChain's OpenAIEmbeddings tokenizes with OpenAI's tiktoken and sends token-id arrays by default;
vLLM would embed them as the served model's own token ids and answer 200 with meaningless vectors.
"""

import pytest


@pytest.mark.parametrize("inp", [[[15339, 1917]], [15339, 1917], [[1], [2, 3]]])
async def test_token_ids_get_a_400_that_names_the_fix(gateway, fake_embed, inp):
    before = dict(fake_embed.fake.requests)
    r = await gateway.post("/v1/embeddings", headers=gateway.auth(), json={"model": "minilm", "input": inp})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["code"] == "token_ids_not_accepted" and err["param"] == "input"
    assert err["type"] == "invalid_request_error"
    assert "check_embedding_ctx_length=False" in err["message"] and "ACCEPT_TOKEN_IDS=true" in err["message"]
    assert dict(fake_embed.fake.requests) == before  # nothing reached vLLM


async def test_accept_token_ids_lets_them_through(make_gateway):
    gw = await make_gateway(ACCEPT_TOKEN_IDS="true")
    r = await gw.post("/v1/embeddings", headers=gw.auth(), json={"model": "minilm", "input": [[15339, 1917]]})
    assert r.status_code == 200 and len(r.json()["data"]) == 1


async def test_text_is_not_affected(gateway):
    r = await gateway.post("/v1/embeddings", headers=gateway.auth(), json={"input": ["15339", "1917"]})
    assert r.status_code == 200 and len(r.json()["data"]) == 2
