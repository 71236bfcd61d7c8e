"""housekeeping: each round reads the queue and feeds the watchdog, the database up or down.

A real server (the `db` fixture, logged in as the daemon's role) and a
datagram socket we bind ourselves where systemd's would be.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import tempfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from psycopg.conninfo import make_conninfo
from structlog.testing import capture_logs

from order_monitor.db import ManagedConnection
from order_monitor.metrics import Metrics
from order_monitor.ops.housekeeping import housekeeping
from order_monitor.ops.sdnotify import Notifier
from tests.conftest import as_daemon
from tests.providers import closed_port


class Systemd:
    """The receiving end of NOTIFY_SOCKET: every datagram, in order."""

    def __init__(self, sock: socket.socket, address: str) -> None:
        self.sock = sock
        self.address = address

    async def until(self, message: bytes) -> list[bytes]:
        """Datagrams up to and including the first that is *message*."""
        loop = asyncio.get_running_loop()
        seen: list[bytes] = []
        while not seen or seen[-1] != message:
            seen.append(await loop.sock_recv(self.sock, 4096))
        return seen


@pytest.fixture
async def systemd() -> AsyncIterator[Systemd]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.setblocking(False)
    # sun_path holds at most 107 bytes: pytest's tmp_path can be longer.
    with tempfile.TemporaryDirectory(prefix="om-hk-") as directory:
        path = str(Path(directory) / "notify")
        sock.bind(path)
        try:
            yield Systemd(sock, path)
        finally:
            sock.close()


@contextlib.asynccontextmanager
async def rounds(
    dsn: str, systemd: Systemd, metrics: Metrics, seen: Callable[[], None]
) -> AsyncIterator[None]:
    """Housekeeping running, every 50 ms, until the block ends."""
    reader = ManagedConnection(dsn, "housekeeping test")
    notifier = Notifier(systemd.address)
    task = asyncio.create_task(
        housekeeping(
            reader,
            metrics=metrics,
            notifier=notifier,
            status=lambda: "leader: listening",
            interval=0.05,
            database_seen=seen,
        )
    )
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await reader.close()
        notifier.close()


async def test_a_round_reads_the_queue_then_sends_status_and_the_watchdog(
    db: str, systemd: Systemd
) -> None:
    metrics = Metrics()
    metrics.notification_queue.set(-1.0)  # anything the query cannot return
    reached = asyncio.Event()
    async with rounds(as_daemon(db), systemd, metrics, reached.set), asyncio.timeout(10):
        # The timeout is a guard against a hang, not a timing assertion.
        first = await systemd.until(b"WATCHDOG=1")
        second = await systemd.until(b"WATCHDOG=1")
    assert reached.is_set()
    assert first == second == [b"STATUS=leader: listening", b"WATCHDOG=1"]
    # An idle test database's queue is empty.
    assert metrics.registry.get_sample_value("order_monitor_pg_notification_queue_usage_ratio") == 0


async def test_the_watchdog_is_fed_while_the_database_is_down(systemd: Systemd) -> None:
    # The engine rides a database outage out by itself: the pings must go on,
    # or systemd would restart a daemon that is doing the right thing.
    down = make_conninfo(f"postgresql://127.0.0.1:{closed_port()}/none", connect_timeout=1)
    reached = asyncio.Event()
    with capture_logs() as logs:
        async with rounds(down, systemd, Metrics(), reached.set), asyncio.timeout(30):
            # The timeout is a guard against a hang, not a timing assertion.
            await systemd.until(b"WATCHDOG=1")
            await systemd.until(b"WATCHDOG=1")
    assert not reached.is_set()
    unreachable = [e for e in logs if e["event"] == "database.unreachable"]
    assert len(unreachable) >= 2
