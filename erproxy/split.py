"""The item path shared by every embeddings and rerank route: cache lookups, misses split across
replicas, answers merged in input order.

A request goes through it when the item cache is on (and the request does not say
`Cache-Control: no-store`) or when it is big enough to split; otherwise the handlers keep their
pass-through fast path. Per request:

1. keys for every item (cache.py); one lookup for all of them (LRU, then one Redis MGET);
2. the misses, cut into chunks when more than one healthy replica serves the model and there are
   more than SPLIT_EMBEDDING_INPUTS inputs or SPLIT_RERANK_DOCUMENTS documents: as many chunks as
   healthy replicas (at most one per SPLIT_* items), posted concurrently, each to the least-loaded
   replica, each retried elsewhere like a whole request (upstreams.post); a chunk that fails for
   good ends the request with its error and cancels the others, never a partial answer;
3. the upstream answers merged: vectors or scores by input index, usage summed (the tokens the
   upstream processed, cached items count none), the misses written to the cache.

A /v1/embeddings answer asks vLLM for the client's own encoding_format and passes each vector's
JSON text on as vLLM printed it: cut out of the chunk's answer as a zero-copy view (`vector_texts`),
never parsed and printed again, so the only copy of the vectors the gateway makes is the one join
of the merged answer. They are decoded to float32 bytes only when the cache stores them. A cached
vector is printed in the client's format: base64 of the float32 little-endian bytes, or each value
as vLLM prints it (Python's repr of the float32 widened to a double, `floats_json`). The dialects
(TEI, Cohere), which need the numbers, ask vLLM for base64 and decode it.

Why not always ask vLLM for base64 and print the floats here: printing 256 x 1024 float32 values as
vLLM does costs the gateway about 15 ms of CPU in pure Python (b64decode, tolist, orjson, repr fix-ups),
several times what cutting and joining the 5.4 MB of float text costs (bench/README.md, splitting).
"""

from __future__ import annotations

import base64
import binascii
import math
import random
import re
import sys
import time
from array import array
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Callable

import orjson

from .asgi import Request
from .cache import BYPASS, REFRESH, ItemCache, cache_mode, embedding_keys, rerank_keys
from .errors import bad_gateway, upstream_error
from .metrics import Metrics
from .protocol import RerankRequest, client_json
from .upstreams import UpstreamResponse, Upstreams

if TYPE_CHECKING:
    from .handlers import Forwarder

_LITTLE = sys.byteorder == "little"
_SCORE = "<d"
# orjson writes tiny and huge doubles differently from Python's repr (0.00001 vs 1e-05, 1e16 vs 1e+16):
# such numbers (a few per vector) are found with bytes.find and printed again with repr
_NOT_REPR = (b"e", b"0.0000")


def floats_json(raw: bytes) -> bytes:
    """A JSON array of the float32 values in `raw`, each printed as vLLM prints it (json.dumps: repr)."""
    out = orjson.dumps(to_floats(raw))
    spans: dict[int, int] = {}
    for needle in _NOT_REPR:
        at = out.find(needle)
        while at >= 0:
            start = out.rfind(b",", 0, at) + 1 or 1
            end = out.find(b",", at)
            if end < 0:
                end = len(out) - 1
            spans[start] = end
            at = out.find(needle, end)
    if not spans:
        return out
    pieces: list[bytes] = []
    last = 0
    for start in sorted(spans):
        end = spans[start]
        pieces += [out[last:start], repr(float(out[start:end])).encode()]
        last = end
    pieces.append(out[last:])
    return b"".join(pieces)


def to_floats(raw: bytes) -> list[float]:
    a = array("f")
    a.frombytes(raw)
    if not _LITTLE:
        a.byteswap()
    return a.tolist()


def from_floats(values: list[float]) -> bytes:
    a = array("f", values)
    if not _LITTLE:
        a.byteswap()
    return a.tobytes()


