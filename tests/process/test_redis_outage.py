"""A Redis that accepts connections but never answers: requests fail fast, the password stays out of the output."""

import socket
import time

import httpx

from tests.procs import gateway_env, make_key_file, start_gateway


def test_hanging_redis_fails_fast_once_known_down(tmp_path, fake_embed, fake_rerank):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)  # accepts connections, never answers
    port = listener.getsockname()[1]
    env = gateway_env(tmp_path, fake_embed.url, fake_rerank.url, REDIS_URL=f"redis://:pw-secret@127.0.0.1:{port}/0")
    keys = make_key_file(tmp_path / "keys.json")
    env["API_KEYS_FILE"] = str(tmp_path / "keys.json")
    proc = start_gateway(tmp_path, env, timeout=60)
    try:
        codes, took = [], []
        for _ in range(5):
            t0 = time.monotonic()
            r = httpx.post(proc.url + "/v1/embeddings", json={"input": "x"},
                           headers={"Authorization": f"Bearer {keys['tester']}"}, timeout=60)
            took.append(time.monotonic() - t0)
            codes.append(r.status_code)
        assert codes == [503] * 5
        assert max(took) < 3  # answered at once, not after socket timeouts and retries (20 s before)
        assert "pw-secret" not in proc.output()
    finally:
        proc.stop()
        listener.close()
