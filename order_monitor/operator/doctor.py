"""``order-monitor doctor``: can this installation work? One line per check.

Every line reads ``PASS|WARN|FAIL  <check>: <detail>``; a FAIL says what to
do. The checks, in order: the database answers (and is a primary); the table,
its columns and the provider reference column exist; the partial index, the
trigger function and both triggers exist, are valid and enabled, and match
what ``order-monitor sql install`` would create for the current settings;
the role may read and write what the daemon reads and writes; LISTEN/NOTIFY
round-trips on this connection (it does not through PgBouncer in transaction
mode); the notification queue has room; every in-flight order has a
configured provider; and each provider answers a real status request.

How "matches what install would create" is decided: the install statements
are run against a temporary copy of the table in this session's ``pg_temp``
(same column names, types and collations, read from the catalog, so no
privilege on the real table is needed), and Postgres' own deparsed text of
the index predicate, the trigger WHEN clauses and the function body is
compared between the two. Nothing is compared as hand-normalised SQL text,
and nothing outside ``pg_temp`` is created; the copy is dropped at the end.
"""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Final

import aiohttp
import psycopg
from psycopg import sql

from order_monitor import __version__, db, schema
from order_monitor.config import Layout, ProviderConfig, Settings
from order_monitor.engine.decisions import describe_outcome
from order_monitor.errors import OrderMonitorError, ProviderAuthError, ProviderError
from order_monitor.metrics import Metrics
from order_monitor.operator import database_error, printable
from order_monitor.operator.findings import INSTALL_HINT, Emit, Finding, Verdict
from order_monitor.operator.handoff_checks import handoff_checks
from order_monitor.providers.base import OrderRef, Outcome, RateLimited
from order_monitor.providers.limits import request_budget
from order_monitor.providers.registry import build_provider
from order_monitor.redaction import redact_url, scrub

#: The reference asked about when probing a provider: no order carries it.
PROBE_REFERENCE: Final = "order-monitor-doctor"
PROBE_ORDER_ID: Final = uuid.UUID("00000000-0000-4000-8000-0000000d0c70")
#: How long the self-NOTIFY may take to come back.
NOTIFY_TIMEOUT: Final = 2.0
QUEUE_WARN: Final = 0.5
#: Bounds every doctor query, so a lock queue cannot hang the doctor.
STATEMENT_TIMEOUT: Final = "15s"

Report = Callable[[Finding], None]


def format_finding(finding: Finding) -> str:
    return printable(f"{finding.verdict.value}  {finding.check}: {finding.detail}")


def exit_status(findings: Sequence[Finding]) -> int:
    """0 when nothing FAILed (WARNs allowed), else 1."""
    return 1 if any(f.verdict is Verdict.FAIL for f in findings) else 0


def settings_failed(exc: OrderMonitorError) -> Finding:
    return Finding(Verdict.FAIL, "settings", f"{exc}")


def settings_loaded(settings: Settings) -> Finding:
    table = f"{settings.layout.schema}.{settings.layout.table}"
    return Finding(
        Verdict.PASS, "settings", f"loaded (table {table}, channel {settings.layout.channel})"
    )


async def diagnose(
    settings: Settings, report: Report, *, notify_timeout: float = NOTIFY_TIMEOUT
) -> list[Finding]:
    """Run every check, passing each finding to *report* as soon as it is known."""
    findings: list[Finding] = []

    def emit(verdict: Verdict, check: str, detail: str) -> None:
        finding = Finding(verdict, check, detail)
        findings.append(finding)
        report(finding)

    await _database_checks(settings, emit, notify_timeout)
    await _provider_checks(settings, emit)
    return findings


# --- the database --------------------------------------------------------------------


