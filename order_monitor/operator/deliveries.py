"""``order-monitor deliveries``: the outbox, for an operator.

The outbox holds the written results not yet delivered to the application
(retried by the leader by itself) and the dead letters (given up: a human
decides). This command lists them, sends dead letters again (``requeue``)
or forgets them (``drop``). It runs with the daemon's DSN: the role may
read the outbox, move an entry's due time and delete entries, nothing else.

An ID on the command line is a delivery id or an order id (the shop's
complaint names the order). Only dead letters are requeued or dropped: an
entry the relay still retries is left to it, and the command says so and
exits 1, as for an id the outbox does not hold (delivered, or never
recorded).

As in the other operator modules, the queries (async, on a real
connection) are apart from the formatting (pure functions of plain
values). What a provider or the application wrote (messages, errors) is
shown through :func:`order_monitor.operator.printable`; the outbox holds no
PIN, so none can be shown.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import psycopg

from order_monitor import db, schema
from order_monitor.config import Layout, Settings
from order_monitor.delivery.model import Entry, Verdict
from order_monitor.delivery.store import OutboxStore, OutboxSummary
from order_monitor.engine.policy import format_seconds
from order_monitor.errors import SchemaError
from order_monitor.operator import printable
from order_monitor.operator.findings import INSTALL_HINT

#: Entries listed by default (every one is counted in the summary).
DEFAULT_LIMIT: Final = 50
#: An error or message longer than this is cut in the text (--json has it whole).
TEXT_SHOWN: Final = 200

LIST_COMMAND: Final = "order-monitor deliveries"
REQUEUE_COMMAND: Final = "order-monitor deliveries requeue ID"
DROP_COMMAND: Final = "order-monitor deliveries drop ID"


class OutboxUnavailable(SchemaError):
    """The outbox is missing (an install older than result delivery) or closed to this role."""


@dataclass(frozen=True, slots=True)
class Listing:
    """What ``order-monitor deliveries`` shows."""

    outbox: str
    at: dt.datetime
    summary: OutboxSummary
    entries: list[Entry]
    dead_only: bool
    limit: int
    #: outcome -> the configured action delivering it.
    actions: Mapping[str, str] = field(default_factory=dict)

    @property
    def matching(self) -> int:
        """How many entries the listing's filter selects (listed or not)."""
        return self.summary.dead if self.dead_only else self.summary.undelivered + self.summary.dead


@dataclass(frozen=True, slots=True)
class Change:
    """What ``requeue`` or ``drop`` did."""

    #: "requeue" or "drop".
    kind: str
    at: dt.datetime
    #: The dead letters changed, as they were before.
    changed: list[Entry]
    #: Entries named that are not dead letters (the relay retries them): left alone.
    not_dead: list[Entry] = field(default_factory=list)
    #: Ids matching no entry (delivered already, or never recorded).
    unknown: list[uuid.UUID] = field(default_factory=list)
    #: ``requeue --all-dead``: how many were requeued (changed is not listed then).
    all_dead: int | None = None

    @property
    def exit_code(self) -> int:
        return 1 if self.not_dead or self.unknown else 0


# --- queries ---------------------------------------------------------------------------


async def read_listing(settings: Settings, *, dead_only: bool, limit: int) -> Listing:
    """The outbox's summary and its newest entries, from one snapshot."""
    async with await db.connect(settings.dsn.reveal(), "deliveries") as conn:
        await conn.set_read_only(True)
        await conn.set_isolation_level(psycopg.IsolationLevel.REPEATABLE_READ)
        async with conn.transaction():
            await require_outbox(conn, settings.layout)
            store = OutboxStore(settings.layout)
            try:
                summary = await store.summary(conn)
                entries = await store.listing(conn, dead=True if dead_only else None, limit=limit)
            except psycopg.errors.InsufficientPrivilege as exc:
                raise _refused(settings.layout, exc) from None
            return Listing(
                outbox=_outbox_name(settings.layout),
                at=await _now(conn),
                summary=summary,
                entries=entries,
                dead_only=dead_only,
                limit=limit,
                actions=actions_by_outcome(settings),
            )


