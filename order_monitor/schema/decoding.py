"""``sql/decoding.sql``: capture dispatched orders from the WAL instead of a trigger (opt-in).

For a cluster run with ``wal_level = logical``. Applied by a superuser after
install.sql and role.sql; it drops our triggers, so the application's
commits do no work of ours at all, and the daemon (``ORDER_MONITOR_CAPTURE=
decoding``) reads the orders from a logical replication slot with the
built-in ``pgoutput`` plugin, through a publication of the orders table's
in-flight columns only.

Least privilege: reading a slot needs the REPLICATION attribute, which would
let the daemon's role decode every table of the database. It keeps none: a
NOLOGIN role with REPLICATION owns four SECURITY DEFINER functions bound to
this slot and this publication, and the daemon's role may execute those
alone. What they return is what the publication carries (the id, the
reference and the two status columns of the orders table, which the role
may read anyway).

A slot nobody reads keeps WAL forever: doctor requires
``max_slot_wal_keep_size``, the daemon exports the slot's lag, and a slot
invalidated for falling behind is recreated by the daemon (the recreate
function refuses while the slot is healthy), which then sweeps.
"""

from __future__ import annotations

from psycopg import sql

from order_monitor.config import Layout
from order_monitor.schema import guards
from order_monitor.schema.names import Names, Statement, dollar_quoted, pin_search_path_again
from order_monitor.schema.write_function import write_signature

#: How many changes one read of the slot decodes at most (whole transactions).
READ_CHANGES = 10_000


def slot_name_sql(layout: Layout) -> sql.Composed:
    """The slot's name, computed where it is used: slot names are per cluster, not database."""
    return sql.SQL(
        "'order_monitor_' || pg_catalog.left(pg_catalog.md5("
        "pg_catalog.current_database() || ':' || {table}), 16)"
    ).format(table=guards.table_text(layout))


def published_columns(layout: Layout) -> tuple[str, ...]:
    """The columns the publication carries: the id and what the in-flight rule reads."""
    c = layout.columns
    return (c.id, c.provider_ref, c.external_status, c.status)


def _function(
    layout: Layout, name: sql.Identifier, arguments: str, returns: str, body: str, *, definer: bool
) -> sql.Composed:
    return sql.SQL(
        "CREATE OR REPLACE FUNCTION {name}({arguments}) RETURNS {returns}\n"
        "    LANGUAGE plpgsql\n"
        "    {security}\n"
        "    SET search_path = pg_catalog, pg_temp\n"
        "AS {body}"
    ).format(
        name=name,
        arguments=sql.SQL(arguments),
        returns=sql.SQL(returns),
        security=sql.SQL("SECURITY DEFINER" if definer else "SECURITY INVOKER"),
        body=dollar_quoted(body),
    )


