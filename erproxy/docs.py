"""The API documentation the gateway serves itself: /openapi.json, the Swagger UI page at /docs, its
assets under /docs/, and / redirecting to /docs. All public (no key, no admission); absent with DOCS=false.

Swagger UI's files come from the PyPI package `swagger-ui-py` (Swagger UI 5, which renders OpenAPI
3.1) and are served from memory: the page fetches nothing from outside the gateway, so it works on
an offline host. The validator badge (a call to validator.swagger.io) is switched off.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Iterable

import orjson

from .asgi import Request, Response
from .errors import not_found
from .openapi import TITLE, openapi_document
from .routing import Route, RouteTable

DOCS = "/docs"
ASSETS = "/docs/"
OPENAPI = "/openapi.json"
# The files of the package's static folder the page uses, with their content types.
FILES = {
    "swagger-ui.css": b"text/css; charset=utf-8",
    "swagger-ui-bundle.js": b"text/javascript; charset=utf-8",
    "favicon-32x32.png": b"image/png",
    "favicon-16x16.png": b"image/png",
}
INIT_JS = b"""window.onload = function () {
  window.ui = SwaggerUIBundle({
    url: "/openapi.json",
    dom_id: "#swagger-ui",
    deepLinking: true,
    validatorUrl: null,
    persistAuthorization: false,
    tryItOutEnabled: false,
    presets: [SwaggerUIBundle.presets.apis],
    layout: "BaseLayout",
  });
};
"""
PAGE = f"""<!DOCTYPE html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>{TITLE}: API</title>
  <link rel="stylesheet" href="{ASSETS}swagger-ui.css">
  <link rel="icon" type="image/png" href="{ASSETS}favicon-32x32.png" sizes="32x32">
  <link rel="icon" type="image/png" href="{ASSETS}favicon-16x16.png" sizes="16x16">
</head>
<body>
  <div id="swagger-ui"></div>
  <script src="{ASSETS}swagger-ui-bundle.js"></script>
  <script src="{ASSETS}init.js"></script>
</body>
</html>
""".encode()


def swagger_ui_dir() -> Path:
    """The static folder of the installed swagger-ui-py package (found without importing it)."""
    spec = importlib.util.find_spec("swagger_ui")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("The API docs need the PyPI package swagger-ui-py (pip install -r requirements.txt), "
                           "or set DOCS=false.")
    return Path(next(iter(spec.submodule_search_locations))) / "static"


class Docs:
    """The handlers of the docs routes; the OpenAPI document and the files are built once, on first use."""

    def __init__(self, api_routes: Iterable[Route]) -> None:
        self.api_routes = tuple(api_routes)
        self.static = swagger_ui_dir()  # fails at start-up, not on the first page view
        missing = [f for f in FILES if not (self.static / f).is_file()]
        if missing:
            raise RuntimeError(f"swagger-ui-py's folder {self.static} lacks {', '.join(missing)}; reinstall it "
                               "or set DOCS=false.")
        self._openapi: bytes | None = None
        self._files: dict[str, tuple[bytes, bytes]] = {"init.js": (INIT_JS, b"text/javascript; charset=utf-8")}

    def openapi_bytes(self) -> bytes:
        if self._openapi is None:
            self._openapi = orjson.dumps(openapi_document(self.api_routes))
        return self._openapi

    async def openapi(self, req: Request) -> Response:
        return Response(200, self.openapi_bytes(), [(b"content-type", b"application/json")])

    async def page(self, req: Request) -> Response:
        return Response(200, PAGE, [(b"content-type", b"text/html; charset=utf-8"), (b"cache-control", b"no-cache")])

    async def asset(self, req: Request) -> Response:
        name = req.path[len(ASSETS):]
        found = self._files.get(name)
        if found is None:
            if name not in FILES:
                raise not_found(f"No file {req.path}. The API docs are at {DOCS}.")
            found = self._files[name] = ((self.static / name).read_bytes(), FILES[name])
        body, ctype = found
        return Response(200, body, [(b"content-type", ctype), (b"cache-control", b"public, max-age=3600")])

    async def root(self, req: Request) -> Response:
        return Response(307, b"", [(b"location", DOCS.encode()), (b"content-type", b"text/plain")])


def docs_routes(api_routes: Iterable[Route]) -> list[Route]:
    """The public routes of the docs, documenting `api_routes` (not themselves)."""
    d = Docs(api_routes)
    return [
        Route(OPENAPI, ("GET",), d.openapi, public=True),
        Route(DOCS, ("GET",), d.page, public=True),
        Route(ASSETS, ("GET",), d.asset, public=True, prefix=True),
        Route("/", ("GET",), d.root, public=True),
    ]


def with_docs(table: RouteTable, enabled: bool) -> RouteTable:
    """`table` plus the docs routes when `enabled` (DOCS), else `table` as it is (the docs answer 404)."""
    return RouteTable([*table.routes, *docs_routes(table.routes)]) if enabled else table
