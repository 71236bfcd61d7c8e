"""Wiring: listener, sweeper, checker and writer in one asyncio.TaskGroup.

The pieces are supervised together: if one dies of an unexpected error the
group cancels the others and the process exits non-zero, so the service
manager restarts a whole daemon, never a half one. Expected trouble (a
database restart, a provider outage) is handled inside each piece and never
reaches here.

Stopping (SIGTERM/SIGINT): stop taking due orders, let checks under way
finish for up to drain_timeout, write what finished, abandon the rest (the
next start's sweep picks them up where the policy says), close, exit 0.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import aiohttp
import psycopg
from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    stop_never,
    wait_exponential,
    wait_random,
)

from order_monitor import __version__
from order_monitor.checker import Checker, CheckerLimits
from order_monitor.config import Settings
from order_monitor.db import ColumnLimits, ManagedConnection, Queries, column_limits
from order_monitor.listener import Listener
from order_monitor.logs import get_logger
from order_monitor.metrics import Metrics
from order_monitor.policy import describe
from order_monitor.providers.base import Provider
from order_monitor.providers.registry import build_provider
from order_monitor.scheduler import Scheduler
from order_monitor.sweep import Sweeper
from order_monitor.writer import Writer

log = get_logger()

ProviderFactory = Callable[
    [Settings, aiohttp.ClientSession, asyncio.Semaphore, Metrics], Mapping[str, Provider]
]


def build_providers(
    settings: Settings,
    session: aiohttp.ClientSession,
    session_limit: asyncio.Semaphore,
    metrics: Metrics,
) -> dict[str, Provider]:
    """Every configured provider, keyed by each provider id it serves."""
    by_id: dict[str, Provider] = {}
    for config in settings.providers:
        provider = build_provider(
            config, session=session, session_limit=session_limit, metrics=metrics
        )
        for provider_id in config.provider_ids:
            by_id[provider_id] = provider
    return by_id


@dataclass
class DaemonState:
    """What health checks and status lines read about a running daemon."""

    started_at: float = field(default_factory=time.monotonic)
    ready: bool = False
    stopping: bool = False


class Daemon:
    def __init__(
        self,
        settings: Settings,
        *,
        metrics: Metrics | None = None,
        provider_factory: ProviderFactory = build_providers,
        clock: Callable[[], float] = time.monotonic,
        on_ready: Callable[[], None] | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.scheduler = Scheduler()
        self.state = DaemonState()
        self._provider_factory = provider_factory
        self._clock = clock
        self._on_ready = on_ready
        self._stop = asyncio.Event()
        self._reload: Callable[[], Settings] | None = None
        self.listener: Listener | None = None
        self.sweeper: Sweeper | None = None
        self.checker: Checker | None = None
        self.writer: Writer | None = None
        self._session: aiohttp.ClientSession | None = None
        self._session_limit = asyncio.Semaphore(settings.concurrency)
        self.metrics.track(self.metrics.pending, lambda: float(len(self.scheduler)))
        self.metrics.track(self.metrics.lag, lambda: self.scheduler.lag(self._clock()))

    def request_stop(self) -> None:
        self.state.stopping = True
        self._stop.set()

    def reload(self, new: Settings) -> None:
        """Apply settings that can change live (providers, timings, limits).

        Connection, table layout and channels need a restart: a change to
        them is reported, not applied.
        """
        old = self.settings
        restart_needed = [
            name
            for name, changed in (
                ("ORDER_MONITOR_DSN", new.dsn != old.dsn),
                ("table layout / channels", new.layout != old.layout),
                ("ORDER_MONITOR_CONCURRENCY", new.concurrency != old.concurrency),
                ("ORDER_MONITOR_HTTP_LISTEN", new.http_listen != old.http_listen),
            )
            if changed
        ]
        if restart_needed:
            log.warning("config.restart_needed", settings=restart_needed)
        if self._session is None or self.checker is None or self.sweeper is None:
            # Still waiting for the database: the new settings simply apply from the start.
            self.settings = new
            log.info("config.reloaded", running=False)
            return
        providers = self._provider_factory(new, self._session, self._session_limit, self.metrics)
        self.checker.reconfigure(_lookup(providers), new.policy)
        self.sweeper.policy = new.policy
        self.sweeper.interval = new.sweep_interval
        self.settings = new
        log.info(
            "config.reloaded",
            providers=sorted({p.name for p in providers.values()}),
            sweep_interval_s=new.sweep_interval,
        )
        # Orders of a newly configured provider are found by this sweep.
        self.sweeper.request()

    async def run(self) -> None:
        settings = self.settings
        dsn = settings.dsn.reveal()
        log.info(
            "daemon.starting",
            version=__version__,
            database=settings.safe_dsn,
            table=f"{settings.layout.schema}.{settings.layout.table}",
            channel=settings.layout.channel,
            providers=[p.name for p in settings.providers],
            schedule=describe(settings.policy).splitlines()[-1],
        )
        reader = ManagedConnection(dsn, "reader")
        writer_conn = ManagedConnection(dsn, "writer")
        queries = Queries(settings.layout)
        try:
            columns = await self._wait_for_database(reader)
            if columns is None:
                return
            connector = aiohttp.TCPConnector(limit=settings.concurrency, ttl_dns_cache=300)
            async with aiohttp.ClientSession(
                connector=connector,
                headers={"User-Agent": f"order-monitor/{__version__}"},
                raise_for_status=False,
            ) as session:
                self._session = session
                providers = self._provider_factory(
                    settings, session, self._session_limit, self.metrics
                )
                await self._serve(reader, writer_conn, queries, columns, providers)
        finally:
            await reader.close()
            await writer_conn.close()
            log.info("daemon.stopped", pending=len(self.scheduler))

    async def _wait_for_database(self, reader: ManagedConnection) -> ColumnLimits | None:
        """Connect and check the table, retrying while the database is unreachable.

        A database that is still starting is waited for; a table or column that
        does not exist is a configuration error and stops the daemon.
        """
        retrying = AsyncRetrying(
            retry=retry_if_exception_type(psycopg.OperationalError),
            wait=wait_exponential(multiplier=0.5, max=30.0) + wait_random(0, 1),
            stop=stop_never,
            before_sleep=lambda state: log.warning(
                "database.unreachable",
                error=str(state.outcome.exception()).strip() if state.outcome else None,
                retry_in_s=round(state.upcoming_sleep, 1),
            ),
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                if self._stop.is_set():
                    return None
                try:
                    return await column_limits(await reader.get(), self.settings.layout)
                except psycopg.OperationalError:
                    await reader.reset()
                    raise
        return None  # pragma: no cover - stop_never

    async def _serve(
        self,
        reader: ManagedConnection,
        writer_conn: ManagedConnection,
        queries: Queries,
        columns: ColumnLimits,
        providers: Mapping[str, Provider],
    ) -> None:
        settings = self.settings
        self.writer = writer = Writer(
            writer_conn, queries, self.scheduler, self.metrics, self._clock, settings.batch_size
        )
        self.checker = checker = Checker(
            conn=reader,
            queries=queries,
            providers=_lookup(providers),
            scheduler=self.scheduler,
            writer=writer,
            policy=settings.policy,
            writes=settings.writes,
            columns=columns,
            limits=CheckerLimits(
                batch_size=settings.batch_size,
                max_in_flight=max(settings.batch_size * 4, settings.concurrency * 50),
                max_in_flight_per_provider=max(settings.batch_size * 2, 1000),
            ),
            metrics=self.metrics,
            clock=self._clock,
        )
        writer.on_rescheduled = checker.wake
        self.sweeper = sweeper = Sweeper(
            reader,
            queries,
            self.scheduler,
            policy=settings.policy,
            interval=settings.sweep_interval,
            page_size=settings.batch_size,
            metrics=self.metrics,
            clock=self._clock,
            on_scheduled=checker.wake,
        )
        self.listener = listener = Listener(
            settings.dsn.reveal(),
            settings.layout.channel,
            on_order=self._notified,
            on_connected=self._listener_connected,
            metrics=self.metrics,
            health_interval=settings.listener_health_interval,
        )

        async with asyncio.TaskGroup() as tg:
            background = [
                tg.create_task(listener.run(), name="listener"),
                tg.create_task(sweeper.run(), name="sweeper"),
            ]
            writer_task = tg.create_task(writer.run(), name="writer")
            checker_task = tg.create_task(checker.run(), name="checker")
            await self._stop.wait()

            log.info("daemon.stopping", under_way=checker.under_way, pending=len(self.scheduler))
            checker.stop()
            await checker_task
            abandoned = await checker.drain(settings.drain_timeout)
            await writer.close()
            try:
                await asyncio.wait_for(writer_task, settings.drain_timeout)
            except TimeoutError:
                log.error("daemon.write_abandoned", backlog=writer.backlog)
            for task in background:
                task.cancel()
            if abandoned:
                log.warning(
                    "daemon.checks_abandoned",
                    orders=abandoned,
                    note="checked again after restart, where the schedule stands",
                )

    def _notified(self, order: uuid.UUID) -> None:
        due = self._clock() + self.settings.policy.initial_delay
        if self.scheduler.offer(order.int, due) and self.checker is not None:
            self.checker.wake()

    def _listener_connected(self) -> None:
        assert self.sweeper is not None
        self.sweeper.request()
        if not self.state.ready:
            self.state.ready = True
            if self._on_ready is not None:
                self._on_ready()


def _lookup(providers: Mapping[str, Provider]) -> Callable[[str | None], Provider | None]:
    def lookup(provider_id: str | None) -> Provider | None:
        return providers.get(provider_id) if provider_id is not None else None

    return lookup
