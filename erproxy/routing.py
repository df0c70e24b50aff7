"""The route table: path and method to an endpoint, or the 404/405 a client gets, in one lookup.

A path with a trailing slash is served like the path without it. A `prefix` route serves every
path under it (a folder of static files: /docs/...), checked only after no exact path matched.
An endpoint is `public` when it skips authentication and admission (/health, the API docs;
/metrics checks METRICS_TOKEN itself).

A Route also documents itself: `summary`, `tags`, the pydantic `request_model` and
`response_model` classes and extra `responses` (status -> description) are what the OpenAPI
document (openapi.py) says about it; a Route added with them appears there with nothing else to do.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Awaitable, Callable, Iterable

from .asgi import Request, Response
from .errors import no_route, wrong_method

Handler = Callable[[Request], Awaitable[Response]]


@dataclass(frozen=True, slots=True)
class Endpoint:
    handler: Handler
    public: bool = False


@dataclass(frozen=True)
class Route:
    path: str
    methods: tuple[str, ...]
    handler: Handler
    public: bool = False
    prefix: bool = False  # `path` (ending in "/") is a folder: every path under it is this route
    # documentation only (openapi.py); routing ignores them
    summary: str = ""
    request_model: type | None = None  # pydantic model class of the JSON body
    response_model: type | None = None  # pydantic model class of the 200 answer
    tags: tuple[str, ...] = ()
    responses: dict[int, str] | None = None  # extra status -> description


class RouteTable:
    """Routes by exact path (no patterns), each with the endpoint of every method it allows; then
    prefix routes, longest first."""

    def __init__(self, routes: Iterable[Route]) -> None:
        self.routes: tuple[Route, ...] = tuple(routes)  # in declaration order, for the OpenAPI document
        self._paths: dict[str, dict[str, Endpoint]] = {}
        prefixes: dict[str, dict[str, Endpoint]] = {}
        for r in self.routes:
            if r.prefix and not r.path.endswith("/"):
                raise ValueError(f"prefix route {r.path!r} must end with '/'")
            endpoint = Endpoint(r.handler, r.public)
            methods = (prefixes if r.prefix else self._paths).setdefault(r.path, {})
            for method in r.methods:
                methods[method] = endpoint
            if "GET" in r.methods:  # RFC 9110: HEAD wherever GET (the server sends the headers alone)
                methods.setdefault("HEAD", endpoint)
        self._prefixes = sorted(prefixes.items(), key=lambda p: -len(p[0]))

    def _prefix(self, path: str) -> tuple[str, dict[str, Endpoint]] | None:
        for prefix, methods in self._prefixes:
            if path.startswith(prefix) and len(path) > len(prefix):
                return prefix, methods
        return None

    def match(self, path: str, method: str) -> Endpoint:
        """The endpoint for `method` on `path`; raises the 404 or 405 (with Allow) otherwise."""
        methods = self._paths.get(path)
        if methods is None and path.endswith("/"):
            methods = self._paths.get(path.rstrip("/"))
        if methods is None and self._prefixes:
            found = self._prefix(path)
            methods = found[1] if found else None
        if methods is None:
            raise no_route(path)
        endpoint = methods.get(method)
        if endpoint is None:
            raise wrong_method(method, path, ", ".join(methods))
        return endpoint

    def label(self, path: str) -> str:
        """The metrics label of a request path: a known route, else "other" (no client-chosen series)."""
        if path in self._paths:
            return path
        if path.endswith("/") and path.rstrip("/") in self._paths:  # served as the route (match)
            return path.rstrip("/")
        found = self._prefix(path) if self._prefixes else None
        return found[0] if found else "other"

    def __contains__(self, path: str) -> bool:
        return path in self._paths
