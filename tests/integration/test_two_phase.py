"""An application that dispatches inside ``PREPARE TRANSACTION`` (two-phase commit).

PostgreSQL refuses to prepare a transaction that has NOTIFYed. While the
daemon holds its idle lock the trigger NOTIFYs, so such a dispatch fails,
and only while the daemon is idle: a failure that comes and goes with the
load. With ``ORDER_MONITOR_HANDOFF=inbox`` the daemon never takes the idle
lock, the trigger always writes to the inbox, and the dispatch prepares.

On a private embedded server (``max_prepared_transactions`` needs a restart,
and the shared test server has it at 0).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace

import psycopg
import pytest

from order_monitor.daemon import Daemon
from order_monitor.embedded import EmbeddedServer
from order_monitor.engine.handoff import HandoffTiming, Mode
from order_monitor.providers.fake import FakeProvider
from tests.conftest import deployed_shop
from tests.daemon_fixtures import App, eventually, running, settings_for

#: Calm after half a second: an idle daemon would take the idle lock at once.
QUICK = HandoffTiming(calm_window=0.5, burst_window=0.2, idle_check=0.2, idle_retry=0.2)
DISPATCH = """INSERT INTO product_orders (provider_referans, "providerId", "externalStatus", "sentAt")
              VALUES (%s, 'fake', 'sent', now())"""


@pytest.fixture(scope="module")
def two_phase_server() -> Iterator[str]:
    server = EmbeddedServer()
    admin = server.start()
    try:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute("ALTER SYSTEM SET max_prepared_transactions = 4")
        server.restart()
        dsn = deployed_shop(admin)
        yield dsn
    finally:
        server.stop_and_delete()


def prepare_a_dispatch(dsn: str, ref: str) -> None:
    """The application's two-phase dispatch: insert, PREPARE TRANSACTION, COMMIT PREPARED."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("BEGIN")
        conn.execute(DISPATCH, (ref,))
        try:
            conn.execute(f"PREPARE TRANSACTION 'dispatch-{ref}'")  # type: ignore[arg-type]
        except psycopg.Error:
            conn.execute("ROLLBACK")
            raise
        conn.execute(f"COMMIT PREPARED 'dispatch-{ref}'")  # type: ignore[arg-type]


async def test_with_the_inbox_setting_a_prepared_dispatch_commits_and_is_checked(
    two_phase_server: str, fake: FakeProvider
) -> None:
    dsn = two_phase_server
    settings = replace(settings_for(dsn, fake), handoff="inbox")
    async with (
        running(Daemon(settings, handoff_timing=QUICK, lock_check_interval=0.2)) as daemon,
        await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn,
    ):
        app = App(conn)
        handoff = daemon.handoff
        assert handoff is not None
        # Long past the calm window: an "auto" daemon would be idle by now.
        await eventually(lambda: _checks(daemon, 5), what="a second of lock checks")
        assert handoff.mode is Mode.BUSY

        prepare_a_dispatch(dsn, "two-phase-1")

        await eventually(lambda: _done(app, "two-phase-1"), what="the prepared order checked")
        assert handoff.mode is Mode.BUSY


async def test_without_it_an_idle_daemon_makes_the_prepare_fail(
    two_phase_server: str, fake: FakeProvider
) -> None:
    """Why the setting exists: the failure it removes, with the default ("auto")."""
    dsn = two_phase_server
    async with running(Daemon(settings_for(dsn, fake), handoff_timing=QUICK)) as daemon:
        handoff = daemon.handoff
        assert handoff is not None
        await eventually(lambda: _idle(daemon), what="the daemon to go idle")
        with pytest.raises(psycopg.errors.FeatureNotSupported, match="NOTIFY"):
            prepare_a_dispatch(dsn, "two-phase-2")


async def _checks(daemon: Daemon, count: int) -> bool:
    return daemon._lock.checks >= count


async def _idle(daemon: Daemon) -> bool:
    return daemon.handoff is not None and daemon.handoff.mode is Mode.IDLE


async def _done(app: App, ref: str) -> bool:
    rows = await app.rows()
    return ref in rows and rows[ref]["externalStatus"] == "done"
