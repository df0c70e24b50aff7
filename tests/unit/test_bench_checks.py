"""The benchmark's verdicts on issue 15's goals (bench/bench.py: target_checks) from result rows."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import bench  # noqa: E402


def row(target: str, conns: int, rps: float, p50: float = 1.0, p99: float = 2.0) -> dict:
    return {"target": target, "connections": conns, "rps": rps, "p50_ms": p50, "p99_ms": p99,
            "socket_errors": 0, "non_2xx": 0, "connect_errors": 0, "read_errors": 0, "write_errors": 0,
            "timeouts": 0}


def verdicts(rows: list[dict]) -> dict[str, str]:
    return {c["target"]: c["status"] for c in bench.target_checks(rows)}


def test_the_floor_goals_are_judged_from_the_gateway_and_bare_rows() -> None:
    rows = [row("gateway-1w", 1, 300, p50=3.05), row("bare", 1, 310, p50=3.0),
            row("gateway-1w", 32, 3600), row("bare", 32, 4000),
            row("gateway-1w", 256, 3500, p99=80), row("bare", 256, 4000, p99=50),
            row("gateway-2w-redis", 32, 3000), row("gateway-2w-redis", 256, 3000),
            row("gateway-4w-2cores", 32, 6200), row("gateway-4w-2cores", 256, 5000)]
    v = verdicts(rows)
    assert v["features at the floor's cost: gateway >= 0.9x the bare floor at 32 connections"] == "met"
    assert v["features at the floor's cost: gateway >= 0.9x the bare floor at 256 connections"] == "not met"
    assert v["p99 at 256 connections <= 1.5x the floor's"] == "not met"  # 80 / 50 = 1.6
    assert v["p50 at 1 connection <= the floor's + 0.1 ms"] == "met"
    assert v["2 workers + Redis on one core >= 0.85x one worker"] == "not met"  # 3000 / 3600 at 32
    assert v["4 workers on 2 cores >= 1.7x one worker"] == "not met"  # 5000 / 3500 at 256


def test_the_shortfall_of_several_workers_is_broken_down_against_its_own_one_worker_rows() -> None:
    rows = [row("gateway-1w", 32, 4000), row("gateway-1w-redis", 32, 3900), row("bare", 32, 4200),
            row("bare-2w", 32, 3780), row("gateway-1w", 256, 4000), row("gateway-1w-redis", 256, 4100)]
    checks = {c["target"]: c for c in bench.target_checks(rows)}
    redis = checks["the Redis round trip alone: 1 worker + Redis vs 1 worker"]
    assert redis["status"] == "context" and "32 connections: 3900 vs 4000 req/s = 0.97x" in redis["detail"]
    assert "256 connections: 4100 vs 4000 req/s = 1.02x" in redis["detail"]
    shared = checks["sharing one core: the bare floor, 2 workers vs 1"]
    assert shared["status"] == "context" and shared["detail"] == "32 connections: 3780 vs 4200 req/s = 0.90x"


def test_worker_goals_show_each_rounds_ratio_beside_the_median_verdict() -> None:
    one = dict(row("gateway-1w", 32, 4000), rounds_rps=[4000, 3000, 5000])
    two = dict(row("gateway-2w-redis", 32, 3300), rounds_rps=[3200, 3300, 4500])
    unpaired = row("gateway-4w-2cores", 32, 6000)  # a single round: nothing to pair
    checks = {c["target"]: c for c in bench.target_checks([one, two, unpaired])}
    two_w = checks["2 workers + Redis on one core >= 0.85x one worker"]
    assert two_w["status"] == "not met"  # judged on the medians, 3300 / 4000; and 256 has no row
    assert two_w["detail"].startswith("32 connections: 3300 vs 4000 req/s = 0.82x (round by round 0.80x, 1.10x, "
                                      "0.90x); 256: no row")
    four_w = checks["4 workers on 2 cores >= 1.7x one worker"]["detail"]
    assert four_w.startswith("32 connections: 6000 vs 4000 req/s = 1.50x;")


def test_the_ceiling_of_four_workers_on_two_cores_comes_from_one_workers_cpu_per_request() -> None:
    one_32 = dict(row("gateway-1w", 32, 3400), proxy_cpu_pct=77.0, upstream_cpu_pct=19.0, load_cpu_pct=29.0)
    one_256 = dict(row("gateway-1w", 256, 3600), proxy_cpu_pct=82.0, upstream_cpu_pct=15.0, load_cpu_pct=25.0)
    checks = {c["target"]: c for c in bench.target_checks([one_32, one_256])}
    ceiling = checks["the most 2 cores allow 4 workers: 2 cores over one worker's CPU per request "
                     "(gateway + upstream + wrk)"]
    assert ceiling["status"] == "context"
    assert ceiling["detail"] == ("32 connections: 200 / (77 + 19 + 29) % = 1.60x; "
                                 "256 connections: 200 / (82 + 15 + 25) % = 1.64x")


def test_wrk_reports_its_own_cpu(tmp_path, monkeypatch) -> None:
    """run_wrk charges the CPU of the wrk it waited for (here a stand-in that spins, then prints a result)."""
    fake = tmp_path / "wrk"
    fake.write_text("#!/usr/bin/env python3\nimport time\nt = time.process_time()\n"
                    "while time.process_time() - t < 0.3: pass\n"
                    "print('BENCH_JSON {\"requests\": 10, \"duration_us\": 1000000, \"connect_errors\": 0, '\n"
                    "      '\"read_errors\": 0, \"write_errors\": 0, \"timeouts\": 0}')\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{bench.os.environ['PATH']}")
    r = bench.run_wrk("http://127.0.0.1:9", 1, 1, 5)
    assert 25 <= r["load_cpu_pct"] <= 60, r  # ~0.3 s of CPU over a 1 s run


def test_a_side_by_side_row_is_its_median_round_and_keeps_every_rounds_errors() -> None:
    rounds = [row("gateway-1w", 32, 4100), row("gateway-1w", 32, 2900), row("gateway-1w", 32, 3600)]
    rounds[0]["timeouts"] = rounds[0]["socket_errors"] = 3
    median = bench.median_row(rounds)
    assert median["rps"] == 3600 and median["rounds_rps"] == [4100, 2900, 3600]
    assert median["rounds_socket_errors"] == 3 and median["socket_errors"] == 0
    clean = bench.median_row([row("gateway-1w", 500, 3000), row("gateway-1w", 500, 3100)])
    at_500 = dict(median, connections=500)
    check = "zero socket errors / timeouts at 256 and 500 connections"
    assert verdicts([row("gateway-1w", 256, 3000), clean])[check] == "met"
    assert verdicts([row("gateway-1w", 256, 3000), at_500])[check] == "not met"  # an error in a round that lost
    failed = bench.median_row([row("bare", 32, 4000), {"target": "bare", "connections": 32, "error": "boom"}])
    assert failed["rps"] == 4000 and failed["error"].startswith("1 of 2 rounds failed: boom")


def test_missing_rows_are_not_applicable_not_met() -> None:
    v = verdicts([row("gateway-1w", 32, 3000)])
    assert v["features at the floor's cost: gateway >= 0.9x the bare floor at 32 connections"] == "n/a"
    assert v["4 workers on 2 cores >= 1.7x one worker"] == "n/a"
    assert "sharing one core: the bare floor, 2 workers vs 1" not in v  # context only where its rows are