def _bodies(layout: Layout) -> dict[str, str]:
    slot = slot_name_sql(layout).as_string(None)
    # pgoutput reads publication_names as a list of identifiers: quoted, so a
    # name with a comma or a quote (a table's) stays one name.
    publication = (
        sql.SQL("pg_catalog.quote_ident({})")
        .format(sql.Literal(Names(layout).publication_name))
        .as_string(None)
    )
    return {
        "changes": f"""
DECLARE
    flushed pg_catalog.pg_lsn := pg_catalog.pg_current_wal_flush_lsn();
BEGIN
    -- Peek, never get: the daemon advances the slot itself, once the orders
    -- are scheduled. Whole transactions only, at most upto changes, up to
    -- the WAL flushed now; then one row (that position, no data): when fewer
    -- than upto rows came, everything up to it was read, and the daemon may
    -- confirm it even when no order changed. Else a slot on a quiet table
    -- would hold back every other table's WAL.
    RETURN QUERY
        SELECT c.lsn, c.data
          FROM pg_catalog.pg_logical_slot_peek_binary_changes(
                   {slot}, flushed, upto,
                   'proto_version', '1', 'publication_names', {publication}) AS c;
    RETURN QUERY SELECT flushed, NULL::pg_catalog.bytea;
END
""",
        "advance": f"""
BEGIN
    RETURN (SELECT a.end_lsn FROM pg_catalog.pg_replication_slot_advance({slot}, upto) AS a);
END
""",
        "slot": f"""
BEGIN
    RETURN QUERY
        SELECT s.slot_name::text, s.wal_status,
               pg_catalog.pg_wal_lsn_diff(pg_catalog.pg_current_wal_lsn(),
                                          s.confirmed_flush_lsn)::bigint,
               s.safe_wal_size
          FROM pg_catalog.pg_replication_slots s
         WHERE s.slot_name = {slot};
END
""",
        "recreate": f"""
DECLARE
    status text;
BEGIN
    SELECT s.wal_status INTO status FROM pg_catalog.pg_replication_slots s
     WHERE s.slot_name = {slot};
    IF FOUND AND status IS DISTINCT FROM 'lost' THEN
        RAISE EXCEPTION 'order-monitor: the slot % is %, not lost: it is not recreated', {slot}, status
            USING HINT = 'only a slot invalidated for falling behind (or dropped) is recreated';
    END IF;
    IF FOUND THEN
        PERFORM pg_catalog.pg_drop_replication_slot({slot});
    END IF;
    RETURN (SELECT r.lsn FROM pg_catalog.pg_create_logical_replication_slot({slot}, 'pgoutput') AS r);
END
""",  # noqa: E501 (plpgsql a DBA reads: long messages stay on one line)
    }


def _signature(function: sql.Identifier, arguments: sql.Composable) -> str:
    return sql.SQL("{}({})").format(function, arguments).as_string(None)


