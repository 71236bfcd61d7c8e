"""``order-monitor status``: what the orders table says, right now.

Read-only: one REPEATABLE READ READ ONLY transaction, so every number comes
from the same snapshot (and it also runs on a read replica).

Cost on a big table:

* the in-flight part uses the daemon's own predicate, with the same literals
  (:func:`order_monitor.schema.in_flight_predicate`), so the planner answers
  it from the partial index: its cost follows the number of orders in
  flight, not the size of the table;
* "gave up in the last day" and "finished in the last hour" filter on
  ``"lastSyncAt"`` and ``"completedAt"``, which the application's table does
  not index: that part is one sequential scan of the table (a materialised
  CTE read once for both), seconds on tens of millions of rows. It only
  reads; the application's writes do not wait for it;
* who holds the leader lock comes from ``pg_locks``: no table is read.

With ``ORDER_MONITOR_CAPTURE=decoding`` it shows the logical replication
slot (its WAL status and how much WAL it holds back), through decoding.sql's
``_slot_v1()``, which reads ``pg_replication_slots`` (on the primary only: a
standby has no current WAL position to measure from).

When actions deliver results to the application (or the outbox holds
entries anyway), a section says how many wait, the oldest's age, how many
wait for credentials the application refused, and the dead letters: read
from the outbox (small: it holds only what is not delivered yet), through
the outbox store's own summary.

Nothing a row holds makes it fail: ages come from db.dispatch (an infinite,
NULL or future "sentAt" is never subtracted from), and such orders are listed
by id, since the daemon schedules them from when it first saw them.
"""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass, field
from typing import Any, Final

import psycopg
from psycopg import sql

from order_monitor import db, schema
from order_monitor.config import Settings
from order_monitor.db import sessions
from order_monitor.db.dispatch import DispatchIssue, dispatch_sql, issue_of
from order_monitor.decoding.statements import DecodingStatements, SlotState
from order_monitor.delivery.store import OutboxStore, OutboxSummary
from order_monitor.engine.policy import format_seconds
from order_monitor.operator import deliveries, printable
from order_monitor.ops.leader import lock_key

#: How many of the orders that gave up are listed (all are counted).
GAVE_UP_LISTED: Final = 10
#: How many of the orders whose dispatch time is unusable are listed (all are counted).
ODD_LISTED: Final = 10
#: A message longer than this is cut in the text report (--json has it whole).
MESSAGE_SHOWN: Final = 200
GAVE_UP_WINDOW: Final = dt.timedelta(hours=24)
FINISHED_WINDOW: Final = dt.timedelta(hours=1)


@dataclass(frozen=True, slots=True)
class ProviderLine:
    provider_id: str | None
    count: int
    oldest_age_s: float
    #: Name of the configured provider serving this providerId; None: nobody.
    served_by: str | None


@dataclass(frozen=True, slots=True)
class OldestOrder:
    id: uuid.UUID
    provider_id: str | None
    reference: str
    age_s: float


@dataclass(frozen=True, slots=True)
class GaveUpOrder:
    id: uuid.UUID
    provider_id: str | None
    reference: str | None
    #: Seconds since its "lastSyncAt" (when it gave up); None when that is not finite.
    age_s: float | None
    last_message: str | None


@dataclass(frozen=True, slots=True)
class OddOrder:
    """An order in flight whose dispatch time cannot be used (db.dispatch)."""

    id: uuid.UUID
    provider_id: str | None
    reference: str
    issue: DispatchIssue
    #: How the report says what is wrong ("sentAt is infinity").
    why: str


@dataclass(frozen=True, slots=True)
class LeaderInfo:
    pid: int
    application_name: str | None
    client_addr: str | None
    #: Seconds since that session started.
    since_s: float | None


@dataclass(frozen=True, slots=True)
class Deliveries:
    """The outbox, as status shows it."""

    #: outcome -> the configured action delivering it.
    actions: dict[str, str]
    #: None when the outbox is missing or this role may not read it (see *problem*).
    summary: OutboxSummary | None
    problem: str | None = None


