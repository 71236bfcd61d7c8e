"""``order-monitor check ORDER_ID``: ask the provider about one order, now.

Uses the daemon's own pieces end to end: the re-read query
(:meth:`~order_monitor.db.Queries.fetch_in_flight`), the provider as
:func:`~order_monitor.providers.registry.build_provider` builds it (limits,
timeouts, secret scrubbing), :func:`~order_monitor.engine.decisions.decide`, and the
guarded write (:meth:`~order_monitor.db.Queries.write`). A running daemon is
no obstacle: the write applies only while the row is still in flight with
the same provider reference, so whichever of the two writes second finds the
order finished and is dropped as stale.

Nothing a row holds makes it traceback: an unusable dispatch time (infinite,
NULL, in the future; db.dispatch) is reported and the order is checked as if
dispatched now; a row the re-read cannot read, or a write the database
refuses, is reported by the error's class and primary message, never values.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field
from typing import Final

import aiohttp
import psycopg
from psycopg import sql

from order_monitor import __version__, db, schema
from order_monitor.config import Layout, Settings
from order_monitor.db import InFlightRow, Queries
from order_monitor.db.queries import is_row_error
from order_monitor.engine.decisions import Decision, decide, write_batch
from order_monitor.engine.policy import format_seconds
from order_monitor.engine.unreadable import primary_message
from order_monitor.errors import OrderMonitorError
from order_monitor.metrics import Metrics
from order_monitor.operator import printable
from order_monitor.providers.base import OrderRef, Outcome, Status
from order_monitor.providers.registry import build_provider

PIN_MARK: Final = "  [the customer's code: keep it out of tickets and chats]"


class CheckError(OrderMonitorError):
    """The order cannot be checked (not found, not in flight, no provider)."""

    exit_code = 1


@dataclass(frozen=True, slots=True)
class OrderState:
    """The row as it is, whether in flight or not."""

    id: uuid.UUID
    status: str | None
    external_status: str | None
    reference: str | None
    provider_id: str | None
    in_flight: bool


@dataclass(slots=True)
class CheckResult:
    order: OrderState
    row: InFlightRow
    provider: str
    kind: str
    outcome: Outcome
    asked_in_s: float
    decision: Decision
    dry_run: bool
    #: None when nothing was to be written or it was a dry run.
    written: bool | None = None
    notes: list[str] = field(default_factory=list)
    #: Why the database refused the write (its class and primary message).
    write_error: str | None = None

    @property
    def exit_code(self) -> int:
        """1 when the provider could not be asked (a transport error), else 0."""
        return 1 if self.outcome.status is Status.ERROR else 0


# --- queries ---------------------------------------------------------------------------


async def read_order(conn: db.AsyncConn, layout: Layout, order_id: uuid.UUID) -> OrderState | None:
    c = layout.columns
    cursor = await conn.execute(
        sql.SQL(
            "SELECT {id}, {status}::text, {ext}::text, {ref}::text, {pid}::text,"
            " coalesce({in_flight}, false)"
            " FROM {table} WHERE {id} = %s"
        ).format(
            id=sql.Identifier(c.id),
            status=sql.Identifier(c.status),
            ext=sql.Identifier(c.external_status),
            ref=sql.Identifier(c.provider_ref),
            pid=sql.Identifier(c.provider_id),
            in_flight=schema.in_flight_predicate(layout),
            table=schema.Names(layout).table,
        ),
        (order_id,),
    )
    row = await cursor.fetchone()
    return None if row is None else OrderState(*row)


def not_in_flight_reason(order: OrderState, layout: Layout) -> str:
    """Why the daemon leaves this order alone, in the in-flight rule's own terms."""
    c = layout.columns
    if order.reference is None:
        return f"it has no {c.provider_ref} (the application has not dispatched it)"
    external = (order.external_status or "").lower()
    if external not in layout.in_flight_external_statuses:
        return (
            f"{c.external_status} {order.external_status!r} is not one of the in-flight "
            f"statuses ({', '.join(layout.in_flight_external_statuses)}): it is finished, "
            "or waiting for a human"
        )
    if (order.status or "").lower() in layout.final_statuses:
        return f"{c.status} {order.status!r} is final"
    return "it left flight while being read"


def describe_state(order: OrderState, layout: Layout) -> str:
    c = layout.columns
    return (
        f"{c.status}={order.status!r}, {c.external_status}={order.external_status!r}, "
        f"{c.provider_ref}={order.reference!r}, {c.provider_id}={order.provider_id!r}"
    )


