"""Delivering results to the application (issue #20): rate, finish-to-call latency, write cost.

    python bench/delivery.py                       # about a minute on 2 cores
    python bench/delivery.py --orders 20000 --latency-rates 20,200,max --seconds 20
    python bench/delivery.py --dsn 'postgresql://postgres@localhost/postgres'

Three measurements, on a fresh database each (the reference table, install.sql
rendered for the reference actions: approve for done, reject and refund for
failed, the tenant copied into each entry), the relay as the daemon builds it
(production timing, the actions' default limits: 8 requests under way, 100
orders a request) and the fake application (``order_monitor.demo.
application_api``, each id in its own transaction, 4 connections, as the
reference application does it) in a process of its own:

* **rate**: N results written through the write function (batches of 500, as
  the writer does; 80 % done, 20 % failed, 10 tenants), then the relay
  started: deliveries/s = N / (outbox empty - relay started).
* **latency**: results written at a steady rate (20/s, half the rate the run
  above measured, and all of it: the most the application takes, where a
  queue builds up by construction), the relay woken after each
  COMMIT as the writer wakes it; latency = the application's receipt of the
  request carrying an order (``time.time()`` in its process) - the COMMIT of
  that order's result (``time.time()`` right after it returned, here).
* **write**: the write path with and without delivery configured: results/s
  through the write function (batches of 500 on one connection) on two
  databases, one installed for no action, one for the reference actions,
  alternated over the repeats; the ratio is the cost of recording the outbox
  entry in the same transaction. Twice: on a fresh table, and on one
  VACUUM ANALYZEd as autovacuum leaves a real one (the planner's statistics
  change the write function's plan).

The load average before and after is in the output: the machine may be shared.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import os
import signal
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import psycopg
from aiohttp import web
from common import (
    BENCH,
    REFERENCE_DDL,
    machine,
    percentile,
    run_header,
    say,
    write_report,
)
from psycopg import sql

from order_monitor import logs, schema
from order_monitor.config import Layout, OutcomeWrites
from order_monitor.db import ManagedConnection
from order_monitor.delivery.relay import Relay, RelayTiming
from order_monitor.delivery.sender import build_senders
from order_monitor.delivery.store import OutboxStore
from order_monitor.demo.application_api import (
    ApplicationApi,
    Recorded,
    prepare_application_tables,
    reference_actions,
)
from order_monitor.embedded import throwaway_postgres
from order_monitor.metrics import Metrics

TOKEN = "bench-app-token"
WRITES = OutcomeWrites(deliver=("done", "failed"), deliver_columns=("tenantId",))
#: The writer's batch: results per write-function call.
WRITE_BATCH = 500
TENANTS = [uuid.UUID(int=0xBE0C0000 + n) for n in range(10)]
OUTBOX = schema.Names(Layout()).outbox
WRITE_FUNCTION = schema.Names(Layout()).write_function


# --- the application, in a process of its own ----------------------------------------


class Stamped(list[Recorded]):
    """ApplicationApi.requests that also notes when each order first arrived."""

    def __init__(self) -> None:
        super().__init__()
        self.first: dict[str, float] = {}

    def append(self, item: Recorded) -> None:
        at = time.time()
        ids = item.json.get("ids") if isinstance(item.json, dict) else None
        for order_id in ids or ():
            self.first.setdefault(str(order_id), at)
        super().append(item)


async def serve_application(dsn: str) -> None:
    """``--serve-application DSN``: the fake application and a stats port; READY <app> <stats>."""
    api = ApplicationApi(dsn, token=TOKEN)
    stamped = Stamped()
    api.requests = stamped

    async def received(request: web.Request) -> web.Response:
        return web.json_response({"requests": len(stamped), "first": stamped.first})

    stats = web.Application()
    stats.router.add_get("/received", received)
    runner = web.AppRunner(stats, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    stats_port = runner.addresses[0][1]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with api.running() as url:
        sys.stdout.write(f"READY {url} http://127.0.0.1:{stats_port}\n")
        sys.stdout.flush()
        await stop.wait()
    await runner.cleanup()


class Application:
    """The fake application in a subprocess, on one database."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.process: subprocess.Popen[str] | None = None
        self.url = self.stats = ""

    def __enter__(self) -> Application:
        self.process = subprocess.Popen(
            [sys.executable, str(BENCH / "delivery.py"), "--serve-application", self.dsn],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line.startswith("READY "):
            raise RuntimeError(f"the fake application did not start: {line!r}")
        self.url, self.stats = line.split()[1:3]
        return self

    def __exit__(self, *exc: object) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)

    async def received(self) -> dict[str, Any]:
        async with (
            aiohttp.ClientSession() as session,
            session.get(self.stats + "/received") as response,
        ):
            result: dict[str, Any] = await response.json()
            return result