@dataclass(frozen=True, slots=True)
class CaptureInfo:
    """How the daemon learns of dispatched orders, and the slot when it reads one."""

    #: ORDER_MONITOR_CAPTURE: trigger or decoding.
    mode: str
    slot: SlotState | None = None
    #: Why the slot is not shown (decoding mode only).
    problem: str | None = None


@dataclass(frozen=True, slots=True)
class Status:
    table: str
    at: dt.datetime
    in_flight: list[ProviderLine]
    oldest: OldestOrder | None
    gave_up_status: str
    gave_up_count: int
    gave_up: list[GaveUpOrder]
    done_status: str
    done_last_hour: int
    failed_status: str
    failed_last_hour: int
    leader: LeaderInfo | None
    #: In flight with an unusable dispatch time: how many, and the first by id.
    odd_count: int = 0
    odd: list[OddOrder] = field(default_factory=list)
    #: Read from a standby: no daemon can lead here, whatever the lock says.
    replica: bool = False
    #: Sessions that are not order-monitor's holding the leader or the idle lock.
    lock_holders: list[sessions.LockHolder] = field(default_factory=list)
    #: None when no action is configured and the outbox holds nothing.
    deliveries: Deliveries | None = None
    capture: CaptureInfo = field(default_factory=lambda: CaptureInfo("trigger"))

    @property
    def in_flight_total(self) -> int:
        return sum(line.count for line in self.in_flight)


# --- queries ---------------------------------------------------------------------------


async def gather(settings: Settings) -> Status:
    """Read the status from the database named by *settings*."""
    async with await db.connect(settings.dsn.reveal(), "status") as conn:
        await conn.set_read_only(True)
        await conn.set_isolation_level(psycopg.IsolationLevel.REPEATABLE_READ)
        async with conn.transaction():
            return await read_status(conn, settings)


