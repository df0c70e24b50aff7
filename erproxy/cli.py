"""Command line: `serve` (default) runs the gateway; `keys ...` manages API keys."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .keys import KeyFileError, ensure_key_file, read_records
from .logs import setup_logging
from .settings import Settings, SettingsError

log = logging.getLogger("erproxy")


def print_new_key(key: str, settings: Settings) -> None:
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
    print(
        "\n"
        "============================================================================\n"
        f" A new API key was created and stored (hashed) in {settings.api_keys_file}.\n"
        " It is shown only now; save it somewhere safe:\n\n"
        f"     {key}\n\n"
        " Use it as a bearer token, e.g.:\n"
        f"     curl http://{host}:{settings.port}/v1/models -H 'Authorization: Bearer {key}'\n"
        " or add ?api_key=<key> to the URL.\n"
        "============================================================================\n",
        flush=True,
    )


def serve(settings: Settings) -> int:
    import uvicorn

    log_path = setup_logging(settings)
    keys_path = Path(settings.api_keys_file)
    try:
        new_key = ensure_key_file(keys_path)
        records = read_records(keys_path)
    except KeyFileError as e:
        log.error("cannot start: %s", e)
        return 2
    if new_key:
        print_new_key(new_key, settings)
    active = sum(1 for r in records if not r.revoked)
    log.info(
        "embedding-reranker gateway starting on %s:%d (workers=%d)", settings.host, settings.port, settings.workers)
    log.info("upstreams: embedding=%s reranker=%s", ",".join(settings.embedding_upstreams),
             ",".join(settings.reranker_upstreams))
    log.info("keys: %s (%d active)%s; rate limit %s per key; max %d concurrent requests; timeout %gs; "
             "max body %d bytes; limits state: %s", keys_path, active,
             " + ACCESS_TOKEN" if settings.access_token else "", settings.rate_limit,
             settings.max_concurrent_requests, settings.timeout, settings.max_body_bytes,
             "redis" if settings.redis_url else "in-process")
    log.info("log file: %s", log_path)
    common = dict(
        host=settings.host, port=settings.port, loop="uvloop", http="httptools", lifespan="on",
        access_log=False, log_level=settings.log_level, timeout_keep_alive=int(settings.keep_alive),
        server_header=False, log_config=None,
    )
    if settings.workers > 1:
        uvicorn.run("erproxy.app:app_from_env", factory=True, workers=settings.workers, **common)
    else:
        from .app import create_app

        uvicorn.run(create_app(settings), **common)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="embedding_reranker_proxy.py",
        description="Gateway for vLLM embedding and reranker servers: API keys, rate limits, failover.",
    )
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("serve", help="run the gateway (default)")
    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env()
    except SettingsError as e:
        print(f"configuration error: {e}", file=sys.stderr)
        return 2
    if args.command in (None, "serve"):
        return serve(settings)
    parser.print_help()
    return 2