async def run_check(settings: Settings, order_id: uuid.UUID, *, dry_run: bool) -> CheckResult:
    """Check *order_id* once; raise CheckError (exit 1) when it cannot be checked."""
    layout = settings.layout
    table = f"{layout.schema}.{layout.table}"
    async with await db.connect(settings.dsn.reveal(), "check") as conn:
        try:
            order = await read_order(conn, layout, order_id)
        except psycopg.Error as exc:
            if not is_row_error(exc, conn):
                raise
            raise CheckError(_unreadable(order_id, exc)) from None
        if order is None:
            raise CheckError(f"no order with id {order_id} in {table}")
        queries = Queries(layout)
        try:
            rows = await queries.fetch_in_flight(conn, [order_id])
        except psycopg.Error as exc:
            if not is_row_error(exc, conn):
                raise
            raise CheckError(_unreadable(order_id, exc)) from None
        read_at = time.monotonic()
        if not order.in_flight or not rows:
            raise CheckError(
                f"order {order_id} is not in flight, so no provider was asked: "
                f"{not_in_flight_reason(order, layout)} ({describe_state(order, layout)})"
            )
        (row,) = rows
        config = settings.provider_for(row.provider_id) if row.provider_id is not None else None
        if config is None:
            source = settings.providers_file or "the providers file (none is configured)"
            raise CheckError(
                f"order {order_id} has {layout.columns.provider_id}={row.provider_id!r}, which no "
                f"provider in {source} serves: add it to an entry's provider_ids"
            )
        limits = await db.column_limits(conn, layout)

        async with aiohttp.ClientSession(
            headers={"User-Agent": f"order-monitor/{__version__} (check)"}
        ) as session:
            provider = build_provider(
                config, session=session, session_limit=asyncio.Semaphore(1), metrics=Metrics()
            )
            started = time.monotonic()
            outcomes = await provider.check(
                [OrderRef(row.id, row.reference, row.external_order_id)]
            )
            asked_in = time.monotonic() - started
        outcome = outcomes.get(row.id) or Outcome.unknown()
        decision = decide(
            row,
            provider.name,
            outcome,
            elapsed=row.elapsed + (time.monotonic() - read_at),
            policy=settings.policy,
            writes=settings.writes,
            limits=limits,
        )
        result = CheckResult(
            order, row, provider.name, config.kind, outcome, asked_in, decision, dry_run
        )
        if row.dispatch_issue is not None:
            result.notes.append(
                f"dispatch time unusable ({row.dispatch_issue.describe(layout)}): checked as if "
                "dispatched now; the daemon schedules such an order from when it first saw it"
            )
        if dry_run or not decision.writes:
            return result
        try:
            written = await queries.write(conn, write_batch([decision]))
        except psycopg.Error as exc:
            if not is_row_error(exc, conn):
                raise
            result.written = False
            result.write_error = f"{type(exc).__name__}: {primary_message(exc)}"
            return result
        result.written = row.id in written
        return result


def _unreadable(order_id: uuid.UUID, exc: psycopg.Error) -> str:
    return (
        f"order {order_id} cannot be read (the daemon skips it too, warning "
        f"sweep.row_unreadable): {type(exc).__name__}: {primary_message(exc)}"
    )


# --- formatting (pure) -------------------------------------------------------------------


def _or_dash(value: str | None) -> str:
    return "-" if value is None else value


def planned_writes(decision: Decision, layout: Layout) -> list[str]:
    """The columns the decision sets, as ``column = value`` (PIN shown, as in the answer)."""
    c = layout.columns
    if not decision.writes:
        return []
    sets: list[tuple[str, str | None]] = [
        (c.external_status, decision.external_status),
        (c.pin_code, decision.pin),
        (c.provider_message, decision.provider_message),
        (c.last_message, decision.last_message),
        (c.status, decision.status),
    ]
    lines = [f"{name} = {value!r}" for name, value in sets if value is not None]
    lines.append(f"{c.last_sync_at} = now()")
    if decision.finished:
        lines.append(f"{c.completed_at} = now()")
        lines.append(f"{c.duration_ms} = now() - coalesce({c.sent_at}, {c.created_at})")
    return lines