async def _database_checks(settings: Settings, emit: Emit, notify_timeout: float) -> None:
    dsn = settings.dsn.reveal()
    try:
        conn = await db.connect(dsn, "doctor")
    except psycopg.Error as exc:
        emit(
            Verdict.FAIL,
            "database",
            f"cannot connect to {settings.safe_dsn}: {database_error(exc, dsn)} — check "
            "ORDER_MONITOR_DSN, that the server is up, and that pg_hba.conf admits this "
            "host and role",
        )
        return
    async with conn:
        try:
            await conn.execute(
                sql.SQL("SET statement_timeout = {}").format(sql.Literal(STATEMENT_TIMEOUT))
            )
            await _server(conn, settings, emit)
            table = await _table_checks(conn, settings.layout, emit)
            if table is not None:
                await _installed_objects(conn, settings.layout, table, emit)
                await handoff_checks(conn, settings.layout, emit)
                await _write_function(conn, settings, emit)
                privileges_ok = await _privileges(conn, settings, table, emit)
                if privileges_ok and table.complete:
                    await _unserved_orders(conn, settings, emit)
            await _listen_notify(conn, emit, notify_timeout)
            await _notification_queue(conn, emit)
        except psycopg.Error as exc:
            # A check query itself failed (timeout, lost connection): say which
            # and stop the database part; the provider checks still run.
            emit(Verdict.FAIL, "database", f"a check query failed: {database_error(exc, dsn)}")


async def _one(conn: db.AsyncConn, query: str | sql.SQL | sql.Composed, params: Any = None) -> Any:
    """The first row of *query* (None when there is none)."""
    cursor = await conn.execute(query, params)
    return await cursor.fetchone()


async def _server(conn: db.AsyncConn, settings: Settings, emit: Emit) -> None:
    row = await _one(
        conn,
        "SELECT current_setting('server_version'), current_database(), current_user,"
        " pg_is_in_recovery()",
    )
    version, database, user, in_recovery = row
    where = f"PostgreSQL {version}, database {database} as {user} ({settings.safe_dsn})"
    if in_recovery:
        emit(
            Verdict.FAIL,
            "database",
            f"{where} is a standby in recovery: the daemon writes and LISTENs, which needs "
            "the primary — point ORDER_MONITOR_DSN at the primary",
        )
    else:
        emit(Verdict.PASS, "database", f"connected: {where}")


@dataclass(frozen=True, slots=True)
class _Column:
    name: str
    #: format_type() of the column: e.g. 'character varying(30)'.
    type: str
    #: Qualified collation name when it is not the type's default.
    collation: str | None


@dataclass(frozen=True, slots=True)
class _Table:
    oid: int
    columns: dict[str, _Column]
    #: Every configured column (the provider reference included) exists.
    complete: bool


async def _table_checks(conn: db.AsyncConn, layout: Layout, emit: Emit) -> _Table | None:
    """The table and its columns, read from the catalog (no privilege on the table needed)."""
    table = f"{layout.schema}.{layout.table}"
    row = await _one(
        conn,
        "SELECT c.oid FROM pg_catalog.pg_class c"
        " JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = %s AND c.relname = %s AND c.relkind IN ('r', 'p')",
        (layout.schema, layout.table),
    )
    if row is None:
        emit(
            Verdict.FAIL,
            "table",
            f"{table} does not exist in this database — check ORDER_MONITOR_SCHEMA, "
            "ORDER_MONITOR_TABLE and the database named in ORDER_MONITOR_DSN",
        )
        return None
    oid = int(row[0])
    cursor = await conn.execute(
        "SELECT a.attname, pg_catalog.format_type(a.atttypid, a.atttypmod),"
        " CASE WHEN a.attcollation <> 0 AND a.attcollation <> t.typcollation"
        "      THEN pg_catalog.format('%%I.%%I', cn.nspname, co.collname) END"
        " FROM pg_catalog.pg_attribute a"
        " JOIN pg_catalog.pg_type t ON t.oid = a.atttypid"
        " LEFT JOIN pg_catalog.pg_collation co ON co.oid = a.attcollation"
        " LEFT JOIN pg_catalog.pg_namespace cn ON cn.oid = co.collnamespace"
        " WHERE a.attrelid = %s AND a.attnum > 0 AND NOT a.attisdropped",
        (oid,),
    )
    columns = {name: _Column(name, type_, coll) for name, type_, coll in await cursor.fetchall()}
    emit(Verdict.PASS, "table", f"{table} exists")

    c = layout.columns
    wanted = [name for name in c.configured() if name != c.provider_ref]
    missing = [name for name in wanted if name not in columns]
    if missing:
        emit(
            Verdict.FAIL,
            "columns",
            f"{table} has no column {', '.join(missing)} — set ORDER_MONITOR_COLUMN_<NAME> "
            "to the names your table uses (names are case-sensitive)",
        )
    else:
        emit(Verdict.PASS, "columns", f"all {len(wanted)} configured columns exist")

    ref = columns.get(c.provider_ref)
    if ref is None:
        emit(
            Verdict.FAIL,
            "provider reference column",
            f"{table} has no column {c.provider_ref} — {INSTALL_HINT}",
        )
    else:
        emit(Verdict.PASS, "provider reference column", f"{c.provider_ref} {ref.type}")

    complete = not missing and ref is not None
    if complete:
        # The daemon's own start-up check, which sees only the columns this
        # role may read: it fails when the catalog has them but the grants do not.
        try:
            await db.column_limits(conn, layout)
        except OrderMonitorError as exc:
            emit(Verdict.FAIL, "columns", f"the daemon's start-up check fails: {exc}")
    return _Table(oid, columns, complete)


