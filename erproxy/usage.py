"""Usage you can bill: per key, per model, per UTC day counters, stored durably, and GET /v1/usage.

For every answered request of a known key the record step (app.py `Gateway.record`, after the
answer was sent) adds one request, its items (inputs or documents), the prompt tokens vLLM's
`usage` reported (`req.tokens`, set by the handler where the upstream's answer is read), its cache
hits and, for a 4xx or 5xx, one error of that class. Recording is a dict update in this process:
a background task flushes the sums every FLUSH_EVERY_S (and at shutdown) to the store, so the
client never waits on a disk or Redis, and a store that fails costs a log line and a metric, never
the answer (the batch is kept and retried at the next flush, under its own id: a write whose outcome
is unknown, such as a Redis reply that timed out after Redis had applied it, is never counted twice).

Stores:
- `SqliteUsageStore`: `er_usage.db` beside the key file, WAL mode, one upsert per row in one
  transaction per flush (in a thread); several workers of one instance add to the same rows.
- `RedisUsageStore` (REDIS_URL): one hash per day and key (`erproxy:usage:DAY:KEY`, fields
  `COUNTER:MODEL`), HINCRBY in one script per flush: every worker and instance adds atomically, and
  the script first marks its batch id (`erproxy:usage:batch:ID`, kept a day), so a retried batch
  that Redis had already applied adds nothing.

A graceful stop (SIGTERM) flushes what was answered; a crash loses at most the last FLUSH_EVERY_S.
"""

from __future__ import annotations

import asyncio
import logging
import re
import sqlite3
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Protocol
from urllib.parse import parse_qs

import orjson
from prometheus_client import CollectorRegistry, Counter
from pydantic import BaseModel, ConfigDict, Field

from .asgi import Request, Response
from .errors import bad_request, unavailable
from .routing import Route

if TYPE_CHECKING:
    from .settings import Settings

log = logging.getLogger("erproxy.usage")

COUNTERS = ("requests", "items", "prompt_tokens", "cache_hits", "errors_4xx", "errors_5xx")
FLUSH_EVERY_S = 0.5
DB_NAME = "er_usage.db"
REDIS_PREFIX = "erproxy:usage"
_DAY = re.compile(r"\d{4}-\d{2}-\d{2}")

Slot = tuple[str, str, str]  # (key name, model, day)


_DAY_CACHE: list = [-1, ""]  # [day number, its text]: every answer is counted under its day