@dataclass
class Embedded:
    vectors: list[bytes | None]  # float32 little-endian, in input order (None: only its text is known)
    prompt_tokens: int | None  # what the upstream processed (None: it did not say)
    id: str
    created: int
    model: str | None
    # a vector's JSON as vLLM printed it in the answer's format (float array or quoted base64), for the
    # misses of a /v1/embeddings answer: views into the upstream's answers, joined once into the merged one
    texts: list[bytes | memoryview | None] | None = None
    usage: dict[str, Any] | None = None  # the first upstream answer's usage, whose shape the merged one keeps


_HEAD = re.compile(rb'"id":"([^"]*)".*?"created":(\d+).*?"model":"((?:[^"\\]|\\.)*)"', re.S)
_TOKENS = re.compile(rb'"prompt_tokens":(\d+)')
_EMBEDDING = b'"embedding":'
_CLOSE = {b"[": b"]", b'"': b'"'}  # a float array, a base64 string


def vector_texts(body: bytes, n: int, encoding_format: str | None = None
                 ) -> tuple[list[memoryview], int | None, str | None, int | None, str | None] | None:
    """vLLM's answer for `n` inputs cut into each vector's JSON text (a float array, or a base64 string
    with its quotes), as views into `body`, without parsing the numbers:
    (texts by index, prompt_tokens, id, created, model); None when it is not shaped as expected, or
    not in `encoding_format` when given (the caller parses it then)."""
    opening = {"float": b"[", "base64": b'"'}.get(encoding_format or "")
    texts: list[memoryview | None] = [None] * n
    view = memoryview(body)
    find = body.find
    pos = find(b'"data":[')
    if pos < 0:
        return None
    for _ in range(n):
        k = find(b'"index":', pos)
        i = find(_EMBEDDING, pos)
        if k < 0 or i < 0 or k > i:
            return None
        m = end = k + 8
        while body[end:end + 1].isdigit():
            end += 1
        i += 12
        close = _CLOSE.get(body[i:i + 1])
        if close is None or end == m or (opening is not None and body[i:i + 1] != opening):
            return None
        j = find(close, i + 1)
        if j < 0 or (close == b'"' and find(b"\\", i, j) >= 0):  # an escaped base64 string: parse it
            return None
        index = int(body[m:end])
        if not 0 <= index < n or texts[index] is not None:
            return None
        texts[index] = view[i:j + 1]
        pos = j + 1
    if find(_EMBEDDING, pos) >= 0:
        return None
    head = _HEAD.search(body, 0, 400)
    used = _TOKENS.search(body, pos)
    return ([t for t in texts if t is not None], int(used.group(1)) if used else None,
            head.group(1).decode() if head else None, int(head.group(2)) if head else None,
            orjson.loads(b'"' + head.group(3) + b'"') if head else None)


float_texts = vector_texts  # the float answers' name, kept for callers and tests

# vLLM's usage for an embeddings answer (0.32), printed when no upstream answer gave its own shape
VLLM_USAGE = {"prompt_tokens": 0, "total_tokens": 0, "completion_tokens": 0, "prompt_tokens_details": None,
              "completion_tokens_details": None}


def usage_of(body: bytes) -> dict[str, Any] | None:
    """The `usage` object of vLLM's answer, its last member (a few bytes at the end: no full parse)."""
    at = body.rfind(b'"usage":')
    end = body.rfind(b"}")
    if at < 0 or end < at:
        return None
    try:
        usage = orjson.loads(body[at + 8:end])
    except orjson.JSONDecodeError:
        return None
    return usage if isinstance(usage, dict) else None


def text_bytes(text: bytes | memoryview) -> bytes:
    """The float32 little-endian bytes of a vector's JSON text (a float array or a quoted base64 string)."""
    if text[0] == 0x22:
        return binascii.a2b_base64(text[1:-1])
    return from_floats(orjson.loads(text))


