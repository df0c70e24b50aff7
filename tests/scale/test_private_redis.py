"""WORKERS>1 without REDIS_URL: the gateway's own redis-server (unix socket, no TCP port, persisted)."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.procs import ROOT, Gateway, fake_stats, gateway_env, make_key_file, start_gateway
from tests.scale.test_scale_out import burst, procs, serving_pids  # noqa: F401 - fixtures

pytestmark = pytest.mark.skipif(subprocess.run(["sh", "-c", "command -v redis-server"],
                                               capture_output=True).returncode != 0,
                                reason="redis-server is not installed (make system-deps)")


def redis_children(pid: int) -> list[int]:
    """PIDs of the redis-server processes whose parent is `pid`."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        comm = text[text.index("(") + 1:text.rindex(")")]
        ppid = int(text[text.rindex(")") + 2:].split()[1])
        if ppid == pid and comm.startswith("redis-server"):
            found.append(int(stat.parent.name))
    return found


def listening_tcp_inodes() -> set[str]:
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            cols = row.split()
            if cols[3] == "0A":  # LISTEN
                inodes.add(cols[9])
    return inodes


def socket_inodes(pid: int) -> set[str]:
    out = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = fd.readlink().as_posix()
        except OSError:
            continue
        if target.startswith("socket:["):
            out.add(target[len("socket:["):-1])
    return out


def gone(pid: int, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not Path(f"/proc/{pid}").exists() or "(zombie)" in _state(pid):
            return True
        time.sleep(0.1)
    return False


def _state(pid: int) -> str:
    try:
        return "(zombie)" if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z" else ""
    except (OSError, IndexError):
        return "(zombie)"


def test_two_workers_share_exact_limits_and_usage_through_a_private_redis(tmp_path, procs, fake_embed,
                                                                          fake_rerank):
    d = tmp_path / "gw0"
    # a stale socket left by a crashed run: bound, never listened on, never unlinked
    (d / ".redis").mkdir(parents=True)
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(d / ".redis" / "redis.sock"))
    stale.close()
    env = gateway_env(d, fake_embed.url, fake_rerank.url, WORKERS="2", RATE_LIMIT="20/minute",
                      CACHE_MAX_BYTES="1MiB")
    keys = make_key_file(Path(env["API_KEYS_FILE"]))
    gw = Gateway(start_gateway(d, env), env, keys)
    procs.append(gw.proc)
    sock = d / ".redis" / "redis.sock"
    assert sock.is_socket()
    assert "private redis-server" in gw.log_file().read_text()

    codes = burst([gw.url], gw.key, 60)
    assert codes.count(200) == 20 and codes.count(429) == 40  # exact across the two workers
    sent = len(codes)
    while len(serving_pids(gw)) < 2 and sent < 600:  # the kernel may hand one worker the first burst
        assert set(burst([gw.url], gw.key, 30)) == {429}
        sent += 30
    assert len(serving_pids(gw)) == 2

    [redis_pid] = redis_children(gw.proc.pid)
    assert not socket_inodes(redis_pid) & listening_tcp_inodes()  # no TCP port: only the unix socket

    gw.proc.popen.send_signal(signal.SIGTERM)
    assert gw.proc.popen.wait(30) in (0, -signal.SIGTERM)
    assert gone(redis_pid), "the private redis-server outlived the gateway"
    assert not sock.exists()
    assert not (d / "er_usage.db").exists()  # the counters went to the private Redis
    assert list((d / ".redis").rglob("*.aof"))  # ... which persists them

    # stopped: `keys usage` reads the persisted counters through a private Redis of its own
    out = subprocess.run([sys.executable, str(ROOT / "embedding_reranker_proxy.py"), "keys", "usage", "--json"],
                         env=gw.env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)["data"]
    assert sum(r["requests"] for r in rows if r["key"] == "tester") == sent
    assert not sock.exists() and not redis_children(gw.proc.pid)

    # the same folder: the counters survive the restart (a new rate: the old window is in Redis too)
    again = start_gateway(d, {**gw.env, "RATE_LIMIT": "1000/minute"})
    procs.append(again)
    doc = httpx.get(again.url + "/v1/usage", headers=gw.auth()).json()
    assert doc.get("total"), doc
    assert doc["total"]["requests"] == sent and doc["total"]["errors_4xx"] == sent - 20
    # the item cache lives there too: a fresh worker answers the burst's input without vLLM
    before = fake_stats(fake_embed)["requests"].get("/v1/embeddings", 0)
    r = httpx.post(again.url + "/v1/embeddings", json={"input": "hello world"}, headers=gw.auth(), timeout=30)
    assert r.status_code == 200
    assert fake_stats(fake_embed)["requests"].get("/v1/embeddings", 0) == before


