"""Command line: `serve` (default) runs the gateway; `keys ...` manages API keys."""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
from pathlib import Path
from typing import Callable

from .keys import (
    KeyFileError,
    create_key,
    ensure_key_file,
    parse_duration,
    read_records,
    revoke_key,
    rotate_key,
)
from . import private_redis, usage_cli
from .audit import audit, audit_ready
from .logs import setup_logging
from .settings import Settings, SettingsError, not_applicable_line, validate_rate_limit

log = logging.getLogger("erproxy")


def gateway_url(settings: Settings) -> str:
    """Where a client on this host reaches the gateway: its scheme, host (loopback for a wildcard) and port."""
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::", "") else settings.host
    if ":" in host:
        host = f"[{host}]"
    scheme = "https" if settings.ssl_certfile and settings.ssl_keyfile else "http"
    return f"{scheme}://{host}:{settings.port}"


def where(settings: Settings) -> int:
    """`where`: the gateway's URL, key file and log file as shell assignments, from the environment and
    .env as the gateway reads them (for `make run`, which must poll the port the gateway really uses)."""
    import shlex

    for name, value in (("GATEWAY_URL", gateway_url(settings)),
                        ("API_KEYS_FILE", settings.api_keys_file),
                        ("GATEWAY_LOG", str(Path(settings.log_dir) / "embedding_reranker_proxy.log"))):
        print(f"{name}={shlex.quote(value)}")
    return 0


def new_key_banner(key: str, settings: Settings) -> str:
    return (
        "\n"
        "============================================================================\n"
        f" A new API key was created and stored (hashed) in {settings.api_keys_file}.\n"
        " It is shown only now; save it somewhere safe:\n\n"
        f"     {key}\n\n"
        " Use it as a bearer token, e.g.:\n"
        f"     curl {gateway_url(settings)}/v1/models -H 'Authorization: Bearer {key}'\n"
        " or add ?api_key=<key> to the URL.\n"
        "============================================================================\n"
    )


def write_to_terminal(text: str) -> bool:
    """Write `text` to the controlling terminal; False when the process has none (a service, a container)."""
    try:
        fd = os.open("/dev/tty", os.O_WRONLY | os.O_NOCTTY)
    except OSError:
        return False
    try:
        with os.fdopen(fd, "w", encoding="utf-8", errors="replace") as tty:
            tty.write(text)
        return True
    except OSError:
        return False


def write_new_key_file(keys_path: Path, text: str) -> Path:
    """Write `text` once to a new file of mode 0600 beside the key file (never over an existing one)."""
    for n in range(1, 100):
        path = keys_path.with_name(keys_path.name + (".new-key" if n == 1 else f".new-key.{n}"))
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            continue
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        return path
    raise KeyFileError(f"cannot write the new key beside {keys_path}: delete the old {keys_path.name}.new-key* files")


def deliver_new_key(key: str, settings: Settings) -> None:
    """Hand the key made on a first start to the operator without putting it in any log.

    It goes to the controlling terminal when there is one; otherwise (systemd, docker, nohup) to a
    file of mode 0600 beside the key file, and the output names only that file.
    """
    banner = new_key_banner(key, settings)
    if write_to_terminal(banner):
        print(f"A new API key was created in {settings.api_keys_file} and shown on the terminal only "
              "(never in this output or the log).", flush=True)
        return
    path = write_new_key_file(Path(settings.api_keys_file), key + "\n")  # the key alone: KEY=$(cat path)
    print(
        "\n"
        f" A new API key was created and stored (hashed) in {settings.api_keys_file}.\n"
        f" There is no terminal to show it on, so it was written to {path} (mode 0600), not here:\n"
        f"     KEY=$(cat {path})    # save the key somewhere safe, then:\n"
        f"     rm {path}\n",
        flush=True,
    )


def prepare_multiprocess_metrics(settings: Settings) -> None:
    """An empty directory shared by the workers' metric files (must be set before they import prometheus).

    It lives in LOG_DIR (or ERPROXY_METRICS_DIR) as `.metrics-PORT`.
    """
    import os
    import shutil

    # Always a directory of our own (emptied at start): never wipe a folder the operator named.
    base = Path(os.environ.get("ERPROXY_METRICS_DIR") or settings.log_dir)
    directory = base / f".metrics-{settings.port}"
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(directory)


