"""Reading the inbox: waits that grow while it is empty, and reads that start where the last ended.

On a version 4 install (its trigger writes the inbox while the daemon is
busy), as a daemon upgraded before install.sql meets it.

The waits are the handoff's own, through an injected sleeper (no clock, no
sleep); the cost of a read is counted in heap blocks by the server itself
(``pg_stat_get_xact_blocks_fetched``), never in seconds.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import psycopg
import pytest
from hypothesis import given
from hypothesis import strategies as st
from structlog.testing import capture_logs

from order_monitor.config import Layout
from order_monitor.db import Queries
from order_monitor.db.changes import Install
from order_monitor.db.inbox import START, InboxStatements
from order_monitor.engine.handoff import EmptyPolls, Handoff, HandoffTiming, Mode, OwnSession
from order_monitor.metrics import Metrics
from order_monitor.ops.installed import InstallHealth
from tests.conftest import DAEMON_ROLE, as_daemon, deploy
from tests.daemon_fixtures import eventually
from tests.schema.scripts import current, give_table_to_owner, install_release, psql

INBOX = "order_monitor_product_orders_inbox_v2"
TIMING = HandoffTiming(poll_interval=0.005, poll_max=0.2)


@pytest.fixture
def db(bare_db: str) -> str:
    """A version 4 install, with the grants its role.sql gave."""
    give_table_to_owner(bare_db)
    install_release(bare_db, 4)
    return bare_db


def test_empty_reads_double_the_wait_up_to_the_cap_and_any_id_resets_it() -> None:
    polls = EmptyPolls(TIMING)
    waits = [polls.after(0) for _ in range(8)]
    assert waits == [0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.2, 0.2]
    assert polls.after(3) == 0.005
    assert [polls.after(0) for _ in range(3)] == [0.005, 0.01, 0.02]


@given(st.lists(st.integers(min_value=0, max_value=3), max_size=60))
def test_the_wait_is_always_within_bounds_and_short_right_after_an_id(taken: list[int]) -> None:
    polls = EmptyPolls(TIMING)
    for count in taken:
        wait = polls.after(count)
        assert TIMING.poll_interval <= wait <= TIMING.poll_max
        if count:
            assert wait == TIMING.poll_interval


class Stop(Exception):
    """Ends the handoff's run from inside the injected sleeper."""


async def test_the_handoff_backs_off_while_empty_and_resets_on_an_id(db: str) -> None:
    waits: list[float] = []
    taken: list[uuid.UUID] = []
    async with await psycopg.AsyncConnection.connect(db, autocommit=True) as admin:

        async def sleep(seconds: float) -> None:
            waits.append(seconds)
            if len(waits) == 8:
                await admin.execute(
                    f"INSERT INTO {INBOX} (order_id) VALUES (gen_random_uuid())"  # type: ignore[arg-type]
                )
            if len(waits) == 11:
                raise Stop

        handoff = Handoff(
            "",
            Queries(Layout()),
            on_orders=taken.extend,
            on_rows=lambda rows: taken.extend(row.id for row in rows),
            room=lambda: 100,
            listening=lambda: False,
            metrics=Metrics(),
            clock=asyncio.get_running_loop().time,
            timing=TIMING,
            session=OwnSession(as_daemon(db)),
            sleep=sleep,
        )
        with pytest.raises(Stop):
            await handoff.run()
    assert len(taken) == 1
    assert waits == [0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.2, 0.2, 0.005, 0.005, 0.01]


BACKLOG = 20_000
BATCH = 500