@dataclass
class Scored:
    scores: list[float]  # by document index
    prompt_tokens: int | None
    id: str | None
    model: str | None


def _rand_id(prefix: str) -> str:
    return f"{prefix}-{random.getrandbits(64):016x}"


def chunks(indices: list[int], limit: int, replicas: int) -> list[list[int]]:
    """`indices` cut into as many even chunks as `replicas`, at most one per `limit` items."""
    n = len(indices)
    if replicas < 2 or n <= limit:
        return [indices] if indices else []
    parts = min(replicas, math.ceil(n / limit))
    size, extra = divmod(n, parts)
    out, start = [], 0
    for p in range(parts):
        end = start + size + (1 if p < extra else 0)
        out.append(indices[start:end])
        start = end
    return out


def auto_truncate(fields: dict[str, Any], enabled: bool, refused: bool = False) -> None:
    """AUTO_TRUNCATE: inputs longer than the model's max_model_len are cut (vLLM `truncate_prompt_tokens: -1`)
    unless the request set its own truncation or refused it (TEI `truncate: false`, Cohere `NONE`)."""
    if enabled and not refused and "truncate_prompt_tokens" not in fields:
        fields["truncate_prompt_tokens"] = -1


class Items:
    """Cache and splitting for the handlers; `plan` says whether a request takes this path."""

    def __init__(self, upstreams: Upstreams, forward: "Forwarder", cache: ItemCache, metrics: Metrics, *,
                 split_inputs: int = 32, split_documents: int = 32) -> None:
        self.upstreams = upstreams
        self.forward = forward
        self.cache = cache
        self.metrics = metrics
        self.split_limits = {"embedding": split_inputs, "reranker": split_documents}
        self._counters: dict[tuple[str, str], Any] = {}

    def healthy(self, kind: str, model: str | None) -> int:
        return sum(1 for r in self.upstreams.candidates(kind, model) if r.healthy)

    def plan(self, req: Request, kind: str, model: str | None, items: int) -> str | None:
        """The cache mode when the request takes the item path; None for the pass-through path."""
        mode = cache_mode(req) if self.cache.enabled else BYPASS
        if mode != BYPASS:
            return mode
        if items > self.split_limits[kind] and self.healthy(kind, model) >= 2:
            return BYPASS
        req.cache_hits, req.cache_misses = 0, items
        return None

    def _count(self, kind: str, hits: int, misses: int) -> None:
        for result, n in (("hit", hits), ("miss", misses)):
            if n:
                c = self._counters.get((kind, result))
                if c is None:
                    c = self._counters[(kind, result)] = self.metrics.cache_items.labels(kind, result)
                c.inc(n)

    async def _lookup(self, req: Request, kind: str, mode: str, keys: list[str] | None, n: int
                      ) -> list[bytes | None]:
        if keys is None:
            found: list[bytes | None] = [None] * n
        elif mode == REFRESH:
            found = [None] * n
        else:
            found = await self.cache.get_many(keys)
        hits = sum(1 for v in found if v is not None)
        req.cache_hits, req.cache_misses = hits, n - hits
        if keys is not None:
            self._count(kind, hits, n - hits)
        return found

    async def _post_chunks(self, req: Request, kind: str, model: str | None, path: str,
                           parts: list[list[int]], body_of: Callable[[list[int]], bytes]) -> list[UpstreamResponse]:
        bodies = [body_of(p) for p in parts]
        resps = await self.forward.many(req, kind, model, path, bodies)
        return resps

    # ---- embeddings --------------------------------------------------------------------------------
    async def embed(self, req: Request, mode: str, model: str | None, texts: list[str], fields: dict[str, Any],
                    float_text: bool = False, text: str | None = None) -> Embedded:
        """`texts` as they go upstream (instruction applied); `fields` the other upstream fields.

        `text` ("float" or "base64"; `float_text` is text="float"): the client's encoding_format, which the
        misses are asked of vLLM in; their JSON text is passed on as vLLM printed it (`Embedded.texts`,
        views into the upstream answers), decoded to float32 bytes only when the cache stores them.
        Without it (the dialects) vLLM is asked for base64 and every vector decoded.
        """
        if float_text:
            text = "float"
        # no shared model root (replicas of one name with different weights, not discovered yet): no cache
        root = self.upstreams.cache_root("embedding", model) if mode != BYPASS else None
        keys = embedding_keys(model, root, texts, fields, self.cache.scope(req)) if root is not None else None
        found = await self._lookup(req, "embedding", mode, keys, len(texts))
        missing = [i for i, v in enumerate(found) if v is None]
        tokens: int | None = 0
        rid, created, answered_model = None, None, None
        usage: dict[str, Any] | None = None
        printed: list[bytes | memoryview | None] | None = [None] * len(texts) if text else None
        if missing:
            healthy = self.healthy("embedding", model) if len(missing) > self.split_limits["embedding"] else 1
            parts = chunks(missing, self.split_limits["embedding"], healthy)
            upstream_format = text or "base64"

            def body_of(part: list[int]) -> bytes:
                body = {**fields, "input": [texts[i] for i in part], "encoding_format": upstream_format}
                if model is not None:
                    body["model"] = model
                return client_json(body)

            resps = await self._post_chunks(req, "embedding", model, "/v1/embeddings", parts, body_of)
            fresh: list[tuple[str, bytes]] = []
            for part, resp in zip(parts, resps):
                cut = vector_texts(resp.body, len(part), upstream_format) if printed is not None else None
                if cut is not None and printed is not None:
                    vtexts, used, chunk_id, chunk_created, chunk_model = cut
                    for at, vtext in zip(part, vtexts):
                        printed[at] = vtext
                    if keys is not None:  # the cache stores float32 bytes: only then are the vectors decoded
                        for at, vtext in zip(part, vtexts):
                            raw = found[at] = text_bytes(vtext)
                            fresh.append((keys[at], raw))
                    tokens = tokens + used if isinstance(used, int) and tokens is not None else None
                    usage = usage or usage_of(resp.body)
                    rid, created = rid or chunk_id, created or chunk_created
                    answered_model = answered_model or chunk_model
                    continue
                try:
                    doc = orjson.loads(resp.body)
                    data = doc["data"]
                    if not isinstance(data, list) or len(data) != len(part):
                        raise ValueError("one vector per input")
                    for item in data:
                        pos = item["index"]
                        if not isinstance(pos, int) or not 0 <= pos < len(part):
                            raise ValueError("index out of range")
                        emb = item["embedding"]
                        raw = base64.b64decode(emb) if isinstance(emb, str) else from_floats(emb)
                        found[part[pos]] = raw
                        if keys is not None:
                            fresh.append((keys[part[pos]], raw))
                    used = (doc.get("usage") or {}).get("prompt_tokens")
                    usage = usage or (doc["usage"] if isinstance(doc.get("usage"), dict) else None)
                except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
                    raise bad_gateway(f"The embedding upstream {resp.replica.url} answered something that is not "
                                      "an embeddings result.") from None
                tokens = tokens + used if isinstance(used, int) and tokens is not None else None
                rid = rid or doc.get("id")
                created = created or doc.get("created")
                answered_model = answered_model or doc.get("model")
            if any(v is None and (printed is None or printed[i] is None) for i, v in enumerate(found)):
                raise bad_gateway("The embedding upstream answered fewer vectors than inputs.")
            if keys is not None and fresh:
                await self.cache.put_many(fresh)
        return Embedded(found, tokens, rid or _rand_id("embd"),
                        created if isinstance(created, int) else int(time.time()), answered_model or model, printed,
                        usage)

    # ---- rerank ------------------------------------------------------------------------------------
    async def rerank(self, req: Request, mode: str, model: str | None, rr: RerankRequest) -> Scored:
        """A score for every document of `rr` (top_n is applied by the caller, after the merge)."""
        root = self.upstreams.cache_root("reranker", model) if mode != BYPASS else None
        docs = rr.documents
        keys = (rerank_keys(model, root, rr.instruction, rr.query, docs, rr.extra, self.cache.scope(req))
                if root is not None else None)
        found = await self._lookup(req, "reranker", mode, keys, len(docs))
        scores: list[float | None] = [None if v is None else _unpack_score(v) for v in found]
        missing = [i for i, v in enumerate(scores) if v is None]
        tokens: int | None = 0
        rid, answered_model = None, None
        if missing:
            healthy = self.healthy("reranker", model) if len(missing) > self.split_limits["reranker"] else 1
            parts = chunks(missing, self.split_limits["reranker"], healthy)

            def body_of(part: list[int]) -> bytes:
                return replace(rr, documents=[docs[i] for i in part], top_n=None).upstream_body(model)

            resps = await self._post_chunks(req, "reranker", model, "/v1/rerank", parts, body_of)
            fresh: list[tuple[str, bytes]] = []
            for part, resp in zip(parts, resps):
                try:
                    doc = orjson.loads(resp.body)
                    results = doc["results"]
                    if not isinstance(results, list):
                        raise ValueError("results")
                    for r in results:
                        pos, score = r["index"], r["relevance_score"]
                        if (not isinstance(pos, int) or not 0 <= pos < len(part) or isinstance(score, bool)
                                or not isinstance(score, (int, float))):
                            raise ValueError("malformed result")
                        scores[part[pos]] = float(score)
                        if keys is not None:
                            fresh.append((keys[part[pos]], _pack_score(float(score))))
                    used = (doc.get("usage") or {}).get("prompt_tokens")
                except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
                    raise bad_gateway(f"The reranker upstream {resp.replica.url} answered something that is not "
                                      "a rerank result.") from None
                tokens = tokens + used if isinstance(used, int) and tokens is not None else None
                rid = rid or doc.get("id")
                answered_model = answered_model or doc.get("model")
            if any(s is None for s in scores):
                raise bad_gateway("The reranker upstream answered fewer scores than documents.")
            if keys is not None and fresh:
                await self.cache.put_many(fresh)
        return Scored([s for s in scores if s is not None], tokens, rid or _rand_id("score"),
                      answered_model or model)