# --- the database -----------------------------------------------------------------------


class Databases:
    """Fresh databases on the server: the reference table, install.sql for given writes."""

    def __init__(self, admin_dsn: str) -> None:
        self.admin_dsn = admin_dsn
        self.made: list[str] = []

    def fresh(self, label: str, writes: OutcomeWrites) -> str:
        name = f"om_bench_dlv_{label}_{uuid.uuid4().hex[:6]}"
        with psycopg.connect(self.admin_dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        self.made.append(name)
        dsn = psycopg.conninfo.make_conninfo(self.admin_dsn, dbname=name)
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(REFERENCE_DDL.read_text().encode())
            for statement in schema.install_statements(Layout(), writes):
                conn.execute(statement.query)
            prepare_application_tables(conn)
        return dsn

    def drop_all(self) -> None:
        for name in reversed(self.made):
            with (
                contextlib.suppress(psycopg.Error),
                psycopg.connect(self.admin_dsn, autocommit=True) as conn,
            ):
                conn.execute(
                    sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
                )

    def describe(self) -> dict[str, str]:
        info = {}
        with psycopg.connect(self.admin_dsn, autocommit=True) as conn:
            for name in ("server_version", "shared_buffers", "synchronous_commit", "fsync"):
                row = conn.execute(sql.SQL("SHOW {}").format(sql.Identifier(name))).fetchone()
                info[name] = str(row[0]) if row else "?"
        return info


async def dispatch(conn: psycopg.AsyncConnection[Any], count: int) -> list[tuple[Any, ...]]:
    """*count* orders in flight: (id, reference, kind) each, 80 % to be done, 20 % failed."""
    cursor = await conn.execute(
        """INSERT INTO product_orders (provider_referans, "providerId", "externalStatus",
               "sentAt", "tenantId", "userId", "sellPriceAmount")
           SELECT 'b.' || g, 'bench', 'sent', now(), (%s::uuid[])[1 + g %% %s],
                  gen_random_uuid(), 10
           FROM generate_series(1, %s) g
           RETURNING id, provider_referans""",
        (TENANTS, len(TENANTS), count),
    )
    rows = await cursor.fetchall()
    return [(oid, ref, "failed" if n % 5 == 0 else "done") for n, (oid, ref) in enumerate(rows)]


async def write(conn: psycopg.AsyncConnection[Any], batch: Sequence[tuple[Any, ...]]) -> int:
    """One write-function call (its own transaction): the daemon's writer's statement."""
    n = len(batch)
    cursor = await conn.execute(
        sql.SQL("SELECT count(*) FROM {}(%s, %s, %s, %s, %s, %s, %s)").format(WRITE_FUNCTION),
        (
            [b[0] for b in batch],
            [b[1] for b in batch],
            ["bench"] * n,
            [b[2] for b in batch],
            ["PIN-BENCH"] * n,
            ["İşlem tamamlandı"] * n,
            ["İşlem tamamlandı"] * n,
        ),
    )
    row = await cursor.fetchone()
    assert row is not None
    return int(row[0])


async def undelivered(conn: psycopg.AsyncConnection[Any]) -> int:
    cursor = await conn.execute(sql.SQL("SELECT count(*) FROM {}").format(OUTBOX))
    row = await cursor.fetchone()
    assert row is not None
    return int(row[0])


@contextlib.asynccontextmanager
async def relay_running(dsn: str, app_url: str) -> AsyncIterator[Relay]:
    """The relay as the daemon builds it (its own connection, production timing)."""
    conn = ManagedConnection(dsn, "delivery")
    actions = reference_actions(app_url, TOKEN)
    async with aiohttp.ClientSession() as session:
        relay = Relay(
            conn,
            OutboxStore(Layout()),
            actions,
            build_senders(actions, session),
            metrics=Metrics(),
            timing=RelayTiming(),
        )
        task = asyncio.create_task(relay.run(), name="relay")
        try:
            yield relay
        finally:
            relay.stop()
            await asyncio.wait_for(task, 60)
            await conn.close()


# --- the measurements -------------------------------------------------------------------


async def rate_run(dbs: Databases, orders: int) -> dict[str, Any]:
    dsn = dbs.fresh("rate", WRITES)
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        batch = await dispatch(conn, orders)
        for start in range(0, orders, WRITE_BATCH):
            await write(conn, batch[start : start + WRITE_BATCH])
        assert await undelivered(conn) == orders
        with Application(dsn) as app:
            started = time.perf_counter()
            async with relay_running(dsn, app.url):
                while await undelivered(conn):  # noqa: ASYNC110 - polling the database
                    await asyncio.sleep(0.02)
                seconds = time.perf_counter() - started
            received = await app.received()
    return {
        "orders": orders,
        "seconds": seconds,
        "deliveries_per_s": orders / seconds,
        "requests": received["requests"],
        "orders_per_request": orders / max(received["requests"], 1),
    }


async def latency_run(dbs: Databases, rate: float, seconds: float) -> dict[str, Any]:
    dsn = dbs.fresh(f"lat{int(rate)}", WRITES)
    count = max(1, round(rate * seconds))
    committed: dict[str, float] = {}
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        orders = await dispatch(conn, count)
        with Application(dsn) as app:
            async with relay_running(dsn, app.url) as relay:
                # A tick of at most 50 ms: what is due by then is one write, as
                # the writer batches what is ready.
                tick = min(0.05, 1.0 / rate)
                begun = time.perf_counter()
                written = 0
                while written < count:
                    due = min(count, int((time.perf_counter() - begun) * rate) + 1)
                    if due > written:
                        batch = orders[written:due]
                        await write(conn, batch)
                        at = time.time()
                        for order in batch:
                            committed[str(order[0])] = at
                        relay.wake()  # the writer's on_delivery hook
                        written = due
                    next_at = begun + written / rate
                    await asyncio.sleep(max(0.0, min(tick, next_at - time.perf_counter())))
                offered = count / (time.perf_counter() - begun)
                deadline = time.monotonic() + max(60.0, seconds * 4)
                while await undelivered(conn):
                    if time.monotonic() > deadline:
                        raise RuntimeError("the outbox did not empty in time")
                    await asyncio.sleep(0.02)
            received = await app.received()
    first: dict[str, float] = received["first"]
    missing = set(committed) - set(first)
    assert not missing, f"{len(missing)} orders never reached the application"
    latencies = [first[oid] - at for oid, at in committed.items()]
    return {
        "rate": rate,
        "offered_per_s": offered,
        "orders": count,
        "requests": received["requests"],
        "p50_ms": percentile(latencies, 0.5) * 1000,
        "p99_ms": percentile(latencies, 0.99) * 1000,
        "max_ms": max(latencies) * 1000,
    }


async def prepared(
    dbs: Databases, orders: int, writes: OutcomeWrites, label: str, *, analyzed: bool
) -> tuple[str, list[tuple[Any, ...]]]:
    """A database installed for *writes*, *orders* in flight, checkpointed (and analyzed)."""
    dsn = dbs.fresh(label, writes)
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        batch = await dispatch(conn, orders)
        if analyzed:
            # As autovacuum leaves a real table: the planner then has statistics.
            await conn.execute("VACUUM ANALYZE product_orders")
        with contextlib.suppress(psycopg.errors.InsufficientPrivilege):
            await conn.execute("CHECKPOINT")  # neither run pays for the other's dirty pages
    return dsn, batch


async def write_run(dsn: str, batch: Sequence[tuple[Any, ...]], delivering: bool) -> float:
    """Results/s through the write function, batches of WRITE_BATCH on one connection."""
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        started = time.perf_counter()
        written = 0
        for start in range(0, len(batch), WRITE_BATCH):
            written += await write(conn, batch[start : start + WRITE_BATCH])
        seconds = time.perf_counter() - started
        assert written == len(batch)
        assert await undelivered(conn) == (len(batch) if delivering else 0)
    return len(batch) / seconds


async def write_path(
    dbs: Databases, orders: int, repeats: int, *, analyzed: bool
) -> dict[str, Any]:
    runs = []
    for i in range(repeats):
        # Both databases ready before either is timed, then timed back to back,
        # alternating which goes first, so neither always meets a warmer server.
        plain = await prepared(dbs, orders, OutcomeWrites(), f"wp{i}", analyzed=analyzed)
        delivering = await prepared(dbs, orders, WRITES, f"wd{i}", analyzed=analyzed)
        if i % 2:
            with_outbox = await write_run(*delivering, delivering=True)
            without = await write_run(*plain, delivering=False)
        else:
            without = await write_run(*plain, delivering=False)
            with_outbox = await write_run(*delivering, delivering=True)
        runs.append({"without": without, "with": with_outbox, "ratio": with_outbox / without})
        say(f"  write path: {without:,.0f}/s without, {with_outbox:,.0f}/s with delivery")
    median = sorted(runs, key=lambda r: r["ratio"])[len(runs) // 2]
    return {
        "orders": orders,
        "analyzed": analyzed,
        "batch": WRITE_BATCH,
        "without_per_s": median["without"],
        "with_per_s": median["with"],
        "ratio": median["ratio"],
        "runs": runs,
    }


async def measure(dbs: Databases, args: argparse.Namespace) -> dict[str, Any]:
    say(f"rate: {args.orders:,} written results, then the relay")
    rates = []
    for _ in range(args.repeats):
        rates.append(r := await rate_run(dbs, args.orders))
        say(f"  {r['deliveries_per_s']:,.0f} deliveries/s, {r['orders_per_request']:.0f}/request")
    best = statistics.median(r["deliveries_per_s"] for r in rates)
    latencies = []
    for text in args.latency_rates.split(","):
        rate = best * float(text.removesuffix("max") or 1) if text.endswith("max") else float(text)
        say(f"latency at {rate:,.0f} results/s for {args.seconds:g} s")
        result = await latency_run(dbs, rate, args.seconds)
        result["label"] = text
        say(f"  p50 {result['p50_ms']:.0f} ms, p99 {result['p99_ms']:.0f} ms")
        latencies.append(result)
    paths = []
    for analyzed in (False, True):
        state = "an analyzed" if analyzed else "a fresh"
        say(f"write path: {args.write_orders:,} results on {state} table, with and without")
        paths.append(await write_path(dbs, args.write_orders, args.repeats, analyzed=analyzed))
    return {
        "rate": {"median_deliveries_per_s": best, "runs": rates},
        "latency": latencies,
        "write_path": paths,
    }


def table(results: dict[str, Any], report: dict[str, Any]) -> str:
    m = report["machine"]
    rate = results["rate"]
    runs = ", ".join(f"{r['deliveries_per_s']:,.0f}" for r in rate["runs"])
    lines = [
        f"delivery bench, {report['started']}: {report['command']}",
        f"machine: {m.get('cpu_model', '?')}, {m['cpus_usable']} usable CPUs; load average"
        f" {' '.join(f'{x:.2f}' for x in m['loadavg_start'])} at start,"
        f" {' '.join(f'{x:.2f}' for x in m['loadavg_end'])} at the end",
        f"postgres: {report['server']} {report['postgres'].get('server_version', '?')}",
        "",
        f"deliveries/s (N={rate['runs'][0]['orders']:,}, median of {len(rate['runs'])}):"
        f" {rate['median_deliveries_per_s']:,.0f} ({runs};"
        f" {rate['runs'][0]['orders_per_request']:.0f} orders/request)",
    ]
    for lat in results["latency"]:
        lines.append(
            f"finish → application call at {lat['rate']:,.0f}/s"
            f" ({lat['label']}, {lat['orders']:,} orders, offered {lat['offered_per_s']:,.0f}/s):"
            f" p50 {lat['p50_ms']:.0f} ms, p99 {lat['p99_ms']:.0f} ms, max {lat['max_ms']:.0f} ms"
        )
    for w in results["write_path"]:
        state = "analyzed table" if w["analyzed"] else "fresh table"
        lines.append(
            f"write path, {state} (N={w['orders']:,}, batches of {w['batch']}, median of"
            f" {len(w['runs'])}): {w['without_per_s']:,.0f} results/s without delivery,"
            f" {w['with_per_s']:,.0f} with ({w['ratio']:.0%})"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--orders", type=int, default=10_000, help="results a rate run (10000)")
    parser.add_argument(
        "--latency-rates",
        default="20,0.5max,max",
        help="results/s for the latency runs; 'max' is the measured rate, '0.5max' half of it"
        " (default 20,0.5max,max)",
    )
    parser.add_argument("--seconds", type=float, default=15.0, help="a latency run (15)")
    parser.add_argument(
        "--write-orders", type=int, default=50_000, help="results a write-path run (50000)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="rate and write runs (3)")
    parser.add_argument("--dsn", help="an existing server (may CREATE DATABASE); default: embedded")
    parser.add_argument(
        "--out", type=Path, help="results file (default bench/results/delivery-<ts>.json)"
    )
    parser.add_argument("--serve-application", metavar="DSN", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_application:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(serve_application(args.serve_application))
        return 0

    started = dt.datetime.now(dt.UTC)
    host = machine()
    log_file = open(os.devnull, "w", encoding="utf-8")  # noqa: SIM115 - closed below
    logs.configure("info", "json", log_file)
    with contextlib.ExitStack() as stack:
        admin = args.dsn or stack.enter_context(throwaway_postgres())
        dbs = Databases(admin)
        try:
            results = asyncio.run(measure(dbs, args))
            postgres = dbs.describe()
        finally:
            dbs.drop_all()
            log_file.close()
    report = {**run_header(started, host, postgres, dsn=args.dsn), **results}
    out = write_report(report, started, out=args.out, prefix="delivery-")
    text = table(results, report)
    out.with_suffix(".txt").write_text(text)
    sys.stdout.write(text)
    print(f"written: {out} (and .txt)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
