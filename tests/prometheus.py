"""Read a /metrics answer in tests: every sample by (name, sorted labels)."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

Samples = dict[tuple[str, tuple], float]


def samples_of(response) -> Samples:
    """The samples of a /metrics response (checked to be Prometheus text)."""
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    samples = {}
    for fam in text_string_to_metric_families(response.text):
        for s in fam.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)