def _pack_score(score: float) -> bytes:
    import struct

    return struct.pack(_SCORE, score)


def _unpack_score(raw: bytes) -> float | None:
    import struct

    return struct.unpack(_SCORE, raw)[0] if len(raw) == 8 else None


def embeddings_answer(e: Embedded, encoding_format: str | None, model: str | None) -> bytes:
    """The OpenAI/vLLM embeddings answer for `e`: vLLM's shape, float or base64."""
    b64 = encoding_format == "base64"
    parts = [b'{"id":', orjson.dumps(e.id), b',"object":"list","created":', str(e.created).encode(),
             b',"model":', orjson.dumps(e.model or model), b',"data":[']
    printed = e.texts
    for i, raw in enumerate(e.vectors):
        if i:
            parts.append(b",")
        text = printed[i] if printed is not None else None
        if text is None:
            assert raw is not None
            text = b'"' + base64.b64encode(raw) + b'"' if b64 else floats_json(raw)
        parts += [b'{"index":', str(i).encode(), b',"object":"embedding","embedding":', text, b"}"]
    tokens = e.prompt_tokens
    usage = dict(e.usage or VLLM_USAGE)  # vLLM's own shape, its counts summed over the chunks
    usage["prompt_tokens"] = tokens
    if "total_tokens" in usage:
        usage["total_tokens"] = tokens
    parts += [b'],"usage":', orjson.dumps(usage), b"}"]
    return b"".join(parts)


def check_status(resp: UpstreamResponse, kind: str) -> UpstreamResponse:
    if resp.status != 200:
        raise upstream_error(resp, kind)
    return resp