async def read_status(conn: db.AsyncConn, settings: Settings) -> Status:
    layout = settings.layout
    c = layout.columns
    names = schema.Names(layout)
    table = names.table
    in_flight = schema.in_flight_predicate(layout)
    d = dispatch_sql(layout)
    ident = sql.Identifier

    cursor = await conn.execute("SELECT pg_catalog.now()")
    row = await cursor.fetchone()
    assert row is not None
    at: dt.datetime = row[0]

    cursor = await conn.execute(
        sql.SQL(
            "SELECT {pid}::text, pg_catalog.count(*),"
            " pg_catalog.max({elapsed}) FILTER (WHERE {usable})"
            " FROM {table} WHERE {in_flight} GROUP BY 1 ORDER BY 1 NULLS LAST"
        ).format(
            pid=ident(c.provider_id),
            elapsed=d.elapsed,
            usable=d.usable,
            table=table,
            in_flight=in_flight,
        )
    )
    lines = []
    for provider_id, count, age in await cursor.fetchall():
        served = settings.provider_for(provider_id) if provider_id is not None else None
        lines.append(
            ProviderLine(
                provider_id,
                int(count),
                float(age or 0.0),
                served.name if served is not None else None,
            )
        )

    oldest = None
    if lines:
        cursor = await conn.execute(
            sql.SQL(
                "SELECT {id}, {pid}::text, {ref}::text, {elapsed}"
                " FROM {table} WHERE {in_flight} AND {usable} ORDER BY {dispatched}, {id} LIMIT 1"
            ).format(
                id=ident(c.id),
                pid=ident(c.provider_id),
                ref=ident(c.provider_ref),
                elapsed=d.elapsed,
                usable=d.usable,
                dispatched=d.dispatched,
                table=table,
                in_flight=in_flight,
            )
        )
        found = await cursor.fetchone()
        if found is not None:
            oldest = OldestOrder(found[0], found[1], found[2], float(found[3] or 0.0))

    writes = settings.writes
    cursor = await conn.execute(
        sql.SQL(
            """WITH recent AS MATERIALIZED (
    SELECT {id} AS id, {pid}::text AS provider_id, {ref}::text AS reference,
           {ext}::text AS external_status, {last_sync} AS last_sync,
           {completed} AS completed, {last_message}::text AS last_message
    FROM {table}
    WHERE {last_sync} >= pg_catalog.now() - %(gave_up_window)s
       OR {completed} >= pg_catalog.now() - %(finished_window)s
)
SELECT
    (SELECT pg_catalog.count(*) FROM recent
      WHERE external_status = %(gave_up)s AND last_sync >= pg_catalog.now() - %(gave_up_window)s),
    (SELECT pg_catalog.count(*) FROM recent
      WHERE external_status = %(done)s AND completed >= pg_catalog.now() - %(finished_window)s),
    (SELECT pg_catalog.count(*) FROM recent
      WHERE external_status = %(failed)s AND completed >= pg_catalog.now() - %(finished_window)s),
    (SELECT coalesce(pg_catalog.json_agg(g), '[]') FROM (
        SELECT id, provider_id, reference,
               CASE WHEN pg_catalog.isfinite(last_sync)
                    THEN pg_catalog.date_part('epoch', pg_catalog.now() - last_sync) END AS age_s,
               last_message
        FROM recent
        WHERE external_status = %(gave_up)s AND last_sync >= pg_catalog.now() - %(gave_up_window)s
        ORDER BY last_sync DESC, id LIMIT %(listed)s) AS g)"""
        ).format(
            id=ident(c.id),
            pid=ident(c.provider_id),
            ref=ident(c.provider_ref),
            ext=ident(c.external_status),
            last_sync=ident(c.last_sync_at),
            completed=ident(c.completed_at),
            last_message=ident(c.last_message),
            table=table,
        ),
        {
            "gave_up_window": GAVE_UP_WINDOW,
            "finished_window": FINISHED_WINDOW,
            "gave_up": writes.gave_up_external_status,
            "done": writes.done_external_status,
            "failed": writes.failed_external_status,
            "listed": GAVE_UP_LISTED,
        },
    )
    counts = await cursor.fetchone()
    assert counts is not None
    gave_up_count, done, failed, listed = counts
    gave_up = [
        GaveUpOrder(
            uuid.UUID(item["id"]),
            item["provider_id"],
            item["reference"],
            None if item["age_s"] is None else float(item["age_s"]),
            item["last_message"],
        )
        for item in listed
    ]
    odd_count, odd = await read_odd(conn, settings)
    replica = await sessions.in_recovery(conn)

    return Status(
        table=f"{layout.schema}.{layout.table}",
        at=at,
        in_flight=lines,
        oldest=oldest,
        gave_up_status=writes.gave_up_external_status,
        gave_up_count=int(gave_up_count),
        gave_up=gave_up,
        done_status=writes.done_external_status,
        done_last_hour=int(done),
        failed_status=writes.failed_external_status,
        failed_last_hour=int(failed),
        leader=await read_leader(conn, layout.schema, layout.table),
        odd_count=odd_count,
        odd=odd,
        replica=replica,
        lock_holders=await sessions.foreign_lock_holders(conn, layout),
        deliveries=await read_deliveries(conn, settings),
        capture=await read_capture(conn, settings, replica=replica),
    )


async def read_capture(conn: db.AsyncConn, settings: Settings, *, replica: bool) -> CaptureInfo:
    """The capture mode, and in decoding mode the slot (or why it cannot be shown)."""
    if settings.capture != "decoding":
        return CaptureInfo(settings.capture)
    if replica:
        return CaptureInfo(
            settings.capture, problem="read from a standby: the slot is the primary's"
        )
    names = schema.Names(settings.layout)
    function = sql.SQL("{}()").format(names.slot_function).as_string(conn)
    cursor = await conn.execute(
        "SELECT coalesce(pg_catalog.has_function_privilege("
        "pg_catalog.to_regprocedure(%(f)s), 'EXECUTE'), false)",
        {"f": function},
    )
    row = await cursor.fetchone()
    if row is None or not row[0]:
        return CaptureInfo(
            settings.capture,
            problem=f"{function} is missing or this role may not execute it: run "
            "sql/decoding.sql as a superuser (`order-monitor doctor` says more)",
        )
    slot = await DecodingStatements(settings.layout).slot(conn)
    if slot is None:
        return CaptureInfo(
            settings.capture,
            problem="the slot is missing: the daemon recreates it at its next read, then "
            "sweeps (`order-monitor doctor`)",
        )
    return CaptureInfo(settings.capture, slot)