# --- index, function, triggers -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Index:
    valid: bool
    ready: bool
    on_table: bool
    #: (access method, key columns, predicate) as Postgres deparses them.
    shape: tuple[str, str, str | None]


@dataclass(frozen=True, slots=True)
class _Trigger:
    enabled: str
    function_oid: int
    #: (tgtype bits, UPDATE OF columns, arguments, WHEN clause) as Postgres deparses them.
    shape: tuple[int, str, bytes, str | None]


@dataclass(frozen=True, slots=True)
class _Function:
    oid: int
    #: (language, return type, body, SET options, SECURITY DEFINER).
    shape: tuple[str, str, str, tuple[str, ...], bool]


@dataclass(frozen=True, slots=True)
class _Objects:
    index: _Index | None
    function: _Function | None
    triggers: dict[str, _Trigger]


_WHEN: Final = re.compile(r" WHEN \((.*)\) EXECUTE (?:FUNCTION|PROCEDURE) ", re.DOTALL)


async def _objects(conn: db.AsyncConn, layout: Layout, table_oid: int) -> _Objects:
    names = schema.Names(layout)
    row = await _one(
        conn,
        "SELECT i.indisvalid, i.indisready, i.indrelid = %s, am.amname,"
        " (SELECT string_agg(pg_catalog.pg_get_indexdef(i.indexrelid, k, false), ', ' ORDER BY k)"
        "  FROM generate_series(1, i.indnkeyatts) AS k),"
        " pg_catalog.pg_get_expr(i.indpred, i.indrelid)"
        " FROM pg_catalog.pg_index i"
        " JOIN pg_catalog.pg_class c ON c.oid = i.indexrelid"
        " JOIN pg_catalog.pg_am am ON am.oid = c.relam"
        " JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = %s AND c.relname = %s",
        (table_oid, layout.schema, names.index_name),
    )
    index = None if row is None else _Index(row[0], row[1], row[2], (row[3], row[4], row[5]))

    row = await _one(
        conn,
        "SELECT p.oid, l.lanname, pg_catalog.format_type(p.prorettype, NULL), p.prosrc,"
        " coalesce(p.proconfig, '{}'), p.prosecdef"
        " FROM pg_catalog.pg_proc p"
        " JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace"
        " JOIN pg_catalog.pg_language l ON l.oid = p.prolang"
        " WHERE n.nspname = %s AND p.proname = %s AND p.pronargs = 0",
        (layout.schema, names.function_name),
    )
    function = (
        None
        if row is None
        else _Function(row[0], (row[1], row[2], row[3], tuple(row[4]), bool(row[5])))
    )

    cursor = await conn.execute(
        "SELECT t.tgname, t.tgenabled, t.tgfoid, t.tgtype,"
        " (SELECT coalesce(string_agg(a.attname, ', ' ORDER BY k.n), '')"
        "  FROM unnest(t.tgattr) WITH ORDINALITY AS k(attnum, n)"
        "  JOIN pg_catalog.pg_attribute a ON a.attrelid = t.tgrelid AND a.attnum = k.attnum),"
        " t.tgargs, pg_catalog.pg_get_triggerdef(t.oid)"
        " FROM pg_catalog.pg_trigger t"
        " WHERE t.tgrelid = %s AND t.tgname = ANY(%s) AND NOT t.tgisinternal",
        (table_oid, [names.insert_trigger_name, names.update_trigger_name]),
    )
    triggers = {}
    for name, enabled, foid, tgtype, attrs, args, definition in await cursor.fetchall():
        when = _WHEN.search(definition)
        triggers[name] = _Trigger(
            str(enabled), int(foid), (int(tgtype), attrs, bytes(args), when and when.group(1))
        )
    return _Objects(index, function, triggers)


