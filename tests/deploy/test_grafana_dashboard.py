"""deploy/grafana/erproxy-dashboard.json: every `expr` is parsed by a PromQL parser (PyPI
`promql-parser`), and every metric and label it uses must be one the gateway exports
(tests.deploy.common.EXPECTED_METRICS). The parser is a dev dependency (requirements-dev.txt); a
missing one fails these tests, never skips them.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from tests.deploy.common import EXPECTED_METRICS, REJECTION_REASONS, ROOT, declared_metrics, require

DASHBOARD = ROOT / "deploy" / "grafana" / "erproxy-dashboard.json"

GRAFANA_VARIABLES = re.compile(r"\$\{?__(rate_interval|interval|range)(_ms|_s)?\}?")


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def all_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out += panel.get("panels", [])          # panels inside collapsed rows
    return out


def exprs(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    return [(p.get("title", ""), t["expr"]) for p in all_panels(dashboard) for t in p.get("targets", [])]


def promql_usage(expr: str) -> tuple[set[str], list[str]]:
    """Parse `expr`; return the metric names it selects and the problems with its labels."""
    pp = require("promql_parser", "promql-parser")
    ast = pp.parse(GRAFANA_VARIABLES.sub("5m", expr))
    names: set[str] = set()
    problems: list[str] = []

    def selectors(node) -> list:
        found = []
        pp.walk(node, lambda n: found.append(n) if isinstance(n, pp.VectorSelector) else None)
        return found

    def visit(node) -> None:
        if isinstance(node, pp.VectorSelector):
            if not node.name:
                problems.append(f"selector without a metric name: {node}")
                return
            names.add(node.name)
            labels = EXPECTED_METRICS.get(node.name, frozenset())
            for m in node.matchers.matchers:
                if m.name not in labels:
                    problems.append(f"{node.name} has no label {m.name!r}")
                if node.name == "erproxy_rejections_total" and m.name == "reason" and m.op == pp.MatchOp.Equal:
                    if m.value not in REJECTION_REASONS:
                        problems.append(f"unknown rejection reason {m.value!r}")
        elif isinstance(node, pp.AggregateExpr) and node.modifier is not None:
            available = set().union(*(EXPECTED_METRICS.get(s.name, frozenset()) for s in selectors(node)))
            for label in node.modifier.labels:
                if label not in available:
                    problems.append(f"{node.op} by/without {label!r}: no metric inside has that label")
        elif isinstance(node, pp.BinaryExpr) and node.modifier is not None and node.modifier.matching is not None:
            available = set().union(*(EXPECTED_METRICS.get(s.name, frozenset()) for s in selectors(node)))
            for label in node.modifier.matching.labels:
                if label not in available:
                    problems.append(f"on/ignoring {label!r}: no metric on either side has that label")

    pp.walk(ast, visit)
    return names, problems


def test_the_metrics_contract_is_every_metric_the_gateway_declares() -> None:
    """A metric added to the gateway and not to EXPECTED_METRICS fails here; once listed, the dashboard
    test below fails until a panel shows it."""
    from erproxy.metrics import REFUSALS

    assert declared_metrics() == EXPECTED_METRICS
    assert set(REFUSALS.values()) == REJECTION_REASONS


def test_dashboard_metadata(dashboard: dict[str, Any]) -> None:
    assert 36 <= dashboard["schemaVersion"] <= 41
    assert dashboard["uid"] and dashboard["title"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    ds = variables["DS_PROMETHEUS"]
    assert (ds["type"], ds["query"]) == ("datasource", "prometheus")


def test_dashboard_panels_are_well_formed(dashboard: dict[str, Any]) -> None:
    panels = all_panels(dashboard)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in panels:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0, (p["title"], g)
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}, p["title"]
        assert p.get("targets"), f"panel {p['title']!r} has no query"
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${DS_PROMETHEUS}" and t["expr"].strip(), p["title"]


def test_dashboard_uses_only_exported_metrics_and_labels(dashboard: dict[str, Any]) -> None:
    used: set[str] = set()
    errors = []
    for title, expr in exprs(dashboard):
        names, problems = promql_usage(expr)
        assert names, f"{title}: {expr} selects no metric"
        unknown = names - set(EXPECTED_METRICS)
        if unknown:
            errors.append(f"{title}: unknown metric(s) {sorted(unknown)} in {expr}")
        errors += [f"{title}: {p} in {expr}" for p in problems]
        used |= names
    assert not errors, "\n".join(errors)
    # Every metric family the gateway exports is shown somewhere.
    family = lambda n: re.sub(r"_(bucket|sum|count)$", "", n)
    assert {family(n) for n in EXPECTED_METRICS} == {family(n) for n in used}


def test_dashboard_label_check_catches_mistakes() -> None:
    # The control for the test above: a wrong label or metric is reported.
    _, problems = promql_usage('sum by (replica) (rate(erproxy_requests_total{route="/v1/rerank"}[5m]))')
    assert problems == ["sum by/without 'replica': no metric inside has that label"]
    names, _ = promql_usage("erproxy_request_latency_seconds_bucket")
    assert names - set(EXPECTED_METRICS) == {"erproxy_request_latency_seconds_bucket"}
    with pytest.raises(Exception):
        promql_usage("sum(rate(erproxy_requests_total[5m])")


def test_dashboard_shows_the_required_views(dashboard: dict[str, Any]) -> None:
    all_exprs = " ".join(e for _, e in exprs(dashboard))
    compact = re.sub(r"\s+", "", all_exprs)
    for q in ("0.5", "0.95", "0.99"):
        assert f"histogram_quantile({q},sumby(le)(rate(erproxy_request_duration_seconds_bucket" in compact, q
    assert "histogram_quantile(0.99,sumby(le,route)(rate(erproxy_overhead_duration_seconds_bucket" in compact
    assert "sumby(le,kind,replica)(rate(erproxy_upstream_duration_seconds_bucket" in compact
    assert "sumby(route,status)(rate(erproxy_requests_total" in compact
    assert 'status=~"5.."' in all_exprs
    assert "topk(10,sumby(key)(rate(erproxy_requests_total" in compact
    assert "sumby(model,kind)(rate(erproxy_tokens_total" in compact
    assert "sumby(reason)(rate(erproxy_rejections_total" in compact
    tables = [p for p in all_panels(dashboard) if p["type"] == "table"]
    assert any("erproxy_upstream_healthy" in t["expr"] for p in tables for t in p["targets"]), "replica health table"