async def read_deliveries(conn: db.AsyncConn, settings: Settings) -> Deliveries | None:
    """The outbox's summary; None when nothing is configured to deliver and nothing waits."""
    actions = deliveries.actions_by_outcome(settings)
    try:
        await deliveries.require_outbox(conn, settings.layout)
    except deliveries.OutboxUnavailable as exc:
        # An install from before delivery has no outbox: only a problem when
        # actions are configured (the daemon then refuses to start).
        return Deliveries(actions, None, str(exc)) if actions else None
    summary = await OutboxStore(settings.layout).summary(conn)
    if not actions and not summary.undelivered and not summary.dead:
        return None
    return Deliveries(actions, summary)


async def read_odd(conn: db.AsyncConn, settings: Settings) -> tuple[int, list[OddOrder]]:
    """How many orders in flight have an unusable dispatch time, and the first few by id."""
    layout = settings.layout
    c = layout.columns
    d = dispatch_sql(layout)
    cursor = await conn.execute(
        sql.SQL(
            "SELECT {id}, {pid}::text, {ref}::text, {elapsed}, {why}, {column},"
            " pg_catalog.count(*) OVER ()"
            " FROM {table} WHERE {in_flight} AND NOT coalesce({usable}, false)"
            " ORDER BY {id} LIMIT %s"
        ).format(
            id=sql.Identifier(c.id),
            pid=sql.Identifier(c.provider_id),
            ref=sql.Identifier(c.provider_ref),
            elapsed=d.elapsed,
            why=d.why,
            column=d.column,
            usable=d.usable,
            table=schema.Names(layout).table,
            in_flight=schema.in_flight_predicate(layout),
        ),
        (ODD_LISTED,),
    )
    odd: list[OddOrder] = []
    total = 0
    for id_, pid, ref, elapsed, why, column, count in await cursor.fetchall():
        total = int(count)
        issue = issue_of(elapsed, why, column)
        if issue is not None:
            odd.append(OddOrder(id_, pid, ref, issue, issue.describe(layout)))
    return total, odd


async def read_leader(conn: db.AsyncConn, schema_name: str, table: str) -> LeaderInfo | None:
    """The session holding the daemon's leader lock for this table, if any.

    A role without pg_read_all_stats sees another role's application_name
    and client address as NULL; the pid is always visible.
    """
    cursor = await conn.execute(
        "SELECT l.pid, a.application_name, pg_catalog.host(a.client_addr),"
        " extract(epoch FROM pg_catalog.now() - a.backend_start)::float8"
        " FROM pg_catalog.pg_locks l LEFT JOIN pg_catalog.pg_stat_activity a USING (pid)"
        " WHERE l.locktype = 'advisory' AND l.objsubid = 1 AND l.granted"
        "   AND l.database = (SELECT oid FROM pg_catalog.pg_database"
        "                     WHERE datname = current_database())"
        "   AND ((l.classid::bigint << 32) | l.objid::bigint) = %s",
        (lock_key(schema_name, table),),
    )
    row = await cursor.fetchone()
    if row is None:
        return None
    return LeaderInfo(int(row[0]), row[1], row[2], None if row[3] is None else float(row[3]))


# --- formatting (pure) -------------------------------------------------------------------


def format_bytes(size: int) -> str:
    """*size* in the largest binary unit that keeps it at least 1 (as pg_size_pretty, 1024s)."""
    if abs(size) < 1024:
        return f"{size} bytes"
    value = float(size)
    for unit in ("kB", "MB", "GB"):
        value /= 1024
        if abs(value) < 1024:
            return f"{value:.1f} {unit}"
    return f"{value / 1024:.1f} TB"


def _seconds(value: float) -> float:
    return round(value, 1)


