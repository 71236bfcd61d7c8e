"""The operator page's cost (issue #23): the refresh's reading, the term's scan, the render.

    python bench/page.py                          # 1k, 10k, 100k in flight: about 2 minutes
    python bench/page.py --sizes 100000 --finished 1000000
    python bench/page.py --dsn 'postgresql://postgres@localhost/postgres'

For each size N, a fresh database holds the reference table with
install.sql applied, N orders in flight over 5 provider ids, ``--finished``
orders finished long ago (a real table is mostly those) and 500 that gave
up within the day; then VACUUM ANALYZE, as autovacuum leaves a real table.
Measured, on the daemon's own statements (``order_monitor.page.reading``):

* **reading**: the statement every refresh runs (in flight per provider id
  with the oldest age, the listed give-ups by id, the outbox summary and
  dead letters), ``--repeats`` times: median and p95, the bytes of its
  result as psycopg receives them, and the plan's access to the table;
* **scan**: the read of the table for the give-ups of the day, made once per
  term as leader (a sequential scan by design: ``"lastSyncAt"`` has no index);
* **render**: the overview's HTML from that reading, in this process.

The page shares one reading per refresh interval (default 5 s) among every
viewer, so the database pays the reading's median once per interval.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import os
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg
from common import REFERENCE_DDL, machine, percentile, run_header, say, write_report
from psycopg import sql

from order_monitor import schema
from order_monitor.config import Layout, OutcomeWrites, Settings
from order_monitor.demo.application_api import reference_actions
from order_monitor.embedded import throwaway_postgres
from order_monitor.page.reading import PageStatements
from order_monitor.page.render import render
from order_monitor.page.view import DaemonFacts, Deliveries, Overview, gave_up_lines, provider_lines
from order_monitor.redaction import Secret

PROVIDER_IDS = ("znet", "barakat", "apstore", "json-1", "json-2")
GAVE_UP = 500


def fresh(admin: str, label: str, writes: OutcomeWrites) -> tuple[str, str]:
    name = f"om_bench_page_{label}_{uuid.uuid4().hex[:6]}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    dsn = psycopg.conninfo.make_conninfo(admin, dbname=name)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(REFERENCE_DDL.read_text().encode())
        for statement in schema.install_statements(Layout(), writes):
            conn.execute(statement.query)
    return name, dsn


def fill(dsn: str, in_flight: int, finished: int) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            """INSERT INTO product_orders (provider_referans, "providerId", "externalStatus",
                   "sentAt", status)
               SELECT 'f' || n, (%(ids)s::text[])[1 + n %% 5], 'done',
                      now() - interval '30 days', 'approved'
               FROM generate_series(1, %(finished)s) AS n""",
            {"ids": list(PROVIDER_IDS), "finished": finished},
        )
        conn.execute(
            """INSERT INTO product_orders (provider_referans, "providerId", "externalStatus",
                   "sentAt")
               SELECT 'w' || n, (%(ids)s::text[])[1 + n %% 5], 'sent',
                      now() - make_interval(secs => n %% 3600)
               FROM generate_series(1, %(n)s) AS n""",
            {"ids": list(PROVIDER_IDS), "n": in_flight},
        )
        conn.execute(
            """INSERT INTO product_orders (provider_referans, "providerId", "externalStatus",
                   "sentAt", "lastSyncAt", "lastMessage")
               SELECT 'g' || n, (%(ids)s::text[])[1 + n %% 5], 'manual_required',
                      now() - interval '2 days', now() - make_interval(secs => n * 60),
                      'order-monitor gave up after 8 checks'
               FROM generate_series(1, %(n)s) AS n""",
            {"ids": list(PROVIDER_IDS), "n": GAVE_UP},
        )
        conn.execute("VACUUM ANALYZE product_orders")


async def measure_size(
    admin: str, in_flight: int, finished: int, repeats: int, settings: Settings
) -> dict[str, Any]:
    name, dsn = fresh(admin, str(in_flight), settings.writes)
    try:
        started = time.perf_counter()
        fill(dsn, in_flight, finished)
        say(f"  {in_flight:,} in flight: table filled in {time.perf_counter() - started:.1f}s")
        statements = PageStatements(settings)
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            scans = []
            for _ in range(3):
                t = time.perf_counter()
                found = await statements.gave_up_within(conn, 86400.0)
                scans.append(time.perf_counter() - t)
            # Newest first, as the ledger gives them.
            ids = [order for order, _ in sorted(found, key=lambda f: f[1])][:1000]
            assert len(ids) == GAVE_UP, len(ids)
            readings = []
            reading = None
            for _ in range(repeats):
                t = time.perf_counter()
                reading = await statements.read(conn, ids)
                readings.append(time.perf_counter() - t)
            assert reading is not None
            assert reading.in_flight_total == in_flight, reading.in_flight_total
            assert reading.gave_up_count == GAVE_UP, reading.gave_up_count
            cursor = await conn.execute(
                sql.SQL("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {}").format(
                    statements.reading_statement
                ),
                statements.reading_parameters(ids),
            )
            row = await cursor.fetchone()
            assert row is not None
            plan = row[0][0]
            cursor = await conn.execute(
                statements.reading_statement,
                statements.reading_parameters(ids),
            )
            raw = await cursor.fetchone()
            assert raw is not None
            wire_bytes = sum(len(str(value)) for value in raw)
        renders = []
        now = dt.datetime.now(dt.UTC)
        for _ in range(repeats):
            t = time.perf_counter()
            lines, unserved = provider_lines(settings.providers, reading.in_flight, {}, {}, now)
            view = Overview(
                daemon=DaemonFacts(
                    "bench",
                    "leader",
                    False,
                    True,
                    "trigger",
                    "notify",
                    1.0,
                    300.0,
                    0.0,
                    in_flight,
                    0,
                    0.0,
                    now,
                    1.0,
                ),
                read_at=now,
                read_age_s=0.0,
                read_problem=None,
                providers=lines,
                unserved=unserved,
                in_flight_total=reading.in_flight_total,
                gave_up=gave_up_lines(reading.gave_up, settings.providers),
                gave_up_count=reading.gave_up_count,
                gave_up_note=None,
                deliveries=Deliveries(reading.outbox, reading.dead_letters, {})
                if reading.outbox is not None
                else None,
                refresh_s=5.0,
            )
            html = render("overview.html", view=view, refresh_s=5, version="x")
            renders.append(time.perf_counter() - t)
        return {
            "in_flight": in_flight,
            "finished": finished,
            "gave_up": GAVE_UP,
            "reading_ms_median": statistics.median(readings) * 1000,
            "reading_ms_p95": percentile(readings, 0.95) * 1000,
            "reading_result_bytes": wire_bytes,
            "reading_shared_hit_blocks": plan["Plan"].get("Shared Hit Blocks", 0),
            "reading_read_blocks": plan["Plan"].get("Shared Read Blocks", 0),
            "reading_table_access": sorted(_accesses(plan["Plan"])),
            "scan_ms_median": statistics.median(scans) * 1000,
            "render_ms_median": statistics.median(renders) * 1000,
            "html_bytes": len(html.encode()),
        }
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


def _accesses(node: dict[str, Any]) -> set[str]:
    found = set()
    if node.get("Relation Name") == "product_orders" or "product_orders" in node.get(
        "Index Name", ""
    ):
        found.add(f"{node['Node Type']} {node.get('Index Name', '')}".strip())
    for child in node.get("Plans", ()):
        found |= _accesses(child)
    return found


def table(results: list[dict[str, Any]], report: dict[str, Any]) -> str:
    lines = [
        f"page bench, {report['started']}: {report['command']}",
        f"postgres: {report['server']} {report['postgres']}",
        "",
        "| in flight | finished rows | reading p50 / p95 | result | table access | "
        "scan (once a term) | render |",
        "| ---: | ---: | ---: | ---: | --- | ---: | ---: |",
    ]
    for r in results:
        lines.append(
            f"| {r['in_flight']:,} | {r['finished']:,} | {r['reading_ms_median']:.1f} /"
            f" {r['reading_ms_p95']:.1f} ms | {r['reading_result_bytes']:,} B |"
            f" {'; '.join(r['reading_table_access'])} | {r['scan_ms_median']:.0f} ms |"
            f" {r['render_ms_median']:.1f} ms |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="1000,10000,100000", help="orders in flight")
    parser.add_argument("--finished", type=int, default=300_000, help="finished rows (300000)")
    parser.add_argument("--repeats", type=int, default=20, help="readings and renders (20)")
    parser.add_argument("--dsn", help="an existing server (may CREATE DATABASE); default: embedded")
    parser.add_argument(
        "--out", type=Path, help="results file (default bench/results/page-<ts>.json)"
    )
    args = parser.parse_args(argv)
    started = dt.datetime.now(dt.UTC)
    host = machine()
    actions = reference_actions("http://127.0.0.1:9", "x" * 16)
    settings = Settings(dsn=Secret(""), actions=actions)
    results = []
    with contextlib.ExitStack() as stack:
        admin = args.dsn or stack.enter_context(throwaway_postgres())
        with psycopg.connect(admin) as conn:
            row = conn.execute("SHOW server_version").fetchone()
            postgres = str(row[0]) if row else "?"
        for size in (int(s) for s in args.sizes.split(",")):
            results.append(
                asyncio.run(measure_size(admin, size, args.finished, args.repeats, settings))
            )
    report = {**run_header(started, host, postgres, dsn=args.dsn), "sizes": results}
    out = write_report(report, started, out=args.out, prefix="page-")
    text = table(results, report)
    out.with_suffix(".txt").write_text(text)
    sys.stdout.write(text)
    print(f"written: {out} (and .txt)")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PGAPPNAME", "order-monitor bench/page")
    sys.exit(main())
