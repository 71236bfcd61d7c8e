"""Two daemons on one table: one works, one waits, and the waiting one takes over."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

import pytest

from order_monitor.config import Columns, Layout, OutcomeWrites
from order_monitor.daemon import Daemon
from order_monitor.errors import SchemaError
from order_monitor.ops.leader import LEADER, STANDBY
from order_monitor.providers.fake import FakeProvider
from tests.daemon_fixtures import App, eventually, running, settings_for


def daemon(db: str, fake: FakeProvider) -> Daemon:
    return Daemon(settings_for(db, fake), lock_poll=0.2, lock_check_interval=0.3)


async def test_a_standby_takes_over_when_the_leader_loses_its_connection(
    db: str, app: App, fake: FakeProvider
) -> None:
    async with running(daemon(db, fake)) as first, running(daemon(db, fake)) as second:
        assert first.role == LEADER
        await eventually(lambda: _role(second, STANDBY), what="the second instance to stand by")
        assert not await second.database_ok()  # a standby does no work, not even housekeeping

        await app.dispatch([f"before-{n}" for n in range(50)])
        await eventually(lambda: _in_flight(app, 0), what="the leader to finish the first orders")

        # The leader's lock session dies (a network cut, a DBA's pg_terminate_backend).
        assert first._lock.backend_pid is not None
        await app.conn.execute("SELECT pg_terminate_backend(%s)", (first._lock.backend_pid,))
        cut = time.monotonic()
        await eventually(lambda: _role(second, LEADER), within=15, what="the standby to take over")
        takeover = time.monotonic() - cut
        await eventually(lambda: _role(first, STANDBY), what="the old leader to stand by again")

        await app.dispatch([f"after-{n}" for n in range(50)])
        await eventually(lambda: _in_flight(app, 0), what="the new leader to finish new orders")
        assert second.listener_connected
        assert first.listener is None  # the old leader's engine is gone

    # "Within a few seconds": the standby polls every 0.2 s here; the margin is
    # for a loaded CI machine, not for the daemon.
    assert takeover < 10.0
    rows = await app.rows()
    assert {r["externalStatus"] for r in rows.values()} == {"done"}


async def _role(d: Daemon, role: str) -> bool:
    return d.role == role


async def _in_flight(app: App, count: int) -> bool:
    return await app.in_flight() == count


async def test_a_standby_refuses_a_table_it_cannot_serve_at_start_not_at_takeover(
    db: str, app: App, fake: FakeProvider
) -> None:
    async with running(daemon(db, fake)) as leader:
        assert leader.role == LEADER
        misspelt = replace(
            settings_for(db, fake),
            layout=replace(Layout(), columns=Columns(pin_code="pin_code")),
        )
        standby = Daemon(misspelt, lock_poll=0.2, lock_check_interval=0.3)
        # The lock is held: this instance would wait for ever before reading the table.
        with pytest.raises(SchemaError, match="no column pin_code"):
            await asyncio.wait_for(standby.run(), 10)
        assert standby.role != LEADER


async def test_a_standby_refuses_an_install_made_for_other_settings_at_start(
    db: str, app: App, fake: FakeProvider
) -> None:
    async with running(daemon(db, fake)):
        other = replace(settings_for(db, fake), writes=OutcomeWrites(done_status="approved"))
        with pytest.raises(SchemaError, match="installed for other settings"):
            await asyncio.wait_for(Daemon(other, lock_poll=0.2).run(), 10)
