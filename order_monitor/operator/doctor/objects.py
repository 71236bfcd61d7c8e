"""The partial index, the trigger function and the triggers.

Each present, valid, enabled, and as ``order-monitor sql install`` would make
it for these settings (see the package docstring for how that is decided).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Final

import psycopg
from psycopg import sql

from order_monitor import db, schema
from order_monitor.config import Layout
from order_monitor.operator.doctor.database import Table, fetch_one
from order_monitor.operator.findings import INSTALL_HINT, Emit, Verdict


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
    row = await fetch_one(
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

    row = await fetch_one(
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


async def _reference_objects(conn: db.AsyncConn, layout: Layout, table: Table) -> _Objects | str:
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
            row = await fetch_one(
                conn,
                "SELECT n.nspname, c.oid FROM pg_catalog.pg_class c"
                " JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace"
                " WHERE c.relnamespace = pg_catalog.pg_my_temp_schema() AND c.relname = %s",
                (layout.table,),
            )
            copy = await _objects(conn, replace(layout, schema=row[0]), int(row[1]))
            return _with_idle_key(copy, schema.idle_lock_key(temp), schema.idle_lock_key(layout))
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


async def check_objects(
    conn: db.AsyncConn, layout: Layout, table: Table, emit: Emit, *, capture: str = "trigger"
) -> None:
    """The index, the trigger function and (with the trigger capture) the triggers.

    With ORDER_MONITOR_CAPTURE=decoding the triggers are meant to be gone:
    the decoding checks say so when they are not.
    """
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
        # The copy's body may name the copy's objects: compare the body with
        # this table's rendering instead.
        *expected_objects.function.shape[:2],
        schema.notify_function_body(layout),
        *expected_objects.function.shape[3:],
    ):
        emit(
            Verdict.FAIL,
            "trigger function",
            f"{qualified_function}() differs from what this version installs for the "
            "current settings (an older version, or the in-flight statuses or columns "
            "changed?) — run `order-monitor sql install` (it replaces the function)",
        )
    else:
        emit(Verdict.PASS, "trigger function", f"{qualified_function}() is current")

    # The triggers.
    triggers = (
        () if capture == "decoding" else (names.insert_trigger_name, names.update_trigger_name)
    )
    for trigger_name in triggers:
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
                "differs from what this version installs for the current settings (an "
                "older version, or the columns or channel changed?) — run `order-monitor "
                "sql install` (it replaces the trigger)",
            )
        else:
            emit(Verdict.PASS, check, "enabled, and matches the current settings")


async def check_function_acls(conn: db.AsyncConn, layout: Layout, emit: Emit) -> None:
    """Who may execute the functions we install: their owner, and the write function our role.

    The write function is SECURITY DEFINER: every other grantee may write
    orders with the owner's rights. The trigger function needs no grant (a
    trigger's call is not checked). "Our role" is the configured
    ORDER_MONITOR_ROLE, this session's role, or a role sql/role.sql was
    applied to (it alone is granted DELETE on the outbox).
    """
    names = schema.Names(layout)
    cursor = await conn.execute(
        "SELECT p.proname::text, r.rolname, r.rolsuper,"
        " ARRAY(SELECT CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE g.rolname::text END"
        "       FROM pg_catalog.aclexplode(coalesce(p.proacl,"
        "                                  pg_catalog.acldefault('f', p.proowner))) AS a"
        "       LEFT JOIN pg_catalog.pg_roles g ON g.oid = a.grantee"
        "       WHERE a.privilege_type = 'EXECUTE' AND a.grantee <> p.proowner"
        "         AND NOT (p.proname = %(write)s AND CASE WHEN a.grantee = 0 THEN false"
        "             ELSE g.rolname IN (%(role)s, current_user)"
        "               OR coalesce(pg_catalog.has_table_privilege(a.grantee,"
        "                      pg_catalog.to_regclass(%(outbox)s), 'DELETE'), false) END)"
        "       ORDER BY 1)"
        " FROM pg_catalog.pg_proc p"
        " JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace"
        " JOIN pg_catalog.pg_roles r ON r.oid = p.proowner"
        " WHERE n.nspname = %(schema)s AND p.proname IN (%(function)s, %(write)s)"
        " ORDER BY 1",
        {
            "schema": layout.schema,
            "function": names.function_name,
            "write": names.write_function_name,
            "role": layout.role,
            "outbox": names.outbox.as_string(None),
        },
    )
    rows = await cursor.fetchall()
    if not rows:
        return  # missing functions are reported by their own checks
    problems, warnings = [], []
    for name, owner, superuser, grantees in rows:
        if grantees:
            problems.append(f"{', '.join(grantees)} may execute {name}()")
        if superuser:
            warnings.append(f"{name}() is owned by the superuser {owner}, so it runs as one")
    if problems:
        emit(
            Verdict.FAIL,
            "function ACLs",
            f"{'; '.join(problems)}: each may write with the owner's rights (SECURITY DEFINER) "
            f"— run `order-monitor sql install` (it takes such grants back), or REVOKE them",
        )
    elif warnings:
        emit(
            Verdict.WARN,
            "function ACLs",
            f"{'; '.join(warnings)} — give the table to an ordinary role and install again "
            "as it (install.sql then hands the functions to it)",
        )
    else:
        emit(
            Verdict.PASS, "function ACLs", "only their owner and the daemon's role may execute them"
        )


def _with_idle_key(objects: _Objects, copy_key: int, key: int) -> _Objects:
    """The copy's triggers as they would be on the table: the WHEN names the table's idle lock.

    The key is derived from the table's name, and the copy's is another
    (pg_temp): the deparsed WHEN shows it as a quoted decimal constant.
    """
    triggers = {}
    for name, trigger in objects.triggers.items():
        tgtype, attrs, args, when = trigger.shape
        if when is not None:
            when = when.replace(f"'{copy_key}'::bigint", f"'{key}'::bigint")
        triggers[name] = replace(trigger, shape=(tgtype, attrs, args, when))
    return replace(objects, triggers=triggers)
