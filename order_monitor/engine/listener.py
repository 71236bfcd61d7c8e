"""The LISTEN connection: notifications in, reconnects forever, a sweep after each.

One dedicated autocommit connection, never shared (iterating notifies()
blocks other statements on it). Between notifications it proves itself alive
every few seconds with a round trip bounded by a timeout, so a half-open TCP
connection is replaced instead of silently waiting forever.

LISTEN is issued *before* the catch-up sweep starts: a notification sent
between the two is then either seen by the listener or found by the sweep.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from typing import Final

from psycopg import sql

from order_monitor.db import CONNECTION_ERRORS, AsyncConn, close_within, connect_forever
from order_monitor.engine.bad_payloads import BadPayloads
from order_monitor.logs import get_logger
from order_monitor.metrics import Metrics

log = get_logger()

# A uuid in any of its text forms is at most 45 characters; anything longer is
# junk and is not even parsed.
_MAX_PAYLOAD: Final = 64


def parse_payload(payload: str) -> uuid.UUID | None:
    """The order id in a notification payload, or None if it is not one."""
    text = payload.strip()
    if not text or len(text) > _MAX_PAYLOAD:
        return None
    try:
        return uuid.UUID(text)
    except ValueError:
        return None


class Listener:
    def __init__(
        self,
        dsn: str,
        channel: str,
        *,
        on_order: Callable[[uuid.UUID], None],
        on_connected: Callable[[], None],
        metrics: Metrics,
        health_interval: float = 10.0,
        health_timeout: float = 5.0,
        max_backoff: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._dsn = dsn
        self._channel = channel
        self._on_order = on_order
        self._on_connected = on_connected
        self._metrics = metrics
        # Looked up once: counted for every notification.
        self._accepted = metrics.notifications.labels("accepted")
        self._health_interval = health_interval
        self._health_timeout = health_timeout
        self._max_backoff = max_backoff
        self.connected = False
        self._connections = 0
        self._bad_payloads = BadPayloads(channel, clock=clock)

    async def run(self) -> None:
        """Listen forever; returns only by cancellation."""
        while True:
            conn = await self._connect()
            try:
                await self._serve(conn)
            except CONNECTION_ERRORS as exc:
                log.warning("listener.lost", error=str(exc).strip() or type(exc).__name__)
            finally:
                self.connected = False
                self._metrics.listener_up.set(0)
                await close_within(conn, self._health_timeout)

    async def _connect(self) -> AsyncConn:
        """Connect and LISTEN, retrying until it works."""
        listen = sql.SQL("LISTEN {}").format(sql.Identifier(self._channel))
        conn = await connect_forever(
            self._dsn,
            "listener",
            event="listener.connect_failed",
            max_wait=self._max_backoff,
            prepare=lambda conn: conn.execute(listen),
        )
        self._connections += 1
        self.connected = True
        self._metrics.listener_up.set(1)
        if self._connections == 1:
            log.info("listener.connected", channel=self._channel)
        else:
            self._metrics.reconnects.inc()
            log.info("listener.reconnected", channel=self._channel, connections=self._connections)
        # Whatever was notified while we were away is found by this sweep.
        self._on_connected()
        return conn

    async def _serve(self, conn: AsyncConn) -> None:
        while True:
            async for notify in conn.notifies(timeout=self._health_interval):
                self._handle(notify.payload)
            self._bad_payloads.flush()
            # No traffic for a while: prove the connection still answers.
            async with asyncio.timeout(self._health_timeout):
                await conn.execute("SELECT 1")

    def _handle(self, payload: str) -> None:
        order = parse_payload(payload)
        if order is None:
            self._metrics.notifications.labels("rejected").inc()
            self._bad_payloads.note(payload)
            return
        self._accepted.inc()
        self._on_order(order)
