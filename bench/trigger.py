"""Issue #10: our trigger must not throttle the application's commits.

    python bench/trigger.py              # the issue's figures: ~15 min on 2 cores
    python bench/trigger.py --quick      # 3 s runs, two rounds: a smoke test, not figures
    python bench/trigger.py --dsn postgresql://postgres@db.example/postgres

Prints a table and writes ``bench/results/trigger-<timestamp>.json``.

The application is pgbench (its own processes, 16 connections, full speed,
``-M prepared``) against ``product_orders`` on a real server (default: the
local PostgreSQL at ``postgresql://postgres@127.0.0.1:5432/test``, a role that
may CREATE DATABASE; the throwaway databases are dropped at the end). Three
variants of the same table, side by side:

* ``v2``: our objects as ``sql/install.sql`` installs them (schema version 2:
  NOTIFY while the daemon holds its idle lock, the UNLOGGED inbox while it is
  busy), with the daemon running in this process, as deployed between checks:
  its policy's first check is an hour away and its periodic sweep a day away,
  so during a run it only takes announced orders in;
* ``off``: the same database and daemon, our two triggers disabled (``ALTER
  TABLE ... DISABLE TRIGGER``): the application's own cost;
* ``v1``: ``tests/integration/fixtures/install_v1.sql`` (the last version 1
  release: a NOTIFY per order) on a database of its own, with a bare LISTEN
  session taking the notifications.

Forms of the application's write: ``insert`` (a new dispatched order per
transaction), ``update`` (one of N undispatched rows is dispatched: reference,
"externalStatus" and "sentAt" set; the trigger fires on every one) and
``unrelated`` (``SET "lastSyncAt" = now()`` on one of N dispatched rows: the
trigger's ``UPDATE OF``/``WHEN`` keeps it out). Before every run the table is
reset to the same state (emptied, or reloaded with N rows, vacuumed) and a
CHECKPOINT taken, so no run inherits another's dead rows or WAL. Variants are
alternated within each round and the order reversed every other round
(``v2 off v1``, ``v1 off v2``, ...), so a slow drift of the machine falls on
each alike; ratios are taken within a round, medians over rounds.

After every run the benchmark checks that nothing was missed: every row in
flight in the table after a ``v2`` run must have been offered to the daemon's
scheduler (by NOTIFY or from the inbox), every one after a ``v1`` run must
have been notified to the LISTEN session, and ``off`` and ``unrelated`` runs
must have announced nothing.

Latency at a fixed rate: pgbench ``-R 500 -c 8 -l`` (per-transaction logs);
average and p99, for the three variants, insert and update forms.

``--diagnose`` adds a fourth variant, ``nodaemon``: our objects on a third
database with no daemon, so every order goes to the inbox and stays there
(the trigger's own cost, apart from what the daemon's reads cost).

COMMIT to the provider's first request: ``bench/common.py``'s
``commit_to_request`` (``bench/app_writer.py`` processes insert and stamp
each COMMIT, ``bench/fake_server.py`` stamps each request, the daemon runs
with ``initial_delay=0``, idle when the writers start) at 20/s (below the
handoff's busy rate: by NOTIFY), 200/s (one writer), 1,000/s (four writers
sharing one timetable) and the maximum: ``--max-writers`` writers (default 4), one
connection each, committing one order per transaction as fast as they can;
the rate they reach is reported.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import psycopg

# bench/common.py: bench/ is on sys.path, this file being run as a script.
from common import (
    BENCH,
    REFERENCE_DDL,
    Fake,
    Server,
    commit_to_request,
    cpu_seconds,
    daemon_settings,
    machine,
    percentile,
    running,
    say,
    until_idle,
    write_report,
)
from psycopg import sql

import order_monitor
from order_monitor import logs, schema
from order_monitor.config import Layout
from order_monitor.daemon import Daemon
from order_monitor.engine.policy import BackoffPolicy
from order_monitor.engine.scheduler import Scheduler
from order_monitor.metrics import counter_total

ROOT = BENCH.parent
V1_INSTALL = ROOT / "tests" / "integration" / "fixtures" / "install_v1.sql"
DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/test"
LAYOUT = Layout()
NAMES = schema.Names(LAYOUT)
V2_TRIGGERS = (NAMES.insert_trigger_name, NAMES.update_trigger_name)

GOALS = {
    "throughput_ratio_min": 0.95,
    "latency_ratio_max": 1.05,
    "commit_to_request_p50_ms_low_rates": 5.0,
    "commit_to_request_p99_ms": 50.0,
}

VARIANTS = ("v2", "off", "v1")
#: --diagnose adds it: our objects with no daemon, so every order goes to the
#: inbox and stays there; the trigger's own cost, without the daemon's reads.
DIAGNOSTIC = "nodaemon"
VARIANT_TITLES = {
    "v2": "v2 (ours)",
    "off": "no trigger",
    "v1": "v1 (NOTIFY/row)",
    DIAGNOSTIC: "v2, no daemon",
}
FORMS = ("insert", "update", "unrelated")
LATENCY_FORMS = ("insert", "update")
FORM_TITLES = {
    "insert": "dispatch INSERT",
    "update": "dispatch UPDATE",
    "unrelated": 'unrelated UPDATE ("lastSyncAt")',
}

# The application's statements. The providerId is the one the daemon's
# provider serves, so every announced order is one the daemon would check.
SCRIPTS = {
    "insert": (
        'INSERT INTO product_orders ("providerId", "externalStatus", "sentAt", provider_referans)\n'
        "    VALUES ('bench', 'sent', now(), md5(random()::text));\n"
    ),
    # The row goes from not sent (reference NULL) to in flight: the update
    # trigger's WHEN holds. A row drawn twice gets a new reference while in
    # flight, which fires it as well (a re-dispatch).
    "update": (
        "\\set n random(1, {rows})\n"
        "UPDATE product_orders SET provider_referans = md5(random()::text),\n"
        '    "externalStatus" = \'sent\', "sentAt" = now()\n'
        '    WHERE "orderNo" = :n;\n'
    ),
    # On rows in flight, so that only UPDATE OF keeps the trigger out.
    "unrelated": (
        "\\set n random(1, {rows})\n"
        'UPDATE product_orders SET "lastSyncAt" = now() WHERE "orderNo" = :n;\n'
    ),
}


# --- the databases ------------------------------------------------------------------------


def order_no_index(dsn: str) -> None:
    """The application finds an order by its number (the reference DDL has no index on it)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute('CREATE UNIQUE INDEX product_orders_order_no ON product_orders ("orderNo")')