def utc_day(ts: float | None = None) -> str:
    t = time.time() if ts is None else ts
    day = int(t // 86400)
    if _DAY_CACHE[0] != day:
        _DAY_CACHE[:] = [day, time.strftime("%Y-%m-%d", time.gmtime(day * 86400))]
    return _DAY_CACHE[1]


def parse_day(text: str | None, name: str) -> str | None:
    """A YYYY-MM-DD day (UTC), or None; ValueError naming `name` otherwise."""
    if text is None or text == "":
        return None
    if not _DAY.fullmatch(text):
        raise ValueError(f"{name} must be a day such as 2026-11-26, got {text!r}")
    try:
        date.fromisoformat(text)
    except ValueError:
        raise ValueError(f"{name} must be a real day (YYYY-MM-DD), got {text!r}") from None
    return text


def parse_days(since: str | None, until: str | None, names: tuple[str, str] = ("since", "until")) -> tuple[str | None, str | None]:
    """The days of a range (either may be None); ValueError naming the bad one, or both when `since` is
    after `until` (the swapped range would read as "no usage")."""
    first, last = parse_day(since, names[0]), parse_day(until, names[1])
    if first and last and first > last:
        raise ValueError(f"{names[0]} {first} is after {names[1]} {last}")
    return first, last


@dataclass
class UsageRow:
    key: str
    model: str
    day: str
    requests: int = 0
    items: int = 0
    prompt_tokens: int = 0
    cache_hits: int = 0
    errors_4xx: int = 0
    errors_5xx: int = 0

    def add(self, other: "UsageRow") -> None:
        for c in COUNTERS:
            setattr(self, c, getattr(self, c) + getattr(other, c))

    def counters(self) -> dict[str, int]:
        return {c: getattr(self, c) for c in COUNTERS}


def in_range(day: str, since: str | None, until: str | None) -> bool:
    return (since is None or day >= since) and (until is None or day <= until)


def by_key_and_model(rows: Iterable[UsageRow]) -> list[UsageRow]:
    """Rows summed over days, one per (key, model), sorted; `day` is the last day seen."""
    out: dict[tuple[str, str], UsageRow] = {}
    for r in rows:
        acc = out.get((r.key, r.model))
        if acc is None:
            out[(r.key, r.model)] = acc = UsageRow(r.key, r.model, r.day)
        acc.add(r)
        acc.day = max(acc.day, r.day)
    return [out[k] for k in sorted(out)]


class UsageStore(Protocol):
    async def add(self, batch: dict[Slot, list[int]], batch_id: str) -> None:
        """Add the batch's counters, at most once per `batch_id` (a retry after an unknown outcome reuses it)."""
        ...
    async def query(self, key: str | None = None, since: str | None = None, until: str | None = None,
                    model: str | None = None) -> list[UsageRow]: ...
    async def close(self) -> None: ...


# ---- SQLite ---------------------------------------------------------------------------------------
SCHEMA = """
CREATE TABLE IF NOT EXISTS usage (
    key TEXT NOT NULL, model TEXT NOT NULL, day TEXT NOT NULL,
    requests INTEGER NOT NULL DEFAULT 0, items INTEGER NOT NULL DEFAULT 0,
    prompt_tokens INTEGER NOT NULL DEFAULT 0, cache_hits INTEGER NOT NULL DEFAULT 0,
    errors_4xx INTEGER NOT NULL DEFAULT 0, errors_5xx INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (key, model, day)
)"""
UPSERT = (f"INSERT INTO usage (key, model, day, {', '.join(COUNTERS)}) VALUES (?, ?, ?, {', '.join('?' * len(COUNTERS))}) "
          "ON CONFLICT (key, model, day) DO UPDATE SET "
          + ", ".join(f"{c} = {c} + excluded.{c}" for c in COUNTERS))


class SqliteUsageStore:
    """`er_usage.db` (WAL): safe with several worker processes of one instance adding to the same rows."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, timeout=10.0, check_same_thread=False, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("PRAGMA busy_timeout=10000")
            db.execute(SCHEMA)
            self._db = db
        return self._db

    def add_sync(self, batch: dict[Slot, list[int]]) -> None:
        with self._lock:
            db = self._conn()
            db.execute("BEGIN IMMEDIATE")
            try:
                db.executemany(UPSERT, [(*slot, *values) for slot, values in batch.items()])
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise

    def query_sync(self, key: str | None = None, since: str | None = None, until: str | None = None,
                   model: str | None = None) -> list[UsageRow]:
        if not self.path.exists():
            return []
        where, args = [], []
        for column, op, value in (("key", "=", key), ("day", ">=", since), ("day", "<=", until),
                                  ("model", "=", model)):
            if value is not None:
                where.append(f"{column} {op} ?")
                args.append(value)
        sql = f"SELECT key, model, day, {', '.join(COUNTERS)} FROM usage"
        if where:
            sql += " WHERE " + " AND ".join(where)
        with self._lock:
            rows = self._conn().execute(sql + " ORDER BY key, model, day", args).fetchall()
        return [UsageRow(*r) for r in rows]

    async def add(self, batch: dict[Slot, list[int]], batch_id: str = "") -> None:
        # one transaction: a failure rolls back the whole batch, so its retry cannot count anything twice
        await asyncio.to_thread(self.add_sync, batch)

    async def query(self, key: str | None = None, since: str | None = None, until: str | None = None,
                    model: str | None = None) -> list[UsageRow]:
        return await asyncio.to_thread(self.query_sync, key, since, until, model)

    async def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None


# ---- Redis ----------------------------------------------------------------------------------------
def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


# KEYS: [1] the batch's mark, [2] the set of days; then per row its hash and its day's set of keys.
# ARGV: [1] the mark's lifetime (s); then per row: its number of fields, key name, day, then field, value
# pairs. Nothing is added when the mark exists: that batch was applied before (its reply was lost). A
# script is not rolled back when a command fails, so the keys' types are checked before anything is
# written: a row whose hash or set holds another type (another program's data) is skipped, and its
# number returned, and the rest is applied whole. Returns {applied (0 or 1), skipped rows...}.
ADD_BATCH = """
local function is(key, want)
  local t = redis.call('TYPE', key)['ok']
  return t == 'none' or t == want
end
if not is(KEYS[2], 'set') then return redis.error_reply('WRONGTYPE ' .. KEYS[2] .. ' is not a set') end
local skipped = {}
for k = 3, #KEYS, 2 do
  if not (is(KEYS[k], 'hash') and is(KEYS[k + 1], 'set')) then skipped[(k - 1) / 2] = true end
end
if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[1]) then return {0} end
local a, out = 2, {1}
for k = 3, #KEYS, 2 do
  local n, name, day = tonumber(ARGV[a]), ARGV[a + 1], ARGV[a + 2]
  a = a + 3
  if skipped[(k - 1) / 2] then
    out[#out + 1] = (k - 1) / 2
    a = a + 2 * n
  else
    redis.call('SADD', KEYS[k + 1], name)
    redis.call('SADD', KEYS[2], day)
    for _ = 1, n do
      redis.call('HINCRBY', KEYS[k], ARGV[a], ARGV[a + 1])
      a = a + 2
    end
  end
end
return out
"""
BATCH_MARK_TTL_S = 86400  # a batch is retried within seconds; a day is far beyond any outage it survives


class RedisUsageStore:
    """One hash per day and key, `erproxy:usage:DAY:KEY` with fields `COUNTER:MODEL`; sets index the
    days (`erproxy:usage:days`) and each day's keys (`erproxy:usage:DAY:keys`)."""

    def __init__(self, redis: Any) -> None:
        self.redis = redis
        self._add = redis.register_script(ADD_BATCH)

    @staticmethod
    def _hash(day: str, key: str) -> str:
        return f"{REDIS_PREFIX}:{day}:{key}"

    async def add(self, batch: dict[Slot, list[int]], batch_id: str) -> None:
        keys: list[str] = [f"{REDIS_PREFIX}:batch:{batch_id}", f"{REDIS_PREFIX}:days"]
        args: list[Any] = [BATCH_MARK_TTL_S]
        rows = list(batch.items())
        for (key, model, day), values in rows:
            fields = [(f"{name}:{model}", v) for name, v in zip(COUNTERS, values) if v]
            keys += [self._hash(day, key), f"{REDIS_PREFIX}:{day}:keys"]
            args += [len(fields), key, day]
            for f, v in fields:
                args += [f, v]
        reply = await self._add(keys=keys, args=args)
        for row in reply[1:]:  # their keys hold another type in Redis: retrying would never succeed
            (key, model, day), values = rows[int(row) - 1]
            log.error("usage of key %r, model %r on %s (%d requests) cannot be recorded: Redis key %s or %s "
                      "holds something else than the gateway's counters", key, model, day, values[0],
                      self._hash(day, key), f"{REDIS_PREFIX}:{day}:keys")

    async def query(self, key: str | None = None, since: str | None = None, until: str | None = None,
                    model: str | None = None) -> list[UsageRow]:
        days = sorted(d for d in map(_s, await self.redis.smembers(f"{REDIS_PREFIX}:days")) if in_range(d, since, until))
        if not days:
            return []
        slots: list[tuple[str, str]] = []
        if key is not None:
            slots = [(d, key) for d in days]
        else:
            pipe = self.redis.pipeline(transaction=False)
            for d in days:
                pipe.smembers(f"{REDIS_PREFIX}:{d}:keys")
            for d, members in zip(days, await pipe.execute()):
                slots += [(d, k) for k in sorted(map(_s, members))]
        pipe = self.redis.pipeline(transaction=False)
        for d, k in slots:
            pipe.hgetall(self._hash(d, k))
        rows: dict[tuple[str, str, str], UsageRow] = {}
        for (d, k), fields in zip(slots, await pipe.execute()):
            for f, v in fields.items():
                counter, _, m = _s(f).partition(":")
                if counter not in COUNTERS or (model is not None and m != model):
                    continue
                row = rows.get((k, m, d))
                if row is None:
                    row = rows[(k, m, d)] = UsageRow(k, m, d)
                setattr(row, counter, int(_s(v)))
        return [rows[s] for s in sorted(rows)]

    async def close(self) -> None:
        return None  # the client belongs to the admission


# ---- the recorder -----------------------------------------------------------------------------------
class Usage:
    """Sums answered requests in this process and flushes them to the store in the background."""

    def __init__(self, store: UsageStore, registry: CollectorRegistry | None = None,
                 flush_every: float = FLUSH_EVERY_S) -> None:
        self.store = store
        self.flush_every = flush_every
        self.pending: dict[Slot, list[int]] = {}
        # a batch whose write failed, with its id: sent again as it is before anything newer, since the
        # store may have applied it (Redis timed out after running it); None when nothing is in doubt
        self.unsent: tuple[str, dict[Slot, list[int]]] | None = None
        self._task: asyncio.Task[None] | None = None
        self._flushing = asyncio.Lock()
        r = registry if registry is not None else CollectorRegistry()
        self.key_tokens = Counter("erproxy_key_tokens", "Prompt tokens processed upstream, by key name and model.",
                                  ["key", "model"], registry=r)
        self.failures = Counter("erproxy_usage_record_failures", "Flushes of usage counters to their store that "
                                "failed (kept and retried at the next flush).", registry=r)
        self._token_children: dict[tuple[str, str], Any] = {}

    def record(self, key: str, model: str, status: int, items: int, tokens: int, cache_hits: int,
               ts: float | None = None) -> None:
        """One answered request (no await, no I/O: the answer is already sent)."""
        slot = (key, model, utc_day(ts))
        values = self.pending.get(slot)
        if values is None:
            values = self.pending[slot] = [0] * len(COUNTERS)
        values[0] += 1
        values[1] += items
        values[2] += tokens
        values[3] += cache_hits
        if 400 <= status < 500:
            values[4] += 1
        elif status >= 500:
            values[5] += 1
        if tokens:
            child = self._token_children.get((key, model))
            if child is None:
                child = self._token_children[(key, model)] = self.key_tokens.labels(key, model)
            child.inc(tokens)

    def record_request(self, req: Request, model: str, status: int) -> None:
        if req.who is None:
            return
        self.record(req.who.name, model, status, req.items or 0, req.tokens or 0,
                    req.cache_hits)

    async def flush(self) -> bool:
        """Write what is pending; on failure keep it for the next flush. True when nothing is left."""
        async with self._flushing:
            if self.unsent is not None:
                if not await self._write(*self.unsent):
                    return False  # the newer counts wait in `pending`, never merged into a batch in doubt
                self.unsent = None
            if not self.pending:
                return True
            batch, self.pending = self.pending, {}
            batch_id = uuid.uuid4().hex
            if not await self._write(batch_id, batch):
                self.unsent = (batch_id, batch)
                return False
            return not self.pending

    async def _write(self, batch_id: str, batch: dict[Slot, list[int]]) -> bool:
        try:
            await self.store.add(batch, batch_id)
        except Exception as e:  # noqa: BLE001 - recording must never fail a request
            self.failures.inc()
            log.error("usage could not be recorded (%s: %s); %d rows kept for the next try",
                      type(e).__name__, e, len(batch))
            return False
        return True

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.flush_every)
            # shielded: a stop (close) that cancels this loop lets a write under way finish instead of
            # losing its batch, which has already left `pending`; close's own flush waits for it
            await asyncio.shield(self.flush())

    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for _ in range(3):
            if await self.flush():
                break
            await asyncio.sleep(0.2)
        else:
            left = [self.pending] + ([self.unsent[1]] if self.unsent is not None else [])
            rows = sum(map(len, left))
            requests = sum(values[0] for batch in left for values in batch.values())
            log.error("usage lost at shutdown: %d rows (%d requests) could not be recorded after 3 tries",
                      rows, requests)
        await self.store.close()

    async def query(self, key: str | None = None, since: str | None = None, until: str | None = None,
                    model: str | None = None) -> list[UsageRow]:
        return await self.store.query(key, since, until, model)