def test_without_redis_server_on_path_start_up_refuses(tmp_path, fake_embed, fake_rerank):
    empty = tmp_path / "bin"
    empty.mkdir()
    env = gateway_env(tmp_path, fake_embed.url, fake_rerank.url, WORKERS="4", PATH=str(empty))
    proc = start_gateway(tmp_path, env, wait=False)
    assert proc.popen.wait(30) == 2
    out = proc.output()
    assert "apt-get install redis-server" in out and "REDIS_URL" in out and "per process" in out
    assert not (tmp_path / ".redis").exists() and not (tmp_path / "keys.json").exists()  # refused before anything


def redis_on(sock: Path) -> list[int]:
    """PIDs of redis-server processes serving `sock` (Redis shows it in its process title)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text.startswith("redis-server") and str(sock) in text:
            found.append(int(cmdline.parent.name))
    return found


def test_private_redis_is_stopped_when_uvicorn_cannot_start(tmp_path, fake_embed, fake_rerank):
    with socket.socket() as taken:  # the gateway's port is taken: uvicorn cannot bind it
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        env = gateway_env(tmp_path, fake_embed.url, fake_rerank.url, WORKERS="2",
                          PORT=str(taken.getsockname()[1]))
        make_key_file(Path(env["API_KEYS_FILE"]))
        proc = start_gateway(tmp_path, env, wait=False)
        assert proc.popen.wait(30) != 0
    out = proc.output()
    assert "private redis-server" in Path(env["LOG_DIR"], "embedding_reranker_proxy.log").read_text(), out
    sock = tmp_path / ".redis" / "redis.sock"
    deadline = time.monotonic() + 10
    while redis_on(sock) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not redis_on(sock) and not sock.exists()


def test_two_gateways_starting_at_once_on_one_folder_never_run_two_redis_servers(tmp_path, monkeypatch):
    """Two redis-servers on one append-only file would corrupt it. The second gateway may look before the
    first one's Redis answers PING; the folder's lock still refuses it, and frees the folder at stop."""
    from erproxy import private_redis

    folder = tmp_path / ".redis"
    first = private_redis.PrivateRedis(folder).start()
    try:
        with monkeypatch.context() as m:
            m.setattr(private_redis, "answers_ping", lambda *a, **k: False)  # the first is still starting
            m.setattr(private_redis, "LOCK_WAIT_S", 0.3)
            with pytest.raises(private_redis.PrivateRedisError, match="another gateway with the same API_KEYS_FILE"):
                private_redis.PrivateRedis(folder).start()
        assert len(redis_children(os.getpid())) == 1 and private_redis.answers_ping(first.socket)
    finally:
        first.stop()
    second = private_redis.PrivateRedis(folder).start()  # the first has stopped: the folder is free again
    second.stop()


def test_a_killed_private_redis_is_started_again_on_the_same_data(tmp_path, monkeypatch):
    import redis

    from erproxy import private_redis

    monkeypatch.setattr(private_redis, "RESTART_LIMIT", 1)
    server = private_redis.PrivateRedis(tmp_path / ".redis").start()
    try:
        server.keep_running()
        client = redis.Redis(unix_socket_path=str(server.socket))
        client.set("erproxy:usage:probe", "17")
        client.execute_command("BGREWRITEAOF")  # on disk now, not within appendfsync's second
        time.sleep(1.5)
        first = server.popen.pid
        os.kill(first, signal.SIGKILL)
        deadline = time.monotonic() + 15
        while (server.popen is None or server.popen.pid == first or not private_redis.answers_ping(server.socket)) \
                and time.monotonic() < deadline:
            time.sleep(0.05)
        second = server.popen.pid
        assert second != first and private_redis.answers_ping(server.socket)
        assert redis.Redis(unix_socket_path=str(server.socket)).get("erproxy:usage:probe") == b"17"
        os.kill(second, signal.SIGKILL)  # a second exit within the window: RESTART_LIMIT=1 leaves it down
        assert gone(second)
        time.sleep(1)
        assert server.popen.pid == second and not private_redis.answers_ping(server.socket)
    finally:
        server.stop()


def test_a_private_redis_still_loading_its_data_is_waited_for(tmp_path, monkeypatch):
    """A large append-only file takes longer to read back than the start timeout: Redis answers -LOADING
    meanwhile, and the gateway waits instead of killing it and refusing to start (every time after)."""
    from erproxy import private_redis

    fake = tmp_path / "redis-server"  # answers -LOADING for 1.5 s, then +PONG
    fake.write_text(f"""#!{sys.executable}
