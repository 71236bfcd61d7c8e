"""bench/trigger.py's verdicts and its decoding variant's place: issue #21's goals, judged.

``ours`` against no trigger: throughput >= 85 % (INSERT and UPDATE forms),
latency at 500 tps within +10 %; ``decoding``: >= 97 % and +3 %; both: the
first check late by at most 1 s p99. The decoding variant is in only on a
server with wal_level = logical, and the plan says why when it is not. No
database, no daemon.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

# The bench's scripts import their helpers as top-level modules (``common``).
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from trigger_bench.report import verdicts
from trigger_bench.setup import DECODING, DIAGNOSTIC, VARIANTS, Plan, with_decoding


def ratios(**medians: float) -> dict[str, Any]:
    return {"ratios": {k: {"median": v, "per_round": [v]} for k, v in medians.items()}, "runs": []}


def first_check(variant: str, p99: float) -> list[dict[str, Any]]:
    return [
        {
            "variant": variant,
            "p99_s": p99,
            "achieved_rate": 20.0,
            "missed": 0,
            "before_pull_window": 0,
            "orders": 60,
        }
    ]


def test_each_variant_is_judged_against_its_own_goal() -> None:
    results = {
        "throughput": {
            "insert": ratios(ours_tps=0.86, decoding_tps=0.96),
            "update": ratios(ours_tps=0.84, decoding_tps=0.98),
            "unrelated": ratios(ours_tps=0.50, decoding_tps=0.50),
        },
        "latency": {
            "insert": ratios(
                ours_latency_avg_ms=1.09,
                ours_latency_p99_ms=1.11,
                decoding_latency_avg_ms=1.02,
                decoding_latency_p99_ms=1.04,
            )
        },
        "first_check": first_check("ours", 0.9),
        "first_check_decoding": first_check(DECODING, 1.2),
    }
    met = {name: v["met"] for name, v in verdicts(results).items()}
    assert met["throughput_ours_insert"] is True
    assert met["throughput_ours_update"] is False
    assert met["throughput_decoding_insert"] is False
    assert met["throughput_decoding_update"] is True
    # The goal is the dispatch forms'; the unrelated form is shown, not judged.
    assert met["throughput_ours_unrelated"] is None
    assert met["throughput_decoding_unrelated"] is None
    assert met["latency_ours_insert_average"] is True
    assert met["latency_ours_insert_p99"] is False
    assert met["latency_decoding_insert_average"] is True
    assert met["latency_decoding_insert_p99"] is False
    assert met["first_check_late_p99_ours"] is True
    assert met["first_check_late_p99_decoding"] is False
    assert met["first_check_every_order_decoding"] is True


def test_without_the_decoding_variant_only_ours_is_judged() -> None:
    results = {"throughput": {"insert": ratios(ours_tps=0.9, v1_tps=0.3)}}
    assert list(verdicts(results)) == ["throughput_ours_insert"]


def plan(variants: tuple[str, ...]) -> Plan:
    return Plan(
        parts=["throughput"],
        variants=variants,
        forms=("insert",),
        rounds=1,
        seconds=1.0,
        clients=1,
        threads=1,
        latency_clients=1,
        latency_rate=1.0,
        rows=1,
        commit_rates=[],
        commit_seconds=1.0,
        max_writers=1,
        pgbench="pgbench",
        psql="psql",
        first_check_rates=[],
        first_check_seconds=1.0,
        initial_delay=5.0,
        busy_sizes=[1],
        busy_seconds=1.0,
        busy_warmup=1.0,
        busy_rate=1.0,
    )


@pytest.mark.parametrize("diagnose", [False, True])
def test_decoding_is_in_on_a_logical_server(diagnose: bool) -> None:
    base = (*VARIANTS, DIAGNOSTIC) if diagnose else VARIANTS
    got = with_decoding(plan(base), "logical", True)
    assert got.decoding
    assert not got.decoding_note
    assert got.variants == (*VARIANTS, DECODING, *((DIAGNOSTIC,) if diagnose else ()))


def test_decoding_is_left_out_and_said_so() -> None:
    replica = with_decoding(plan(VARIANTS), "replica", True)
    assert not replica.decoding
    assert replica.variants == VARIANTS
    assert "wal_level is replica, not logical" in replica.decoding_note
    refused = with_decoding(plan(VARIANTS), "logical", False)
    assert not refused.decoding
    assert refused.variants == VARIANTS
    assert "--no-decoding" in refused.decoding_note