def usage_db_path(settings: "Settings") -> Path:
    return Path(settings.api_keys_file).resolve().parent / DB_NAME


def make_store(settings: "Settings", redis: Any = None) -> UsageStore:
    if settings.redis_url:
        if redis is None:
            from redis import asyncio as aioredis

            redis = aioredis.Redis.from_url(settings.redis_url, socket_connect_timeout=2.0, socket_timeout=5.0)
        return RedisUsageStore(redis)
    return SqliteUsageStore(usage_db_path(settings))


def read_usage(settings: "Settings", key: str | None = None, since: str | None = None, until: str | None = None,
               model: str | None = None) -> list[UsageRow]:
    """The stored rows (for the `keys` command)."""
    if not settings.redis_url:
        return SqliteUsageStore(usage_db_path(settings)).query_sync(key, since, until, model)

    async def run() -> list[UsageRow]:
        from redis import asyncio as aioredis

        r = aioredis.Redis.from_url(settings.redis_url, socket_connect_timeout=2.0, socket_timeout=5.0)
        try:
            return await RedisUsageStore(r).query(key, since, until, model)
        finally:
            await r.aclose()

    return asyncio.run(run())


# ---- GET /v1/usage --------------------------------------------------------------------------------
class UsageCounters(BaseModel):
    requests: int = Field(description="Answered requests (errors included).")
    items: int = Field(description="Embedding inputs or reranked documents.")
    prompt_tokens: int = Field(description="Prompt tokens the upstream processed (vLLM's `usage`).")
    cache_hits: int = Field(description="Items answered from the gateway's cache.")
    errors_4xx: int = Field(description="Requests answered 4xx.")
    errors_5xx: int = Field(description="Requests answered 5xx.")


