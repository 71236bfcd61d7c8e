"""What the role may do: the write function, the daemon's own statements.

And, once the role can read them, whether any order in flight has no provider.
"""

from __future__ import annotations

import psycopg
from psycopg import sql

from order_monitor import db, schema
from order_monitor.config import Settings
from order_monitor.db.changes import ChangeStatements
from order_monitor.operator.doctor.database import Table, fetch_one
from order_monitor.operator.findings import Emit, Verdict


async def check_write_function(conn: db.AsyncConn, settings: Settings, emit: Emit) -> None:
    """The write function: present, made for these settings, and not a superuser's."""
    layout = settings.layout
    names = schema.Names(layout)
    qualified = names.write_function.as_string(conn)
    problem = await db.write_function_problem(conn, layout, settings.writes)
    if problem is not None:
        emit(Verdict.FAIL, "write function", problem)
        return
    row = await fetch_one(
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


async def check_privileges(
    conn: db.AsyncConn, settings: Settings, table: Table, emit: Emit
) -> bool:
    """What the role may do, proven on the daemon's own statements, not on a list beside them."""
    layout = settings.layout
    c = layout.columns
    # xmin: the busy read compares it (engine.changes); role.sql grants it.
    readable = [name for name in c.read() if name in table.columns] + ["xmin"]
    row = await fetch_one(
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
        "and the busy read "
        f"(reading {len(readable)} columns, writing only through the write function)",
    )
    return True


async def _daemon_statements_refused(conn: db.AsyncConn, settings: Settings) -> list[str]:
    """Run the daemon's own statements with nothing to do; name the ones refused.

    The write gets empty arrays, inside a transaction that is rolled back:
    it proves the call is permitted and changes nothing.
    """
    queries = db.Queries(settings.layout)
    changes = ChangeStatements(settings.layout)
    empty = db.WriteBatch([], [], [], [], [], [], [])
    refused = []
    for what, run in (
        # LIMIT 0: the grants are checked all the same, and no row's values
        # can fail the probe (those are the "dispatch times" check's).
        ("the sweep's SELECT", lambda: queries.sweep_page(conn, None, 0)),
        ("the re-read's SELECT", lambda: queries.fetch_in_flight(conn, [])),
        ("EXECUTE on the write function", lambda: queries.write(conn, empty)),
        ("the busy read's SELECT of xmin", lambda: _busy_read_probe(conn, changes)),
    ):
        try:
            async with conn.transaction(force_rollback=True):
                await run()
        except psycopg.errors.InsufficientPrivilege:
            refused.append(what)
        except (psycopg.errors.UndefinedFunction, psycopg.errors.UndefinedTable):
            refused.append(f"{what} (it is missing)")
    return refused


async def check_unserved_orders(conn: db.AsyncConn, settings: Settings, emit: Emit) -> None:
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


#: Role attributes the daemon's role must not have (sql/role.sql takes them back).
POWERS = ("rolcreatedb", "rolcreaterole", "rolreplication", "rolbypassrls")
#: What the daemon's role must not be able to do to the table, whichever way it got it.
TABLE_WRITES = ("INSERT", "UPDATE", "DELETE", "TRUNCATE", "TRIGGER", "REFERENCES")


async def check_role_powers(
    conn: db.AsyncConn, settings: Settings, table: Table, emit: Emit
) -> None:
    """This role's memberships, attributes, and any privilege on the table beyond role.sql's.

    A role that existed before role.sql, or was later made a member of an
    application role, may write the table or read the PINs and prices
    through that membership (or through PUBLIC), which no grant of ours shows.
    """
    c = settings.layout.columns
    allowed = set(c.read())
    row = await fetch_one(
        conn,
        "WITH RECURSIVE member_of(oid) AS ("
        "  SELECT m.roleid FROM pg_catalog.pg_auth_members m"
        "   WHERE m.member = (SELECT oid FROM pg_catalog.pg_roles WHERE rolname = current_user)"
        "  UNION SELECT m.roleid FROM pg_catalog.pg_auth_members m"
        "   JOIN member_of ON m.member = member_of.oid)"
        " SELECT current_user, r.rolsuper,"
        "  ARRAY(SELECT pg_catalog.upper(pg_catalog.substr(p, 4))"
        "        FROM pg_catalog.unnest(%s::text[]) AS p"
        "        WHERE (pg_catalog.to_jsonb(r) ->> p)::boolean),"
        "  ARRAY(SELECT g.rolname::text FROM member_of JOIN pg_catalog.pg_roles g"
        "        ON g.oid = member_of.oid ORDER BY 1),"
        "  ARRAY(SELECT w FROM pg_catalog.unnest(%s::text[]) AS w"
        "        WHERE pg_catalog.has_table_privilege(%s::oid, w)),"
        "  ARRAY(SELECT a.attname::text FROM pg_catalog.pg_attribute a"
        "        WHERE a.attrelid = %s::oid AND a.attnum > 0 AND NOT a.attisdropped"
        "          AND NOT a.attname = ANY(%s::text[])"
        "          AND pg_catalog.has_column_privilege(%s::oid, a.attnum, 'SELECT')"
        "        ORDER BY a.attnum)"
        " FROM pg_catalog.pg_roles r WHERE r.rolname = current_user",
        (list(POWERS), list(TABLE_WRITES), table.oid, table.oid, sorted(allowed), table.oid),
    )
    user, superuser, powers, memberships, writes, reads = row
    through = (
        f" (through its memberships: {', '.join(memberships)}, or PUBLIC)"
        if memberships
        else " (granted to it, or to PUBLIC)"
    )
    if superuser:
        emit(
            Verdict.WARN,
            "role powers",
            f"{user} is a superuser: every check above passes for it, and whoever holds its DSN "
            "may do anything — run the daemon as the role sql/role.sql creates",
        )
        return
    excess = [f"{w} on the table" for w in writes]
    if reads:
        excess.append(f"SELECT on {', '.join(reads)}")
    if excess:
        emit(
            Verdict.FAIL,
            "role powers",
            f"{user} may also {'; '.join(excess)}{through} — revoke them, or take the role out "
            "of those roles (REVOKE <role> FROM ...): it needs nothing beyond sql/role.sql",
        )
    elif powers or memberships:
        extra = [*powers, *(f"member of {m}" for m in memberships)]
        emit(
            Verdict.WARN,
            "role powers",
            f"{user} has more than it needs ({', '.join(extra)}), though nothing on the table "
            "beyond sql/role.sql's — apply sql/role.sql again (it takes the attributes back) "
            "and revoke the memberships",
        )
    else:
        emit(
            Verdict.PASS,
            "role powers",
            f"{user} is a member of no role and may do nothing on the table beyond sql/role.sql's",
        )


async def check_schema_create(conn: db.AsyncConn, settings: Settings, emit: Emit) -> None:
    """Warn when a role other than the schema's and the table's owner may CREATE in our schema.

    On such a schema (``public`` on a database created before PostgreSQL 15
    lets PUBLIC CREATE) any role can plant functions that shadow pg_catalog's
    for every session that does not pin its search_path: the daemon pins it,
    the application, psql and report tools usually do not.
    """
    layout = settings.layout
    cursor = await conn.execute(
        "SELECT n.nspname::text,"
        " ARRAY(SELECT DISTINCT CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE g.rolname::text END"
        "       FROM pg_catalog.aclexplode(coalesce(n.nspacl,"
        "                                  pg_catalog.acldefault('n', n.nspowner))) AS a"
        "       LEFT JOIN pg_catalog.pg_roles g ON g.oid = a.grantee"
        "       WHERE a.privilege_type = 'CREATE' AND a.grantee <> n.nspowner"
        "         AND a.grantee IS DISTINCT FROM (SELECT t.relowner FROM pg_catalog.pg_class t"
        "                                 WHERE t.oid = pg_catalog.to_regclass(%s))"
        "         AND NOT coalesce(g.rolsuper, false)"
        "       ORDER BY 1)"
        " FROM pg_catalog.pg_namespace n WHERE n.nspname IN (%s, 'public') ORDER BY 1",
        (schema.Names(layout).table.as_string(None), layout.schema),
    )
    open_schemas = [(name, who) for name, who in await cursor.fetchall() if who]
    if not open_schemas:
        emit(
            Verdict.PASS,
            "schema CREATE",
            "only the schema's and the table's owner may create objects in "
            + " and ".join(sorted({layout.schema, "public"})),
        )
        return
    said = "; ".join(f"{', '.join(who)} may CREATE in schema {name}" for name, who in open_schemas)
    emit(
        Verdict.WARN,
        "schema CREATE",
        f"{said}: such a role can plant functions (a lower(varchar)) that run as whoever calls "
        "them from a session that does not pin search_path (the daemon pins it; the "
        "application and psql may not) — REVOKE CREATE ON SCHEMA ... FROM those roles",
    )


async def _busy_read_probe(conn: db.AsyncConn, changes: ChangeStatements) -> None:
    """The busy read as the daemon makes it (its rows), from the first transaction id
    not yet assigned: no row (but one over 2^31 transactions old: db.changes), so no
    row's values can fail the probe."""
    row = await fetch_one(
        conn,
        "SELECT pg_catalog.pg_snapshot_xmax(pg_catalog.pg_current_snapshot())::pg_catalog.text",
    )
    # Never a special id (0-2, just after a wraparound): age() of one is huge.
    await changes.read(conn, max(int(row[0]) % 2**32, 3), rows=True)
