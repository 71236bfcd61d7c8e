"""The operator page's routes: ``/``, ``/order?id=…`` and ``/page.css``.

Served by the daemon's HTTP server (``ops.http``), which bounds connections
and header time for these routes as for the probes. Read-only: every route
is a GET, no handler changes anything, and the one form (the order lookup)
is a GET to a page of ours.

Access (:func:`access_rule`):

* with ``ORDER_MONITOR_PAGE_TOKEN`` set, every request needs it, as the
  password of HTTP basic auth (any user name: a browser asks for it) or as
  ``Authorization: Bearer <token>``; compared in constant time, never logged;
* without one, the page is served only when the server listens on loopback,
  and only to requests whose ``Host`` names loopback: a web page elsewhere
  cannot read it through DNS rebinding, and a reverse proxy in front passes
  the upstream's address as ``Host`` by default (nginx's ``$proxy_host``);
* on any other address without a token it answers 403 and says what to set.

What each response carries: a strict ``Content-Security-Policy`` (nothing but
our own stylesheet; no script at all, so none injected can run), no caching,
no referrer, no framing.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import datetime as dt
import hmac
import ipaddress
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib import resources
from typing import Any, Final, Literal

import psycopg
from aiohttp import web

from order_monitor import __version__
from order_monitor.config import Settings
from order_monitor.db import AsyncConn, ManagedConnection
from order_monitor.engine.unreadable import primary_message
from order_monitor.logs import get_logger
from order_monitor.metrics import Metrics
from order_monitor.operator import database_error
from order_monitor.operator.check import not_in_flight_reason
from order_monitor.ops.http import parse_listen
from order_monitor.page.activity import CheckActivity
from order_monitor.page.cache import Shared, SharedByKey
from order_monitor.page.ledger import GaveUpLedger
from order_monitor.page.reading import GAVE_UP_LISTED, OrderRow, PageStatements, TableReading
from order_monitor.page.render import render
from order_monitor.page.source import (
    PageSource,
    daemon_facts,
    next_check,
    provider_states,
    utc_now,
)
from order_monitor.page.view import (
    Deliveries,
    OrderView,
    Overview,
    gave_up_lines,
    provider_lines,
)
from order_monitor.redaction import Secret

log = get_logger(component="page")

CONTENT_SECURITY_POLICY: Final = (
    "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
    "base-uri 'none'; frame-ancestors 'none'"
)
_HEADERS: Final = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}
_CHALLENGE: Final = {"WWW-Authenticate": 'Basic realm="order-monitor", charset="UTF-8"'}
_STYLESHEET: Final = resources.files("order_monitor.page").joinpath("static/page.css").read_bytes()

Readiness = Callable[[], Awaitable[tuple[dict[str, dict[str, Any]], list[str]]]]
Access = Literal["token", "loopback", "refused"]


def is_loopback(host: str | None) -> bool:
    """Whether *host* (an address to listen on, or a Host header's name) is loopback only."""
    if host is None or host == "":
        return False  # every interface
    name = host.strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def access_rule(listen_host: str | None, token: Secret | None) -> Access:
    if token is not None:
        return "token"
    return "loopback" if is_loopback(listen_host) else "refused"


def host_of(header: str | None) -> str | None:
    """The host part of a Host header ('[::1]:9187' -> '::1'), None when absent."""
    if not header:
        return None
    if header.startswith("["):
        return header[1 : header.find("]")] if "]" in header else None
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def token_given(authorization: str | None, token: str) -> bool:
    """Whether the Authorization header carries *token* (basic auth's password, or bearer)."""
    if not authorization:
        return False
    scheme, _, value = authorization.partition(" ")
    value = value.strip()
    offered: bytes
    if scheme.lower() == "bearer":
        offered = value.encode("utf-8", "surrogateescape")
    elif scheme.lower() == "basic":
        try:
            decoded = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            return False
        _, sep, password = decoded.partition(b":")
        if not sep:
            return False
        offered = password
    else:
        return False
    return hmac.compare_digest(offered, token.encode("utf-8"))


def check_totals(metrics: Metrics) -> dict[tuple[str, str], float]:
    """order_monitor_checks_total by (provider, outcome)."""
    totals: dict[tuple[str, str], float] = {}
    for metric in metrics.checks.collect():
        for sample in metric.samples:
            if sample.name.endswith("_total"):
                key = (sample.labels["provider"], sample.labels["outcome"])
                totals[key] = sample.value
    return totals


@dataclass(frozen=True, slots=True)
class _Read:
    reading: TableReading
    at: dt.datetime
    at_monotonic: float


class OperatorPage:
    """The page: its routes, its one shared reading, and what it remembers between them."""

    def __init__(
        self,
        source: PageSource,
        *,
        listen: str,
        metrics: Metrics,
        readiness: Readiness | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], dt.datetime] = utc_now,
        connection: ManagedConnection | None = None,
    ) -> None:
        settings: Settings = source.settings
        self._source = source
        self._settings = settings
        self._token = settings.page_token
        self.access = access_rule(parse_listen(listen)[0], self._token)
        self._listen = listen
        self._metrics = metrics
        self._readiness = readiness
        self._clock = clock
        self._wall = wall
        self.refresh = settings.page_refresh
        self._conn = connection or ManagedConnection(settings.dsn.reveal(), "page")
        self._statements = PageStatements(settings)
        self.ledger = GaveUpLedger()
        self.activity = CheckActivity(started=clock())
        self.shared: Shared[_Read] = Shared(self.refresh, clock=clock)
        self.orders: SharedByKey[uuid.UUID, OrderRow | None] = SharedByKey(
            self.refresh, clock=clock
        )
        self._last: _Read | None = None
        self._seed_problem: str | None = None

    # --- wiring -------------------------------------------------------------------

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/", self._overview_handler),
            web.get("/order", self._order_handler),
            web.get("/page.css", self._stylesheet),
        ]

    def gave_up(self, order: uuid.UUID) -> None:
        """The writer gave *order* up (engine.writer's on_finished, for gave_up only)."""
        self.ledger.record(order, self._clock())

    async def run(self) -> None:
        """Keep the hour of check counts, whether anyone looks or not."""
        if self.access == "refused":
            log.warning(
                "page.refused",
                listen=self._listen,
                reason="the page is not served on an address that is not loopback without "
                "ORDER_MONITOR_PAGE_TOKEN; /healthz, /readyz and /metrics are",
            )
        while True:
            self.activity.observe(self._clock(), check_totals(self._metrics))
            await asyncio.sleep(self.activity.sample_every / 4)

    async def close(self) -> None:
        await self._conn.close()

    # --- reading ------------------------------------------------------------------

    async def _read(self) -> _Read:
        try:
            conn = await self._conn.get()
            term = self._source.term
            if self.ledger.seeded_for != term:
                await self._seed(conn, term)
            asked = self.ledger.recent(self._clock())
            reading = await self._statements.read(conn, asked)
        except (psycopg.Error, OSError):
            self._metrics.page_reads.labels("failed").inc()
            await self._conn.reset()
            raise
        self._metrics.page_reads.labels("ok").inc()
        # Only the listed ones were read whole: those not returned need no human now.
        listed = {row.id for row in reading.gave_up}
        self.ledger.forget(order for order in asked[:GAVE_UP_LISTED] if order not in listed)
        read = _Read(reading, self._wall(), self._clock())
        self._last = read
        return read

    async def _seed(self, conn: AsyncConn, term: int) -> None:
        started = self._clock()
        try:
            found = await self._statements.gave_up_within(conn, self.ledger.window)
        except psycopg.errors.QueryCanceled:
            self._seed_problem = (
                f"orders that gave up before {self._wall():%H:%M} UTC are not listed: reading "
                "the table for them took longer than 30 s (`order-monitor status` lists them)"
            )
            log.warning("page.gave_up_scan_too_slow", timeout_s=30)
            self.ledger.seeded_for = term
            return
        now = self._clock()
        self.ledger.seed(((order, now - age) for order, age in found), term=term)
        self._seed_problem = None
        log.info(
            "page.gave_up_scanned",
            orders=len(found),
            duration_s=round(self._clock() - started, 3),
        )

    async def overview(self) -> Overview:
        problem: str | None = None
        try:
            read: _Read | None = await self.shared.get(self._read)
        except (psycopg.Error, OSError) as exc:
            problem = self._problem(exc)
            read = self._last
        now = self._wall()
        mono = self._clock()
        ready, not_ready = await self._ready()
        # The source's, not ours: a reload (SIGHUP) may have changed the providers.
        settings = self._source.settings
        reading = read.reading if read is not None else TableReading([], [])
        lines, unserved = provider_lines(
            settings.providers,
            reading.in_flight,
            self.activity.last_hour(mono, check_totals(self._metrics)),
            provider_states(self._source),
            now,
        )
        deliveries = None
        if reading.outbox is not None:
            actions = {o: a.name for a in settings.actions for o in a.outcomes}
            deliveries = Deliveries(reading.outbox, reading.dead_letters, actions)
        return Overview(
            daemon=daemon_facts(self._source, now=now, ready=ready, not_ready=not_ready),
            read_at=read.at if read is not None else None,
            read_age_s=mono - read.at_monotonic if read is not None else None,
            read_problem=problem,
            providers=lines,
            unserved=unserved,
            in_flight_total=reading.in_flight_total,
            gave_up=gave_up_lines(reading.gave_up, settings.providers),
            gave_up_count=max(reading.gave_up_count, len(reading.gave_up)),
            gave_up_note=self._seed_problem
            or (
                f"more than {self.ledger.capacity} orders gave up: the oldest are not listed"
                if self.ledger.overflowed
                else None
            ),
            deliveries=deliveries,
            refresh_s=self.refresh,
            hour_window_s=self.activity.window,
        )

    async def order(self, order_id: uuid.UUID) -> OrderView:
        now = self._wall()
        problem = None
        try:
            row = await self.orders.get(order_id, lambda: self._read_order(order_id))
        except (psycopg.Error, OSError) as exc:
            row, problem = None, f"the order cannot be read: {self._problem(exc)}"
        in_flight = row is not None and row.in_flight
        next_one = next_check(self._source, order_id, now=now, in_flight=in_flight)
        if row is None:
            return OrderView(order_id, None, None, None, next_one, problem=problem)
        settings = self._source.settings
        layout = settings.layout
        config = settings.provider_for(row.provider_id) if row.provider_id else None
        return OrderView(
            order_id,
            row,
            (config.name, config.kind) if config is not None else None,
            None if row.in_flight else not_in_flight_reason(row, layout),
            next_one,
            dispatch_issue_text=(
                row.dispatch_issue.describe(layout) if row.dispatch_issue is not None else None
            ),
            message_shown=row.external_status != settings.writes.done_external_status,
        )

    async def _read_order(self, order_id: uuid.UUID) -> OrderRow | None:
        try:
            conn = await self._conn.get()
            return await self._statements.order(conn, order_id)
        except (psycopg.OperationalError, OSError):
            await self._conn.reset()
            raise

    async def _ready(self) -> tuple[bool, tuple[str, ...]]:
        if self._readiness is None:
            return True, ()
        checks, failed = await self._readiness()
        return not failed, tuple(
            f"{name}: {checks[name].get('reason', 'failed')}" for name in failed
        )

    def _problem(self, exc: BaseException) -> str:
        if isinstance(exc, psycopg.Error):
            if isinstance(exc, psycopg.OperationalError):
                return database_error(exc, self._settings.dsn.reveal())
            return f"{type(exc).__name__}: {primary_message(exc)}"
        return f"{type(exc).__name__}: {exc}"

    # --- handlers -----------------------------------------------------------------

    def _refusal(self, request: web.Request) -> web.Response | None:
        """The response that refuses *request*, or None when it may see the page."""
        if self.access == "refused":
            return self._message(
                403,
                "Not served on this address",
                "The operator page is served on a non-loopback address only with "
                "ORDER_MONITOR_PAGE_TOKEN set. Set it, or listen on 127.0.0.1 behind a "
                "reverse proxy that checks who may see it.",
            )
        if self.access == "loopback":
            if not is_loopback(host_of(request.headers.get("Host"))):
                return self._message(
                    403,
                    "Wrong host",
                    "Without ORDER_MONITOR_PAGE_TOKEN the page answers only requests addressed "
                    "to a loopback name (127.0.0.1, [::1], localhost).",
                )
            return None
        assert self._token is not None
        if token_given(request.headers.get("Authorization"), self._token.reveal()):
            return None
        response = self._message(
            401, "Sign in", "The page needs ORDER_MONITOR_PAGE_TOKEN as the password."
        )
        response.headers.update(_CHALLENGE)
        return response

    def _html(self, body: str, status: int = 200) -> web.Response:
        return web.Response(
            text=body, status=status, content_type="text/html", charset="utf-8", headers=_HEADERS
        )

    def _message(self, status: int, heading: str, text: str) -> web.Response:
        return self._html(
            render(
                "message.html",
                heading=heading,
                text=text,
                refresh_s=0,
                version=__version__,
            ),
            status,
        )

    async def _overview_handler(self, request: web.Request) -> web.Response:
        refused = self._refusal(request)
        if refused is not None:
            return refused
        view = await self.overview()
        return self._html(
            render(
                "overview.html",
                view=view,
                refresh_s=view.refresh_s,
                version=view.daemon.version,
            )
        )

    async def _order_handler(self, request: web.Request) -> web.Response:
        refused = self._refusal(request)
        if refused is not None:
            return refused
        raw = request.query.get("id", "").strip()
        try:
            order_id = uuid.UUID(raw)
        except ValueError:
            return self._message(
                400,
                "Not an order id",
                "An order id is a UUID, e.g. 0b9f5c3e-8a7d-4f7e-9c1a-2f4b6d8e0a1c.",
            )
        view = await self.order(order_id)
        return self._html(
            render("order.html", view=view, refresh_s=self.refresh, version=__version__)
        )

    async def _stylesheet(self, request: web.Request) -> web.Response:
        refused = self._refusal(request)
        if refused is not None:
            return refused
        return web.Response(
            body=_STYLESHEET,
            content_type="text/css",
            charset="utf-8",
            headers={**_HEADERS, "Cache-Control": "max-age=300"},
        )
