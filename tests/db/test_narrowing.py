"""A page or batch that fails on one row is narrowed down to that row.

After db.dispatch no value of the default layout's columns fails a query, so
the failing row is made by a test-only view over the table: its "providerId"
divides by zero for the rows whose reference starts with BAD, as a custom
column mapping onto an expression could. Run as the daemon's role.
"""

from __future__ import annotations

import uuid

import psycopg
import pytest
from psycopg import sql

from order_monitor.config import Layout
from order_monitor.db import Queries
from tests.conftest import DAEMON_ROLE, as_daemon

HOSTILE = Layout(table="hostile_orders")


def make_hostile_view(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            """CREATE VIEW hostile_orders AS
               SELECT id, status, "externalStatus", provider_referans, "externalOrderId",
                      "sentAt", "createdAt", "lastSyncAt",
                      -- Not a constant, so it is evaluated per row, and only for rows read.
                      CASE WHEN provider_referans LIKE 'BAD%'
                           THEN (1 / (length(provider_referans) - length(provider_referans)))::text
                           ELSE "providerId" END AS "providerId"
               FROM product_orders"""
        )
        conn.execute(
            sql.SQL("GRANT SELECT ON hostile_orders TO {}").format(sql.Identifier(DAEMON_ROLE))
        )


def insert(dsn: str, references: list[str]) -> dict[str, uuid.UUID]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute(
            """INSERT INTO product_orders (provider_referans, "externalStatus", "providerId",
                   "sentAt")
               SELECT ref, 'sent', 'fake', now() FROM unnest(%s::text[]) AS r(ref)
               RETURNING provider_referans, id""",
            (references,),
        ).fetchall()
    return dict(rows)  # type: ignore[arg-type]


async def test_a_failing_sweep_page_is_narrowed_down_to_its_bad_rows(db: str) -> None:
    make_hostile_view(db)
    refs = [f"R{n:02}" for n in range(20)] + ["BAD-1", "BAD-2"]
    ids = insert(db, refs)
    bad = {ids["BAD-1"], ids["BAD-2"]}
    queries = Queries(HOSTILE)
    reported: list[tuple[uuid.UUID, psycopg.Error]] = []
    async with await psycopg.AsyncConnection.connect(as_daemon(db), autocommit=True) as conn:
        # As the sweep was before: one bad row fails its whole page.
        with pytest.raises(psycopg.errors.DivisionByZero):
            await queries.sweep_page(conn, None, 100)

        # Pages of 5, so the bad rows fall in some pages and not others.
        found: list[uuid.UUID] = []
        after = None
        pages = 0
        while True:
            rows, after = await queries.sweep_page_narrowed(
                conn, after, 5, lambda order, exc: reported.append((order, exc))
            )
            found += [row.id for row in rows]
            pages += 1
            if after is None:
                break
    assert sorted(found) == sorted(set(ids.values()) - bad)
    assert len(found) == len(set(found))
    assert pages == 5  # 22 ids: four full pages and a last of two
    assert {order for order, _ in reported} == bad
    assert all(isinstance(exc, psycopg.errors.DivisionByZero) for _, exc in reported)


async def test_a_failing_confirm_or_re_read_keeps_its_good_rows(db: str) -> None:
    make_hostile_view(db)
    ids = insert(db, ["G1", "BAD-1", "G2", "G3"])
    queries = Queries(HOSTILE)
    everyone = list(ids.values())
    async with await psycopg.AsyncConnection.connect(as_daemon(db), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.DivisionByZero):
            await queries.confirm(conn, everyone)
        with pytest.raises(psycopg.errors.DivisionByZero):
            await queries.fetch_in_flight(conn, everyone)

        skipped: list[uuid.UUID] = []
        confirmed = await queries.confirm(conn, everyone, unreadable=lambda o, _: skipped.append(o))
        reread = await queries.fetch_in_flight(
            conn, everyone, unreadable=lambda o, _: skipped.append(o)
        )
    good = {ids["G1"], ids["G2"], ids["G3"]}
    assert {row.id for row in confirmed} == good
    assert {row.id for row in reread} == good
    assert {row.reference for row in reread} == {"G1", "G2", "G3"}
    assert skipped == [ids["BAD-1"], ids["BAD-1"]]


async def test_an_error_of_the_statement_is_not_blamed_on_a_row(db: str) -> None:
    """A missing grant fails every row alike: raised as it is, no row reported."""
    make_hostile_view(db)
    ids = insert(db, ["G1", "G2"])
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute(
            sql.SQL("REVOKE SELECT ON hostile_orders FROM {}").format(sql.Identifier(DAEMON_ROLE))
        )
    queries = Queries(HOSTILE)
    reported: list[uuid.UUID] = []
    async with await psycopg.AsyncConnection.connect(as_daemon(db), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            await queries.sweep_page_narrowed(conn, None, 10, lambda o, _: reported.append(o))
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            await queries.confirm(
                conn, list(ids.values()), unreadable=lambda o, _: reported.append(o)
            )
    assert reported == []