import socket, sys, time
path = sys.argv[sys.argv.index("--unixsocket") + 1]
s = socket.socket(socket.AF_UNIX)
s.bind(path)
s.listen(16)
ready = time.monotonic() + 1.5
while True:
    c, _ = s.accept()
    c.recv(64)
    c.sendall(b"+PONG\\r\\n" if time.monotonic() > ready else b"-LOADING Redis is loading the dataset in memory\\r\\n")
    c.close()
""")
    fake.chmod(0o755)
    monkeypatch.setattr(private_redis, "START_TIMEOUT_S", 0.5)
    t0 = time.monotonic()
    server = private_redis.PrivateRedis(tmp_path / ".redis", binary=str(fake)).start()
    try:
        assert time.monotonic() - t0 >= 1.4
        assert private_redis.ping(server.socket) == b"+PONG\r\n"
    finally:
        server.stop()


def test_workers_stop_when_the_main_process_is_killed(tmp_path, procs, fake_embed, fake_rerank):
    """SIGKILL of the gateway's main process takes its private Redis down with it; the workers must not
    stay behind on the port answering 503, or the next start finds the address in use."""
    env = gateway_env(tmp_path, fake_embed.url, fake_rerank.url, WORKERS="2")
    keys = make_key_file(Path(env["API_KEYS_FILE"]))
    gw = Gateway(start_gateway(tmp_path, env), env, keys)
    procs.append(gw.proc)
    workers = [int(p) for p in subprocess.run(["pgrep", "-P", str(gw.proc.pid), "-f", "spawn_main"],
                                              capture_output=True, text=True).stdout.split()]
    assert len(workers) == 2, workers
    os.kill(gw.proc.pid, signal.SIGKILL)
    assert all(gone(w) for w in workers), "a worker outlived the main process"
    again = start_gateway(tmp_path, env)  # the port and the folder are free again
    procs.append(again)
    assert httpx.post(again.url + "/v1/embeddings", json={"input": "hi"}, headers=gw.auth(),
                      timeout=30).status_code == 200


def test_keys_usage_reads_the_running_gateways_private_redis_whatever_workers_it_is_given(
        tmp_path, procs, fake_embed, fake_rerank):
    env = gateway_env(tmp_path, fake_embed.url, fake_rerank.url, WORKERS="2")
    keys = make_key_file(Path(env["API_KEYS_FILE"]))
    gw = Gateway(start_gateway(tmp_path, env), env, keys)
    procs.append(gw.proc)
    for _ in range(3):
        assert httpx.post(gw.url + "/v1/embeddings", json={"input": "hi"}, headers=gw.auth(),
                          timeout=30).status_code == 200
    without_workers = {k: v for k, v in env.items() if k != "WORKERS"}  # as a systemd unit might leave it
    deadline = time.monotonic() + 15
    while True:  # the workers flush their counters every half second
        out = subprocess.run([sys.executable, str(ROOT / "embedding_reranker_proxy.py"), "keys", "usage", "--json"],
                             env=without_workers, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        requests = sum(r["requests"] for r in json.loads(out.stdout)["data"] if r["key"] == "tester")
        if requests == 3 or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert requests == 3


def test_a_gateway_starting_while_a_keys_command_holds_the_folder_waits_for_it(tmp_path):
    """`keys usage` with the gateway stopped runs the private Redis for a moment, holding the folder's lock
    (a billing export from cron, say); a gateway starting then waits for it instead of refusing."""
    import threading

    from erproxy import private_redis

    folder = tmp_path / ".redis"
    command = private_redis.PrivateRedis(folder).start()
    threading.Timer(1.0, command.stop).start()
    t0 = time.monotonic()
    gateway = private_redis.PrivateRedis(folder).start()
    try:
        assert time.monotonic() - t0 >= 0.9 and private_redis.answers_ping(gateway.socket)
    finally:
        gateway.stop()