async def blocks_per_batch(db: str, take: Any) -> list[int]:
    """Heap blocks of the inbox each batch reads, emptying a backlog with its dead rows kept.

    One transaction, as a snapshot held elsewhere would leave it: the rows
    each batch deleted stay in their pages for the next batch to walk over.
    """
    with psycopg.connect(db, autocommit=True) as admin:
        admin.execute(
            f"INSERT INTO {INBOX} (order_id) SELECT gen_random_uuid()"  # type: ignore[arg-type]
            f" FROM generate_series(1, {BACKLOG})"
        )
    fetched = "SELECT pg_stat_get_xact_blocks_fetched(%s::regclass)"
    blocks: list[int] = []
    async with (
        await psycopg.AsyncConnection.connect(as_daemon(db), autocommit=True) as conn,
        conn.transaction(),
    ):
        before = (await (await conn.execute(fetched, (INBOX,))).fetchall())[0][0]
        drained = 0
        while batch := await take(conn, BATCH):
            drained += len(batch)
            after = (await (await conn.execute(fetched, (INBOX,))).fetchall())[0][0]
            blocks.append(int(after - before))
            before = after
    assert drained == BACKLOG
    return blocks


async def test_a_backlog_drains_in_linear_time(db: str) -> None:
    statements = InboxStatements(Layout())
    blocks = await blocks_per_batch(db, statements.take)
    # Each batch starts where the last one ended: the last costs what the
    # first did (about three blocks per id deleted, plus the few pages read).
    assert max(blocks) - min(blocks) <= 8, blocks
    assert statements.position == START


#: The read before this fix: no position, so from the first page every time.
FROM_THE_START = (
    f"DELETE FROM {INBOX} WHERE ctid = ANY(ARRAY(SELECT ctid FROM {INBOX} LIMIT %s))"
    " RETURNING order_id"
)


async def from_the_start(conn: psycopg.AsyncConnection[Any], limit: int) -> list[uuid.UUID]:
    cursor = await conn.execute(FROM_THE_START, (limit,))  # type: ignore[arg-type]
    return [row[0] for row in await cursor.fetchall()]


async def test_reading_from_the_first_page_each_time_is_quadratic(db: str) -> None:
    """Each batch walks every row the ones before it deleted: the bound above tells them apart."""
    blocks = await blocks_per_batch(db, from_the_start)
    assert blocks[-1] - blocks[0] > 60, blocks


async def test_a_read_that_runs_off_the_end_goes_back_for_rows_behind_it(db: str) -> None:
    statements = InboxStatements(Layout())
    async with (
        await psycopg.AsyncConnection.connect(as_daemon(db), autocommit=True) as daemon,
        await psycopg.AsyncConnection.connect(db, autocommit=True) as admin,
    ):
        ids = [
            r[0]
            for r in await (
                await admin.execute(
                    f"INSERT INTO {INBOX} (order_id) SELECT gen_random_uuid()"  # type: ignore[arg-type]
                    " FROM generate_series(1, 10) RETURNING order_id"
                )
            ).fetchall()
        ]
        first = await statements.take(daemon, 4)
        assert first == ids[:4]
        assert statements.position == "(0,4)"
        # A row put into the free space before the position (vacuum made room there).
        await admin.execute(f"VACUUM {INBOX}")  # type: ignore[arg-type]
        late = await (
            await admin.execute(
                f"INSERT INTO {INBOX} (order_id) VALUES (gen_random_uuid())"  # type: ignore[arg-type]
                " RETURNING order_id, ctid::text"
            )
        ).fetchone()
        assert late is not None
        assert late[1] < "(0,4)"  # behind the position: only going back finds it
        rest = await statements.take(daemon, 100)
    assert sorted(rest) == sorted([*ids[4:], late[0]])
    assert statements.position == START


async def test_an_inbox_dropped_under_the_handoff_is_reported_missing_then_back(db: str) -> None:
    health = InstallHealth()
    handoff = Handoff(
        "",
        Queries(Layout()),
        on_orders=lambda ids: None,
        on_rows=lambda rows: None,
        room=lambda: 100,
        listening=lambda: False,
        metrics=Metrics(),
        clock=asyncio.get_running_loop().time,
        timing=HandoffTiming(idle_check=0.05),
        session=OwnSession(as_daemon(db), max_backoff=0.2),
        health=health,
    )
    with capture_logs() as logs:
        task = asyncio.create_task(handoff.run())
        try:
            await eventually(lambda: _installed(handoff), what="the handoff to start")
            assert health.readiness() == {"ok": True}
            with psycopg.connect(db, autocommit=True) as admin:
                admin.execute(f"DROP TABLE {INBOX}")  # type: ignore[arg-type]
            await eventually(lambda: _missing(health), what="the inbox reported missing")
            readiness = health.readiness()
            assert readiness["ok"] is False
            assert readiness["missing"] == ["handoff"]
            assert "install.sql" in readiness["reason"]

            deploy(db)  # the DBA runs install.sql and role.sql again
            await eventually(lambda: _back(health), what="the inbox back")
        finally:
            task.cancel()
            await asyncio.wait({task})
    missing = [e for e in logs if e["event"] == "daemon.object_missing"]
    assert len(missing) == 1  # once, not once a read
    assert missing[0]["object"] == "handoff"
    assert any(e["event"] == "daemon.object_back" for e in logs)