async def _reference_objects(conn: db.AsyncConn, layout: Layout, table: _Table) -> _Objects | str:
    """What ``sql install`` creates for *layout*, built on a pg_temp copy; or why not."""
    temp = replace(layout, schema="pg_temp")
    definitions = sql.SQL(", ").join(
        sql.SQL("{name} {type}{collate}").format(
            name=sql.Identifier(column.name),
            # format_type()'s text and the collation come from the server's own
            # catalog, not from configuration.
            type=sql.SQL(column.type),
            collate=sql.SQL(" COLLATE " + column.collation) if column.collation else sql.SQL(""),
        )
        for column in table.columns.values()
    )
    names = schema.Names(temp)
    try:
        await conn.execute(
            sql.SQL("CREATE TEMPORARY TABLE {table} ({definitions})").format(
                table=names.table, definitions=definitions
            )
        )
        try:
            for statement in schema.install_statements(temp):
                if statement.replayable:
                    await conn.execute(statement.query)
            # The catalog names this session's temporary schema pg_temp_<n>.
            row = await _one(
                conn,
                "SELECT n.nspname, c.oid FROM pg_catalog.pg_class c"
                " JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace"
                " WHERE c.relnamespace = pg_catalog.pg_my_temp_schema() AND c.relname = %s",
                (layout.table,),
            )
            return await _objects(conn, replace(layout, schema=row[0]), int(row[1]))
        finally:
            await conn.execute(sql.SQL("DROP TABLE IF EXISTS {} CASCADE").format(names.table))
            await conn.execute(sql.SQL("DROP FUNCTION IF EXISTS {}()").format(names.function))
            await conn.execute(
                sql.SQL("DROP FUNCTION IF EXISTS {}({})").format(
                    names.write_function, schema.write_signature()
                )
            )
    except psycopg.Error as exc:
        return " ".join(str(exc).split())


