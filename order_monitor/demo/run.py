"""A run: the daemon, the application (its dispatching and its API) and the fake together.

Until every order has ended and every delivery to the application is
settled, or the deadline has passed.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from decimal import Decimal
from types import FrameType
from typing import Any, Final, Literal, TextIO

import psycopg
from psycopg import sql

from order_monitor.config import Settings
from order_monitor.daemon import Daemon
from order_monitor.delivery.relay import RelayTiming
from order_monitor.demo.application import Application
from order_monitor.demo.application_api import WALLET, ApplicationApi
from order_monitor.demo.live import LiveView, Snapshot, Tally
from order_monitor.demo.setup import DEMO_POLICY, DemoDatabase, demo_behaviour, demo_settings
from order_monitor.engine.policy import BackoffPolicy
from order_monitor.metrics import counter_total
from order_monitor.providers.fake import FakeProvider


class Interrupts:
    """SIGINT and SIGTERM for the whole run, start-up and clean-up included.

    Python-level handlers (not the event loop's), so that they stay in force
    outside the loop too: a signal during start-up or clean-up is remembered
    and never interrupts the embedded server half-started or half-stopped
    (that would leave a postgres process behind). Inside the loop the first
    signal asks for the graceful stop and a second one hurries it.
    """

    SIGNALS: Final = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.count = 0
        self._previous: dict[int, Any] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._callback: Callable[[int], None] | None = None

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def attach(self, loop: asyncio.AbstractEventLoop, callback: Callable[[int], None]) -> None:
        self._loop, self._callback = loop, callback

    def detach(self) -> None:
        self._loop = self._callback = None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.count += 1
        if self._loop is not None and self._callback is not None:
            # Runs between two bytecodes of the loop's thread: hand over safely.
            self._loop.call_soon_threadsafe(self._callback, self.count)


#: The relay's pace in the demo: seconds where production has minutes (a
#: retry after 0.5 s instead of 5 s), like the demo's checking policy.
DEMO_RELAY: Final = RelayTiming(poll_interval=0.5, summary_interval=0.5, retry_scale=0.1)
#: Deliveries the application's API answers 503 at the start: its bad moment,
#: which the relay rides out (retried, nothing lost, nothing twice).
API_HICCUPS: Final = 2
#: A token that needs escaping in a header and must never show in a log.
API_TOKEN_SUFFIX: Final = "%'\"\\=?#+; x"  # noqa: S105 - not a secret: its random part is

RunStatus = Literal["finished", "unfinished", "daemon_failed", "app_failed", "interrupted"]


@dataclass
class RunResult:
    """How the run ended, and the figures the summary prints."""

    status: RunStatus = "interrupted"
    final: Snapshot | None = None
    error: str | None = None
    polls: list[int] = field(default_factory=list)
    checks_by_outcome: dict[str, float] = field(default_factory=dict)
    durations_ms: tuple[int | None, int | None] = (None, None)
    server_version: str = ""
    #: Refunds the application made (wallet records), and their total.
    refunds: int = 0
    refunded: Decimal = Decimal(0)
    #: Orders refunded although not rejected (must stay 0: one refund per rejection).
    stray_refunds: int = 0
    #: Requests the application's API received.
    api_requests: int = 0


def deadline_for(orders: int, rate: float, policy: BackoffPolicy) -> float:
    """Seconds after which an unfinished run is called unfinished.

    Dispatching, plus the longest schedule an order can have (every gap at
    its largest jitter), plus room for the last deliveries, start-up and a
    loaded machine.
    """
    span = replace(policy, jitter=0.0).slots(0)[-1].offset
    return orders / rate + min(span * (1 + policy.jitter), policy.max_age) + 40.0


async def play(
    database: DemoDatabase,
    *,
    orders: int,
    rate: float,
    seed: int,
    interrupts: Interrupts,
    out: TextIO,
) -> RunResult:
    """Fake provider, daemon and application, until every order has ended and is
    delivered (or a signal)."""
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    assert main is not None
    stop = asyncio.Event()
    result = RunResult()

    def on_signal(count: int) -> None:
        if count == 1:
            out.write("\nStopping (Ctrl-C again to hurry)...\n")
            out.flush()
            stop.set()
        else:
            main.cancel()

    interrupts.attach(loop, on_signal)
    if interrupts.count:  # a signal came during start-up: do not start at all
        stop.set()
    dsn = database.admin_dsn
    token = secrets.token_urlsafe(16)
    fake = FakeProvider(demo_behaviour(seed), token=token, seed=seed)
    api = ApplicationApi(dsn, token=secrets.token_urlsafe(16) + API_TOKEN_SUFFIX)
    api.fail_next(503, API_HICCUPS)
    try:
        async with (
            fake.running() as provider_url,
            api.running() as api_url,
            await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn,
        ):
            result.server_version = await _server_version(conn)
            settings = demo_settings(database.daemon_dsn, provider_url, token, api_url, api.token)
            ready = asyncio.Event()
            daemon = Daemon(settings, on_ready=ready.set, relay_timing=DEMO_RELAY)
            app = Application(dsn, orders=orders, rate=rate, seed=seed)
            tally = Tally(app, daemon, fake, settings.writes, settings.layout)
            view = LiveView(
                out,
                f"order-monitor demo: {orders} orders at {rate:g}/s; PostgreSQL "
                f"{result.server_version} (embedded); fake provider on {provider_url};"
                f" the application's API on {api_url}",
            )
            view.start()
            try:
                daemon_task = asyncio.create_task(daemon.run(), name="daemon")
                app_task: asyncio.Task[None] | None = None
                graceful = True
                try:
                    if await _until_ready(daemon, ready, stop, daemon_task, result):
                        if daemon.http_server is not None:
                            view.note(
                                "The operator page, while the demo runs: "
                                f"http://127.0.0.1:{daemon.http_server.port}/"
                            )
                        app_task = asyncio.create_task(app.run(), name="application")
                        await _watch(
                            result, tally, view, conn, stop, daemon_task, app_task, orders, rate
                        )
                except asyncio.CancelledError:
                    graceful = False  # a second signal: no drain, just clean up
                    raise
                finally:
                    app.stop()
                    daemon.request_stop()  # the daemon's own stop path: drain, write, close
                    await _finish(daemon_task, app_task, settings, graceful, result)
                final = await tally.snapshot(conn)
                view.update(final, final=True)
                result.final = final
            finally:
                view.close()
            await _figures(result, conn, app, fake, daemon)
            result.api_requests = len(api.requests)
    finally:
        interrupts.detach()
    return result


async def _finish(
    daemon_task: asyncio.Task[None],
    app_task: asyncio.Task[None] | None,
    settings: Settings,
    graceful: bool,
    result: RunResult,
) -> None:
    """Wait for the stopping daemon (and the application) to end; cancel when hurried."""
    tasks = {daemon_task} if app_task is None else {daemon_task, app_task}
    if graceful:
        # The daemon drains for up to drain_timeout, then writes for up to as long.
        await asyncio.wait(tasks, timeout=settings.drain_timeout * 3 + 5)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    if not daemon_task.cancelled() and daemon_task.exception() is not None:
        failure = daemon_task.exception()
        result.status = "daemon_failed"
        result.error = f"{type(failure).__name__}: {failure}"


async def _watch(
    result: RunResult,
    tally: Tally,
    view: LiveView,
    conn: psycopg.AsyncConnection[Any],
    stop: asyncio.Event,
    daemon_task: asyncio.Task[None],
    app_task: asyncio.Task[None],
    orders: int,
    rate: float,
) -> None:
    deadline = time.monotonic() + deadline_for(orders, rate, DEMO_POLICY)
    while True:
        snap = await tally.snapshot(conn)
        view.update(snap)
        if snap.all_delivered:
            result.status = "finished"
            return
        if daemon_task.done() or (app_task.done() and app_task.exception() is not None):
            result.status = "daemon_failed" if daemon_task.done() else "app_failed"
            if app_task.done() and app_task.exception() is not None:
                result.error = f"the application simulator failed: {app_task.exception()!r}"
            return
        if time.monotonic() > deadline:
            result.status = "unfinished"
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), view.period)
        if stop.is_set():
            result.status = "interrupted"
            return


async def _until_ready(
    daemon: Daemon,
    ready: asyncio.Event,
    stop: asyncio.Event,
    daemon_task: asyncio.Task[None],
    result: RunResult,
) -> bool:
    """Wait for the daemon to listen (it sweeps then): True when the run may begin."""
    waiters = {asyncio.create_task(ready.wait()), asyncio.create_task(stop.wait())}
    await asyncio.wait({*waiters, daemon_task}, timeout=30, return_when=asyncio.FIRST_COMPLETED)
    for waiter in waiters:
        waiter.cancel()
    if stop.is_set():
        return False
    if not ready.is_set():
        result.status = "daemon_failed"
        if not daemon_task.done():
            result.error = "the daemon was not ready within 30 s"
        return False
    # Ready can mean "standing by for the leader lock"; the demo's first orders
    # should find the daemon listening (a sweep would find them anyway, later).
    deadline = time.monotonic() + 10
    while not daemon.listener_connected and not daemon_task.done():
        if stop.is_set() or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.02)
    return not stop.is_set()


async def _server_version(conn: psycopg.AsyncConnection[Any]) -> str:
    cursor = await conn.execute("SHOW server_version")
    row = await cursor.fetchone()
    return str(row[0]).split()[0] if row else "?"


async def _figures(
    result: RunResult,
    conn: psycopg.AsyncConnection[Any],
    app: Application,
    fake: FakeProvider,
    daemon: Daemon,
) -> None:
    result.polls = [fake.poll_count(ref) for ref in app.references[: app.dispatched]]
    result.checks_by_outcome = {
        name: counter_total(daemon.metrics.checks, outcome=name)
        for name in ("pending", "done", "failed", "unknown", "error")
    }
    cursor = await conn.execute(
        'SELECT percentile_disc(0.5) WITHIN GROUP (ORDER BY "durationMs"),'
        ' percentile_disc(0.99) WITHIN GROUP (ORDER BY "durationMs")'
        ' FROM product_orders WHERE "completedAt" IS NOT NULL'
    )
    row = await cursor.fetchone()
    if row is not None:
        result.durations_ms = (row[0], row[1])
    cursor = await conn.execute(
        sql.SQL(
            "SELECT pg_catalog.count(*), coalesce(pg_catalog.sum(w.amount), 0),"
            " pg_catalog.count(*) FILTER (WHERE o.status IS DISTINCT FROM 'rejected')"
            " FROM {wallet} w LEFT JOIN product_orders o ON o.id = w.order_id"
        ).format(wallet=sql.Identifier(WALLET))
    )
    row = await cursor.fetchone()
    if row is not None:
        result.refunds, result.refunded, result.stray_refunds = int(row[0]), row[1], int(row[2])