async def change(settings: Settings, kind: str, ids: Sequence[uuid.UUID] | None) -> Change:
    """Requeue or drop the dead letters named by *ids* (``None``: requeue every dead letter).

    One transaction: the named entries are read and locked (FOR UPDATE), so
    what is printed is exactly what was changed, whatever another operator
    does at the same time. The relay never touches a dead letter.
    """
    assert kind in {"requeue", "drop"}
    assert ids is not None or kind == "requeue"
    layout = settings.layout
    store = OutboxStore(layout)
    conn = await db.connect(settings.dsn.reveal(), f"deliveries {kind}")
    async with conn, conn.transaction():
        await require_outbox(conn, layout)
        try:
            at = await _now(conn)
            if ids is None:
                return Change(kind, at, [], all_dead=await store.requeue(conn, None))
            found = await entries_named(conn, layout, ids, lock=True)
            dead = [e for e in found if e.dead_at is not None]
            ids_of_dead = [e.delivery_id for e in dead]
            if ids_of_dead:
                if kind == "requeue":
                    count = await store.requeue(conn, ids_of_dead)
                else:
                    count = await store.drop(conn, ids_of_dead)
                # Locked above: nobody could have changed them meanwhile.
                assert count == len(ids_of_dead), (count, len(ids_of_dead))
        except psycopg.errors.InsufficientPrivilege as exc:
            raise _refused(layout, exc) from None
        matched = {e.delivery_id for e in found} | {e.order_id for e in found}
        return Change(
            kind,
            at,
            dead,
            not_dead=[e for e in found if e.dead_at is None],
            unknown=[i for i in _unique(ids) if i not in matched],
        )


async def require_outbox(conn: db.AsyncConn, layout: Layout) -> None:
    """Raise :class:`OutboxUnavailable` when the outbox is missing or closed to this role."""
    cursor = await conn.execute(
        "SELECT c.oid IS NOT NULL,"
        " c.oid IS NOT NULL AND pg_catalog.has_table_privilege(c.oid, 'SELECT')"
        " FROM (SELECT pg_catalog.to_regclass(%s) AS oid) AS c",
        (schema.Names(layout).outbox.as_string(None),),
    )
    row = await cursor.fetchone()
    assert row is not None
    exists, readable = row
    if not exists:
        raise OutboxUnavailable(
            f"the outbox {_outbox_name(layout)} does not exist: this install predates result "
            f"delivery (schema version {schema.VERSION}) — {INSTALL_HINT}"
        )
    if not readable:
        raise _refused(layout, None)


async def entries_named(
    conn: db.AsyncConn, layout: Layout, ids: Sequence[uuid.UUID], *, lock: bool = False
) -> list[Entry]:
    """The entries whose delivery id or order id is one of *ids*, newest recorded first."""
    return await OutboxStore(layout).entries(conn, ids, lock=lock)


def actions_by_outcome(settings: Settings) -> dict[str, str]:
    return {outcome: action.name for action in settings.actions for outcome in action.outcomes}


async def _now(conn: db.AsyncConn) -> dt.datetime:
    cursor = await conn.execute("SELECT pg_catalog.now()")
    row = await cursor.fetchone()
    assert row is not None
    now: dt.datetime = row[0]
    return now


def _unique(ids: Sequence[uuid.UUID]) -> list[uuid.UUID]:
    return list(dict.fromkeys(ids))


def _outbox_name(layout: Layout) -> str:
    return f"{layout.schema}.{schema.Names(layout).outbox_name}"


def _refused(layout: Layout, exc: psycopg.Error | None) -> OutboxUnavailable:
    why = f" ({' '.join(str(exc).split())})" if exc is not None else ""
    return OutboxUnavailable(
        f"this role may not read or change the outbox {_outbox_name(layout)}{why} — apply "
        "`order-monitor sql print role` (sql/role.sql) as a role that may grant it"
    )


