"""Request validation and dialect normalisation; rebuilding responses only where they must change.

OpenAI embeddings and Cohere/Jina-style rerank requests are checked here, before any upstream
work, so clients get a precise 400 naming the field. Embedding requests that need no change are
forwarded as the client's own bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from .errors import bad_request


def parse_json_object(body: bytes) -> dict[str, Any]:
    if not body:
        raise bad_request("The request body is empty; send a JSON object.", code="invalid_json")
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise bad_request(f"The request body is not valid JSON: {e}.", code="invalid_json") from None
    if not isinstance(doc, dict):
        raise bad_request("The request body must be a JSON object.", code="invalid_json")
    return doc


def _model(doc: dict[str, Any]) -> str | None:
    model = doc.get("model")
    if model is None:
        return None
    if not isinstance(model, str) or not model.strip():
        raise bad_request("`model` must be a non-empty string.", param="model")
    return model


def _instruction(doc: dict[str, Any]) -> str | None:
    instruction = doc.get("instruction")
    if instruction is not None and (not isinstance(instruction, str) or not instruction.strip()):
        raise bad_request("`instruction` must be a non-empty string.", param="instruction")
    return instruction


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass
class EmbeddingsRequest:
    model: str | None
    items: int
    doc: dict[str, Any]
    changed: bool  # the upstream body must be re-serialised (else the client's bytes are forwarded)


def is_qwen3_embedding(model: str | None, root: str | None) -> bool:
    names = " ".join(x for x in (model, root) if x).lower()
    return "qwen3" in names and "embed" in names


def parse_embeddings(body: bytes) -> EmbeddingsRequest:
    doc = parse_json_object(body)
    model = _model(doc)
    inp = doc.get("input")
    if inp is None:
        raise bad_request("`input` is required: a string, a list of strings, or token ids.", param="input")
    if isinstance(inp, str):
        items = 1
    elif isinstance(inp, list):
        if not inp:
            raise bad_request("`input` must not be an empty list.", param="input")
        if all(isinstance(x, str) for x in inp):
            items = len(inp)
        elif all(_is_int(x) for x in inp):
            items = 1
        elif all(isinstance(x, list) and x and all(_is_int(t) for t in x) for x in inp):
            items = len(inp)
        else:
            raise bad_request("`input` must be a string, a list of strings, a list of token ids, "
                              "or a list of token-id lists (no mixing, no empty lists).", param="input")
    else:
        raise bad_request("`input` must be a string, a list of strings, or token ids; "
                          f"got {type(inp).__name__}.", param="input")
    fmt = doc.get("encoding_format")
    if fmt is not None and fmt not in ("float", "base64"):
        raise bad_request("`encoding_format` must be \"float\" or \"base64\".", param="encoding_format")
    dims = doc.get("dimensions")
    if dims is not None and (not _is_int(dims) or dims < 1):
        raise bad_request("`dimensions` must be a positive integer.", param="dimensions")
    user = doc.get("user")
    if user is not None and not isinstance(user, str):
        raise bad_request("`user` must be a string.", param="user")
    input_type = doc.get("input_type")
    if input_type is not None and input_type not in ("query", "document", "search_query", "search_document"):
        raise bad_request("`input_type` must be \"query\" or \"document\".", param="input_type")
    instruction = _instruction(doc)
    changed = model is None or input_type is not None or instruction is not None
    return EmbeddingsRequest(model, items, doc, changed)


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
        return orjson.dumps(body)


_RERANK_FIELDS = frozenset({"model", "query", "documents", "top_n", "top_k", "return_documents", "instruction"})


def parse_rerank(body: bytes) -> RerankRequest:
    doc = parse_json_object(body)
    model = _model(doc)
    query = doc.get("query")
    if not isinstance(query, str) or not query:
        raise bad_request("`query` is required and must be a non-empty string.", param="query")
    docs = doc.get("documents")
    if not isinstance(docs, list) or not docs:
        raise bad_request("`documents` is required: a non-empty list of strings or {\"text\": ...} objects.",
                          param="documents")
    texts: list[str] = []
    for i, d in enumerate(docs):
        if isinstance(d, str):
            texts.append(d)
        elif isinstance(d, dict) and isinstance(d.get("text"), str):
            texts.append(d["text"])
        else:
            raise bad_request(f"`documents[{i}]` must be a string or an object with a string `text`.",
                              param=f"documents[{i}]")
    top_n = doc.get("top_n", doc.get("top_k"))
    if "top_n" in doc and "top_k" in doc and doc["top_n"] != doc["top_k"]:
        raise bad_request("`top_n` and its alias `top_k` disagree; send one of them.", param="top_n")
    if top_n is not None and (not _is_int(top_n) or top_n < 1):
        raise bad_request("`top_n` must be a positive integer.", param="top_n")
    if top_n is not None and top_n > len(texts):
        top_n = len(texts)
    rd = doc.get("return_documents", True)
    if not isinstance(rd, bool):
        raise bad_request("`return_documents` must be true or false.", param="return_documents")
    instruction = _instruction(doc)
    extra = {k: v for k, v in doc.items() if k not in _RERANK_FIELDS}
    return RerankRequest(model, query, texts, top_n, rd, instruction, extra)


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
