"""uninstall.sql run under a working daemon: it goes unready and says what is missing.

Before, /readyz stayed 200 while every write failed. The daemon runs as the
least-privilege role; the uninstall is applied as a DBA would, beside it.
"""

from __future__ import annotations

from dataclasses import replace

import aiohttp
import psycopg
from psycopg import sql
from structlog.testing import capture_logs

from order_monitor import install, schema
from order_monitor.config import Layout
from order_monitor.daemon import Daemon
from order_monitor.ops.leader import LEADER
from order_monitor.providers.fake import FakeProvider, Script
from tests.conftest import DAEMON_ROLE, deploy
from tests.daemon_fixtures import App, eventually, running, settings_for


async def readyz(daemon: Daemon) -> tuple[int, dict[str, object]]:
    assert daemon.http_server is not None
    url = f"http://127.0.0.1:{daemon.http_server.port}/readyz"
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return response.status, await response.json()


async def test_an_uninstall_under_a_running_daemon_makes_it_unready_until_reinstalled(
    db: str, fake: FakeProvider
) -> None:
    settings = replace(settings_for(db, fake), http_listen="127.0.0.1:0")
    with capture_logs() as logs:
        async with running(Daemon(settings, lock_check_interval=0.5)) as daemon:
            assert daemon.role == LEADER
            await eventually(lambda: _status(daemon, 200), what="ready")

            for line in install.apply(db, "uninstall", Layout(role=DAEMON_ROLE)):
                assert line.startswith("ok")

            await eventually(lambda: _status(daemon, 503), what="unready")
            _, body = await readyz(daemon)
            assert "schema" in body["failed"]  # type: ignore[operator]
            schema_check = body["checks"]["schema"]  # type: ignore[index]
            assert "handoff" in schema_check["missing"]
            assert "install.sql" in schema_check["reason"]

            deploy(db)
            await eventually(lambda: _status(daemon, 200), what="ready again")
    missing = [e for e in logs if e["event"] == "daemon.object_missing"]
    assert missing, "the log says what is missing"
    assert all("uninstall.sql" in e["note"] for e in missing)


async def _status(daemon: Daemon, wanted: int) -> bool:
    status, _ = await readyz(daemon)
    return status == wanted


async def test_a_write_function_dropped_under_a_running_daemon_holds_results_not_refuses_them(
    db: str, app: App, fake: FakeProvider
) -> None:
    # Only the write function goes (a DROP by hand, a restore): before, every
    # result was "refused" row by row as if the row were at fault, counted
    # against its order's attempts, and /readyz stayed 200.
    settings = replace(settings_for(db, fake), http_listen="127.0.0.1:0")
    write_function = schema.Names(Layout()).write_function
    with capture_logs() as logs:
        async with running(Daemon(settings)) as daemon:
            await eventually(lambda: _status(daemon, 200), what="ready")
            with psycopg.connect(db, autocommit=True) as admin:
                admin.execute(
                    sql.SQL("DROP FUNCTION {}({})").format(write_function, schema.write_signature())
                )
            fake.set_script("while-gone", Script.done())
            await app.dispatch(["while-gone"])
            await eventually(lambda: _status(daemon, 503), what="unready")
            _, body = await readyz(daemon)
            assert body["checks"]["schema"]["missing"] == ["write function"]  # type: ignore[index]
            assert await app.in_flight() == 1

            deploy(db)
            await eventually(lambda: _status(daemon, 200), what="ready again")
            await eventually(lambda: _in_flight(app, 0), what="the held result written")
    assert fake.poll_count("while-gone") == 1  # held, not asked again
    assert (await app.rows())["while-gone"]["externalStatus"] == "done"
    assert not [e for e in logs if e["event"] == "writer.row_rejected"]
    assert [e["object"] for e in logs if e["event"] == "daemon.object_missing"] == [
        "write function"
    ]


async def _in_flight(app: App, left: int) -> bool:
    return await app.in_flight() == left