def to_json(status: Status) -> dict[str, Any]:
    """A dict with stable keys for ``--json``; every age in seconds."""
    return {
        "table": status.table,
        "at": status.at.isoformat(),
        "in_flight": {
            "total": status.in_flight_total,
            "by_provider": [
                {
                    "provider_id": line.provider_id,
                    "count": line.count,
                    "oldest_age_s": _seconds(line.oldest_age_s),
                    "served_by": line.served_by,
                }
                for line in status.in_flight
            ],
            "oldest": None
            if status.oldest is None
            else {
                "id": str(status.oldest.id),
                "provider_id": status.oldest.provider_id,
                "reference": status.oldest.reference,
                "age_s": _seconds(status.oldest.age_s),
            },
        },
        "gave_up_24h": {
            "external_status": status.gave_up_status,
            "count": status.gave_up_count,
            "recent": [
                {
                    "id": str(order.id),
                    "provider_id": order.provider_id,
                    "reference": order.reference,
                    "age_s": None if order.age_s is None else _seconds(order.age_s),
                    "last_message": order.last_message,
                }
                for order in status.gave_up
            ],
        },
        "dispatch_time_unusable": {
            "count": status.odd_count,
            "orders": [
                {
                    "id": str(order.id),
                    "provider_id": order.provider_id,
                    "reference": order.reference,
                    "reason": order.issue.reason,
                    "column": order.issue.column,
                    "why": order.why,
                }
                for order in status.odd
            ],
        },
        "finished_1h": {"done": status.done_last_hour, "failed": status.failed_last_hour},
        "leader": None
        if status.leader is None
        else {
            "pid": status.leader.pid,
            "application_name": status.leader.application_name,
            "client_addr": status.leader.client_addr,
            "since_s": None if status.leader.since_s is None else _seconds(status.leader.since_s),
        },
        "replica": status.replica,
        "lock_holders": [
            {
                "lock": holder.lock,
                "pid": holder.session.pid,
                "user": holder.session.user,
                "application_name": holder.session.application_name,
                "client": holder.session.client,
            }
            for holder in status.lock_holders
        ],
        "deliveries": None if status.deliveries is None else _deliveries_json(status.deliveries),
        "capture": _capture_json(status.capture),
    }


def _capture_json(capture: CaptureInfo) -> dict[str, Any]:
    slot = capture.slot
    return {
        "mode": capture.mode,
        "slot": None
        if slot is None
        else {
            "name": slot.name,
            "wal_status": slot.wal_status,
            "lag_bytes": slot.lag_bytes,
            "safe_wal_size_bytes": slot.safe_wal_size,
        },
        "problem": capture.problem,
    }


def _capture_text(capture: CaptureInfo) -> str:
    if capture.mode != "decoding":
        return f"Capture: {capture.mode} (ORDER_MONITOR_CAPTURE)"
    slot = capture.slot
    if slot is None:
        return f"Capture: logical decoding — {capture.problem}"
    lag = "" if slot.lag_bytes is None else f", {format_bytes(slot.lag_bytes)} behind"
    if slot.wal_status == "lost":
        return (
            f"Capture: logical decoding, slot {slot.name} is LOST (invalidated for falling "
            "behind): the daemon recreates it and sweeps; orders dispatched meanwhile are "
            "checked late (`order-monitor doctor`)"
        )
    room = (
        ""
        if slot.safe_wal_size is None
        else f" ({format_bytes(slot.safe_wal_size)} more before it is invalidated)"
    )
    warn = (
        ": it holds back more WAL than max_wal_size — is the daemon reading it?"
        if slot.wal_status in ("unreserved", "extended")
        else ""
    )
    return (
        f"Capture: logical decoding, slot {slot.name} {slot.wal_status or 'in use'}{lag}"
        f"{room}{warn}"
    )


def _deliveries_json(info: Deliveries) -> dict[str, Any]:
    return {
        "actions": dict(sorted(info.actions.items())),
        "problem": info.problem,
        **(
            deliveries.summary_to_json(info.summary)
            if info.summary is not None
            else {
                "undelivered": None,
                "oldest_undelivered_age_s": None,
                "dead": None,
                "auth_waiting": None,
                "by_outcome": {},
            }
        ),
    }


def _pid(provider_id: str | None) -> str:
    return "(none)" if provider_id is None else _cut(provider_id)


def _cut(text: str) -> str:
    """Text from the table, short enough for one line of the report."""
    return text if len(text) <= MESSAGE_SHOWN else text[: MESSAGE_SHOWN - 1] + "…"


