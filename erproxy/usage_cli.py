"""The `keys usage` and `keys update` commands, and the usage columns of `keys list`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable

import orjson

from .audit import audit
from .settings import Settings, validate_rate_limit
from .token_limits import parse_token_limit, update_key
from .usage import COUNTERS, UsageRow, as_json_rows, by_key_and_model, parse_days, read_usage, utc_day


def add_commands(ksub: Any) -> None:
    """`keys update` and `keys usage` on the `keys` subparsers."""
    u = ksub.add_parser("update", help="change a key's limits or models (keeps its secret)")
    u.add_argument("ref", metavar="NAME|PREFIX")
    u.add_argument("--rate-limit", help="e.g. 300/minute; '' = RATE_LIMIT")
    u.add_argument("--token-limit", help="prompt tokens per window, e.g. 100000/minute; '' = TOKEN_LIMIT")
    u.add_argument("--models", help="comma-separated allow-list of models; '' = all")
    s = ksub.add_parser("usage", help="requests, items, prompt tokens, cache hits, errors per key and model")
    s.add_argument("name", nargs="?", metavar="NAME", help="one key (default: all keys)")
    s.add_argument("--since", help="first UTC day, YYYY-MM-DD (default: the first recorded)")
    s.add_argument("--until", help="last UTC day, YYYY-MM-DD (default: today)")
    s.add_argument("--model", help="one model")
    s.add_argument("--json", action="store_true", help="JSON instead of a table")


def check_token_limit(text: str | None) -> None:
    if text:
        parse_token_limit(text)


def keys_update(args: argparse.Namespace, settings: Settings, path: Path) -> None:
    if args.rate_limit:
        validate_rate_limit(args.rate_limit)
    check_token_limit(args.token_limit)
    models = None if args.models is None else [m.strip() for m in args.models.split(",") if m.strip()]
    if args.rate_limit is None and args.token_limit is None and models is None:
        raise ValueError("nothing to change: give --rate-limit, --token-limit or --models")
    record = update_key(path, args.ref, rate_limit=args.rate_limit, token_limit=args.token_limit, models=models)
    audit(settings, "update", record.name, prefix=record.prefix, rate_limit=record.rate_limit,
          token_limit=record.extra.get("token_limit"), models=record.models)
    print(f"Updated key {record.name!r} ({record.prefix}…): rate limit {record.rate_limit or 'default'}, "
          f"token limit {record.extra.get('token_limit') or 'default'}, models {','.join(record.models or []) or 'all'}."
          " Running gateways apply it within a second.")


def table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) if i == 0 or i == 1 else cell.rjust(w)
                               for i, (cell, w) in enumerate(zip(row, widths))).rstrip() for row in rows)


def keys_usage(args: argparse.Namespace, settings: Settings, path: Path) -> None:
    since, until = parse_days(args.since, args.until, ("--since", "--until"))
    try:
        rows = by_key_and_model(read_usage(settings, args.name, since, until, args.model))
    except Exception as e:  # noqa: BLE001 - Redis unreachable, a damaged database: a message, no traceback
        where = "Redis (REDIS_URL)" if settings.redis_url else "er_usage.db"
        raise ValueError(f"cannot read the usage counters from {where}: {e}") from None
    if args.json:
        doc = {"since": since, "until": until,
               "data": [{k: v for k, v in r.items() if k != "day"} for r in as_json_rows(rows)]}
        sys.stdout.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode() + "\n")
        return
    head = ("KEY", "MODEL", "REQUESTS", "ITEMS", "PROMPT TOKENS", "CACHE HITS", "4XX", "5XX")
    total = UsageRow("total", "", "")
    lines: list[tuple[str, ...]] = [head]
    for r in rows:
        total.add(r)
        lines.append((r.key, r.model, *(f"{getattr(r, c):,}" for c in COUNTERS)))
    if len(rows) > 1:
        lines.append(("total", "", *(f"{getattr(total, c):,}" for c in COUNTERS)))
    span = f"{since or 'first record'} .. {until or 'today'} (UTC)"
    print(f"usage {span}" + (f", model {args.model}" if args.model else ""))
    print(table(lines) if rows else "no usage recorded")


def today_by_key(settings: Settings) -> dict[str, UsageRow] | None:
    """Today's usage per key (summed over models) for `keys list`; None when the store cannot be read."""
    try:
        rows = read_usage(settings, since=utc_day(), until=utc_day())
    except Exception:  # noqa: BLE001 - the listing works without usage
        return None
    out: dict[str, UsageRow] = {}
    for r in rows:
        out.setdefault(r.key, UsageRow(r.key, "", r.day)).add(r)
    return out


def today_cell(today: dict[str, UsageRow] | None, name: str) -> str:
    if today is None:
        return "?"
    r = today.get(name)
    return f"{r.requests:,} req, {r.prompt_tokens:,} tok" if r else "0 req, 0 tok"


COMMANDS: dict[str, Callable[[argparse.Namespace, Settings, Path], None]] = {
    "update": keys_update, "usage": keys_usage,
}
