"""A Route carries its own documentation (the contract openapi.py and other route authors rely on)."""

from pydantic import BaseModel

from erproxy.routing import Route, RouteTable


async def handler(req):
    return "ok"


class Body(BaseModel):
    text: str


def test_route_takes_documentation_fields_by_keyword_and_old_calls_still_work():
    plain = Route("/a", ("GET",), handler, public=True)
    assert (plain.summary, plain.request_model, plain.response_model, plain.tags, plain.responses) == (
        "", None, None, (), None)
    doc = Route("/b", ("POST",), handler, summary="Do b", request_model=Body, response_model=Body,
                tags=("b",), responses={422: "Not processable"})
    assert doc.request_model is Body and doc.tags == ("b",) and doc.responses == {422: "Not processable"}


def test_route_table_keeps_its_routes_in_order():
    routes = [Route("/a", ("GET",), handler), Route("/b", ("POST",), handler, summary="B")]
    table = RouteTable(routes)
    assert table.routes == tuple(routes)
    assert table.match("/b", "POST").handler is handler
