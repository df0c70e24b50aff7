"""What the deployment-file tests share: the repository root, the parsers they need, the metrics contract."""

from __future__ import annotations

import importlib
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"

# Every sample name the gateway exports on GET /metrics, with its labels (`le` on histogram buckets).
# The Grafana dashboard may use these and nothing else.
EXPECTED_METRICS: dict[str, frozenset[str]] = {
    "erproxy_requests_total": frozenset({"route", "model", "status", "key"}),
    "erproxy_request_duration_seconds_bucket": frozenset({"route", "le"}),
    "erproxy_request_duration_seconds_sum": frozenset({"route"}),
    "erproxy_request_duration_seconds_count": frozenset({"route"}),
    "erproxy_upstream_duration_seconds_bucket": frozenset({"kind", "replica", "le"}),
    "erproxy_upstream_duration_seconds_sum": frozenset({"kind", "replica"}),
    "erproxy_upstream_duration_seconds_count": frozenset({"kind", "replica"}),
    "erproxy_overhead_duration_seconds_bucket": frozenset({"route", "le"}),
    "erproxy_overhead_duration_seconds_sum": frozenset({"route"}),
    "erproxy_overhead_duration_seconds_count": frozenset({"route"}),
    "erproxy_in_flight_requests": frozenset(),
    "erproxy_rejections_total": frozenset({"reason"}),
    "erproxy_upstream_healthy": frozenset({"kind", "replica"}),
    "erproxy_upstream_in_flight": frozenset({"kind", "replica"}),
    "erproxy_inputs_total": frozenset({"model"}),
    "erproxy_documents_total": frozenset({"model"}),
    "erproxy_tokens_total": frozenset({"model", "kind"}),
    "erproxy_key_tokens_total": frozenset({"key", "model"}),
    "erproxy_usage_record_failures_total": frozenset(),
    "erproxy_cache_items_total": frozenset({"kind", "result"}),
    "erproxy_auth_failures_total": frozenset({"reason"}),
    "erproxy_auth_throttled_total": frozenset(),
    "erproxy_key_file_ok": frozenset(),
    "erproxy_key_file_last_good_load_timestamp_seconds": frozenset(),
}
REJECTION_REASONS = {"rate_limit", "concurrency", "token_limit"}


def declared_metrics() -> dict[str, frozenset[str]]:
    """Every sample name the gateway's registry declares (Metrics and the usage recorder), with its labels."""
    from prometheus_client.metrics import MetricWrapperBase

    from erproxy.metrics import Metrics
    from erproxy.usage import Usage

    metrics = Metrics()
    usage = Usage(store=None, registry=metrics.registry)  # type: ignore[arg-type]
    out: dict[str, frozenset[str]] = {}
    for owner in (metrics, usage):
        for metric in vars(owner).values():
            if not isinstance(metric, MetricWrapperBase):
                continue
            labels = frozenset(metric._labelnames)
            if metric._type == "counter":
                out[metric._name + "_total"] = labels
            elif metric._type == "histogram":
                out[metric._name + "_bucket"] = labels | {"le"}
                out[metric._name + "_sum"] = out[metric._name + "_count"] = labels
            else:
                out[metric._name] = labels
    return out

INSTALL_HINT = "install the dev dependencies: .venv/bin/python -m pip install -r requirements-dev.txt"


def require(module: str, package: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        pytest.fail(f"the Python package {package!r} is missing ({INSTALL_HINT})", pytrace=False)


# Dockerfile instructions through the official BuildKit parser (PyPI `dockerfile`): the image tests
# check them, the compose tests read the image's ENV.
@lru_cache(maxsize=1)
def _instructions() -> tuple:
    dockerfile = require("dockerfile", "dockerfile")
    return tuple(dockerfile.parse_file(str(DOCKERFILE)))


def instructions(cmd: str | None = None) -> list:
    return [i for i in _instructions() if cmd is None or i.cmd == cmd]


def dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for inst in instructions("ENV"):
        values = list(inst.value)
        env.update(zip(values[0::2], values[1::2]))
    return env
