"""The OpenAPI 3.1 document of the gateway, built from the route table's Routes and their models.

Each Route says what it is (summary, tags, request and response models, extra responses); this
module adds what every route shares: the errors the gateway itself answers (all in the OpenAI
error shape, schemas.Error), and the three ways to send a key as security schemes. A Route added
anywhere appears here with nothing else to do. Served as GET /openapi.json (docs.py).
"""

from __future__ import annotations

import re
from typing import Any, Iterable

import orjson

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from . import __version__
from .routing import Route
from .schemas import Error

TITLE = "Embedding & reranker gateway"
DESCRIPTION = (
    "One endpoint in front of vLLM embedding and reranker servers: OpenAI embeddings, Cohere/Jina/TEI-style "
    "rerank and embed, API keys, per-key rate limits.\n\n"
    "Every route but the public ones (`/health`, `/metrics`, these docs) needs a key: "
    "`Authorization: Bearer <key>`, `?api_key=<key>` or `?access_token=<key>`. "
    "Every error is `{\"error\": {\"message\", \"type\", \"param\", \"code\"}}`."
)

# The three ways a key is accepted (auth.presented_key); a request needs one of them.
SECURITY_SCHEMES: dict[str, dict[str, Any]] = {
    "bearer": {"type": "http", "scheme": "bearer", "description": "`Authorization: Bearer <key>`"},
    "api_key": {"type": "apiKey", "in": "query", "name": "api_key", "description": "`?api_key=<key>`"},
    "access_token": {"type": "apiKey", "in": "query", "name": "access_token", "description": "`?access_token=<key>`"},
}
KEYED = [{name: []} for name in SECURITY_SCHEMES]  # any one of them

# The errors the gateway answers itself, by what a route does.
EVERY_ROUTE = {500: "Internal gateway error; see the gateway log."}
KEYED_ROUTE = {
    401: "Missing, unknown, revoked or expired key (`missing_api_key`, `invalid_api_key`).",
    429: "Per-key `RATE_LIMIT` (`rate_limit_exceeded`), the key's `TOKEN_LIMIT` (`token_limit_exceeded`, POST routes), "
         "`MAX_CONCURRENT_REQUESTS` (`concurrency_limit_exceeded`) "
         "or too many failed keys from one address: wait `Retry-After` seconds.",
    503: "No reachable vLLM replica for the model (`upstream_unavailable`), the shared limits' Redis is "
         "unreachable (`limits_unavailable`), or the gateway stopped before answering (`shutting_down`).",
}
BODY_ROUTE = {
    400: "The request is malformed: the message says what to change and `param` names the field (`input[0]`, "
         "`documents[3]`); vLLM's own 400s (input too long, `dimensions` unsupported) pass through.",
    403: "The key's model allow-list does not include this model (`model_not_allowed`).",
    404: "Unknown model (`model_not_found`; the message lists the served ones).",
    408: "The body did not arrive within `BODY_TIMEOUT` seconds (`request_timeout`).",
    413: "Body over `MAX_BODY_BYTES` (`request_too_large`): split the batch.",
    502: "vLLM failed, answered garbage, or refused the gateway (`bad_upstream_response`), or answered more than "
         "MAX_ANSWER_BYTES (`upstream_answer_too_large`).",
    504: "vLLM did not answer within `TIMEOUT` seconds (`upstream_timeout`).",
}


def _example_errors() -> dict[int, Any]:
    """One real answer per status, made by the helpers that make them (errors.py)."""
    from . import errors as e

    made = {
        400: e.bad_request("`input[1]` must be a string like `input[0]` (no mixing); got 1.", param="input[1]"),
        401: e.unauthorized("Missing API key. Send 'Authorization: Bearer <key>' or add '?api_key=<key>'.",
                            code="missing_api_key"),
        403: e.forbidden("This API key may only use the models Qwen3-Embedding-0.6B; `other` is not among them."),
        404: e.not_found("The model `nope` does not exist. Models served here: Qwen3-Embedding-0.6B, "
                         "Qwen3-Reranker-0.6B.", code="model_not_found", param="model"),
        408: e.body_too_slow(30),
        413: e.body_too_large(16 * 1024 * 1024),
        429: e.rate_limited("100/minute", 12),
        500: e.unexpected(),
        502: e.bad_gateway("The embedding upstream http://127.0.0.1:8000 failed with HTTP 500"),
        503: e.unavailable("No healthy embedding upstream for model `Qwen3-Embedding-0.6B`.", retry_after=1),
        504: e.gateway_timeout("No answer from the embedding upstream within TIMEOUT=600 s."),
    }
    return {status: orjson.loads(err.body()) for status, err in made.items()}