def decoding_statements(layout: Layout) -> list[Statement]:
    n = Names(layout)
    bodies = _bodies(layout)
    role = sql.Identifier(layout.role)
    columns = sql.SQL(", ").join(sql.Identifier(c) for c in published_columns(layout))
    return [
        pin_search_path_again(),
        Statement(
            "See install.sql: a step that waits longer for a lock stops, changing nothing.",
            sql.SQL("SET lock_timeout = '3s'"),
        ),
        Statement(
            "Stops here unless the server decodes its WAL and the objects this file\n"
            "builds on are in place.",
            guards.do(
                sql.SQL(
                    """
BEGIN
    IF pg_catalog.current_setting('wal_level') <> 'logical' THEN
        RAISE EXCEPTION 'order-monitor: wal_level is %, not logical: nothing was changed', pg_catalog.current_setting('wal_level')
            USING HINT = 'ALTER SYSTEM SET wal_level = logical (a managed service: its parameter group), restart the server, then run this file again';
    END IF;
    IF pg_catalog.to_regprocedure({write}) IS NULL THEN
        RAISE EXCEPTION 'order-monitor: install.sql has not run here: nothing was changed'
            USING HINT = 'run install.sql, then role.sql, then this file';
    END IF;
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = {daemon}) THEN
        RAISE EXCEPTION 'order-monitor: the daemon''s role % does not exist: nothing was changed', {daemon}
            USING HINT = 'run role.sql first';
    END IF;
END
"""  # noqa: E501 (plpgsql a DBA reads: long messages stay on one line)
                ).format(
                    write=sql.Literal(
                        sql.SQL("{}({})")
                        .format(n.write_function, write_signature())
                        .as_string(None)
                    ),
                    daemon=sql.Literal(layout.role),
                )
            ),
            replayable=False,
        ),
        Statement(
            "The slot, first and in a transaction of its own (PostgreSQL creates a\n"
            "logical slot only in a transaction that has written nothing). It waits\n"
            "for the transactions running now to end, to start from a consistent\n"
            "point. Its name is derived from the database and the table: slot names\n"
            "are per cluster. From here on the server keeps the WAL the slot has not\n"
            "confirmed: set max_slot_wal_keep_size (doctor requires it), or a slot\n"
            "nobody reads fills the disk.",
            guards.do(
                sql.SQL(
                    """
BEGIN
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_replication_slots WHERE slot_name = {slot}) THEN
        PERFORM pg_catalog.pg_create_logical_replication_slot({slot}, 'pgoutput');
    END IF;
END
"""
                ).format(slot=slot_name_sql(layout))
            ),
            replayable=False,
        ),
        Statement("", sql.SQL("BEGIN"), replayable=False),
        Statement(
            "A role that may read slots (REPLICATION) and cannot log in. It owns the\n"
            "four functions below and nothing else; the daemon's role is not it and\n"
            "is not a member of it.",
            guards.do(
                sql.SQL(
                    """
BEGIN
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = {name}) THEN
        CREATE ROLE {role} NOLOGIN REPLICATION;
    END IF;
    ALTER ROLE {role} NOLOGIN REPLICATION NOSUPERUSER NOCREATEDB NOCREATEROLE NOBYPASSRLS;
END
"""
                ).format(name=sql.Literal(n.decoder_role_name), role=n.decoder_role)
            ),
            replayable=False,
        ),
        Statement(
            "The publication: the orders table's inserts and updates, with only the\n"
            "columns the in-flight rule reads and the id (a column list needs\n"
            "PostgreSQL 15). Deletes and truncates are not published. Created when\n"
            "missing; a different one of the same name is reported by doctor.",
            guards.do(
                sql.SQL(
                    """
BEGIN
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_publication WHERE pubname = {name}) THEN
        CREATE PUBLICATION {publication} FOR TABLE {table} ({columns})
            WITH (publish = 'insert, update');
    END IF;
END
"""
                ).format(
                    name=sql.Literal(n.publication_name),
                    publication=n.publication,
                    table=n.table,
                    columns=columns,
                )
            ),
            replayable=False,
        ),
        Statement(
            "The slot's changes, as the publication carries them: a peek (nothing is\n"
            "consumed), whole transactions, at most upto changes, then the position\n"
            "read up to.",
            _function(
                layout,
                n.changes_function,
                "upto integer",
                "TABLE (lsn pg_catalog.pg_lsn, data pg_catalog.bytea)",
                bodies["changes"],
                definer=True,
            ),
            replayable=False,
        ),
        Statement(
            "Confirms the changes up to upto: the server may then recycle that WAL.",
            _function(
                layout,
                n.advance_function,
                "upto pg_catalog.pg_lsn",
                "pg_catalog.pg_lsn",
                bodies["advance"],
                definer=True,
            ),
            replayable=False,
        ),
        Statement(
            "The slot's state: its WAL status (lost: invalidated), how many bytes of\n"
            "WAL it holds back, how many more it may before it is invalidated.",
            _function(
                layout,
                n.slot_function,
                "",
                "TABLE (slot_name text, wal_status text, lag_bytes bigint, safe_wal_size bigint)",
                bodies["slot"],
                definer=False,
            ),
            replayable=False,
        ),
        Statement(
            "A new slot for an invalidated (or dropped) one; refuses while the slot\n"
            "is healthy, so the daemon cannot skip changes with it. The daemon sweeps\n"
            "after it: orders dispatched meanwhile are found there.",
            _function(
                layout,
                n.recreate_function,
                "",
                "pg_catalog.pg_lsn",
                bodies["recreate"],
                definer=True,
            ),
            replayable=False,
        ),
        *[
            stmt
            for function, arguments in n.decoding_functions
            for stmt in (
                Statement(
                    "",
                    sql.SQL("ALTER FUNCTION {}({}) OWNER TO {}").format(
                        function, sql.SQL(arguments), n.decoder_role
                    ),
                    replayable=False,
                ),
                Statement(
                    "",
                    sql.SQL("REVOKE ALL ON FUNCTION {}({}) FROM PUBLIC").format(
                        function, sql.SQL(arguments)
                    ),
                    replayable=False,
                ),
                Statement(
                    "",
                    sql.SQL("GRANT EXECUTE ON FUNCTION {}({}) TO {}").format(
                        function, sql.SQL(arguments), role
                    ),
                    replayable=False,
                ),
            )
        ],
        Statement(
            "And by no other role, whatever ALTER DEFAULT PRIVILEGES gave: each\n"
            "grantee of a SECURITY DEFINER function here could read or confirm the\n"
            "slot with REPLICATION's rights.",
            guards.do(
                sql.SQL(
                    """
DECLARE
    item record;
BEGIN
    FOR item IN
        SELECT DISTINCT p.oid::pg_catalog.regprocedure AS f, r.rolname
          FROM pg_catalog.pg_proc p
         CROSS JOIN LATERAL pg_catalog.aclexplode(p.proacl) AS acl
          JOIN pg_catalog.pg_roles r ON r.oid = acl.grantee
         WHERE p.oid IN ({functions})
           AND acl.grantee <> p.proowner AND r.rolname <> {daemon}
    LOOP
        EXECUTE pg_catalog.format('REVOKE ALL ON FUNCTION %s FROM %I CASCADE', item.f, item.rolname);
    END LOOP;
END
"""  # noqa: E501 (plpgsql a DBA reads: long statements stay on one line)
                ).format(
                    functions=sql.SQL(", ").join(
                        sql.SQL("pg_catalog.to_regprocedure({})").format(
                            sql.Literal(_signature(function, sql.SQL(arguments)))
                        )
                        for function, arguments in n.decoding_functions
                    ),
                    daemon=sql.Literal(layout.role),
                )
            ),
            replayable=False,
        ),
        Statement(
            "Our triggers go: from here on the application's commits do no work of\n"
            "ours. (install.sql run again puts them back; doctor says so.)",
            guards.drop_our_triggers(layout),
            replayable=False,
        ),
        Statement("", sql.SQL("COMMIT"), replayable=False),
        Statement("", sql.SQL("RESET lock_timeout"), replayable=False),
        Statement("", sql.SQL("RESET search_path"), replayable=False),
    ]