def format_result(result: CheckResult, layout: Layout) -> str:
    o = result.outcome
    d = result.decision
    width = 11
    lines = [
        f"{'order':<{width}}{result.order.id}",
        f"{'provider':<{width}}{result.provider} (kind {result.kind}, "
        f"{layout.columns.provider_id} {result.row.provider_id!r})",
        f"{'reference':<{width}}{result.row.reference}",
        f"{'dispatched':<{width}}{_dispatched_text(result, layout)}",
        f"{'asked':<{width}}{result.asked_in_s * 1000:.0f} ms",
        f"{'raw status':<{width}}{_or_dash(o.raw_status)}",
        f"{'outcome':<{width}}{o.status.value}",
        f"{'PIN':<{width}}{_or_dash(o.pin)}{PIN_MARK if o.pin is not None else ''}",
        f"{'message':<{width}}{_or_dash(o.message)}",
        f"{'error':<{width}}{_or_dash(o.error)}",
        f"{'decision':<{width}}{_decision_text(d)}",
    ]
    for entry in planned_writes(d, layout):
        lines.append(f"{'':<{width}}  {entry}")
    lines.append(f"{'write':<{width}}{_write_text(result)}")
    lines.extend(f"{'note':<{width}}{note}" for note in result.notes)
    return "".join(printable(line) + "\n" for line in lines)


def _dispatched_text(result: CheckResult, layout: Layout) -> str:
    issue = result.row.dispatch_issue
    if issue is None:
        return f"{format_seconds(result.row.elapsed)} ago"
    return f"unknown: {issue.describe(layout)}"


def _decision_text(decision: Decision) -> str:
    if decision.kind == "deferred":
        wait = format_seconds(decision.next_check_in or 0.0)
        return f"deferred: nothing to write; the provider should not be asked for {wait}"
    if decision.kind == "pending":
        after = (
            f"; by the schedule the next check is due in {format_seconds(decision.next_check_in)}"
            if decision.next_check_in is not None
            else ""
        )
        return f"pending: the order stays in flight{after}"
    if decision.kind == "gave_up":
        return "gave up: the order's checks are used up; it is left for a human"
    return f"{decision.kind}: the order leaves flight"


def _write_text(result: CheckResult) -> str:
    if not result.decision.writes:
        return "nothing to write"
    if result.dry_run:
        return "dry run: nothing written"
    if result.write_error is not None:
        return f"NOT written: the database refused it ({result.write_error})"
    if result.written:
        return "written (through the write function the daemon uses)"
    return (
        "NOT written: the row left flight or got a new provider reference while the "
        "provider was asked (the daemon, the application or an operator was faster); "
        "its newer state stands"
    )


def order_to_json(order: OrderState) -> dict[str, object]:
    return {
        "id": str(order.id),
        "status": order.status,
        "external_status": order.external_status,
        "provider_reference": order.reference,
        "provider_id": order.provider_id,
        "in_flight": order.in_flight,
    }


def to_json(result: CheckResult) -> dict[str, object]:
    """The result for scripts: stable keys, seconds as numbers, absent values null.

    The PIN is included, as in the text output: it is what the provider said.
    """
    o = result.outcome
    d = result.decision
    return {
        "checked": True,
        "order": order_to_json(result.order),
        "provider": result.provider,
        "kind": result.kind,
        "dispatched_s_ago": None
        if result.row.dispatch_issue is not None
        else round(result.row.elapsed, 3),
        "asked_in_s": round(result.asked_in_s, 3),
        "answer": {
            "raw_status": o.raw_status,
            "outcome": o.status.value,
            "pin": o.pin,
            "message": o.message,
            "error": o.error,
        },
        "decision": {
            "kind": d.kind,
            "writes": d.writes,
            "finished": d.finished,
            "external_status": d.external_status,
            "status": d.status,
            "pin": d.pin,
            "provider_message": d.provider_message,
            "last_message": d.last_message,
            "next_check_in_s": d.next_check_in,
        },
        "dry_run": result.dry_run,
        "written": result.written,
        # An unusable dispatch time and a refused write are said in the notes.
        "notes": list(result.notes)
        + (
            []
            if result.write_error is None
            else [f"the database refused the write: {result.write_error}"]
        ),
        "exit_status": result.exit_code,
    }


def error_to_json(order_id: uuid.UUID, error: CheckError) -> dict[str, object]:
    """Why the order was not checked (not found, not in flight, no provider)."""
    return {"checked": False, "order_id": str(order_id), "error": str(error), "exit_status": 1}