async def _installed(handoff: Handoff) -> bool:
    return handoff.install is Install.INBOX


async def _missing(health: InstallHealth) -> bool:
    return "handoff" in health.problems


async def _back(health: InstallHealth) -> bool:
    return not health.problems


async def test_the_upgrade_to_version_5_under_a_busy_handoff_leaves_no_order_unannounced(
    db: str, tmp_path: Path
) -> None:
    """Daemons first, then install.sql, then role.sql: every order reaches the handoff.

    Between install.sql and role.sql the daemon may not read xmin: it holds
    the idle lock, so the new trigger NOTIFYs every order; once role.sql is
    in, it reads every order in flight once, then what changed.
    """
    taken: list[uuid.UUID] = []
    layout = Layout(role=DAEMON_ROLE)
    handoff = Handoff(
        "",
        Queries(Layout()),
        on_orders=taken.extend,
        on_rows=lambda rows: taken.extend(row.id for row in rows),
        room=lambda: 1000,
        listening=lambda: False,  # stays busy unless it cannot read
        metrics=Metrics(),
        clock=asyncio.get_running_loop().time,
        timing=HandoffTiming(idle_check=0.05),
        session=OwnSession(as_daemon(db), max_backoff=0.2),
    )
    async with (
        await psycopg.AsyncConnection.connect(as_daemon(db), autocommit=True) as listener,
        await psycopg.AsyncConnection.connect(db, autocommit=True) as app,
    ):
        await listener.execute("LISTEN order_monitor")
        task = asyncio.create_task(handoff.run())
        try:
            await eventually(lambda: _installed(handoff), what="the handoff on version 4")
            before = await _dispatch(app, "v4-busy")
            await eventually(lambda: _has(taken, before), what="the inbox read")

            done = await asyncio.to_thread(psql, db, current("install", tmp_path, layout))
            assert done.returncode == 0, done.stderr
            await eventually(lambda: _is(handoff, Install.GATED_UNREADABLE), what="v5 seen")
            await eventually(lambda: _mode(handoff, Mode.IDLE), what="the idle lock held")
            between = await _dispatch(app, "between-install-and-role")
            notes = [n.payload async for n in listener.notifies(timeout=2, stop_after=1)]
            assert notes == [str(between)]

            done = await asyncio.to_thread(psql, db, current("role", tmp_path, layout))
            assert done.returncode == 0, done.stderr
            await eventually(lambda: _is(handoff, Install.GATED), what="xmin granted")
            await eventually(lambda: _mode(handoff, Mode.BUSY), what="busy again")
            after = await _dispatch(app, "v5-busy")
            await eventually(lambda: _has(taken, after), what="the busy read")
        finally:
            task.cancel()
            await asyncio.wait({task})


async def _dispatch(app: psycopg.AsyncConnection[Any], ref: str) -> uuid.UUID:
    row = await (
        await app.execute(
            """INSERT INTO product_orders (provider_referans, "externalStatus") VALUES (%s, 'sent')
               RETURNING id""",
            (ref,),
        )
    ).fetchone()
    assert row is not None
    return uuid.UUID(str(row[0]))


async def _has(taken: list[uuid.UUID], order: uuid.UUID) -> bool:
    return order in taken


async def _is(handoff: Handoff, install: Install) -> bool:
    return handoff.install is install


async def _mode(handoff: Handoff, mode: Mode) -> bool:
    return handoff.mode is mode