def decoding_uninstall_statements(layout: Layout) -> list[Statement]:
    """Uninstall's part: the slot, the publication and the functions, when present."""
    n = Names(layout)
    drops = sql.SQL("\n    ").join(
        sql.SQL("DROP FUNCTION IF EXISTS {}({});").format(function, sql.SQL(arguments))
        for function, arguments in n.decoding_functions
    )
    body = sql.SQL(
        """
BEGIN
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_publication WHERE pubname = {name})
       AND NOT EXISTS (SELECT FROM pg_catalog.pg_replication_slots WHERE slot_name = {slot})
       AND pg_catalog.to_regprocedure({changes}) IS NULL THEN
        RETURN;  -- decoding.sql never ran here
    END IF;
    IF NOT (SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = current_user) THEN
        RAISE EXCEPTION 'order-monitor: decoding.sql ran here: its slot, publication and functions need a superuser to drop; nothing was changed'
            USING HINT = 'run this file as a superuser';
    END IF;
    IF EXISTS (SELECT FROM pg_catalog.pg_replication_slots WHERE slot_name = {slot}) THEN
        PERFORM pg_catalog.pg_drop_replication_slot({slot});
    END IF;
    DROP PUBLICATION IF EXISTS {publication};
    {drops}
END
"""  # noqa: E501 (plpgsql a DBA reads: long messages stay on one line)
    ).format(
        name=sql.Literal(n.publication_name),
        slot=slot_name_sql(layout),
        changes=sql.Literal(sql.SQL("{}(integer)").format(n.changes_function).as_string(None)),
        publication=n.publication,
        drops=drops,
    )
    return [
        Statement(
            "The logical decoding capture (decoding.sql), first: the slot (a slot left\n"
            "behind keeps WAL forever), the publication and the slot's functions.\n"
            "Needs a superuser when they exist. The decoder role stays (roles are per\n"
            "cluster): DROP ROLE it yourself.",
            guards.do(body),
            replayable=False,
        )
    ]
