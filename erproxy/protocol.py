"""Requests through their models (schemas.py), the Qwen3 prompt rules, and the rerank answer rebuilt.

OpenAI embeddings and Cohere/Jina-style rerank requests are validated by their pydantic models
before any upstream work, so clients get a precise 400 naming the field. Embedding requests
that need no change are forwarded as the client's own bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson
from pydantic import ValidationError

from .errors import bad_request
from .schemas import EmbeddingsRequest as EmbeddingsModel
from .schemas import RerankRequest as RerankModel
from .schemas import request_error


def client_json(doc: Any, option: int | None = None) -> bytes:
    """`orjson.dumps` of what a client sent (or the gateway built around it: an upstream body, a cache key).

    orjson reads JSON nested up to 1,024 levels but writes at most 254: a body nested in between was
    accepted and then failed here (500). It is the client's 400 instead, found where it matters, at no
    cost to the bodies that are fine.
    """
    try:
        return orjson.dumps(doc, option=option)
    except orjson.JSONEncodeError:
        raise bad_request("The request body nests arrays or objects too deep (more than about 250 levels).",
                          code="invalid_json") from None


def parse_json_object(body: bytes) -> dict[str, Any]:
    if not body:
        raise bad_request("The request body is empty; send a JSON object.", code="invalid_json")
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        if body[:2] == b"\x1f\x8b":  # gzip's magic number: a client that compressed its body
            raise bad_request("The request body is gzip-compressed (Content-Encoding: gzip), which the gateway "
                              "does not accept; send the JSON uncompressed.", code="invalid_json") from None
        raise bad_request(f"The request body is not valid JSON: {e}.", code="invalid_json") from None
    if not isinstance(doc, dict):
        raise bad_request("The request body must be a JSON object.", code="invalid_json")
    return doc


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass
class EmbeddingsRequest:
    model: str | None
    items: int
    doc: dict[str, Any]
    changed: bool  # the upstream body must be re-serialised (else the client's bytes are forwarded)
    token_ids: bool = False  # `input` is token ids rather than text


def is_qwen3_embedding(model: str | None, root: str | None) -> bool:
    names = " ".join(x for x in (model, root) if x).lower()
    return "qwen3" in names and "embed" in names


def parse_embeddings(body: bytes) -> EmbeddingsRequest:
    doc = parse_json_object(body)
    try:
        m = EmbeddingsModel.model_validate(doc)
    except ValidationError as e:
        raise request_error(EmbeddingsModel, e, doc) from None
    inp = m.input
    if isinstance(inp, str):
        items, token_ids = 1, False
    elif isinstance(inp[0], str):
        items, token_ids = len(inp), False
    elif isinstance(inp[0], list):
        items, token_ids = len(inp), True
    else:
        items, token_ids = 1, True
    changed = m.model is None or m.input_type is not None or m.instruction is not None
    return EmbeddingsRequest(m.model, items, doc, changed, token_ids)


def apply_query_instruction(req: EmbeddingsRequest, *, qwen3: bool, default_instruction: str) -> None:
    """Qwen3-Embedding model card: queries are `Instruct: {instruction}\\nQuery:{text}`, documents as sent.

    `input_type`/`instruction` are gateway fields: they are removed from what vLLM sees.
    An explicit `instruction` is applied to any model; `input_type: query` alone only to Qwen3.
    """
    doc = req.doc
    input_type = doc.pop("input_type", None)
    instruction = doc.pop("instruction", None)
    is_query = input_type in ("query", "search_query") or (input_type is None and instruction is not None)
    if not is_query or (instruction is None and not qwen3):
        return
    text = instruction or default_instruction
    inp = doc["input"]
    if isinstance(inp, str):
        doc["input"] = f"Instruct: {text}\nQuery:{inp}"
    elif all(isinstance(x, str) for x in inp):
        doc["input"] = [f"Instruct: {text}\nQuery:{x}" for x in inp]
    else:
        raise bad_request("An instruction cannot be applied to token-id input; send text, or drop "
                          "`instruction`/`input_type`.", param="instruction")


@dataclass
class RerankRequest:
    model: str | None
    query: str
    documents: list[str]
    top_n: int | None
    return_documents: bool
    instruction: str | None
    extra: dict[str, Any]  # fields the gateway does not interpret, forwarded to vLLM as sent

    @property
    def items(self) -> int:
        return len(self.documents)

    def upstream_body(self, model: str | None) -> bytes:
        body: dict[str, Any] = {**self.extra, "query": self.query, "documents": self.documents}
        if model is not None:
            body["model"] = model
        if self.top_n is not None:
            body["top_n"] = self.top_n
        if self.instruction is not None:
            # The shipped Qwen3 reranker template reads this (templates/qwen3_reranker.jinja).
            kwargs = body.get("chat_template_kwargs")
            body["chat_template_kwargs"] = {**(kwargs if isinstance(kwargs, dict) else {}),
                                            "instruction": self.instruction}
        return client_json(body)


def parse_rerank(body: bytes) -> RerankRequest:
    doc = parse_json_object(body)
    try:
        m = RerankModel.model_validate(doc)
    except ValidationError as e:
        raise request_error(RerankModel, e, doc) from None
    texts: list[str] = m.documents  # type: ignore[assignment]  # Documents holds the texts
    rank_fields = doc.get("rank_fields")
    if rank_fields is not None and rank_fields != ["text"]:
        # Cohere ranks object documents on these fields; the gateway sends each document's `text` to vLLM,
        # so anything else would be ranked on the wrong field without a word
        raise bad_request("`rank_fields` other than [\"text\"] is not served: documents are ranked on their "
                          "`text`. Put what should be ranked in `text`.", param="rank_fields")
    if m.top_n is not None and m.top_k is not None and m.top_n != m.top_k:
        raise bad_request("`top_n` and its alias `top_k` disagree; send one of them.", param="top_n")
    top_n = m.top_n if m.top_n is not None else m.top_k
    if top_n is not None and top_n > len(texts):
        top_n = len(texts)
    extra = {k: v for k, v in doc.items() if k not in _RERANK_FIELDS}
    return RerankRequest(m.model, m.query, texts, top_n, m.return_documents, m.instruction, extra)


# Read by the gateway itself (the gateway's own fields and those rebuilt in upstream_body); the
# other fields, declared (truncate_prompt_tokens, ...) or not, go to vLLM as sent.
_RERANK_FIELDS = frozenset({"model", "query", "documents", "top_n"}) | RerankModel.GATEWAY_FIELDS


def build_rerank_response(req: RerankRequest, upstream_body: bytes, model: str | None) -> tuple[bytes, dict[str, Any]]:
    """Rebuild vLLM's rerank answer: sorted by score, our `document` policy, no vLLM-only fields.

    Raises ValueError when the upstream answer is not a rerank result (the caller answers 502).
    """
    doc = orjson.loads(upstream_body)
    results_in = doc["results"]
    if not isinstance(results_in, list):
        raise ValueError("results is not a list")
    results = []
    for r in results_in:
        index = r["index"]
        score = r["relevance_score"]
        if not _is_int(index) or not 0 <= index < len(req.documents) or not isinstance(score, (int, float)):
            raise ValueError("malformed result")
        item: dict[str, Any] = {"index": index, "relevance_score": score}
        if req.return_documents:
            item["document"] = {"text": req.documents[index]}
        results.append(item)
    results.sort(key=lambda x: x["relevance_score"], reverse=True)
    if req.top_n is not None:
        results = results[: req.top_n]
    usage = doc.get("usage") if isinstance(doc.get("usage"), dict) else {}
    out = {
        "id": doc.get("id"),
        "model": doc.get("model", model),
        "results": results,
        "usage": {k: usage[k] for k in ("prompt_tokens", "total_tokens") if k in usage},
    }
    return orjson.dumps(out), out["usage"]
