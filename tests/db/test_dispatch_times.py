"""The engine's queries on every value the time columns can hold.

``timestamptz`` holds ``infinity`` and ``-infinity``, and ``now() - 'infinity'``
raises: before db.dispatch one such row failed every sweep page, confirm and
re-read that met it (issue #19). Run as the daemon's least-privilege role.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg import sql

from order_monitor.config import Columns, Layout
from order_monitor.db import Queries, SweepRow
from order_monitor.db.changes import ChangeStatements
from tests.conftest import DAEMON_ROLE, as_daemon

#: A layout whose created-at column may be NULL (the default's is NOT NULL).
NULLABLE = Layout(columns=Columns(created_at="approvedAt"))


def grant_nullable(dsn: str) -> None:
    """What role.sql grants for NULLABLE beyond the default layout: its created-at column."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            sql.SQL('GRANT SELECT ("approvedAt") ON product_orders TO {}').format(
                sql.Identifier(DAEMON_ROLE)
            )
        )


def insert(dsn: str, rows: dict[str, dict[str, Any]]) -> dict[str, uuid.UUID]:
    """In-flight orders by reference, their time columns given as text (so 'infinity' goes in)."""
    ids = {}
    with psycopg.connect(dsn, autocommit=True) as conn:
        for ref, times in rows.items():
            found = conn.execute(
                """INSERT INTO product_orders (provider_referans, "externalStatus", "providerId",
                       "sentAt", "approvedAt", "lastSyncAt")
                   VALUES (%s, 'sent', 'fake', %s::timestamptz, %s::timestamptz, %s::timestamptz)
                   RETURNING id""",
                (ref, times.get("sent"), times.get("created"), times.get("synced")),
            ).fetchone()
            assert found is not None
            ids[ref] = found[0]
    return ids


ODD = {
    "good": {"sent": "now() - 1 hour", "synced": "now() - 10 minutes"},
    "inf": {"sent": "infinity", "synced": "infinity"},
    "minus-inf": {"sent": "-infinity", "synced": "-infinity"},
    "future": {"sent": "now() + 3 hours", "synced": "now() - 1 minute"},
    "none": {},
    "created-inf": {"created": "infinity"},
}


def _fix(times: dict[str, str]) -> dict[str, str]:
    """'now() - 1 hour' as a timestamp text Postgres parses (relative to now)."""
    now = dt.datetime.now(dt.UTC)
    out = {}
    for key, value in times.items():
        if value.startswith("now()"):
            sign, amount, unit = value.split()[1:]
            delta = dt.timedelta(**{unit if unit.endswith("s") else unit + "s": int(amount)})
            value = (now - delta if sign == "-" else now + delta).isoformat()
        out[key] = value
    return out


def mark_now(dsn: str) -> int:
    """A busy read's mark (32-bit) from which every row written after this call is read."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT pg_catalog.pg_snapshot_xmin(pg_catalog.pg_current_snapshot())::text"
        ).fetchone()
    assert row is not None
    return int(row[0]) % 2**32


async def busy_rows(conn: psycopg.AsyncConnection[Any], since: int) -> list[SweepRow]:
    """The busy read's rows (db.changes), as the handoff reads them."""
    changed = await ChangeStatements(NULLABLE).read(conn, since, rows=True)
    assert changed.rows is not None
    assert [row.id for row in changed.rows] == changed.ids
    return changed.rows


async def test_every_engine_query_reads_rows_whose_dispatch_time_is_unusable(db: str) -> None:
    grant_nullable(db)
    since = mark_now(db)
    ids = insert(db, {ref: _fix(times) for ref, times in ODD.items()})
    queries = Queries(NULLABLE)
    async with await psycopg.AsyncConnection.connect(as_daemon(db), autocommit=True) as conn:
        swept = {row.id: row for row in await queries.sweep_page(conn, None, 100)}
        confirmed = {row.id: row for row in await queries.confirm(conn, list(ids.values()))}
        reread = {row.id: row for row in await queries.fetch_in_flight(conn, list(ids.values()))}
        busy = {row.id: row for row in await busy_rows(conn, since)}

    # The busy read stands in for the confirm: the same reference for each.
    assert {i: r.reference for i, r in busy.items()} == {
        i: r.reference for i, r in confirmed.items()
    }
    for rows in (swept, confirmed, reread, busy):
        assert set(rows) == set(ids.values())
        issues = {ref: rows[ids[ref]].dispatch_issue for ref in ids}
        assert issues["good"] is None
        assert 3590 < rows[ids["good"]].elapsed < 3700
        assert rows[ids["good"]].last_checked is not None
        assert rows[ids["good"]].last_checked == pytest.approx(3000.0, abs=1)
        for ref, why, column in [
            ("inf", "infinity", "sentAt"),
            ("minus-inf", "-infinity", "sentAt"),
            ("future", "future", "sentAt"),
            ("none", "missing", None),
            ("created-inf", "infinity", "approvedAt"),
        ]:
            issue = issues[ref]
            assert issue is not None, ref
            assert (issue.why, issue.column) == (why, column), ref
            # Read as dispatched just now (engine.anchors gives it an age of its own).
            assert rows[ids[ref]].elapsed == 0.0, ref
            assert rows[ids[ref]].last_checked is None, ref
        ahead = issues["future"].ahead_s  # type: ignore[union-attr]
        assert ahead is not None
        assert 3 * 3600 - 60 < ahead <= 3 * 3600


