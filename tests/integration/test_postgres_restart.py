"""A real PostgreSQL restart under a running daemon: it recovers by itself.

Every connection is cut (the leader lock, the listener, the reader and the
writer) and the server is away for a moment; the daemon must come back as
leader, LISTEN again, sweep, and finish every order, with no process restart.
This runs on a private embedded server of its own, whatever
ORDER_MONITOR_TEST_DSN says: restarting a shared server would break the rest.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace

import psycopg
import pytest

from order_monitor.daemon import Daemon
from order_monitor.embedded import EmbeddedServer
from order_monitor.ops.leader import LEADER
from order_monitor.providers.fake import FakeProvider
from tests.conftest import deployed_shop
from tests.daemon_fixtures import App, eventually, running, settings_for


@pytest.fixture
def private_server() -> Iterator[tuple[EmbeddedServer, str]]:
    server = EmbeddedServer()
    admin = server.start()
    try:
        dsn = deployed_shop(admin)
        yield server, dsn
    finally:
        server.stop_and_delete()


@pytest.fixture
async def private_app(private_server: tuple[EmbeddedServer, str]) -> AsyncIterator[App]:
    _, dsn = private_server
    app = App(await psycopg.AsyncConnection.connect(dsn, autocommit=True))
    yield app
    await app.conn.close()  # the test replaces it across the restart


@pytest.mark.slow
async def test_the_daemon_rides_out_a_postgres_restart_without_being_restarted(
    private_server: tuple[EmbeddedServer, str], private_app: App, fake: FakeProvider
) -> None:
    server, dsn = private_server
    settings = replace(settings_for(dsn, fake), listener_health_interval=0.5)
    daemon = Daemon(settings, lock_poll=0.2, lock_check_interval=0.3)
    async with running(daemon):
        await private_app.dispatch([f"before-{n}" for n in range(100)])
        await eventually(lambda: _finished(private_app), what="orders before the restart")

        await private_app.conn.close()
        await asyncio.to_thread(server.restart)
        private_app.conn = await psycopg.AsyncConnection.connect(dsn, autocommit=True)

        await private_app.dispatch([f"after-{n}" for n in range(100)])
        await eventually(lambda: _leading_again(daemon), within=60, what="the daemon to lead again")
        await eventually(lambda: _finished(private_app), within=60, what="orders after the restart")
    rows = await private_app.rows()
    assert len(rows) == 200
    assert {r["externalStatus"] for r in rows.values()} == {"done"}


async def _finished(app: App) -> bool:
    return await app.in_flight() == 0


async def _leading_again(daemon: Daemon) -> bool:
    return daemon.role == LEADER and daemon.listener_connected