async def _installed_objects(conn: db.AsyncConn, layout: Layout, table: _Table, emit: Emit) -> None:
    names = schema.Names(layout)
    found = await _objects(conn, layout, table.oid)
    expected = await _reference_objects(conn, layout, table)
    if isinstance(expected, str):
        not_compared = f"; its definition was not compared with what install creates ({expected})"
        expected_objects = None
    else:
        not_compared = ""
        expected_objects = expected

    # The index.
    index = found.index
    qualified_index = names.index.as_string(conn)
    if index is None:
        emit(Verdict.FAIL, "index", f"{names.index_name} is missing — {INSTALL_HINT}")
    elif not index.valid or not index.ready:
        emit(
            Verdict.FAIL,
            "index",
            f"{names.index_name} is INVALID (an interrupted CREATE INDEX CONCURRENTLY): run "
            f"DROP INDEX CONCURRENTLY {qualified_index}; then `order-monitor sql install`",
        )
    elif not index.on_table:
        emit(
            Verdict.FAIL,
            "index",
            f"{names.index_name} exists but indexes another table: drop it "
            f"(DROP INDEX CONCURRENTLY {qualified_index}), then `order-monitor sql install`",
        )
    elif expected_objects is None or expected_objects.index is None:
        emit(Verdict.WARN, "index", f"{names.index_name} exists and is valid{not_compared}")
    elif index.shape != expected_objects.index.shape:
        emit(
            Verdict.FAIL,
            "index",
            f"{names.index_name} was built for another in-flight rule, so the sweep cannot "
            f"use it (found WHERE {index.shape[2]}; the settings give WHERE "
            f"{expected_objects.index.shape[2]}) — run DROP INDEX CONCURRENTLY "
            f"{qualified_index}; then `order-monitor sql install`, or restore "
            "ORDER_MONITOR_IN_FLIGHT_EXTERNAL_STATUSES / ORDER_MONITOR_FINAL_STATUSES",
        )
    else:
        emit(Verdict.PASS, "index", f"{names.index_name} is valid and matches the in-flight rule")

    # The function.
    function = found.function
    qualified_function = names.function.as_string(conn)
    if function is None:
        emit(
            Verdict.FAIL, "trigger function", f"{qualified_function}() is missing — {INSTALL_HINT}"
        )
    elif expected_objects is None or expected_objects.function is None:
        emit(Verdict.WARN, "trigger function", f"{qualified_function}() exists{not_compared}")
    elif function.shape != (
        # The copy's body names the copy's inbox and lock: compare the body
        # with this table's rendering instead.
        *expected_objects.function.shape[:2],
        schema.notify_function_body(layout),
        *expected_objects.function.shape[3:],
    ):
        emit(
            Verdict.FAIL,
            "trigger function",
            f"{qualified_function}() differs from what this version installs — "
            "run `order-monitor sql install` (it replaces the function)",
        )
    else:
        emit(Verdict.PASS, "trigger function", f"{qualified_function}() is current")

    # The triggers.
    for trigger_name in (names.insert_trigger_name, names.update_trigger_name):
        check = f"trigger {trigger_name}"
        trigger = found.triggers.get(trigger_name)
        reference = expected_objects.triggers.get(trigger_name) if expected_objects else None
        table_name = names.table.as_string(conn)
        if trigger is None:
            emit(Verdict.FAIL, check, f"missing on {table_name} — {INSTALL_HINT}")
        elif trigger.enabled not in ("O", "A"):
            state = "only in replica mode" if trigger.enabled == "R" else "disabled"
            emit(
                Verdict.FAIL,
                check,
                f"is {state}: orders dispatched now notify nobody (the sweep still finds "
                f"them, late) — run ALTER TABLE {table_name} ENABLE TRIGGER {trigger_name}",
            )
        elif function is None or trigger.function_oid != function.oid:
            emit(
                Verdict.FAIL,
                check,
                f"does not call {qualified_function}() — {INSTALL_HINT} (it replaces the trigger)",
            )
        elif reference is None:
            emit(Verdict.WARN, check, f"exists and is enabled{not_compared}")
        elif trigger.shape != reference.shape:
            emit(
                Verdict.FAIL,
                check,
                "fires on another rule than the current settings give (in-flight "
                "statuses, columns or channel changed?) — run `order-monitor sql install` "
                "(it replaces the trigger)",
            )
        else:
            emit(Verdict.PASS, check, "enabled, and matches the current settings")


# --- privileges ---------------------------------------------------------------------------