#: Texts Postgres accepts for a timestamptz, from one end of its range to the other.
EDGES = [
    "infinity",
    "-infinity",
    "4713-01-01 00:00:00+00 BC",
    "294276-12-31 23:59:59+00",
    "1970-01-01 00:00:00+00",
    "epoch",
]
moments = st.one_of(
    st.none(),
    st.sampled_from(EDGES),
    # Around now, either side, up to ten years.
    st.integers(min_value=-10 * 365 * 86400, max_value=10 * 365 * 86400).map(lambda s: f"now:{s}"),
    st.datetimes(
        min_value=dt.datetime(1, 1, 1),
        max_value=dt.datetime(9999, 12, 31),
        timezones=st.just(dt.UTC),
    ).map(lambda d: d.isoformat()),
)


def _text(value: str | None) -> str | None:
    if value is None or not value.startswith("now:"):
        return value
    seconds = int(value[4:])
    return (dt.datetime.now(dt.UTC) + dt.timedelta(seconds=seconds)).isoformat()


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sent=moments, created=moments, synced=moments)
def test_no_time_value_fails_a_query_and_each_is_judged_right(
    db: str, sent: str | None, created: str | None, synced: str | None
) -> None:
    """Property: whatever the three columns hold, sweep, confirm, re-read and busy read answer,
    the row is flagged exactly when its dispatch time is missing, infinite or ahead,
    and every age handed on is a finite, non-negative number."""
    times = {"sent": _text(sent), "created": _text(created), "synced": _text(synced)}
    grant_nullable(db)
    with psycopg.connect(db, autocommit=True) as admin:
        admin.execute("DELETE FROM product_orders")
    since = mark_now(db)
    (order,) = insert(db, {"ref": {k: v for k, v in times.items() if v is not None}}).values()
    dispatched = times["sent"] if times["sent"] is not None else times["created"]

    async def read() -> list[Any]:
        queries = Queries(NULLABLE)
        async with await psycopg.AsyncConnection.connect(as_daemon(db), autocommit=True) as conn:
            (swept,) = await queries.sweep_page(conn, None, 10)
            (confirmed,) = await queries.confirm(conn, [order])
            (reread,) = await queries.fetch_in_flight(conn, [order])
            (busy,) = await busy_rows(conn, since)
            return [swept, confirmed, reread, busy]

    for row in asyncio.run(read()):
        issue = row.dispatch_issue
        if dispatched is None:
            assert issue is not None
            assert issue.why == "missing"
        elif dispatched in {"infinity", "-infinity"}:
            assert issue is not None
            assert issue.why == dispatched
        elif issue is not None:
            assert issue.why == "future"
            assert issue.ahead_s is not None
            assert issue.ahead_s > 0
        assert row.elapsed >= 0
        assert row.elapsed < float("inf")
        assert row.last_checked is None or 0 <= row.last_checked < float("inf")
        if issue is not None:
            assert row.elapsed == 0.0
            assert row.last_checked is None


async def test_the_busy_read_measures_ages_after_its_snapshot_not_at_its_start(db: str) -> None:
    """A row committed after the statement's now() but before its snapshot is not 'future'.

    At full speed a dispatch commits every 0.1 ms, so some land between the
    busy read's start and its snapshot: measured at now(), their "sentAt"
    read as ahead of the clock (a false warning, and an anchored schedule).
    Here a transaction block stands in for that gap: its now() is fixed at
    BEGIN, and each statement in it takes a new snapshot.
    """
    since = mark_now(db)
    async with await psycopg.AsyncConnection.connect(as_daemon(db)) as conn:
        await conn.execute("SELECT 1")  # the transaction (and its now()) begins
        await asyncio.sleep(0.05)
        (order,) = insert(db, {"late": {"sent": "now"}}).values()
        changed = await ChangeStatements(Layout()).read(conn, since, rows=True)
        (confirmed,) = await Queries(Layout()).confirm(conn, [order])
        await conn.rollback()
    assert changed.rows is not None
    (row,) = changed.rows
    assert row.id == order
    assert row.dispatch_issue is None
    assert 0 <= row.elapsed < 60
    # What now() makes of the same row: ahead of the clock.
    assert confirmed.dispatch_issue is not None
    assert confirmed.dispatch_issue.why == "future"