# --- formatting (pure) -------------------------------------------------------------------


def _seconds(value: float) -> float:
    return round(value, 1)


def _age(at: dt.datetime, moment: dt.datetime | None) -> float | None:
    return None if moment is None else max(0.0, (at - moment).total_seconds())


def state_of(entry: Entry) -> str:
    """'dead' (a dead letter), 'auth' (waits for credentials) or 'waiting' (retried)."""
    if entry.dead_at is not None:
        return "dead"
    return "auth" if entry.last_verdict == Verdict.AUTH.value else "waiting"


def entry_to_json(entry: Entry, at: dt.datetime, actions: Mapping[str, str]) -> dict[str, Any]:
    due_in = None
    if entry.dead_at is None and entry.due_at is not None:
        due_in = _seconds((entry.due_at - at).total_seconds())
    age = _age(at, entry.recorded_at)
    return {
        "delivery_id": str(entry.delivery_id),
        "order_id": str(entry.order_id),
        "outcome": entry.outcome,
        "action": actions.get(entry.outcome),
        "state": state_of(entry),
        "recorded_at": entry.recorded_at.isoformat(),
        "age_s": None if age is None else _seconds(age),
        "tries": entry.tries,
        "rejections": entry.rejections,
        "last_verdict": entry.last_verdict,
        "last_error": entry.last_error,
        "due_at": None if entry.due_at is None else entry.due_at.isoformat(),
        "due_in_s": due_in,
        "dead_at": None if entry.dead_at is None else entry.dead_at.isoformat(),
        "message": entry.message,
        "columns": dict(entry.columns),
    }


def summary_to_json(summary: OutboxSummary) -> dict[str, Any]:
    age = summary.oldest_undelivered_age
    return {
        "undelivered": summary.undelivered,
        "oldest_undelivered_age_s": None if age is None else _seconds(age),
        "dead": summary.dead,
        "auth_waiting": summary.auth_waiting,
        "by_outcome": dict(sorted(summary.by_outcome.items())),
    }


def listing_to_json(listing: Listing) -> dict[str, Any]:
    """The listing for scripts: stable keys, ages in seconds."""
    return {
        "outbox": listing.outbox,
        "at": listing.at.isoformat(),
        "summary": summary_to_json(listing.summary),
        "actions": dict(sorted(listing.actions.items())),
        "filter": "dead" if listing.dead_only else "all",
        "limit": listing.limit,
        "matching": listing.matching,
        "entries": [entry_to_json(e, listing.at, listing.actions) for e in listing.entries],
    }


def change_to_json(result: Change) -> dict[str, Any]:
    done = "requeued" if result.kind == "requeue" else "dropped"
    return {
        "action": result.kind,
        done: result.all_dead
        if result.all_dead is not None
        else [entry_to_json(e, result.at, {}) for e in result.changed],
        "count": result.all_dead if result.all_dead is not None else len(result.changed),
        "not_dead": [entry_to_json(e, result.at, {}) for e in result.not_dead],
        "unknown": [str(i) for i in result.unknown],
        "exit_status": result.exit_code,
    }


def _cut(text: str) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= TEXT_SHOWN else flat[: TEXT_SHOWN - 1] + "…"


def _plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


def _tries(count: int) -> str:
    return f"{count} {'try' if count == 1 else 'tries'}"


def summary_lines(summary: OutboxSummary) -> list[str]:
    """The summary as the listing and ``status`` print it (no leading indentation)."""
    by = ", ".join(f"{outcome} {n}" for outcome, n in sorted(summary.by_outcome.items()) if n)
    line = f"Undelivered: {summary.undelivered}"
    if summary.undelivered:
        line += f" ({by})" if by else ""
        if summary.oldest_undelivered_age is not None:
            line += (
                f", the oldest written {format_seconds(summary.oldest_undelivered_age)} ago"
                " (retried by the leader by itself)"
            )
    out = [line]
    if summary.auth_waiting:
        out.append(
            f"  {summary.auth_waiting} of them wait: the application refused our credentials "
            "(401/403) — fix the action's secret in the providers file, then restart "
            "order-monitor (they are not used up meanwhile)"
        )
    dead = f"Dead letters: {summary.dead}"
    if summary.dead:
        dead += (
            f" (given up: a human decides) — `{LIST_COMMAND} --dead` lists them, "
            f"`{REQUEUE_COMMAND}` sends one again, `{DROP_COMMAND}` forgets it"
        )
    out.append(dead)
    return out


