"""Authentication: which key a request presents, who that key is, and which models it may use."""

from __future__ import annotations

from urllib.parse import parse_qsl

from .asgi import Request
from .errors import forbidden, unauthorized
from .keys import Identity, KeyStore


def presented_key(req: Request) -> str | None:
    """The key from `Authorization: Bearer <key>`, else from `?api_key=` or `?access_token=`."""
    auth = req.header(b"authorization")
    if auth:
        scheme, _, value = auth.decode("latin-1").partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    qs = req.scope.get("query_string")
    if qs:
        params = dict(parse_qsl(qs.decode("latin-1")))
        return params.get("api_key") or params.get("access_token")
    return None


def authenticate(req: Request, keys: KeyStore) -> Identity:
    """The caller's Identity; raises 401 for a missing, unknown, revoked or expired key."""
    key = presented_key(req)
    if not key:
        raise unauthorized("Missing API key. Send 'Authorization: Bearer <key>' or add '?api_key=<key>'.",
                           code="missing_api_key")
    who = keys.authenticate(key)
    if isinstance(who, str):
        raise unauthorized(who)
    return who


def check_model_allowed(who: Identity | None, model: str | None) -> None:
    """403 when the key is limited to some models and `model` is not one of them."""
    allowed = who.models if who else None
    if allowed and model not in allowed:
        raise forbidden(f"This API key may only use the models {', '.join(allowed)}; `{model}` is not among them.")
