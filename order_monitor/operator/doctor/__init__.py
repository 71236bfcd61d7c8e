"""``order-monitor doctor``: can this installation work? One line per check.

Every line reads ``PASS|WARN|FAIL  <check>: <detail>``; a FAIL says what to
do. The checks, in order: the database answers (and is a primary); the table,
its columns and the provider reference column exist; the partial index, the
trigger function and both triggers exist, are valid and enabled, and match
what ``order-monitor sql install`` would create for the current settings;
the role may read and write what the daemon reads and writes; LISTEN/NOTIFY
round-trips on this connection (it does not through PgBouncer in transaction
mode); the notification queue has room; every in-flight order has a
configured provider; and each provider answers a real status request. With
actions configured: the outbox and the role's rights on it, what its entries
say (credentials refused, dead letters, results waiting long), and that each
action's host answers (a HEAD that performs no action).

How "matches what install would create" is decided: the install statements
are run against a temporary copy of the table in this session's ``pg_temp``
(same column names, types and collations, read from the catalog, so no
privilege on the real table is needed), and Postgres' own deparsed text of
the index predicate, the trigger WHEN clauses and the function body is
compared between the two. Nothing is compared as hand-normalised SQL text,
and nothing outside ``pg_temp`` is created; the copy is dropped at the end.

The checks live by what they check: ``database`` (the server, the table),
``objects`` (index, function, triggers), ``handoff`` (the inbox and the idle
lock), ``privileges`` (the role, the write function, unserved orders),
``notify`` (LISTEN/NOTIFY, the queue), ``providers`` and ``delivery`` (the
outbox and the actions). This module runs
them in order and formats what they find.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Final

import psycopg
from psycopg import sql

from order_monitor import db
from order_monitor.config import Settings
from order_monitor.errors import OrderMonitorError
from order_monitor.operator import database_error, printable
from order_monitor.operator.doctor.database import check_server, check_table
from order_monitor.operator.doctor.decoding import check_decoding
from order_monitor.operator.doctor.delivery import check_actions, check_outbox
from order_monitor.operator.doctor.dispatch import check_dispatch_times
from order_monitor.operator.doctor.handoff import check_handoff
from order_monitor.operator.doctor.notify import (
    NOTIFY_TIMEOUT,
    check_listen_notify,
    check_notification_queue,
)
from order_monitor.operator.doctor.objects import check_function_acls, check_objects
from order_monitor.operator.doctor.privileges import (
    check_privileges,
    check_role_powers,
    check_schema_create,
    check_unserved_orders,
    check_write_function,
)
from order_monitor.operator.doctor.providers import check_providers
from order_monitor.operator.findings import Emit, Finding, Verdict

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
    await check_providers(settings, emit)
    await check_actions(settings, emit)
    return findings


# --- the database: every check that needs a connection, in order ----------------


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
            if not await check_server(conn, settings, emit):
                # A replica: the inbox, the write proof and LISTEN would each
                # fail with a message of their own; the one that matters is said.
                return
            table = await check_table(conn, settings.layout, emit)
            if table is not None:
                await check_objects(conn, settings.layout, table, emit, capture=settings.capture)
                await check_function_acls(conn, settings.layout, emit)
                await check_handoff(conn, settings.layout, emit)
                await check_decoding(conn, settings, emit)
                await check_write_function(conn, settings, emit)
                privileges_ok = await check_privileges(conn, settings, table, emit)
                await check_role_powers(conn, settings, table, emit)
                await check_schema_create(conn, settings, emit)
                await check_outbox(conn, settings, emit)
                if privileges_ok and table.complete:
                    await check_unserved_orders(conn, settings, emit)
                    await check_dispatch_times(conn, settings, emit)
            await check_listen_notify(conn, emit, notify_timeout)
            await check_notification_queue(conn, emit)
        except psycopg.Error as exc:
            # A check query itself failed (timeout, lost connection): say which
            # and stop the database part; the provider checks still run.
            emit(Verdict.FAIL, "database", f"a check query failed: {database_error(exc, dsn)}")


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