def _entry_lines(entry: Entry, at: dt.datetime, actions: Mapping[str, str]) -> list[str]:
    state = state_of(entry)
    age = _age(at, entry.recorded_at)
    tries = _tries(entry.tries)
    if entry.rejections:
        tries += f" ({entry.rejections} refused)"
    if state == "dead":
        since = _age(at, entry.dead_at)
        when = "dead" if since is None else f"dead since {format_seconds(since)} ago"
    elif entry.due_at is None or entry.due_at <= at:
        when = "due now"
    else:
        when = f"next try in {format_seconds((entry.due_at - at).total_seconds())}"
    action = actions.get(entry.outcome)
    via = f" ({action})" if action else ""
    written = "" if age is None else f"  written {format_seconds(age)} ago"
    out = [
        f"  {state.upper():<7}  {entry.delivery_id}  order {entry.order_id}  "
        f"{entry.outcome}{via}{written}  {tries}  {when}"
    ]
    if entry.last_error:
        verdict = f"{entry.last_verdict}: " if entry.last_verdict else ""
        out.append(f"           last answer: {verdict}{_cut(entry.last_error)}")
    return out


def format_listing(listing: Listing) -> str:
    at = listing.at.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    out = [f"order-monitor deliveries in {listing.outbox} at {at}", ""]
    out += summary_lines(listing.summary)
    if not listing.actions:
        out.append(
            "No action is configured ([actions.NAME] in the providers file): nothing delivers "
            "these entries"
            if listing.summary.undelivered
            else "No action is configured ([actions.NAME] in the providers file)"
        )
    out.append("")
    if listing.entries:
        what = "Dead letters" if listing.dead_only else "Entries"
        out.append(f"{what}, newest first (a delivery id, then the order it finishes):")
        for entry in listing.entries:
            out += _entry_lines(entry, listing.at, listing.actions)
        more = listing.matching - len(listing.entries)
        if more > 0:
            out.append(f"  … and {more} more (--limit)")
    elif listing.dead_only:
        out.append("No dead letters.")
    else:
        out.append("Nothing to deliver.")
    return "".join(printable(line) + "\n" for line in out)


def format_change(result: Change) -> str:
    done = "requeued" if result.kind == "requeue" else "dropped"
    out: list[str] = []
    if result.all_dead is not None:
        out.append(
            f"requeued {_plural(result.all_dead, 'dead letter')}: due now, the leader "
            "delivers them again (their refusals counted from zero)"
        )
    for entry in result.changed:
        error = f" — was: {_cut(entry.last_error)}" if entry.last_error else ""
        out.append(
            f"{done} {entry.delivery_id} (order {entry.order_id}, {entry.outcome}, "
            f"{_tries(entry.tries)}){error}"
        )
    if result.kind == "requeue" and result.changed:
        out.append("  due now: the leader delivers them again (their refusals counted from zero)")
    if result.kind == "drop" and result.changed:
        out.append(
            "  forgotten: the application was not told; finish those orders there by hand "
            "if they must be"
        )
    for entry in result.not_dead:
        out.append(
            f"not {done}: {entry.delivery_id} (order {entry.order_id}) is not a dead letter: "
            "the leader still retries it by itself"
        )
    for unknown in result.unknown:
        out.append(
            f"not {done}: {unknown} is no delivery id or order id in the outbox (delivered "
            f"already, or never recorded; `{LIST_COMMAND}` lists what is there)"
        )
    if not out:
        out.append(f"nothing {done}")
    return "".join(printable(line) + "\n" for line in out)