async def _write_function(conn: db.AsyncConn, settings: Settings, emit: Emit) -> None:
    """The write function: present, made for these settings, and not a superuser's."""
    layout = settings.layout
    names = schema.Names(layout)
    qualified = names.write_function.as_string(conn)
    problem = await db.write_function_problem(conn, layout, settings.writes)
    if problem is not None:
        emit(Verdict.FAIL, "write function", problem)
        return
    row = await _one(
        conn,
        "SELECT r.rolname, r.rolsuper FROM pg_catalog.pg_proc p"
        " JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace"
        " JOIN pg_catalog.pg_roles r ON r.oid = p.proowner"
        " WHERE n.nspname = %s AND p.proname = %s",
        (layout.schema, names.write_function_name),
    )
    owner, superuser = row
    if superuser:
        emit(
            Verdict.WARN,
            "write function",
            f"{qualified}() is owned by the superuser {owner}, so it runs with every right: "
            "install as the table's owner instead (ALTER FUNCTION ... OWNER TO that role)",
        )
    else:
        emit(
            Verdict.PASS,
            "write function",
            f"{qualified}() matches the settings and runs as {owner}",
        )


async def _privileges(conn: db.AsyncConn, settings: Settings, table: _Table, emit: Emit) -> bool:
    """What the role may do, proven on the daemon's own statements, not on a list beside them."""
    layout = settings.layout
    c = layout.columns
    readable = [name for name in c.read() if name in table.columns]
    row = await _one(
        conn,
        "SELECT current_user, pg_catalog.has_schema_privilege(%s, 'USAGE'),"
        " ARRAY(SELECT col FROM unnest(%s::text[]) AS col"
        "       WHERE NOT pg_catalog.has_column_privilege(%s::oid, col, 'SELECT'))",
        (layout.schema, readable, table.oid),
    )
    user, usage, no_select = row
    problems = []
    if not usage:
        problems.append(f"USAGE on schema {layout.schema}")
    if no_select:
        problems.append(f"SELECT on {', '.join(no_select)}")
    if not problems and table.complete:
        problems += await _daemon_statements_refused(conn, settings)
    if problems:
        emit(
            Verdict.FAIL,
            "privileges",
            f"role {user} lacks {'; '.join(problems)} — apply `order-monitor sql print role` "
            "(sql/role.sql) as a role that may grant them",
        )
        return False
    emit(
        Verdict.PASS,
        "privileges",
        f"role {user} may run the daemon's statements: the sweep, the re-read, the write "
        "and taking from the inbox "
        f"(reading {len(readable)} columns, writing only through the write function)",
    )
    return True


async def _daemon_statements_refused(conn: db.AsyncConn, settings: Settings) -> list[str]:
    """Run the daemon's own statements with nothing to do; name the ones refused.

    The write gets empty arrays, inside a transaction that is rolled back:
    it proves the call is permitted and changes nothing.
    """
    queries = db.Queries(settings.layout)
    empty = db.WriteBatch([], [], [], [], [], [], [])
    refused = []
    for what, run in (
        ("the sweep's SELECT", lambda: queries.sweep_page(conn, None, 1)),
        ("the re-read's SELECT", lambda: queries.fetch_in_flight(conn, [])),
        ("EXECUTE on the write function", lambda: queries.write(conn, empty)),
        ("SELECT and DELETE on the inbox", lambda: queries.drain_inbox(conn, 0)),
    ):
        try:
            async with conn.transaction(force_rollback=True):
                await run()
        except psycopg.errors.InsufficientPrivilege:
            refused.append(what)
        except (psycopg.errors.UndefinedFunction, psycopg.errors.UndefinedTable):
            refused.append(f"{what} (it is missing)")
    return refused


async def _unserved_orders(conn: db.AsyncConn, settings: Settings, emit: Emit) -> None:
    """In-flight orders whose providerId no provider serves (served by the partial index)."""
    layout = settings.layout
    cursor = await conn.execute(
        sql.SQL("SELECT {pid}::text, count(*) FROM {table} WHERE {in_flight} GROUP BY 1").format(
            pid=sql.Identifier(layout.columns.provider_id),
            table=schema.Names(layout).table,
            in_flight=schema.in_flight_predicate(layout),
        )
    )
    counts = {pid: int(n) for pid, n in await cursor.fetchall()}
    total = sum(counts.values())
    unserved = {
        pid: n for pid, n in counts.items() if pid is None or settings.provider_for(pid) is None
    }
    if not unserved:
        emit(Verdict.PASS, "orders in flight", f"{total}, every one with a configured provider")
        return
    listed = ", ".join(
        f"{'(none)' if pid is None else repr(pid)}: {n}"
        for pid, n in sorted(unserved.items(), key=lambda kv: -kv[1])
    )
    emit(
        Verdict.WARN,
        "orders in flight",
        f"{sum(unserved.values())} of {total} have a providerId no provider serves "
        f"({listed}) and will not be checked — add those ids to provider_ids in the "
        "providers file, then reload (systemctl reload order-monitor)",
    )


