"""The API documentation: /openapi.json (OpenAPI 3.1 from the route table), /docs (Swagger UI served by
the gateway itself), / redirecting there; all public, all gone with DOCS=false.

The page in a real browser and schemathesis against the document: tests/process/test_docs_browser.py,
tests/process/test_openapi_schemathesis.py.
"""

import re

import pytest
from openapi_spec_validator import validate
from pydantic import BaseModel

from erproxy.errors import ApiError
from erproxy.openapi import openapi_document
from erproxy.routing import Route, RouteTable

DOCS_PATHS = ["/openapi.json", "/docs", "/docs/swagger-ui.css", "/docs/swagger-ui-bundle.js", "/docs/init.js", "/"]


async def test_openapi_json_is_valid_openapi_31_and_needs_no_key(gateway):
    r = await gateway.get("/openapi.json")
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    doc = r.json()
    assert doc["openapi"] == "3.1.0"
    validate(doc)  # openapi-spec-validator picks the 3.1 schema from the version field


async def test_every_api_route_is_documented_with_schemas_examples_errors_and_security(gateway):
    doc = (await gateway.get("/openapi.json")).json()
    table: RouteTable = gateway.app.routes
    # the docs' own routes (GET); POST / is TEI's default route, an API route
    api = [r for r in table.routes if not (r.path in ("/openapi.json", "/docs", "/docs/", "/") and r.methods == ("GET",))]
    assert {r.path for r in api} <= set(doc["paths"])
    assert not {"/openapi.json", "/docs"} & set(doc["paths"]) and "get" not in doc["paths"]["/"]
    assert set(doc["components"]["securitySchemes"]) == {"bearer", "api_key", "access_token"}
    assert doc["components"]["securitySchemes"]["api_key"] == {
        "type": "apiKey", "in": "query", "name": "api_key", "description": "`?api_key=<key>`"}
    for r in api:
        for method in r.methods:
            op = doc["paths"][r.path][method.lower()]
            assert op["summary"] and op["operationId"]
            if r.public:
                assert op["security"] == []
            else:
                assert op["security"] == [{"bearer": []}, {"api_key": []}, {"access_token": []}]
                assert {"401", "429", "500"} <= set(op["responses"])
            if r.request_model is not None:
                body = op["requestBody"]["content"]["application/json"]
                assert "example" in body
                assert {"400", "413", "502"} <= set(op["responses"])
            for status, answer in op["responses"].items():
                if status != "200":
                    schema = answer["content"]["application/json"]["schema"]
                    assert "#/components/schemas/Error" in str(schema), (r.path, status)
    emb = doc["paths"]["/v1/embeddings"]["post"]
    assert emb["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/EmbeddingsRequest"}
    assert emb["responses"]["200"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/EmbeddingsResponse"}
    assert emb["responses"]["200"]["content"]["application/json"]["example"]["object"] == "list"
    assert "examples" in doc["components"]["schemas"]["EmbeddingsRequest"]


async def test_docs_page_and_assets_come_from_the_gateway(gateway):
    page = await gateway.get("/docs")
    assert page.status_code == 200 and page.headers["content-type"] == "text/html; charset=utf-8"
    html = page.text
    assert not re.search(r"(https?:)?//[a-z]", html)  # no CDN, no absolute URL: it works offline
    urls = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert urls and all(u.startswith("/docs/") for u in urls)
    types = {"css": "text/css", "js": "text/javascript", "png": "image/png"}
    for u in urls:
        r = await gateway.get(u)
        assert r.status_code == 200 and r.content, u
        assert r.headers["content-type"].startswith(types[u.rsplit(".", 1)[1]]), u
    init = (await gateway.get("/docs/init.js")).text
    assert 'url: "/openapi.json"' in init and "validatorUrl: null" in init
    assert (await gateway.get("/docs/")).text == html


async def test_root_redirects_to_docs(gateway):
    r = await gateway.get("/")
    assert r.status_code == 307 and r.headers["location"] == "/docs"


async def test_docs_need_no_key_even_a_wrong_one(gateway):
    for path in DOCS_PATHS:
        r = await gateway.get(path, headers={"Authorization": "Bearer wrong"})
        assert r.status_code in (200, 307), path


@pytest.mark.parametrize("path", ["/docs/nope.js", "/docs/../erproxy/app.py", "/docs/swagger-editor.js"])
async def test_only_the_page_files_are_served(gateway, path):
    r = await gateway.get(path)
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


async def test_docs_false_turns_every_docs_route_off(make_gateway):
    gw = await make_gateway(DOCS="false")
    for path in DOCS_PATHS:
        r = await gw.get(path)
        if path == "/":  # only TEI's default route is left there, and it takes POST
            assert r.status_code == 405 and r.headers["allow"] == "POST", path
        else:
            assert r.status_code == 404 and r.json()["error"]["code"] == "not_found", path
    assert (await gw.get("/health")).status_code == 200


def test_a_route_added_anywhere_is_documented_from_its_fields():
    class Ping(BaseModel):
        model_config = {"json_schema_extra": {"examples": [{"text": "hi"}]}}
        text: str

    async def handler(req):
        raise ApiError(500, "x", type="server_error")

    doc = openapi_document([Route("/v1/ping", ("POST",), handler, summary="Ping", request_model=Ping,
                                  response_model=Ping, tags=("ping",), responses={418: "A teapot."})])
    validate(doc)
    op = doc["paths"]["/v1/ping"]["post"]
    assert op["summary"] == "Ping" and op["tags"] == ["ping"]
    assert op["requestBody"]["content"]["application/json"]["example"] == {"text": "hi"}
    assert op["responses"]["418"]["description"] == "A teapot."
    assert "Ping" in doc["components"]["schemas"]
