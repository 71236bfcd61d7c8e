"""Doctor's checks of the delivery to the application: the outbox, the actions' hosts, what waits.

With actions configured (``[actions.NAME]`` of the providers file): the
outbox exists and the daemon's role may do what the relay does with it;
each action's host answers HTTP; and the outbox's entries say whether
delivering works (credentials refused, dead letters, results waiting long).
Whether the write function records what the actions deliver is the write
function's own check (``db.checks``), run with the others.

Without actions, only one thing is worth a line: an outbox that holds
entries, which nothing will deliver.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import aiohttp
import psycopg
from psycopg import sql
from yarl import URL

from order_monitor import __version__, db, schema
from order_monitor.config import ActionConfig, Settings
from order_monitor.delivery.model import Verdict as DeliveryVerdict
from order_monitor.delivery.store import OutboxStore, OutboxSummary
from order_monitor.engine.policy import format_seconds
from order_monitor.operator.doctor.database import fetch_one
from order_monitor.operator.findings import Emit, Verdict
from order_monitor.redaction import scrub
from order_monitor.schema.outbox import OUTBOX_UPDATABLE

#: Undelivered this long after its result was written: the relay is not keeping up
#: (no leader, the application down, a backoff grown long).
UNDELIVERED_STALE: Final = 3600.0
#: The most a host probe waits for an answer: doctor is run by a person, waiting.
PROBE_TIMEOUT: Final = 5.0
#: The request that performs no action: never the action's own method.
PROBE_METHOD: Final = "HEAD"

_FIX_SCHEMA: Final = (
    "run install.sql and role.sql of this release (`order-monitor sql install` as the "
    "table's owner, then `order-monitor sql print role`)"
)
_DEAD_LETTERS_HINT: Final = "order-monitor deliveries --dead"


# --- the outbox ------------------------------------------------------------------


async def check_outbox(conn: db.AsyncConn, settings: Settings, emit: Emit) -> None:
    """The outbox and the role's rights on it; then what its entries say (see the module)."""
    layout = settings.layout
    outbox = schema.Names(layout).outbox.as_string(None)
    try:
        access = await _access(conn, outbox)
    except psycopg.errors.InsufficientPrivilege:
        access = None  # no USAGE on the schema: the privileges check says so
    if not settings.actions:
        if access is not None and access.select:
            await _nothing_delivers(conn, settings, emit)
        return
    if access is None:
        emit(
            Verdict.FAIL,
            "outbox",
            f"this role may not look {outbox} up (no USAGE on schema {layout.schema}) — "
            f"{_FIX_SCHEMA}",
        )
        return
    if not access.exists:
        emit(Verdict.FAIL, "outbox", f"{outbox} is missing — {_FIX_SCHEMA}")
        return
    lacking = access.lacking()
    if lacking:
        emit(
            Verdict.FAIL,
            "outbox",
            f"role {access.user} may not {'; '.join(lacking)} on {outbox}, as the relay"
            f" must — {_FIX_SCHEMA}",
        )
    else:
        emit(
            Verdict.PASS,
            "outbox",
            f"{outbox} exists; role {access.user} may read it, delete delivered entries"
            " and update its bookkeeping",
        )
    if access.select:
        summary = await OutboxStore(layout).summary(conn)
        await _health(conn, settings, summary, emit)


@dataclass(frozen=True, slots=True)
class _Access:
    """What the session's role may do with the outbox (all False when it is missing)."""

    user: str
    exists: bool
    select: bool
    delete: bool
    no_update: tuple[str, ...]

    def lacking(self) -> list[str]:
        found = [] if self.select else ["SELECT"]
        if not self.delete:
            found.append("DELETE")
        if self.no_update:
            found.append(f"UPDATE ({', '.join(self.no_update)})")
        return found


async def _access(conn: db.AsyncConn, outbox: str) -> _Access:
    # has_column_privilege raises on a column the table lacks (an outbox of
    # another release): such a column counts as one the role may not update.
    row = await fetch_one(
        conn,
        "SELECT current_user, o.oid IS NOT NULL,"
        " o.oid IS NOT NULL AND pg_catalog.has_table_privilege(o.oid, 'SELECT'),"
        " o.oid IS NOT NULL AND pg_catalog.has_table_privilege(o.oid, 'DELETE'),"
        " ARRAY(SELECT col FROM pg_catalog.unnest(%s::text[]) AS col"
        "       WHERE o.oid IS NULL OR NOT EXISTS (SELECT FROM pg_catalog.pg_attribute a"
        "              WHERE a.attrelid = o.oid AND a.attname = col AND a.attnum > 0"
        "                AND NOT a.attisdropped"
        "                AND pg_catalog.has_column_privilege(o.oid, a.attnum, 'UPDATE')))"
        " FROM (SELECT pg_catalog.to_regclass(%s) AS oid) AS o",
        (list(OUTBOX_UPDATABLE), outbox),
    )
    user, exists, select, delete, no_update = row
    return _Access(user, exists, select, delete, tuple(no_update))


async def _nothing_delivers(conn: db.AsyncConn, settings: Settings, emit: Emit) -> None:
    summary = await OutboxStore(settings.layout).summary(conn)
    if not summary.undelivered and not summary.dead:
        return
    emit(
        Verdict.WARN,
        "deliveries",
        f"the outbox holds {_entries(summary)} but no action is configured: results were "
        "recorded for delivery and nothing delivers them — configure the [actions.*] of the "
        "providers file again, or, if the application is told another way, drop them "
        f"(`order-monitor deliveries`) and re-render install.sql without actions",
    )


