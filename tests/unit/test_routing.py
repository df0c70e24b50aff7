import pytest

from erproxy.errors import ApiError
from erproxy.routing import Route, RouteTable


async def health(req):
    return "health"


async def embed(req):
    return "embed"


TABLE = RouteTable([Route("/health", ("GET",), health, public=True), Route("/v1/embeddings", ("POST",), embed)])


def test_path_and_method_give_the_endpoint_with_a_trailing_slash_too():
    assert TABLE.match("/health", "GET").handler is health and TABLE.match("/health", "GET").public
    assert TABLE.match("/v1/embeddings/", "POST").handler is embed
    assert not TABLE.match("/v1/embeddings", "POST").public


def test_unknown_path_is_a_404_that_lists_the_routes():
    for path in ("/nope", "/", "/v1/embeddings/x"):
        with pytest.raises(ApiError) as e:
            TABLE.match(path, "GET")
        assert e.value.status == 404 and e.value.code == "not_found" and path in e.value.message


def test_wrong_method_is_a_405_with_allow():
    with pytest.raises(ApiError) as e:
        TABLE.match("/v1/embeddings/", "GET")
    assert e.value.status == 405 and e.value.code == "method_not_allowed"
    assert dict(e.value.headers) == {b"allow": b"POST"}
    assert e.value.message == "GET is not allowed on /v1/embeddings/; use POST."


def test_metric_labels_only_name_known_routes():
    assert TABLE.label("/health") == "/health"
    assert TABLE.label("/x\n") == "other" and TABLE.label("/x/") == "other"
    # served as the route (match strips a trailing slash), so counted as it
    assert TABLE.label("/v1/embeddings/") == "/v1/embeddings" and TABLE.label("/health//") == "/health"


def test_head_is_served_wherever_get_is():
    assert TABLE.match("/health", "HEAD") is TABLE.match("/health", "GET")
    with pytest.raises(ApiError) as e:
        TABLE.match("/v1/embeddings", "HEAD")
    assert e.value.status == 405 and dict(e.value.headers) == {b"allow": b"POST"}
