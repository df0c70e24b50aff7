"""Property-based tests of the whole API from its own /openapi.json (schemathesis), against a gateway
process in front of the fake vLLM: no answer is a 5xx, every status is one the document declares
for the operation, and every JSON answer conforms to the declared schema. Requests that break the
document (negative mode) must also be refused with a 4xx.

Bounded and repeatable: a modest number of examples per operation, derandomized (the same cases
on every run), no deadline (the first request of an operation may wait on a connection).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import httpx
import pytest
import schemathesis
from schemathesis import GenerationMode
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.checks import negative_data_rejection, not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance, status_code_conformance

from tests.procs import Gateway, Proc, gateway_env, make_key_file, start_gateway

MAX_EXAMPLES = 30
CHECKS = [not_a_server_error, status_code_conformance, response_schema_conformance]


@pytest.fixture(scope="module")
def fuzzed_gateway(tmp_path_factory: pytest.TempPathFactory, fake_embed: Proc, fake_rerank: Proc
                   ) -> Iterator[Gateway]:
    d = tmp_path_factory.mktemp("fuzzed_gw")
    # A high rate limit: hundreds of generated requests must not turn into 429s.
    env = gateway_env(d, fake_embed.url, fake_rerank.url, RATE_LIMIT="1000000/minute")
    keys = make_key_file(Path(env["API_KEYS_FILE"]))
    proc = start_gateway(d, env)
    yield Gateway(proc, env, keys)
    proc.stop()


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=lambda m: m.value)
def test_api_answers_as_documented(fuzzed_gateway: Gateway, mode: GenerationMode):
    """Positive: valid requests as the document declares them. Negative: requests that break it (wrong
    types, missing fields), which must get a documented 4xx in the error shape, never a 5xx."""
    doc = httpx.get(fuzzed_gateway.url + "/openapi.json", timeout=10).raise_for_status().json()
    schema = schemathesis.openapi.from_dict(doc)
    # schemathesis' pytest loader (from_fixture) does not run under pytest 9, so each operation's
    # strategy is driven by hypothesis here, with the same checks.
    failures: list[str] = []
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == sum(len(methods) for methods in doc["paths"].values())
    if mode is GenerationMode.NEGATIVE:  # only a body can be broken: GET operations take no parameters
        operations = [op for op in operations if op.body]
    for op in operations:
        @given(case=op.as_strategy(generation_mode=mode))
        @settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])
        def check(case):
            case.call_and_validate(base_url=fuzzed_gateway.url, headers=fuzzed_gateway.auth(), timeout=30,
                                   checks=checks)

        checks = CHECKS + ([negative_data_rejection] if mode is GenerationMode.NEGATIVE else [])

        try:
            check()
        except Exception as e:  # noqa: BLE001 - every operation is tried; all failures reported together
            failures.append(f"{op.label}: {e}")
    assert not failures, "\n\n".join(failures)