# --- LISTEN / NOTIFY ----------------------------------------------------------------------------

_POOLER_TEXT: Final = (
    "ORDER_MONITOR_DSN probably goes through PgBouncer (or another pooler) in transaction "
    "or statement mode, where LISTEN does not work and the leader lock is not held — "
    "connect to Postgres directly or through a session-mode pool"
)


async def _listen_notify(conn: db.AsyncConn, emit: Emit, wait: float) -> None:
    channel = f"order_monitor_doctor_{os.getpid()}_{secrets.token_hex(4)}"
    token = secrets.token_hex(8)
    reported_pid = conn.info.backend_pid
    try:
        (pid_before,) = await _one(conn, "SELECT pg_backend_pid()")
        await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
        started = time.monotonic()
        await conn.execute("SELECT pg_notify(%s, %s)", (channel, token))
        arrived = False
        async for notify in conn.notifies(timeout=wait, stop_after=1):
            arrived = notify.channel == channel and notify.payload == token
        elapsed_ms = (time.monotonic() - started) * 1000
        (pid_after,) = await _one(conn, "SELECT pg_backend_pid()")
        await conn.execute(sql.SQL("UNLISTEN {}").format(sql.Identifier(channel)))
    except psycopg.Error as exc:
        text = " ".join(str(exc).split())
        hint = (
            "the server is a standby — point ORDER_MONITOR_DSN at the primary"
            if "recovery" in text
            else _POOLER_TEXT
        )
        emit(Verdict.FAIL, "listen/notify", f"LISTEN failed ({text}) — {hint}")
        return
    if pid_before != pid_after:
        emit(
            Verdict.FAIL,
            "listen/notify",
            "two statements on one connection ran in different server sessions "
            f"(backend pid {pid_before} then {pid_after}): {_POOLER_TEXT}",
        )
    elif not arrived:
        emit(
            Verdict.FAIL,
            "listen/notify",
            f"a NOTIFY sent on this connection did not come back within {wait:g} s: "
            + _POOLER_TEXT,
        )
    elif reported_pid != pid_before:
        emit(
            Verdict.WARN,
            "listen/notify",
            f"the round trip works, but a pooler sits in between (the server's backend pid "
            f"is {pid_before}, the connection was told {reported_pid}): make sure it pools "
            "by session, or connect to Postgres directly",
        )
    else:
        emit(Verdict.PASS, "listen/notify", f"a self-NOTIFY came back in {elapsed_ms:.0f} ms")


async def _notification_queue(conn: db.AsyncConn, emit: Emit) -> None:
    (usage,) = await _one(conn, "SELECT pg_notification_queue_usage()")
    percent = f"{float(usage) * 100:.1f} %"
    if usage >= QUEUE_WARN:
        emit(
            Verdict.WARN,
            "notification queue",
            f"{percent} full: some session LISTENs but does not read (often one idle in an "
            "open transaction; see pg_stat_activity). When it is full, every commit that "
            "NOTIFYs fails — including the application's dispatches through our trigger",
        )
    else:
        emit(Verdict.PASS, "notification queue", f"{percent} used")


# --- providers -------------------------------------------------------------------------------