async def _health(
    conn: db.AsyncConn, settings: Settings, summary: OutboxSummary, emit: Emit
) -> None:
    healthy = True
    if summary.auth_waiting:
        healthy = False
        refused = await _auth_refused_by_action(conn, settings)
        named = ", ".join(f"{name} ({count})" for name, count in refused.items())
        emit(
            Verdict.FAIL,
            "delivery credentials",
            f"the application refuses the action's credentials: {summary.auth_waiting}"
            f" delivery(ies) wait for a token it accepts ({named}) — correct the"
            " [actions.NAME] secrets, then reload the daemon",
        )
    if summary.dead:
        healthy = False
        emit(
            Verdict.WARN,
            "dead letters",
            f"{summary.dead} delivery(ies) were given up and the application was never told "
            f"— see `{_DEAD_LETTERS_HINT}`, then requeue or drop them",
        )
    age = summary.oldest_undelivered_age
    if age is not None and age > UNDELIVERED_STALE:
        healthy = False
        emit(
            Verdict.WARN,
            "undelivered",
            f"{summary.undelivered} result(s) wait for delivery, the oldest written"
            f" {format_seconds(age)} ago — is a daemon leading, and does the application"
            " answer? (`order-monitor deliveries`, the daemon's log: delivery.*)",
        )
    if healthy:
        waiting = (
            "nothing undelivered"
            if age is None
            else f"{summary.undelivered} undelivered, the oldest written {format_seconds(age)} ago"
        )
        emit(Verdict.PASS, "deliveries", f"{waiting}; no dead letters")


async def _auth_refused_by_action(conn: db.AsyncConn, settings: Settings) -> dict[str, int]:
    """Undelivered entries refused for their credentials, by the action that delivers them."""
    outbox = schema.Names(settings.layout).outbox
    cursor = await conn.execute(
        sql.SQL(
            "SELECT outcome, pg_catalog.count(*) FROM {}"
            " WHERE dead_at IS NULL AND last_verdict = %s"
            " GROUP BY outcome ORDER BY outcome"
        ).format(outbox),
        (DeliveryVerdict.AUTH.value,),
    )
    counts: dict[str, int] = {}
    for outcome, count in await cursor.fetchall():
        action = settings.action_for(outcome)
        name = action.name if action is not None else f"{outcome} (no action)"
        counts[name] = counts.get(name, 0) + int(count)
    return counts


def _entries(summary: OutboxSummary) -> str:
    parts = []
    if summary.undelivered:
        parts.append(f"{summary.undelivered} undelivered result(s)")
    if summary.dead:
        parts.append(f"{summary.dead} dead letter(s)")
    return " and ".join(parts)


# --- the actions' hosts ----------------------------------------------------------


async def check_actions(settings: Settings, emit: Emit) -> None:
    """Each action's host answers a request that performs no action (one line per action)."""
    if not settings.actions:
        return
    async with aiohttp.ClientSession(
        headers={"User-Agent": f"order-monitor/{__version__} (doctor)"}
    ) as session:
        results = await asyncio.gather(
            *(probe_action(action, session) for action in settings.actions)
        )
    for action, (verdict, detail) in zip(settings.actions, results, strict=True):
        emit(verdict, f"action {action.name}", detail)


def probe_target(url_template: str) -> URL | None:
    """The URL a probe asks: the action's, without its query, fragment and userinfo, and
    cut before the path segment of its first placeholder; None when the host is not fixed."""
    fixed = url_template.partition("#")[0].partition("?")[0]
    head, brace, _ = fixed.partition("{")
    if brace:
        head = head.rsplit("/", 1)[0] + "/"  # a segment with a placeholder names nothing yet
    try:
        url = URL(head)
    except ValueError:
        return None
    if url.scheme not in ("http", "https") or not url.host:
        return None
    return url.with_user(None).with_query(None).with_fragment(None)


async def probe_action(action: ActionConfig, session: aiohttp.ClientSession) -> tuple[Verdict, str]:
    """HEAD of the action's URL: any HTTP answer is a host that answers; no secret is sent.

    Bounded by the action's own connect and read timeouts, and by
    :data:`PROBE_TIMEOUT`.
    """
    target = probe_target(action.url)
    if target is None:
        return (
            Verdict.WARN,
            "its url's host is a template (or not http/https): not probed",
        )
    where = f"{target.host}:{target.port}"
    limit = min(PROBE_TIMEOUT, action.limits.connect_timeout + action.limits.read_timeout)
    hidden = [secret.reveal() for secret in action.secrets.values()]
    try:
        async with (
            asyncio.timeout(limit),
            session.request(
                PROBE_METHOD,
                target,
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=limit),
            ) as answer,
        ):
            status = answer.status
    except TimeoutError:
        return (
            Verdict.FAIL,
            f"{where} did not answer within {limit:g} s — check the action's url, DNS, the "
            "firewall and that the application is up",
        )
    except (aiohttp.ClientError, OSError) as exc:
        return Verdict.FAIL, f"{where} does not answer: {_describe(exc, hidden, action.url)}"
    return Verdict.PASS, f"{where} answers: HTTP {status} to {PROBE_METHOD} (no action taken)"


def _describe(exc: BaseException, hidden: Sequence[str], url: str) -> str:
    """The error without the URL's query (it may carry a key) or a secret."""
    if isinstance(exc, aiohttp.ClientConnectorError):
        text = exc.os_error.strerror or str(exc.os_error)
    else:
        text = " ".join(str(exc).split())
    query = url.partition("?")[2].partition("#")[0]
    text = scrub(text, [*hidden, query]) if query else scrub(text, hidden)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