ERROR_EXAMPLES = _example_errors()


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _operation_id(method: str, path: str) -> str:
    return method.lower() + "_" + (re.sub(r"[^A-Za-z0-9]+", "_", path).strip("_") or "root")


def _example(schema: dict[str, Any], defs: dict[str, Any], depth: int = 0) -> Any:
    """The schema's first example; for a union without one (a RootModel), its first member's."""
    if "$ref" in schema:
        schema = defs.get(schema["$ref"].rsplit("/", 1)[-1], {})
    examples = schema.get("examples")
    if isinstance(examples, list) and examples:
        return examples[0]
    for member in (schema.get("anyOf") or schema.get("oneOf") or []) if depth < 3 else []:
        found = _example(member, defs, depth + 1)
        if found is not None:
            return found
    return None


def _content(schema: dict[str, Any], defs: dict[str, Any], example: Any = None) -> dict[str, Any]:
    media: dict[str, Any] = {"schema": schema}
    example = _example(schema, defs) if example is None else example
    if example is not None:
        media["example"] = example
    return {"application/json": media}


def openapi_document(routes: Iterable[Route], *, title: str = TITLE, version: str = __version__) -> dict[str, Any]:
    """The OpenAPI 3.1 document of `routes` (a route table's, in its order)."""
    routes = [r for r in routes if not r.prefix]
    wanted: list[tuple[type[BaseModel], Any]] = [(Error, "serialization")]
    for r in routes:
        if r.request_model is not None:
            wanted.append((r.request_model, "validation"))
        if r.response_model is not None:
            wanted.append((r.response_model, "serialization"))
    wanted = list(dict.fromkeys(wanted))
    refs, top = models_json_schema(wanted, ref_template="#/components/schemas/{model}")
    defs: dict[str, Any] = top.get("$defs", {})
    error_schema = refs[(Error, "serialization")]

    paths: dict[str, dict[str, Any]] = {}
    for r in routes:
        responses: dict[str, Any] = {}
        if r.response_model is not None:
            ok = _content(refs[(r.response_model, "serialization")], defs)
        elif r.path == "/metrics":
            ok = {"text/plain": {"schema": {"type": "string"}}}
        else:
            ok = None
        responses["200"] = {"description": r.summary or "OK", **({"content": ok} if ok else {})}
        errors: dict[int, str] = dict(EVERY_ROUTE)
        if not r.public:
            errors.update(KEYED_ROUTE)
        if r.request_model is not None:
            errors.update(BODY_ROUTE)
        errors.update(r.responses or {})
        for status in sorted(errors):
            schema = error_schema
            if r.response_model is not None and r.responses and status in r.responses:
                # a route's own extra answer may be its document (/health's 503) or an error
                schema = {"anyOf": [refs[(r.response_model, "serialization")], error_schema]}
            responses[str(status)] = {"description": errors[status],
                                      "content": _content(schema, defs, ERROR_EXAMPLES.get(status)
                                                          if schema is error_schema else None)}
        for method in r.methods:
            op: dict[str, Any] = {
                "operationId": _operation_id(method, r.path),
                "summary": r.summary or f"{method} {r.path}",
                "responses": responses,
                "security": [] if r.public else KEYED,
            }
            if r.tags:
                op["tags"] = list(r.tags)
            doc = (r.request_model or r.response_model).__doc__ if (r.request_model or r.response_model) else None
            if doc and not doc.startswith(("A base class", "Usage docs")):
                op["description"] = " ".join(doc.split())
            if r.request_model is not None:
                op["requestBody"] = {"required": True, "content": _content(refs[(r.request_model, "validation")],
                                                                           defs)}
            paths.setdefault(r.path, {})[method.lower()] = op

    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version, "description": DESCRIPTION},
        "paths": paths,
        "components": {"schemas": defs, "securitySchemes": SECURITY_SCHEMES},
    }
