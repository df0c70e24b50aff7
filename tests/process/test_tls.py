"""SSL_CERTFILE / SSL_KEYFILE: the gateway serves HTTPS (self-signed certificate made by the test)."""

import httpx
import openai

from tests.procs import gateway_env, start_gateway, start_tls_gateway


def test_https_with_a_self_signed_certificate(tmp_path, fake_embed, fake_rerank):
    gw = start_tls_gateway(tmp_path, fake_embed.url, fake_rerank.url)
    url, ctx, keys, env, proc = gw.url, gw.ctx, gw.keys, gw.env, gw.proc
    try:
        r = httpx.post(url + "/v1/embeddings", verify=ctx, json={"input": "hello world"},
                       headers={"Authorization": f"Bearer {keys['tester']}"})
        assert r.status_code == 200 and r.json()["data"][0]["embedding"]
        client = openai.OpenAI(base_url=url + "/v1", api_key=keys["tester"],
                               http_client=httpx.Client(verify=ctx))
        assert len(client.embeddings.create(model="minilm", input="hello world").data[0].embedding) == 384
        try:  # plain HTTP on the TLS port does not work
            httpx.get(f"http://127.0.0.1:{env['PORT']}/health", timeout=2)
            plain_ok = True
        except httpx.HTTPError:
            plain_ok = False
        assert not plain_ok
        assert "https://" in proc.output()
    finally:
        proc.stop()


def test_half_tls_configuration_is_refused(tmp_path, fake_embed, fake_rerank):
    env = gateway_env(tmp_path, fake_embed.url, fake_rerank.url, SSL_CERTFILE=str(tmp_path / "missing.pem"))
    proc = start_gateway(tmp_path, env, wait=False)
    assert proc.popen.wait(30) == 2 and "SSL_KEYFILE" in proc.output()