class UsageEntry(UsageCounters):
    model: str = Field(description="Served model (`-` for requests without one).")
    day: str = Field(description="UTC day, YYYY-MM-DD.")


class UsageReport(BaseModel):
    """The calling key's own usage, per model and UTC day."""

    model_config = ConfigDict(json_schema_extra={"examples": [{
        "object": "usage", "key": "team-a", "since": "2026-11-01", "until": None,
        "data": [{"model": "Qwen3-Embedding-0.6B", "day": "2026-11-26", "requests": 12, "items": 340,
                  "prompt_tokens": 18230, "cache_hits": 0, "errors_4xx": 1, "errors_5xx": 0}],
        "total": {"requests": 12, "items": 340, "prompt_tokens": 18230, "cache_hits": 0, "errors_4xx": 1,
                  "errors_5xx": 0},
    }]})

    object: str = "usage"
    key: str = Field(description="The key's name.")
    since: str | None = Field(None, description="First day counted (`?since=YYYY-MM-DD`), null = from the start.")
    until: str | None = Field(None, description="Last day counted (`?until=YYYY-MM-DD`), null = today.")
    data: list[UsageEntry]
    total: UsageCounters


def report(key: str, rows: list[UsageRow], since: str | None, until: str | None) -> dict[str, Any]:
    total = UsageRow(key, "", "")
    data = []
    for r in rows:
        total.add(r)
        data.append({"model": r.model, "day": r.day, **r.counters()})
    return {"object": "usage", "key": key, "since": since, "until": until, "data": data, "total": total.counters()}


