"""The daemon as systemd sees it (sd_notify), and live reconfiguration."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import aiohttp
import pytest
from structlog.testing import capture_logs

from order_monitor import daemon as daemon_module
from order_monitor.daemon import Daemon
from order_monitor.ops.sdnotify import Notifier
from order_monitor.providers.fake import FakeProvider
from tests.daemon_fixtures import App, eventually, running, settings_for


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    sock.setblocking(False)
    yield sock
    sock.close()


def received(sock: socket.socket) -> list[dict[str, str]]:
    messages = []
    while True:
        try:
            data = sock.recv(4096)
        except BlockingIOError:
            return messages
        messages.append(dict(line.split("=", 1) for line in data.decode().splitlines()))


async def test_the_daemon_tells_systemd_ready_status_watchdog_reloading_and_stopping(
    db: str, app: App, fake: FakeProvider, notify_socket: socket.socket
) -> None:
    notifier = Notifier(notify_socket.getsockname(), watchdog_usec="1000000")
    settings = settings_for(db, fake)
    messages: list[dict[str, str]] = []

    async def saw(key: str, value: str | None = None) -> bool:
        messages.extend(received(notify_socket))
        return any(key in m and (value is None or m[key] == value) for m in messages)

    daemon = Daemon(settings, notifier=notifier)
    async with running(daemon):
        await eventually(lambda: saw("READY", "1"), what="READY=1")
        ready = next(m for m in messages if m.get("READY") == "1")
        assert ready["STATUS"].startswith("leader")
        await app.dispatch(["sd-1"])
        await eventually(lambda: saw("WATCHDOG", "1"), what="a watchdog ping")
        await eventually(lambda: saw("STATUS"), what="a STATUS= line")
        assert any(m.get("STATUS", "").startswith("leader: ") for m in messages)

        daemon.reload(replace(settings, sweep_interval=30.0))
        await eventually(lambda: saw("RELOADING", "1"), what="RELOADING=1")
        reloading = next(m for m in messages if m.get("RELOADING") == "1")
        assert int(reloading["MONOTONIC_USEC"]) > 0
        after = messages.index(reloading)
        await eventually(lambda: saw("READY", "1"), what="READY=1 after the reload")
        assert any(m.get("READY") == "1" for m in messages[after + 1 :])
    await eventually(lambda: saw("STOPPING", "1"), what="STOPPING=1")


async def test_orders_of_an_unconfigured_provider_wait_and_are_picked_up_after_a_reload(
    db: str, app: App, fake: FakeProvider
) -> None:
    settings = settings_for(db, fake)
    with capture_logs() as logs:
        async with running(Daemon(settings)) as daemon:
            await app.dispatch([f"other-{n}" for n in range(3)], provider_id="other")
            await app.dispatch(["known"])
            await eventually(
                lambda: _status(app, "known", "done"), what="the configured provider's order"
            )
            await eventually(
                lambda: _unconfigured_counted(daemon, 3), what="the unknown provider to be noticed"
            )
            warnings = [e for e in logs if e["event"] == "provider.not_configured"]
            assert len(warnings) == 1  # once per provider, not once per order
            assert warnings[0]["provider_id"] == "other"
            assert await app.in_flight() == 3

            (fake_config,) = settings.providers
            other = replace(fake_config, name="other", provider_ids=("other",))
            daemon.reload(replace(settings, providers=(fake_config, other)))
            await eventually(lambda: _finished(app), what="the newly configured provider's orders")
    assert any(e["event"] == "config.reloaded" for e in logs)


async def _status(app: App, ref: str, status: str) -> bool:
    return (await app.rows())[ref]["externalStatus"] == status


async def _unconfigured_counted(daemon: Daemon, count: int) -> bool:
    return daemon.metrics.unconfigured._value.get() >= count


async def _finished(app: App) -> bool:
    return await app.in_flight() == 0


async def test_health_readiness_and_metrics_of_a_running_daemon(
    db: str, app: App, fake: FakeProvider
) -> None:
    settings = replace(settings_for(db, fake), http_listen="127.0.0.1:0")
    daemon = Daemon(settings)
    async with running(daemon), aiohttp.ClientSession() as http:
        assert daemon.http_server is not None
        base = f"http://127.0.0.1:{daemon.http_server.port}"
        await app.dispatch(["metered"])
        await eventually(lambda: _finished(app), what="an order to finish")

        async with http.get(f"{base}/healthz") as response:
            assert response.status == 200

        async def ready() -> bool:
            async with http.get(f"{base}/readyz") as response:
                return response.status == 200 and (await response.json())["role"] == "leader"

        await eventually(ready, what="/readyz to say ready (after the first housekeeping)")

        async with http.get(f"{base}/metrics") as response:
            text = await response.text()
        assert 'order_monitor_checks_total{outcome="done",provider="fake"} 1.0' in text
        assert 'order_monitor_orders_finished_total{outcome="done"} 1.0' in text
        assert "order_monitor_queue_lag_seconds" in text
        assert "order_monitor_leader 1.0" in text
        assert "order_id" not in text


async def test_with_the_database_down_systemd_still_hears_from_us_and_stop_is_prompt(
    notify_socket: socket.socket, fake: FakeProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A database down at boot (or for longer than WatchdogSec) must not get us
    killed by the watchdog or by the start timeout: we are waiting, not wedged."""
    monkeypatch.setattr(daemon_module, "READY_GRACE", 0.5)
    unreachable = "host=127.0.0.1 port=1 dbname=shop connect_timeout=1"
    notifier = Notifier(notify_socket.getsockname(), watchdog_usec="1000000")
    daemon = Daemon(settings_for(unreachable, fake), notifier=notifier, lock_poll=0.1)
    messages: list[dict[str, str]] = []

    async def saw(key: str, value: str) -> bool:
        messages.extend(received(notify_socket))
        return any(m.get(key) == value for m in messages)

    task = asyncio.create_task(daemon.run())
    await eventually(lambda: saw("READY", "1"), within=10, what="READY=1 while waiting")
    ready = next(m for m in messages if m.get("READY") == "1")
    assert ready["STATUS"].startswith("waiting for the database: ")
    assert "port 1" in ready["STATUS"] or "Connection refused" in ready["STATUS"]
    pings = sum(1 for m in messages if m.get("WATCHDOG") == "1")
    await eventually(
        lambda: _more_pings(notify_socket, messages, pings + 2),
        within=10,
        what="watchdog pings while the database is down",
    )
    daemon.request_stop()
    await asyncio.wait_for(task, 5)  # not a 30 s backoff sleep


async def _more_pings(sock: socket.socket, messages: list[dict[str, str]], count: int) -> bool:
    messages.extend(received(sock))
    return sum(1 for m in messages if m.get("WATCHDOG") == "1") >= count


async def test_a_reload_keeps_the_settings_that_need_a_restart(
    db: str, app: App, fake: FakeProvider
) -> None:
    settings = settings_for(db, fake)
    with capture_logs() as logs:
        async with running(Daemon(settings)) as daemon:
            daemon.reload(replace(settings, batch_size=7, sweep_interval=42.0))
            assert daemon.settings.batch_size == settings.batch_size  # needs a restart
            assert daemon.settings.sweep_interval == 42.0  # applied live
            assert daemon.sweeper is not None
            assert daemon.sweeper.interval == 42.0
    (warning,) = [e for e in logs if e["event"] == "config.restart_needed"]
    assert warning["settings"] == ["ORDER_MONITOR_BATCH_SIZE"]
