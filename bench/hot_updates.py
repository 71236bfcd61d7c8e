"""What our partial index costs the application's own updates: HOT and WAL (issue #19).

An UPDATE is HOT (heap-only: no new index entries, less WAL, less bloat) only
when it changes no indexed column. Our in-flight index is partial on
``provider_referans``, ``"externalStatus"`` and ``status``, so the application's
status changes (approve, reject) stop being HOT once it exists, while updates
of other columns keep being HOT. This measures both, on the reference table,
without our install and with it, in the same run:

    PYTHONPATH=$PWD python bench/hot_updates.py                  # local server
    PYTHONPATH=$PWD python bench/hot_updates.py --dsn postgresql://…/postgres

The figures are counts, not timings (HOT updates from pg_stat_user_tables,
WAL bytes from pg_current_wal_lsn()), so they do not depend on the machine's
load. Each row is updated once, on pages with room left (fillfactor 70, as
on a table whose updates and vacuums leave free space; 100 is the worst case
where no update can be HOT for lack of room).
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

sys.path.insert(0, str(Path(__file__).parent))

from common.report import machine, run_header, say, write_report

import order_monitor
from order_monitor import schema
from order_monitor.config import Layout

REFERENCE_DDL = Path(order_monitor.__file__).with_name("product_orders.sql")

#: The application's updates: its status change, and one that touches no column of ours.
UPDATES = {
    "approve": (
        "UPDATE product_orders SET status = 'approved', \"approvedAt\" = now() WHERE id = %s"
    ),
    "note": 'UPDATE product_orders SET "notesCount" = "notesCount" + 1 WHERE id = %s',
}


def measure(
    admin_dsn: str, *, installed: bool, update: str, rows: int, fillfactor: int
) -> dict[str, Any]:
    name = f"om_bench_hot_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin_dsn, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        with psycopg.connect(make_conninfo(admin_dsn, dbname=name), autocommit=True) as conn:
            conn.execute(REFERENCE_DDL.read_text().encode())
            conn.execute(
                # No autovacuum in the middle of a run: when it came would
                # decide how much room the pages have, so the figures would vary.
                sql.SQL(
                    "ALTER TABLE product_orders SET (fillfactor = {}, autovacuum_enabled = false)"
                ).format(sql.Literal(fillfactor))
            )
            conn.execute("ALTER TABLE product_orders ADD COLUMN provider_referans varchar(255)")
            if installed:
                for statement in schema.install_statements(Layout()):
                    conn.execute(statement.query)
            conn.execute(
                'INSERT INTO product_orders (status, "externalStatus", provider_referans,'
                ' "providerId", "sentAt")'
                " SELECT 'pending', 'sent', 'ref-' || g, 'znet', now()"
                " FROM generate_series(1, %s) g",
                (rows,),
            )
            conn.execute("VACUUM (ANALYZE) product_orders")
            ids = [r[0] for r in conn.execute("SELECT id FROM product_orders ORDER BY ctid")]
            # Every scenario starts right after a checkpoint, so each page's
            # first change writes a full-page image in all of them alike; the
            # WAL is counted per statement (EXPLAIN's), not cluster-wide, so
            # other databases on the server do not add to it.
            conn.execute("CHECKPOINT")
            wal = {"WAL Records": 0, "WAL FPI": 0, "WAL Bytes": 0}
            for order_id in ids:
                (plan,) = conn.execute(
                    b"EXPLAIN (ANALYZE, WAL, FORMAT JSON) " + UPDATES[update].encode(),
                    (order_id,),
                ).fetchone() or ([],)
                top = plan[0]["Plan"]
                for key in wal:
                    wal[key] += int(top.get(key, 0))
            updated, hot = _counts(conn)
        return {
            "installed": installed,
            "update": update,
            "rows": rows,
            "fillfactor": fillfactor,
            "hot_share": hot / updated if updated else 0.0,
            "wal_bytes_per_update": wal["WAL Bytes"] / rows,
            "wal_records_per_update": wal["WAL Records"] / rows,
            "full_page_images": wal["WAL FPI"],
        }
    finally:
        with psycopg.connect(admin_dsn, autocommit=True) as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


def _counts(conn: psycopg.Connection[Any]) -> tuple[int, int]:
    """(updates, HOT updates) of the table, once the statistics caught up."""
    for _ in range(50):
        # Statistics are flushed by the backend at most once a second (15+).
        row = conn.execute(
            "SELECT n_tup_upd, n_tup_hot_upd FROM pg_catalog.pg_stat_user_tables"
            " WHERE relname = 'product_orders'"
        ).fetchone()
        if row is not None and row[0] > 0:
            return int(row[0]), int(row[1])
        conn.execute("SELECT pg_catalog.pg_stat_clear_snapshot()")
        time.sleep(0.2)
    raise RuntimeError("pg_stat_user_tables never counted the updates")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", default="postgresql://127.0.0.1:5432/postgres")
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--fillfactor", type=int, action="append")
    args = parser.parse_args()
    fillfactors = args.fillfactor or [70, 100]
    started = dt.datetime.now(dt.UTC)
    results = []
    for fillfactor in fillfactors:
        for update in UPDATES:
            for installed in (False, True):
                r = measure(
                    args.dsn,
                    installed=installed,
                    update=update,
                    rows=args.rows,
                    fillfactor=fillfactor,
                )
                results.append(r)
                say(
                    f"fillfactor {fillfactor:3}  {update:8} {'with' if installed else 'without':7}"
                    f" our install: HOT {r['hot_share']:6.1%},"
                    f" WAL {r['wal_bytes_per_update']:7.1f} B/update,"
                    f" {r['wal_records_per_update']:.2f} records/update"
                )
    with psycopg.connect(args.dsn) as conn:
        postgres = conn.execute("SELECT pg_catalog.version()").fetchone()
    header = run_header(started, machine(), postgres and postgres[0], dsn=args.dsn)
    path = write_report({**header, "results": results}, started, prefix="hot-")
    say(f"written: {path}")


if __name__ == "__main__":
    main()