def format_text(status: Status) -> str:
    """The human report: short, aligned, and saying what needs a look."""
    at = status.at.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    out = [f"order-monitor status of {status.table} at {at}", ""]

    total = status.in_flight_total
    out.append(f"In flight: {total} order{'' if total == 1 else 's'}")
    if status.in_flight:
        width = max(len("providerId"), *(len(_pid(line.provider_id)) for line in status.in_flight))
        out.append(f"  {'providerId':<{width}}  {'orders':>7}  {'oldest':>7}  provider")
        for line in status.in_flight:
            served = line.served_by or "NOT CONFIGURED: these orders are not checked"
            out.append(
                f"  {_pid(line.provider_id):<{width}}  {line.count:>7}  "
                f"{format_seconds(line.oldest_age_s):>7}  {served}"
            )
    if status.oldest is not None:
        o = status.oldest
        out.append(
            f"  oldest: {o.id} (providerId {_pid(o.provider_id)}, reference {_cut(o.reference)}), "
            f"dispatched {format_seconds(o.age_s)} ago"
        )
    out.append("")

    if status.odd_count:
        out.append(
            f"Dispatch time unusable: {status.odd_count} in flight (checked on a schedule "
            "from when the daemon first saw them; fix the row if the time is wrong)"
        )
        for odd in status.odd:
            out.append(
                f"  {odd.id}  providerId {_pid(odd.provider_id)}  reference "
                f"{_cut(odd.reference)}  {odd.why}"
            )
        if status.odd_count > len(status.odd):
            out.append(f"  … and {status.odd_count - len(status.odd)} more")
        out.append("")

    out.append(
        f"Gave up in the last 24 h: {status.gave_up_count} "
        f"(externalStatus = {status.gave_up_status!r}: a human must look)"
    )
    for order in status.gave_up:
        message = f" — {_cut(order.last_message)}" if order.last_message else ""
        ago = "at an unusable time" if order.age_s is None else f"{format_seconds(order.age_s)} ago"
        out.append(
            f"  {order.id}  providerId {_pid(order.provider_id)}  reference "
            f"{_cut(order.reference or '-')}  {ago}{message}"
        )
    if status.gave_up_count > len(status.gave_up):
        out.append(f"  … and {status.gave_up_count - len(status.gave_up)} more")
    out.append("")

    out.append(
        f"Finished in the last hour: {status.done_last_hour} done "
        f"({status.done_status!r}), {status.failed_last_hour} failed ({status.failed_status!r})"
    )
    out.append("")

    if status.deliveries is not None:
        out += _deliveries_text(status.deliveries)
        out.append("")

    out.append(_capture_text(status.capture))
    if status.replica:
        out.append(f"Daemon: {sessions.REPLICA_HINT}")
    elif status.leader is None:
        out.append(
            "Daemon: no session holds the leader lock for this table — is order-monitor "
            "running? (systemctl status order-monitor)"
        )
    else:
        leader = status.leader
        name = leader.application_name or "(name hidden from this role)"
        where = f" from {leader.client_addr}" if leader.client_addr else ""
        since = (
            f", connected {format_seconds(leader.since_s)} ago"
            if leader.since_s is not None
            else ""
        )
        out.append(f"Daemon: leader is {name}, server pid {leader.pid}{where}{since}")
    for holder in status.lock_holders:
        # Any role that can connect may take either lock and stall the daemon.
        out.append(
            f"Lock: the {holder.lock} lock is held by {holder.session}, not an order-monitor "
            "session: it keeps the daemon "
            + ("standing by" if holder.lock == "leader" else "from switching to NOTIFY")
            + " (pg_terminate_backend it if it should not)"
        )
    return "".join(printable(line) + "\n" for line in out)


def _deliveries_text(info: Deliveries) -> list[str]:
    if info.actions:
        by = ", ".join(f"{name}: {outcome}" for outcome, name in sorted(info.actions.items()))
        out = [f"Delivered to the application ({by}):"]
    else:
        out = ["Delivered to the application: no action is configured ([actions.NAME])"]
    if info.summary is None:
        out.append(f"  {info.problem}")
        return out
    out += [f"  {line}" for line in deliveries.summary_lines(info.summary)]
    return out