async def _provider_checks(settings: Settings, emit: Emit) -> None:
    if not settings.providers:
        emit(
            Verdict.WARN,
            "providers",
            "no providers configured (set ORDER_MONITOR_PROVIDERS_FILE, or create "
            "/etc/order-monitor/providers.toml): no order will be checked",
        )
        return
    source = str(settings.providers_file) if settings.providers_file else "providers file"
    emit(
        Verdict.PASS,
        "providers",
        f"{source} parsed: {', '.join(p.name for p in settings.providers)}",
    )
    async with aiohttp.ClientSession(
        headers={"User-Agent": f"order-monitor/{__version__} (doctor)"}
    ) as session:
        metrics = Metrics()
        results = await asyncio.gather(
            *(probe(config, session, metrics) for config in settings.providers)
        )
    for verdict, detail, config in results:
        emit(verdict, f"provider {config.name}", detail)


async def probe(
    config: ProviderConfig, session: aiohttp.ClientSession, metrics: Metrics
) -> tuple[Verdict, str, ProviderConfig]:
    """One real status request for a reference no order carries.

    The provider is built exactly as the daemon builds it; the request goes to
    its adapter directly (not through the limits wrapper, which turns every
    failure into an ERROR outcome) so that refused credentials can be told
    apart from an unreachable host. It is bounded by the same time budget.
    """
    where = f"{config.kind} at {redact_url(config.base_url, set())}"
    try:
        provider = build_provider(
            config, session=session, session_limit=asyncio.Semaphore(1), metrics=metrics
        )
    except OrderMonitorError as exc:
        return Verdict.FAIL, f"{exc}", config
    hidden = [secret.reveal() for secret in config.secrets.values()]
    budget = request_budget(config.limits)
    started = time.monotonic()
    order = OrderRef(PROBE_ORDER_ID, PROBE_REFERENCE)
    try:
        async with asyncio.timeout(budget):
            answered = await provider.adapter.fetch(session, [order])
    except ProviderAuthError as exc:
        return (
            Verdict.FAIL,
            f"{where} refused us: {scrub(str(exc), hidden)} — check credentials / IP whitelist",
            config,
        )
    except RateLimited as exc:
        return (
            Verdict.WARN,
            f"{where} is reachable but asked us to wait ({scrub(str(exc), hidden)})",
            config,
        )
    except TimeoutError:
        return (
            Verdict.FAIL,
            f"{where} did not answer within {budget:g} s (limits.connect_timeout + "
            "read_timeout) — check base_url, DNS, the firewall and the provider's status",
            config,
        )
    except ProviderError as exc:
        text = scrub(str(exc), hidden)
        if re.search(r": HTTP 2\d\d: ", text):
            # A well-formed error answer: the provider was reached and read our
            # request. Some say "not found" this way; some say "bad credentials".
            return (
                Verdict.WARN,
                f"{where} answered with an error for the test reference "
                f"{PROBE_REFERENCE!r}: {text} — fine if that is its 'not found'; if it "
                "says the credentials are wrong, fix them (and list the code in "
                "options.auth_codes)",
                config,
            )
        return Verdict.FAIL, f"{where}: {text}", config
    except Exception as exc:  # an adapter bug must not hide the other providers' lines
        text = scrub(" ".join(str(exc).split()), hidden) or type(exc).__name__
        return Verdict.FAIL, f"{where}: unexpected {type(exc).__name__}: {text}", config
    elapsed_ms = (time.monotonic() - started) * 1000
    outcome = answered.get(order.order_id) or Outcome.unknown()
    return (
        Verdict.PASS,
        f"{where} answered in {elapsed_ms:.0f} ms ({describe_outcome(outcome)} for the test "
        f"reference {PROBE_REFERENCE!r})",
        config,
    )


def to_json(findings: Sequence[Finding], exit_code: int) -> dict[str, object]:
    """The report for scripts: stable keys, one entry per check in the order run.

    ``ok`` is what the exit status says (nothing FAILed); ``counts`` always
    has all three verdicts, so a script need not test for a missing key.
    """
    counts = {v.value.lower(): 0 for v in Verdict}
    for finding in findings:
        counts[finding.verdict.value.lower()] += 1
    return {
        "ok": exit_code == 0,
        "exit_status": exit_code,
        "counts": counts,
        "findings": [
            {"check": f.check, "verdict": f.verdict.value, "detail": f.detail} for f in findings
        ],
    }