def serve(settings: Settings) -> int:
    log_path = setup_logging(settings)
    keys_path = Path(settings.api_keys_file)
    if private_redis.needed(settings) and not private_redis.binary():  # refuse before making a key file
        log.error("cannot start: %s", private_redis.missing_binary_message(settings))
        return 2
    try:  # a mistyped HOST would otherwise end in the server's "Name or service not known", naming nothing
        socket.getaddrinfo(settings.host, settings.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (OSError, UnicodeError) as e:
        log.error("cannot start: HOST=%s is not an address of this machine nor a name that resolves (%s)",
                  settings.host, getattr(e, "strerror", None) or e)
        return 2
    try:
        new_key = ensure_key_file(keys_path)
        records = read_records(keys_path)
    except (KeyFileError, OSError) as e:  # OSError: a lock file it may not open (made by another user)
        log.error("cannot start: %s", e)
        return 2
    if new_key:
        try:
            deliver_new_key(new_key, settings)
        except (OSError, KeyFileError) as e:
            log.error("the new key could not be handed over (%s); make another with `keys create`", e)
    private = None
    if private_redis.needed(settings):
        try:
            private = private_redis.start_for(settings)
        except private_redis.PrivateRedisError as e:
            log.error("cannot start: %s", e)
            return 2
        private.keep_running()  # started again if it exits while the gateway runs
        # the workers read their settings from the environment (app_from_env)
        os.environ["REDIS_URL"] = private.url
        settings = settings.model_copy(update={"redis_url": private.url})
    try:
        log_start(settings, keys_path, sum(1 for r in records if not r.revoked), log_path,
                  private_dir=private.directory if private else None)
        run_server(settings)
    finally:
        if private is not None:  # after the workers have drained and flushed their usage counters
            private.stop()
    return 0


def log_start(settings: Settings, keys_path: Path, active_keys: int, log_path: Path,
              private_dir: Path | None = None) -> None:
    """What the operator needs to see at start, including variables set for another server."""
    log.info("embedding-reranker gateway starting on %s://%s:%d (workers=%d%s; %s)",
             "https" if settings.ssl_certfile else "http", settings.host, settings.port, settings.workers,
             ", auto: one per CPU core" if settings.workers_auto else "", protocols(settings))
    log.info("upstreams: embedding=%s reranker=%s", ",".join(settings.embedding_upstreams),
             ",".join(settings.reranker_upstreams))
    log.info("keys: %s (%d active)%s; rate limit %s per key; max %d concurrent requests; timeout %gs; "
             "max body %d bytes; limits state: %s", keys_path, active_keys,
             " + ACCESS_TOKEN" if settings.access_token else "", settings.rate_limit,
             settings.max_concurrent_requests, settings.timeout, settings.max_body_bytes,
             (f"private redis-server ({private_dir})" if private_dir else "redis") if settings.redis_url
             else "in-process")
    log.info("log file: %s", log_path)
    ignored = not_applicable_line(settings)
    if ignored:
        log.warning("%s", ignored)


def protocols(settings: Settings) -> str:
    """What the port speaks, for the start line."""
    if settings.server == "granian":
        return "granian: HTTP/1.1 and HTTP/2 " + ("(h2 by ALPN)" if settings.ssl_certfile else "(h2c by prior knowledge)")
    return "uvicorn: HTTP/1.1"


def run_server(settings: Settings) -> None:
    """SERVER's server with the gateway: uvicorn in this process or WORKERS processes that each build it
    (app_from_env); Granian always in worker processes (server.py)."""
    if settings.server == "granian":
        from .server import run_granian

        if settings.workers > 1:
            prepare_multiprocess_metrics(settings)
        run_granian(settings)
        return
    import uvicorn

    common = dict(
        # uvloop whose listening socket takes every waiting connection at once (accepting.py)
        host=settings.host, port=settings.port, loop="erproxy.accepting:new_event_loop", http="httptools",
        lifespan="on",
        access_log=False, log_level=settings.log_level, timeout_keep_alive=max(1, round(settings.keep_alive)),
        server_header=False, log_config=None, timeout_graceful_shutdown=max(1, round(settings.shutdown_grace)),
        ssl_certfile=settings.ssl_certfile, ssl_keyfile=settings.ssl_keyfile, proxy_headers=False,
    )
    if settings.workers > 1:
        prepare_multiprocess_metrics(settings)
        uvicorn.run("erproxy.app:app_from_env", factory=True, workers=settings.workers, **common)
    else:
        from .app import create_app

        # bound here, as for several workers, so the loop's create_server gets the socket (accepting.py)
        config = uvicorn.Config(create_app(settings), **common)
        server = uvicorn.Server(config)
        try:
            server.run(sockets=[config.bind_socket()])
        except KeyboardInterrupt:
            pass
        if not server.started:
            from uvicorn.config import STARTUP_FAILURE

            sys.exit(STARTUP_FAILURE)  # as uvicorn.run exits


def share_revocation(settings: Settings, key_hash: str) -> None:
    """With REDIS_URL, also revoke through Redis so instances on other hosts refuse the key at once."""
    if not settings.redis_url:
        return
    import asyncio

    from .redis_admission import publish_revocation

    try:
        asyncio.run(publish_revocation(settings.redis_url, key_hash))
    except Exception as e:  # noqa: BLE001
        print(f"warning: the key file is updated, but Redis could not be told ({e}); instances on other "
              "hosts keep accepting the old key until their key file is updated too", file=sys.stderr)


def keys_with_private_redis(args: argparse.Namespace, settings: Settings) -> int:
    """With a private Redis (WORKERS>1, no REDIS_URL) usage and revocations live in it: the running
    gateway's when it runs, else one started for the command from the same data."""
    if settings.redis_url or args.keys_command not in ("list", "revoke", "rotate", "usage"):
        return keys_command(args, settings)
    url = private_redis.running_url(settings)  # a gateway runs on this folder with its private Redis
    if url:
        return keys_command(args, settings.model_copy(update={"redis_url": url}))
    stored = private_redis.data_dir(settings).is_dir()
    if not private_redis.needed(settings):
        if stored and args.keys_command in ("list", "usage"):
            print(f"note: usage recorded while the gateway ran with WORKERS>1 is kept in its private Redis "
                  f"({private_redis.data_dir(settings)}), not in er_usage.db: run this command with that WORKERS "
                  "to read it", file=sys.stderr)
        return keys_command(args, settings)
    if not stored:  # no gateway ever ran with it: nothing stored there
        return keys_command(args, settings)
    try:
        private = private_redis.start_for(settings)
    except private_redis.PrivateRedisError as e:
        print(f"error: the private Redis holding usage and revocations cannot be read: {e}", file=sys.stderr)
        return 1
    try:
        return keys_command(args, settings.model_copy(update={"redis_url": private.url}))
    finally:
        private.stop()


def keys_command(args: argparse.Namespace, settings: Settings) -> int:
    command = KEY_COMMANDS.get(args.keys_command)
    if command is None:
        return 2
    try:
        if args.keys_command in CHANGING_COMMANDS:
            audit_ready(settings)
        command(args, settings, Path(settings.api_keys_file))
    except (KeyFileError, KeyError, ValueError) as e:
        msg = e.args[0] if isinstance(e, KeyError) else str(e)
        print(f"error: {msg}", file=sys.stderr)
        return 1
    return 0


def keys_init(args: argparse.Namespace, settings: Settings, path: Path) -> None:
    key = ensure_key_file(path, args.name)
    if key is None:
        print(f"{path} already exists; create more keys with: keys create --name NAME")
        return
    audit(settings, "init", args.name)
    deliver_new_key(key, settings)


def keys_create(args: argparse.Namespace, settings: Settings, path: Path) -> None:
    if args.rate_limit:
        validate_rate_limit(args.rate_limit)
    usage_cli.check_token_limit(args.token_limit)
    models = [m.strip() for m in args.models.split(",") if m.strip()] if args.models else None
    if models == []:  # " , ": stored as [] it would mean every model, which is not what was asked
        raise ValueError("--models needs at least one model name (leave it out to allow every model)")
    expires_in = parse_duration(args.expires_in) if args.expires_in else None
    key, record = create_key(path, args.name, rate_limit=args.rate_limit, models=models, expires_in=expires_in,
                             token_limit=args.token_limit)
    audit(settings, "create", record.name, prefix=record.prefix, rate_limit=record.rate_limit,
          models=record.models, expires=record.expires)
    print(f"Created key {record.name!r} ({record.prefix}…). It is shown only now:\n\n    {key}\n")


def keys_list(args: argparse.Namespace, settings: Settings, path: Path) -> None:
    rows = [("NAME", "PREFIX", "CREATED", "EXPIRES", "RATE LIMIT", "TOKEN LIMIT", "MODELS", "STATUS", "TODAY (UTC)")]
    records = read_records(path)
    today = usage_cli.today_by_key(settings)
    for rec in records:
        status = "revoked" if rec.revoked else ("expired" if rec.expired() else "active")
        rows.append((rec.name, rec.prefix + "…", rec.created, rec.expires or "never",
                     rec.rate_limit or f"{settings.rate_limit} (default)",
                     rec.extra.get("token_limit") or (f"{settings.token_limit} (default)" if settings.token_limit else "none"),
                     ",".join(rec.models or []) or "all", status, usage_cli.today_cell(today, rec.name)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())


def keys_revoke(args: argparse.Namespace, settings: Settings, path: Path) -> None:
    record = revoke_key(path, args.ref)
    audit(settings, "revoke", record.name, prefix=record.prefix)
    share_revocation(settings, record.hash)
    print(f"Revoked key {record.name!r} ({record.prefix}…). Running gateways refuse it within a second.")


def keys_rotate(args: argparse.Namespace, settings: Settings, path: Path) -> None:
    key, record, old_hash = rotate_key(path, args.name)
    audit(settings, "rotate", record.name, prefix=record.prefix)
    share_revocation(settings, old_hash)
    print(f"Rotated key {record.name!r}; the old secret no longer works. New key, shown only now:\n\n"
          f"    {key}\n")


CHANGING_COMMANDS = frozenset({"init", "create", "revoke", "rotate", "update"})  # each writes an audit entry
KEY_COMMANDS: dict[str, Callable[[argparse.Namespace, Settings, Path], None]] = {
    "init": keys_init, "create": keys_create, "list": keys_list, "revoke": keys_revoke, "rotate": keys_rotate,
    **usage_cli.COMMANDS,  # update, usage
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="embedding_reranker_proxy.py",
        description="Gateway for vLLM embedding and reranker servers: API keys, rate limits, failover.",
    )
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("serve", help="run the gateway (default)")
    sub.add_parser("where", help="print the gateway's URL, key file and log file (shell assignments)")
    keys = sub.add_parser("keys", help="manage API keys in API_KEYS_FILE (a running gateway picks changes up)")
    ksub = keys.add_subparsers(dest="keys_command", required=True)
    c = ksub.add_parser("create", help="create a key and print it once")
    c.add_argument("--name", required=True)
    c.add_argument("--rate-limit", help="e.g. 300/minute (default: RATE_LIMIT)")
    c.add_argument("--models", help="comma-separated allow-list of models (default: all)")
    c.add_argument("--expires-in", help="e.g. 30d, 12h (default: never)")
    c.add_argument("--token-limit", help="prompt tokens per window, e.g. 100000/minute (default: TOKEN_LIMIT)")
    usage_cli.add_commands(ksub)
    ksub.add_parser("list", help="list keys (never shows the keys themselves)")
    r = ksub.add_parser("revoke", help="revoke a key by name or prefix")
    r.add_argument("ref", metavar="NAME|PREFIX")
    o = ksub.add_parser("rotate", help="give a key a new secret, keeping its name and limits")
    o.add_argument("name", metavar="NAME")
    i = ksub.add_parser("init", help="create the key file with one key if it does not exist (shows the key on the terminal, "
                         "else writes it to API_KEYS_FILE.new-key)")
    i.add_argument("--name", default="default")
    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env()
    except SettingsError as e:
        print(f"configuration error: {e}", file=sys.stderr)
        return 2
    if args.command in (None, "serve"):
        return serve(settings)
    if args.command == "keys":
        return keys_with_private_redis(args, settings)
    if args.command == "where":
        return where(settings)
    parser.print_help()
    return 2