def install_v1(server: Server, psql: str) -> str:
    """A database with the table and the last version 1 install, applied by psql as a DBA does."""
    dsn = server.empty("trig_v1")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(REFERENCE_DDL.read_text().encode())
    subprocess.run(
        [psql, "-X", "-q", "-v", "ON_ERROR_STOP=1", "-f", str(V1_INSTALL), dsn],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    order_no_index(dsn)
    return dsn


def reset(dsn: str, form: str, rows: int, *, inbox: bool = False) -> None:
    """The table in the state a run of *form* starts from, vacuumed, after a CHECKPOINT.

    Rows are loaded with triggers off (session_replication_role): nobody is
    told about them, and the daemon, whose sweep is a day away, never sees them.
    """
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("TRUNCATE product_orders")
        if inbox:
            conn.execute(sql.SQL("TRUNCATE {}").format(NAMES.inbox))
        if form in ("update", "unrelated"):
            with conn.transaction():
                conn.execute("SET LOCAL session_replication_role = replica")
                if form == "update":
                    conn.execute(
                        """INSERT INTO product_orders ("orderNo", "providerId")
                           SELECT g, 'bench' FROM generate_series(1, %s) g""",
                        (rows,),
                    )
                else:
                    conn.execute(
                        """INSERT INTO product_orders
                               ("orderNo", "providerId", provider_referans, "externalStatus",
                                "sentAt")
                           SELECT g, 'bench', 'w.' || g, 'sent', now()
                           FROM generate_series(1, %s) g""",
                        (rows,),
                    )
        conn.execute("VACUUM ANALYZE product_orders")
        conn.execute("CHECKPOINT")


def set_triggers(dsn: str, enabled: bool) -> None:
    verb = sql.SQL("ENABLE" if enabled else "DISABLE")
    with psycopg.connect(dsn, autocommit=True) as conn:
        for trigger in V2_TRIGGERS:
            conn.execute(
                sql.SQL("ALTER TABLE {table} {verb} TRIGGER {trigger}").format(
                    table=NAMES.table, verb=verb, trigger=sql.Identifier(trigger)
                )
            )


async def in_flight_ids(dsn: str) -> set[int]:
    """Every order in flight in the table, as the daemon keys them (the UUID's integer)."""
    query = sql.SQL("SELECT {id} FROM {table} WHERE {predicate}").format(
        id=sql.Identifier(LAYOUT.columns.id),
        table=NAMES.table,
        predicate=schema.in_flight_predicate(LAYOUT),
    )
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cursor = await conn.execute(query)
        return {row[0].int for row in await cursor.fetchall()}


async def inbox_ids(dsn: str) -> list[int]:
    """The order ids waiting in the inbox table (duplicates kept)."""
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cursor = await conn.execute(sql.SQL("SELECT order_id FROM {}").format(NAMES.inbox))
        return [row[0].int for row in await cursor.fetchall()]


# --- who hears about orders --------------------------------------------------------------


class MissedOrders(RuntimeError):
    pass


class OfferLog(Scheduler):
    """The daemon's own Scheduler, noting every order offered to it (measuring only)."""

    def __init__(self) -> None:
        super().__init__()
        self.offered: set[int] = set()

    def offer(
        self, order: int, due: float, *, group: str | None = None, opens: float | None = None
    ) -> bool:
        self.offered.add(order)
        return super().offer(order, due, group=group, opens=opens)


class BareListener:
    """A session that LISTENs on the v1 database and keeps every payload (an order id)."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.received: set[int] = set()
        self.notifications = 0

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[BareListener]:
        conn = await psycopg.AsyncConnection.connect(self.dsn, autocommit=True)
        await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(LAYOUT.channel)))

        async def consume() -> None:
            async for notify in conn.notifies():
                self.notifications += 1
                self.received.add(uuid.UUID(notify.payload).int)

        task = asyncio.create_task(consume(), name="v1-listener")
        try:
            yield self
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await conn.close()


# --- pgbench ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Load:
    """One pgbench invocation's shape."""

    clients: int
    threads: int
    seconds: float
    rate: float | None = None  # -R: a fixed arrival rate (tps), else full speed


def pgbench_command(
    pgbench: str, dsn: str, script: Path, load: Load, log_prefix: Path | None
) -> list[str]:
    command = [
        pgbench,
        "--no-vacuum",
        "--protocol=prepared",
        f"--client={load.clients}",
        f"--jobs={load.threads}",
        f"--time={max(1, round(load.seconds))}",
        f"--file={script}",
    ]
    if load.rate is not None:
        command.append(f"--rate={load.rate:g}")
    if log_prefix is not None:
        command += ["--log", f"--log-prefix={log_prefix}"]
    return [*command, dsn]


def summary_value(output: str, starts: str) -> str:
    for line in output.splitlines():
        if line.startswith(starts):
            return line[len(starts) :].strip()
    raise RuntimeError(f"pgbench printed no {starts!r} line:\n{output}")


async def pgbench_run(
    pgbench: str, dsn: str, script: Path, load: Load, log_dir: Path | None = None
) -> dict[str, Any]:
    """Run pgbench without blocking the event loop (the daemon runs in it)."""
    prefix = log_dir / "txn" if log_dir is not None else None
    process = await asyncio.create_subprocess_exec(
        *pgbench_command(pgbench, dsn, script, load, prefix),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await process.communicate()
    output = out.decode()
    if process.returncode != 0:
        raise RuntimeError(f"pgbench failed ({process.returncode}): {err.decode()}{output}")
    result: dict[str, Any] = {
        "tps": float(summary_value(output, "tps = ").split()[0]),
        "transactions": int(summary_value(output, "number of transactions actually processed:")),
        "failed": int(summary_value(output, "number of failed transactions:").split()[0]),
        "pgbench_latency_avg_ms": float(summary_value(output, "latency average = ").split()[0]),
    }
    if prefix is not None:
        result.update(transaction_log(sorted(prefix.parent.glob(prefix.name + ".*"))))
    return result


def transaction_log(files: list[Path]) -> dict[str, Any]:
    """Average and percentiles from pgbench's per-transaction logs (``-l``).

    A line is ``client transaction time_us script epoch_s epoch_us
    [schedule_lag_us]``. With ``-R`` pgbench measures ``time`` from the
    transaction's *scheduled* start, so it includes the wait for a busy
    connection (what an application with a fixed arrival rate sees);
    ``service`` is ``time`` less that lag: the transaction alone.
    """
    latency: list[float] = []
    service: list[float] = []
    for path in files:
        for line in path.read_text().splitlines():
            fields = line.split()
            if len(fields) < 6 or fields[2] == "skipped":
                continue
            total = int(fields[2]) / 1000
            lag = int(fields[6]) / 1000 if len(fields) > 6 else 0.0
            latency.append(total)
            service.append(total - lag)
    if not latency:
        raise RuntimeError("pgbench wrote no per-transaction log")
    return {
        "logged": len(latency),
        "latency_avg_ms": statistics.fmean(latency),
        "latency_p50_ms": percentile(latency, 0.5),
        "latency_p99_ms": percentile(latency, 0.99),
        "latency_max_ms": max(latency),
        "service_avg_ms": statistics.fmean(service),
        "service_p99_ms": percentile(service, 0.99),
    }


# --- one run ------------------------------------------------------------------------------


@dataclass
class Bench:
    pgbench: str
    variants: tuple[str, ...]
    v2_dsn: str
    v1_dsn: str
    nodaemon_dsn: str | None
    daemon: Daemon
    offers: OfferLog
    v1: BareListener
    rows: int
    scripts: dict[str, Path]
    catch_up_within: float

    def dsn(self, variant: str) -> str:
        if variant == DIAGNOSTIC:
            assert self.nodaemon_dsn is not None
            return self.nodaemon_dsn
        return self.v1_dsn if variant == "v1" else self.v2_dsn


def metric(daemon: Daemon, name: str) -> float:
    m = daemon.metrics
    readers: dict[str, Callable[[], float]] = {
        "notified": lambda: counter_total(m.notifications, result="accepted"),
        "from_inbox": lambda: counter_total(m.inbox_taken),
        "to_busy": lambda: counter_total(m.handoff_switches, to="busy"),
        "to_idle": lambda: counter_total(m.handoff_switches, to="idle"),
    }
    return readers[name]()


async def one_run(
    b: Bench, variant: str, form: str, load: Load, logs_in: Path | None
) -> dict[str, Any]:
    dsn = b.dsn(variant)
    await asyncio.to_thread(reset, dsn, form, b.rows, inbox=variant == DIAGNOSTIC)
    if variant in ("v2", "off"):
        await asyncio.to_thread(set_triggers, dsn, variant == "v2")
    idle_at_start = await until_idle(b.daemon, 15.0)
    b.offers.offered.clear()
    b.v1.received.clear()
    before = {name: metric(b.daemon, name) for name in ("notified", "from_inbox", "to_busy")}
    v1_before = b.v1.notifications
    cpu_before = cpu_seconds()
    result = await pgbench_run(b.pgbench, dsn, b.scripts[form], load, logs_in)
    ended = time.monotonic()
    # This process: the daemon (it serves the v2 database only) and the v1 listener.
    result["bench_process_cpu_s"] = cpu_seconds() - cpu_before
    result.update(variant=variant, form=form, daemon_idle_at_start=idle_at_start)
    result.update(await account(b, variant, form, ended))
    result["notified"] = metric(b.daemon, "notified") - before["notified"]
    result["from_inbox"] = metric(b.daemon, "from_inbox") - before["from_inbox"]
    result["switches_to_busy"] = metric(b.daemon, "to_busy") - before["to_busy"]
    if variant == "v1":
        result["notified"] = b.v1.notifications - v1_before
    elif variant == DIAGNOSTIC:
        result["notified"] = result["from_inbox"] = 0.0  # nobody listens or reads there
    # The orders of this run are gone with the next reset: the daemon need not keep them.
    for order in b.offers.offered:
        b.daemon.scheduler.forget(order)
    b.offers.offered.clear()
    b.v1.received.clear()
    return result


async def account(b: Bench, variant: str, form: str, ended: float) -> dict[str, Any]:
    """Did every order the trigger announced reach whoever listens? (and nothing else)."""
    # Triggers disabled, or a write they keep out: nothing may be announced.
    announces = variant != "off" and form != "unrelated"
    expected = await in_flight_ids(b.dsn(variant)) if announces else set()
    # Filled as announcements arrive (the same set objects throughout); with
    # no daemon, the inbox itself (its rows are committed with the orders').
    if variant == DIAGNOSTIC:
        got = set(await inbox_ids(b.dsn(variant)))
    else:
        got = b.v1.received if variant == "v1" else b.offers.offered
    deadline = ended + b.catch_up_within
    while time.monotonic() < deadline:
        if expected <= got:
            break
        await asyncio.sleep(0.02)
    caught_up = time.monotonic() - ended
    if not expected:
        # Give stray announcements a moment to show before saying there were none.
        await asyncio.sleep(0.5)
    out: dict[str, Any] = {
        "orders_in_flight": len(expected),
        "orders_announced": len(got & expected),
        "orders_missed": len(expected - got),
        "unexpected_announcements": len(got - expected),
        "catch_up_s": caught_up if expected else 0.0,
    }
    if variant in ("v2", "off"):
        out["inbox_left"] = len(await inbox_ids(b.v2_dsn))
    return out


# --- the parts ----------------------------------------------------------------------------


def alternations(rounds: int, variants: tuple[str, ...]) -> list[tuple[str, ...]]:
    """v2 off v1, then v1 off v2, and so on: drift falls on each variant alike."""
    return [variants if r % 2 == 0 else tuple(reversed(variants)) for r in range(rounds)]


async def series(
    b: Bench, forms: tuple[str, ...], load: Load, rounds: int, logged: bool
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for form in forms:
        runs: list[dict[str, Any]] = []
        for number, order in enumerate(alternations(rounds, b.variants)):
            for variant in order:
                with tempfile.TemporaryDirectory(prefix="om-trig-") as tmp:
                    run = await one_run(b, variant, form, load, Path(tmp) if logged else None)
                run["round"] = number
                runs.append(run)
                say(
                    f"  {form} {variant:>8} round {number + 1}: {run['tps']:,.0f} tps"
                    + (
                        f", avg {run['latency_avg_ms']:.2f} / p99 {run['latency_p99_ms']:.2f} ms"
                        if logged
                        else ""
                    )
                    + f"; {run['orders_announced']:,}/{run['orders_in_flight']:,} orders heard"
                    + (f", {run['orders_missed']} MISSED" if run["orders_missed"] else "")
                )
                if run["orders_missed"]:
                    # Figures from a run that lost orders measure a broken daemon.
                    raise MissedOrders(
                        f"{run['orders_missed']:,} orders missed in a {variant} {form} run; "
                        "the daemon's log (kept) says why"
                    )
        out[form] = summarise(runs, b.variants, logged)
    return out


def summarise(
    runs: list[dict[str, Any]], variants: tuple[str, ...], logged: bool
) -> dict[str, Any]:
    def figures(variant: str, key: str) -> list[float]:
        return [r[key] for r in sorted(runs, key=lambda r: r["round"]) if r["variant"] == variant]

    keys = ["tps"] + (["latency_avg_ms", "latency_p99_ms"] if logged else [])
    summary: dict[str, Any] = {"runs": runs, "medians": {}, "ratios": {}}
    for variant in variants:
        summary["medians"][variant] = {k: statistics.median(figures(variant, k)) for k in keys}
    for variant in (v for v in variants if v != "off"):
        for key in keys:
            # Within a round: the two runs are minutes apart at most.
            per_round = [
                a / b for a, b in zip(figures(variant, key), figures("off", key), strict=True)
            ]
            summary["ratios"][f"{variant}_{key}"] = {
                "per_round": per_round,
                "median": statistics.median(per_round),
            }
    return summary


async def trigger_series(plan: Plan, server: Server, fake: Fake) -> dict[str, Any]:
    v2_dsn = server.fresh("trig_v2")
    await asyncio.to_thread(order_no_index, v2_dsn)
    v1_dsn = await asyncio.to_thread(install_v1, server, plan.psql)
    nodaemon_dsn = None
    if DIAGNOSTIC in plan.variants:
        nodaemon_dsn = server.fresh("trig_nod")
        await asyncio.to_thread(order_no_index, nodaemon_dsn)
    offers = OfferLog()
    # As deployed between checks: the first check an hour away, the sweep a
    # day away, so the daemon only takes announced orders in during a run.
    policy = BackoffPolicy(initial_delay=3600.0)
    settings = daemon_settings(v2_dsn, fake.url, policy)
    settings = replace(settings, sweep_interval=86400.0)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="om-trig-scripts-") as tmp:
        scripts = {}
        for form, text in SCRIPTS.items():
            scripts[form] = Path(tmp) / f"{form}.sql"
            scripts[form].write_text(text.format(rows=plan.rows))
        async with (
            running(settings, offers) as daemon,
            BareListener(v1_dsn).running() as v1,
        ):
            b = Bench(
                pgbench=plan.pgbench,
                variants=plan.variants,
                v2_dsn=v2_dsn,
                v1_dsn=v1_dsn,
                nodaemon_dsn=nodaemon_dsn,
                daemon=daemon,
                offers=offers,
                v1=v1,
                rows=plan.rows,
                scripts=scripts,
                catch_up_within=60.0,
            )
            if "throughput" in plan.parts:
                load = Load(plan.clients, plan.threads, plan.seconds)
                say(f"throughput: {plan.clients} connections, full speed, {plan.seconds:g} s a run")
                results["throughput"] = await series(b, plan.forms, load, plan.rounds, False)
            if "latency" in plan.parts:
                load = Load(plan.latency_clients, plan.threads, plan.seconds, plan.latency_rate)
                say(f"latency: {plan.latency_rate:g} tps, {plan.latency_clients} connections")
                forms = tuple(f for f in plan.forms if f in LATENCY_FORMS)
                results["latency"] = await series(b, forms, load, plan.rounds, True)
    return results


async def commit_series(plan: Plan, server: Server, fake: Fake) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for rate, writers in [*plan.commit_rates, (None, plan.max_writers)]:
        what = f"{rate:g}/s, {writers} writer(s)" if rate else f"max, {writers} writers flat out"
        say(f"COMMIT -> first request: {what}, {plan.commit_seconds:g} s")
        result = await commit_to_request(server, fake, rate, plan.commit_seconds, writers=writers)
        say(
            f"  {result['achieved_rate']:,.0f} orders/s reached;"
            f" p50 {result['p50_ms']:.1f} ms, p99 {result['p99_ms']:.1f} ms"
        )
        out.append(result)
    return out


# --- report -------------------------------------------------------------------------------


def verdicts(results: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for form, s in results.get("throughput", {}).items():
        ratio = s["ratios"]["v2_tps"]["median"]
        out[f"throughput_{form}"] = {
            "target": f"v2 >= {GOALS['throughput_ratio_min']:.0%} of no trigger",
            "measured": f"{ratio:.1%} (median of {len(s['ratios']['v2_tps']['per_round'])} rounds)",
            "met": ratio >= GOALS["throughput_ratio_min"],
        }
    for form, s in results.get("latency", {}).items():
        for key, label in (("latency_avg_ms", "average"), ("latency_p99_ms", "p99")):
            ratio = s["ratios"][f"v2_{key}"]["median"]
            out[f"latency_{form}_{label}"] = {
                "target": f"v2 {label} within {GOALS['latency_ratio_max'] - 1:.0%} of no trigger",
                "measured": f"{ratio:.1%} of it",
                "met": ratio <= GOALS["latency_ratio_max"],
            }
    commit = results.get("commit_to_request", [])
    low = [r for r in commit if r["rate"] is not None]
    if low:
        worst = max(r["p50_ms"] for r in low)
        out["commit_to_request_p50_low_rates"] = {
            "target": f"p50 < {GOALS['commit_to_request_p50_ms_low_rates']:g} ms"
            " at the fixed rates",
            "measured": ", ".join(f"{r['p50_ms']:.1f} ms at {r['rate']:g}/s" for r in low),
            "met": worst < GOALS["commit_to_request_p50_ms_low_rates"],
        }
    if commit:
        worst = max(r["p99_ms"] for r in commit)
        out["commit_to_request_p99"] = {
            "target": f"p99 < {GOALS['commit_to_request_p99_ms']:g} ms at every rate",
            "measured": ", ".join(
                f"{r['p99_ms']:.1f} ms at {r['achieved_rate']:,.0f}/s" for r in commit
            ),
            "met": worst < GOALS["commit_to_request_p99_ms"],
        }
    runs = [
        run
        for part in ("throughput", "latency")
        for s in results.get(part, {}).values()
        for run in s["runs"]
    ]
    if runs:
        missed = sum(r["orders_missed"] + r["unexpected_announcements"] for r in runs)
        out["no_order_missed"] = {
            "target": "every order in flight after a run was announced to the daemon (v1: LISTEN)",
            "measured": f"{missed} missed or unexpected over {len(runs)} runs",
            "met": missed == 0,
        }
    return out


def ms(value: float) -> str:
    """Milliseconds in at most six characters (a saturated run's are in the thousands)."""
    return f"{value:.2f}" if value < 100 else f"{value:.0f}"


def table(report: dict[str, Any]) -> str:
    m, pg, plan = report["machine"], report["postgres"], report["plan"]
    variants: tuple[str, ...] = tuple(plan["variants"])
    others = [v for v in variants if v != "off"]
    r = report["results"]
    lines = [
        f"order-monitor trigger benchmark (issue #10), {report['started']}",
        f"machine: {m['cpus']} CPUs ({m.get('cpu_model', '?')}), {m.get('memory_gib', '?')} GiB,"
        f" PostgreSQL {pg['server_version']} (synchronous_commit {pg['synchronous_commit']},"
        f" fsync {pg['fsync']}), load average at start {m['loadavg_start'][0]:.2f}",
        f"pgbench {plan['clients']} connections ({plan['threads']} threads, prepared),"
        f" {plan['seconds']:g} s a run, {plan['rounds']} rounds alternating"
        f" {' / '.join(' '.join(o) for o in alternations(min(2, plan['rounds']), variants))}",
        "",
    ]
    head = f"{'':<36}" + "".join(f"{VARIANT_TITLES[v]:>17}" for v in variants)
    head += "".join(f"{v + '/none':>14}" for v in others)
    if "throughput" in r:
        lines += ["application tps, full speed (median)", head]
        for form, s in r["throughput"].items():
            med, ratios = s["medians"], s["ratios"]
            lines.append(
                f"{FORM_TITLES[form]:<36}"
                + "".join(f"{med[v]['tps']:>17,.0f}" for v in variants)
                + "".join(f"{ratios[v + '_tps']['median']:>14.1%}" for v in others)
            )
        lines.append("  each run (tps, by round):")
        for form, s in r["throughput"].items():
            for v in variants:
                figures = [run["tps"] for run in s["runs"] if run["variant"] == v]
                lines.append(f"    {form:<10}{v:<9}" + ", ".join(f"{x:,.0f}" for x in figures))
        lines.append("")
    if "latency" in r:
        lines += [
            f"latency at {plan['latency_rate']:g} tps, {plan['latency_clients']} connections,"
            " ms average / p99 (median)",
            head,
        ]
        for form, s in r["latency"].items():
            med, ratios = s["medians"], s["ratios"]
            cells = "".join(
                f"{ms(med[v]['latency_avg_ms']):>9} /{ms(med[v]['latency_p99_ms']):>6}"
                for v in variants
            )
            lines.append(
                f"{FORM_TITLES[form]:<36}{cells}"
                + "".join(f"{ratios[v + '_latency_avg_ms']['median']:>14.1%}" for v in others)
                + "  (average)"
            )
            lines.append(
                f"{'':<36}{'':>{17 * len(variants)}}"
                + "".join(f"{ratios[v + '_latency_p99_ms']['median']:>14.1%}" for v in others)
                + "  (p99)"
            )
        lines.append("  each run (average / p99 ms and the rate reached, by round):")
        for form, s in r["latency"].items():
            for v in variants:
                figures = [
                    f"{ms(run['latency_avg_ms'])} / {ms(run['latency_p99_ms'])}"
                    f" ({run['tps']:,.0f} tps)"
                    for run in s["runs"]
                    if run["variant"] == v
                ]
                lines.append(f"    {form:<10}{v:<9}" + ", ".join(figures))
        for form, s in r["latency"].items():
            for v in variants:
                reached = s["medians"][v]["tps"]
                if reached < 0.95 * plan["latency_rate"]:
                    lines.append(
                        f"  note: {form} {v} reached only {reached:,.0f} tps: it could not keep"
                        " up, so its latency includes waiting for a free connection"
                    )
        lines.append("")
    if "commit_to_request" in r:
        lines.append("COMMIT -> first provider request (v2, initial_delay=0)")
        for c in r["commit_to_request"]:
            asked = f"{c['rate']:g}/s asked" if c["rate"] is not None else "flat out"
            lines.append(
                f"  {asked:<14} {c['writers']} writer(s), {c['achieved_rate']:>7,.0f}/s reached,"
                f" {c['orders']:>7,} orders: p50 {c['p50_ms']:6.1f} ms, p99 {c['p99_ms']:6.1f} ms,"
                f" max {c['max_ms']:6.1f} ms; {c['notified']:,.0f} by NOTIFY,"
                f" {c['from_inbox']:,.0f} from the inbox"
            )
        lines.append("")
    runs = [
        run
        for part in ("throughput", "latency")
        for s in r.get(part, {}).values()
        for run in s["runs"]
    ]
    heard = [run for run in runs if run["variant"] == "v2" and run["orders_in_flight"]]
    if heard:
        lines.append(
            f"orders (v2 runs): {sum(x['orders_in_flight'] for x in heard):,} in flight,"
            f" {sum(x['orders_announced'] for x in heard):,} reached the daemon"
            f" ({sum(x['notified'] for x in heard):,.0f} notifications,"
            f" {sum(x['from_inbox'] for x in heard):,.0f} inbox rows taken),"
            f" slowest catch-up after a run {max(x['catch_up_s'] for x in heard):.2f} s"
        )
        lines.append("")
    for name, verdict in report["targets"].items():
        mark = {True: "met", False: "MISSED", None: "n/a"}[verdict["met"]]
        lines.append(f"target {name}: {verdict['target']}; measured {verdict['measured']}: {mark}")
    return "\n".join(lines)


# --- the run ------------------------------------------------------------------------------


@dataclass
class Plan:
    parts: list[str]
    variants: tuple[str, ...]
    forms: tuple[str, ...]
    rounds: int
    seconds: float
    clients: int
    threads: int
    latency_clients: int
    latency_rate: float
    rows: int
    commit_rates: list[tuple[float, int]]
    commit_seconds: float
    max_writers: int
    pgbench: str
    psql: str


PARTS = ["throughput", "latency", "commit"]


def plan_from(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Plan:
    quick = args.quick
    pgbench, psql = shutil.which(args.pgbench), shutil.which("psql")
    if pgbench is None or psql is None:
        parser.error("pgbench and psql must be on PATH (the PostgreSQL client programs)")
    parts = args.parts or PARTS
    forms = tuple(args.forms or FORMS)
    if set(parts) - set(PARTS) or set(forms) - set(FORMS):
        parser.error(f"--parts is a subset of {PARTS}, --forms of {list(FORMS)}")
    return Plan(
        parts=parts,
        variants=(*VARIANTS, DIAGNOSTIC) if args.diagnose else VARIANTS,
        forms=forms,
        rounds=args.rounds or (2 if quick else 3),
        seconds=args.seconds or (3.0 if quick else 12.0),
        clients=16,
        threads=2,
        latency_clients=8,
        latency_rate=500.0,
        rows=args.rows or (50_000 if quick else 200_000),
        # 20/s is below the handoff's busy rate (50/s): orders come by NOTIFY.
        # One connection reaches about 700 commits/s here: 1,000/s takes
        # four writers at 250/s each (slots interleaved).
        commit_rates=[(20.0, 1), (200.0, 1), (1000.0, 4)],
        commit_seconds=args.commit_seconds or (3.0 if quick else 15.0),
        max_writers=args.max_writers,
        pgbench=pgbench,
        psql=psql,
    )


async def run(plan: Plan, server: Server, fake: Fake) -> dict[str, Any]:
    results: dict[str, Any] = {}
    if "throughput" in plan.parts or "latency" in plan.parts:
        results.update(await trigger_series(plan, server, fake))
    if "commit" in plan.parts:
        results["commit_to_request"] = await commit_series(plan, server, fake)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="order-monitor: the trigger's cost to the application (issue #10)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    parser.add_argument("--quick", action="store_true", help="3 s runs, 2 rounds: a smoke test")
    parser.add_argument(
        "--dsn",
        default=DEFAULT_DSN,
        help=f"a role that may CREATE DATABASE (default {DEFAULT_DSN})",
    )
    parser.add_argument(
        "--parts",
        type=lambda s: [x.strip() for x in s.split(",") if x.strip()],
        help=f"comma-separated subset of {','.join(PARTS)} (default: all)",
    )
    parser.add_argument(
        "--forms",
        type=lambda s: [x.strip() for x in s.split(",") if x.strip()],
        help=f"comma-separated subset of {','.join(FORMS)} (default: all)",
    )
    parser.add_argument("--rounds", type=int, help="rounds of the three variants (default 3)")
    parser.add_argument("--seconds", type=float, help="seconds a pgbench run (default 12)")
    parser.add_argument("--rows", type=int, help="rows the update forms draw from (default 200k)")
    parser.add_argument(
        "--commit-seconds", type=float, help="seconds of each COMMIT->request run (default 15)"
    )
    parser.add_argument(
        "--max-writers",
        type=int,
        default=4,
        help="application connections committing flat out for the maximum rate (default 4)",
    )
    parser.add_argument(
        "--diagnose",
        action="store_true",
        help="add a fourth variant: our objects with no daemon (every order to the inbox, "
        "never read): the trigger's own cost, apart from the daemon's reads",
    )
    parser.add_argument("--pgbench", default="pgbench", help="the pgbench program")
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="the daemon's log level; logs go to a temporary file",
    )
    parser.add_argument(
        "--out", type=Path, help="results file (default bench/results/trigger-<ts>.json)"
    )
    args = parser.parse_args(argv)
    plan = plan_from(args, parser)

    package = Path(order_monitor.__file__).resolve().parent
    if package.parent != ROOT:
        say(f"note: order_monitor is imported from {package}, not this checkout (PYTHONPATH=$PWD?)")
    started = dt.datetime.now(dt.UTC)
    host = machine()
    handle, log_name = tempfile.mkstemp(prefix="om-trig-daemon-", suffix=".log")
    log_file = os.fdopen(handle, "w", encoding="utf-8")
    logs.configure(args.log_level, "json", log_file)
    fake = Fake()
    server = Server(args.dsn)
    try:
        server.setup()
        fake.start()
        results = asyncio.run(run(plan, server, fake))
        postgres = server.describe()
    except MissedOrders as exc:
        log_file.close()
        say(f"stopped: {exc}: {log_name}")
        return 1
    finally:
        fake.stop()
        server.drop_all()
        log_file.close()
    with open(log_name, encoding="utf-8") as written:
        log_lines = sum(1 for _ in written)
    os.unlink(log_name)
    pgbench_version = subprocess.run(
        [plan.pgbench, "--version"], capture_output=True, text=True, check=False
    ).stdout.strip()
    report = {
        "started": started.isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "order_monitor": str(package),
        "schema_version": schema.VERSION,
        "machine": {**host, "loadavg_end": os.getloadavg()},
        "postgres": postgres,
        "pgbench": pgbench_version,
        "daemon_log_lines": log_lines,
        "plan": plan.__dict__,
        "results": results,
        "targets": verdicts(results),
    }
    out = write_report(report, started, prefix="trigger-", out=args.out)
    print(table(report))
    print(f"\nwritten: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