class UsageRoute:
    """GET /v1/usage: the caller's own counters (its key's name; never another key's)."""

    def __init__(self, usage: Usage) -> None:
        self.usage = usage

    async def __call__(self, req: Request) -> Response:
        assert req.who is not None
        q = parse_qs(req.scope.get("query_string", b"").decode("latin-1"))
        try:
            since, until = parse_days((q.get("since") or [None])[-1], (q.get("until") or [None])[-1])
        except ValueError as e:
            raise bad_request(str(e), param="since" if str(e).startswith("since") else "until") from None
        model = (q.get("model") or [None])[-1] or None
        await self.usage.flush()  # the caller's last requests count too
        try:
            rows = await self.usage.query(req.who.name, since, until, model)
        except Exception as e:  # noqa: BLE001 - Redis down, a damaged database
            log.error("usage could not be read (%s: %s)", type(e).__name__, e)
            raise unavailable("The usage counters cannot be read right now (their store is unreachable); "
                              "retry shortly.", code="usage_unavailable", retry_after=1) from None
        return Response(200, orjson.dumps(report(req.who.name, rows, since, until)))


def usage_routes(usage: Usage) -> list[Route]:
    return [Route("/v1/usage", ("GET",), UsageRoute(usage), tags=("usage",), response_model=UsageReport,
                  summary="The calling key's own usage per model and UTC day (`?since=`, `?until=` YYYY-MM-DD, "
                          "`?model=`)",
                  responses={400: "`since` or `until` is not a day such as 2026-11-26."})]


def as_json_rows(rows: Iterable[UsageRow]) -> list[dict[str, Any]]:
    return [asdict(r) for r in rows]
