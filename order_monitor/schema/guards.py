"""The install's DO blocks: they read the catalog first and change only what differs.

A DBA must be able to re-run ``install.sql`` on a busy table: a re-run that
changes nothing takes no lock on the orders table at all, and a run that
must change a trigger takes the one lock it needs, at its final strength,
before anything else (a weaker lock upgraded later deadlocks with an
application transaction that did ``SELECT ... FOR UPDATE`` then ``UPDATE``).
What the install would create is learnt by building it on a temporary
"probe" table with the same column types, and comparing the catalog's
deparsed forms (under the script's pinned search_path), not by comparing
the text we render: an index built by an older release with an unqualified
``lower`` that resolved to ``pg_catalog.lower`` is the same index.
"""

from __future__ import annotations

from psycopg import sql

from order_monitor.config import Layout
from order_monitor.schema.names import (
    Names,
    dollar_quoted,
    idle_lock_key,
    in_flight_predicate,
)

#: The temporary table the checks build what the install would create on.
PROBE = sql.Identifier("pg_temp", "order_monitor_probe")


def do(body: sql.Composable) -> sql.Composed:
    """``DO`` with *body* dollar-quoted (the body holds configured identifiers)."""
    return sql.SQL("DO {body}").format(body=dollar_quoted(body.as_string(None)))


def table_text(layout: Layout) -> sql.Literal:
    """The table's qualified name as a literal, for ``pg_catalog.to_regclass`` (no lock)."""
    return sql.Literal(Names(layout).table.as_string(None))


def _probe(layout: Layout) -> sql.Composed:
    """plpgsql lines that create the probe: the table's columns, same types, same numbers.

    Same attribute numbers (a dropped column is recreated, then dropped), so
    the stored expression trees of what we build on it and of what the table
    has can be compared as they are, without deparsing anything on the
    table: deparsing opens it, and that takes a lock.
    """
    return sql.SQL(
        "    SELECT pg_catalog.string_agg(CASE WHEN a.attisdropped\n"
        "               THEN pg_catalog.format('order_monitor_dropped_%s integer', a.attnum)\n"
        "               ELSE pg_catalog.format('%I %s%s', a.attname,\n"
        "                   pg_catalog.format_type(a.atttypid, a.atttypmod),\n"
        "                   CASE WHEN a.attcollation = 0 THEN ''\n"
        "                   ELSE pg_catalog.format(' COLLATE %I.%I', cn.nspname, co.collname)\n"
        "                   END) END, ', ' ORDER BY a.attnum),\n"
        "           pg_catalog.string_agg(\n"
        "               pg_catalog.format('DROP COLUMN order_monitor_dropped_%s', a.attnum), ', '\n"
        "           ) FILTER (WHERE a.attisdropped)\n"
        "      INTO probe_columns, probe_drops\n"
        "      FROM pg_catalog.pg_attribute a\n"
        "      LEFT JOIN pg_catalog.pg_collation co ON co.oid = a.attcollation\n"
        "      LEFT JOIN pg_catalog.pg_namespace cn ON cn.oid = co.collnamespace\n"
        "     WHERE a.attrelid = pg_catalog.to_regclass({table}) AND a.attnum > 0;\n"
        "    EXECUTE pg_catalog.format('CREATE TEMPORARY TABLE {probe} (%s)', probe_columns);\n"
        "    IF probe_drops IS NOT NULL THEN\n"
        "        EXECUTE pg_catalog.format('ALTER TABLE {probe} %s', probe_drops);\n"
        "    END IF;"
    ).format(table=table_text(layout), probe=PROBE)


#: An expression tree as pg_node_tree text, without the positions in the
#: statement it was parsed from (which differ between two spellings of it).
def _tree(column: str) -> sql.SQL:
    return sql.SQL(f"pg_catalog.regexp_replace({column}::text, ' :location -?[0-9]+', '', 'g')")


def as_table_owner(layout: Layout) -> sql.Composed:
    """Run the rest of the script as the table's owner, or refuse, or warn about a superuser."""
    n = Names(layout)
    ours = sql.SQL(", ").join(
        sql.Literal(name)
        for name in (
            n.function_name,
            n.v2_function_name,
            n.v1_function_name,
            n.write_function_name,
            n.v1_write_function_name,
        )
    )
    body = sql.SQL(
        """
DECLARE
    table_owner name;
    owner_is_superuser boolean;
    item record;
BEGIN
    SELECT r.rolname, r.rolsuper INTO table_owner, owner_is_superuser
      FROM pg_catalog.pg_class c JOIN pg_catalog.pg_roles r ON r.oid = c.relowner
     WHERE c.oid = pg_catalog.to_regclass({table});
    IF table_owner IS NULL THEN
        RAISE EXCEPTION 'order-monitor: table % does not exist', {table};
    END IF;
    IF owner_is_superuser THEN
        -- Go on, but say it: our SECURITY DEFINER functions run as their
        -- owner, the table's, so with every right on the cluster.
        RAISE WARNING 'order-monitor: % is owned by the superuser %, so the SECURITY DEFINER functions this file creates run as a superuser', {table}, table_owner
            USING HINT = 'give the table to an ordinary role (ALTER TABLE ... OWNER TO ...) and run this file again';
    ELSIF table_owner <> current_user THEN
        IF NOT pg_catalog.pg_has_role(table_owner, 'MEMBER') THEN
            RAISE EXCEPTION 'order-monitor: run this file as the owner of % (%), or as a role that may SET ROLE to it', {table}, table_owner;
        END IF;
        -- An earlier install run by a superuser left functions (or the
        -- inbox, or the outbox) that are not the table owner's: give them back, or the
        -- owner could not replace them, and a superuser-owned SECURITY
        -- DEFINER function would keep running with every right.
        FOR item IN
            SELECT p.oid::pg_catalog.regprocedure AS f
              FROM pg_catalog.pg_proc p
              JOIN pg_catalog.pg_namespace s ON s.oid = p.pronamespace
             WHERE s.nspname = {schema} AND p.proname::text IN ({ours})
               AND p.proowner <> (SELECT r.oid FROM pg_catalog.pg_roles r WHERE r.rolname = table_owner)
        LOOP
            EXECUTE pg_catalog.format('ALTER FUNCTION %s OWNER TO %I', item.f, table_owner);
        END LOOP;
        FOR item IN
            SELECT i.oid::pg_catalog.regclass AS t FROM pg_catalog.pg_class i
             WHERE i.oid IN (pg_catalog.to_regclass({inbox}), pg_catalog.to_regclass({outbox}))
               AND i.relowner <> (SELECT r.oid FROM pg_catalog.pg_roles r
                                   WHERE r.rolname = table_owner)
        LOOP
            EXECUTE pg_catalog.format('ALTER TABLE %s OWNER TO %I', item.t, table_owner);
        END LOOP;
        -- For this session, until the RESET ROLE at the end of the file.
        PERFORM pg_catalog.set_config('role', table_owner, false);
    END IF;
END
"""  # noqa: E501 (plpgsql a DBA reads: long messages stay on one line)
    ).format(
        table=table_text(layout),
        schema=sql.Literal(layout.schema),
        ours=ours,
        inbox=sql.Literal(n.inbox.as_string(None)),
        outbox=sql.Literal(n.outbox.as_string(None)),
    )
    return do(body)


#: The session setting that lets uninstall drop undelivered deliveries.
DROP_UNDELIVERED = "order_monitor.drop_undelivered"


def refuse_undelivered(layout: Layout, *, drop: bool) -> sql.Composed:
    """Raise when the outbox holds entries, unless this session set DROP_UNDELIVERED to on.

    With *drop*, the outbox is locked first and dropped after the check, in
    the same transaction: nothing can be recorded between the two.
    """
    n = Names(layout)
    outbox = sql.Literal(n.outbox.as_string(None))
    body = sql.SQL(
        """
DECLARE
    waiting bigint;
    dead bigint;
BEGIN
    IF pg_catalog.to_regclass({outbox}) IS NULL THEN
        RETURN;
    END IF;
{lock}    IF pg_catalog.lower(coalesce(pg_catalog.current_setting({setting}, true), '')) = 'on' THEN
        waiting := 0;
        dead := 0;
    ELSE
        SELECT pg_catalog.count(*) FILTER (WHERE dead_at IS NULL), pg_catalog.count(*) FILTER (WHERE dead_at IS NOT NULL)
          INTO waiting, dead FROM {outbox_ident};
    END IF;
    IF waiting + dead > 0 THEN
        RAISE EXCEPTION 'order-monitor: the outbox % still holds % deliveries not yet made and % dead letters: results written but never delivered to the application (approvals, refunds); nothing was dropped', {outbox}, waiting, dead
            USING HINT = 'let the daemon deliver them (order-monitor deliveries lists them), or drop them anyway: SET ' || {setting} || ' = on; before this file (order-monitor sql uninstall --drop-undelivered)';
    END IF;
{drop}END
"""  # noqa: E501 (plpgsql a DBA reads: long messages stay on one line)
    ).format(
        outbox=outbox,
        outbox_ident=n.outbox,
        setting=sql.Literal(DROP_UNDELIVERED),
        lock=sql.SQL("    LOCK TABLE {} IN ACCESS EXCLUSIVE MODE;\n").format(n.outbox)
        if drop
        else sql.SQL(""),
        drop=sql.SQL("    DROP TABLE {};\n").format(n.outbox) if drop else sql.SQL(""),
    )
    return do(body)


def add_column_if_missing(layout: Layout) -> sql.Composed:
    """The provider reference column, added only when the catalog says it is missing."""
    c = layout.columns
    body = sql.SQL(
        """
BEGIN
    -- ADD COLUMN IF NOT EXISTS takes ACCESS EXCLUSIVE on the table even when
    -- the column exists: ask the catalog (no lock) first.
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_attribute
                    WHERE attrelid = pg_catalog.to_regclass({table})
                      AND attname = {ref_name} AND NOT attisdropped) THEN
        ALTER TABLE {table_ident} ADD COLUMN IF NOT EXISTS {ref} varchar(255);
    END IF;
END
"""
    ).format(
        table=table_text(layout),
        ref_name=sql.Literal(c.provider_ref),
        table_ident=Names(layout).table,
        ref=sql.Identifier(c.provider_ref),
    )
    return do(body)


def index_missing(layout: Layout) -> sql.Composed:
    """True when our index does not exist (CREATE INDEX ... IF NOT EXISTS locks the table first)."""
    return sql.SQL("pg_catalog.to_regclass({index}) IS NULL").format(
        index=sql.Literal(Names(layout).index.as_string(None))
    )


def check_index(layout: Layout) -> sql.Composed:
    """Stop the script when our index is INVALID or was built for another in-flight rule."""
    n = Names(layout)
    shape = sql.SQL(
        "(am.amname, i.indisunique, i.indnatts, i.indkey, i.indclass, i.indcollation,\n"
        "            {exprs}, {pred})::text"
    ).format(exprs=_tree("i.indexprs"), pred=_tree("i.indpred"))
    body = sql.SQL(
        """
DECLARE
    probe_columns text;
    probe_drops text;
    existing record;
    wanted record;
BEGIN
    SELECT i.indisvalid AND i.indisready AS valid,
           i.indrelid = pg_catalog.to_regclass({table}) AS on_table,
           {shape} AS shape, i.indpred
      INTO existing
      FROM pg_catalog.pg_index i
      JOIN pg_catalog.pg_class c ON c.oid = i.indexrelid
      JOIN pg_catalog.pg_am am ON am.oid = c.relam
     WHERE i.indexrelid = pg_catalog.to_regclass({index});
    IF NOT FOUND THEN
        RAISE EXCEPTION 'order-monitor: index % is missing', {index}
            USING HINT = 'run this file again, as the table''s owner';
    END IF;
    IF NOT existing.valid THEN
        RAISE EXCEPTION 'order-monitor: index % is INVALID (an interrupted CREATE INDEX CONCURRENTLY left it): the sweep cannot use it', {index}
            USING HINT = 'run DROP INDEX CONCURRENTLY ' || {index} || '; then run this file again';
    END IF;
    IF NOT existing.on_table THEN
        RAISE EXCEPTION 'order-monitor: index % indexes another table than %', {index}, {table}
            USING HINT = 'run DROP INDEX CONCURRENTLY ' || {index} || '; then run this file again';
    END IF;
{probe}
    CREATE INDEX order_monitor_probe_index ON {probe_ident} ({id}) WHERE {predicate};
    SELECT {shape} AS shape, i.indpred, i.indrelid
      INTO wanted
      FROM pg_catalog.pg_index i
      JOIN pg_catalog.pg_class c ON c.oid = i.indexrelid
      JOIN pg_catalog.pg_am am ON am.oid = c.relam
     WHERE i.indexrelid = 'pg_temp.order_monitor_probe_index'::pg_catalog.regclass;
    IF existing.shape IS DISTINCT FROM wanted.shape THEN
        -- Both deparsed on the probe (same column numbers), not on the table.
        RAISE EXCEPTION 'order-monitor: index % was built for another in-flight rule (WHERE %), this file builds it WHERE %', {index},
            pg_catalog.pg_get_expr(existing.indpred, wanted.indrelid), pg_catalog.pg_get_expr(wanted.indpred, wanted.indrelid)
            USING HINT = 'run DROP INDEX CONCURRENTLY ' || {index} || '; then run this file again (or render it with the settings the index was built for)';
    END IF;
    DROP TABLE {probe_ident};
END
"""  # noqa: E501 (plpgsql a DBA reads: long messages stay on one line)
    ).format(
        table=table_text(layout),
        index=sql.Literal(n.index.as_string(None)),
        shape=shape,
        probe=_probe(layout),
        probe_ident=PROBE,
        id=sql.Identifier(layout.columns.id),
        predicate=in_flight_predicate(layout),
    )
    return do(body)


def trigger_definitions(layout: Layout, table: sql.Composable) -> list[sql.Composed]:
    """Our two triggers on *table* (the orders table, or the probe), as CREATE OR REPLACE.

    Each WHEN is the idle lock's shared try and nothing else: PostgreSQL
    prepares a trigger's WHEN for every statement, and the in-flight rule
    there cost the application up to a third of its dispatch throughput
    while the daemon was busy (``bench/when_parts.sh``). The function tests
    the rule, and it runs only while the daemon is idle (see
    notify_function_body).
    """
    n = Names(layout)
    c = layout.columns
    channel = sql.Literal(layout.channel)
    daemon_idle = sql.SQL("NOT pg_catalog.pg_try_advisory_xact_lock_shared({key})").format(
        key=sql.Literal(idle_lock_key(layout))
    )
    insert = sql.SQL(
        "CREATE OR REPLACE TRIGGER {trigger}\n"
        "            AFTER INSERT ON {table}\n"
        "            FOR EACH ROW\n"
        "            WHEN ({daemon_idle})\n"
        "            EXECUTE FUNCTION {function}({channel})"
    ).format(
        trigger=sql.Identifier(n.insert_trigger_name),
        table=table,
        daemon_idle=daemon_idle,
        function=n.function,
        channel=channel,
    )
    update = sql.SQL(
        "CREATE OR REPLACE TRIGGER {trigger}\n"
        "            AFTER UPDATE OF {ref}, {external_status}, {status} ON {table}\n"
        "            FOR EACH ROW\n"
        "            WHEN ({daemon_idle})\n"
        "            EXECUTE FUNCTION {function}({channel})"
    ).format(
        daemon_idle=daemon_idle,
        trigger=sql.Identifier(n.update_trigger_name),
        ref=sql.Identifier(c.provider_ref),
        external_status=sql.Identifier(c.external_status),
        status=sql.Identifier(c.status),
        table=table,
        function=n.function,
        channel=channel,
    )
    return [insert, update]


def _trigger_shapes(relation: sql.Composable) -> sql.Composed:
    """(name, shape) of our triggers on *relation*: what the swap compares (no deparsing)."""
    return sql.SQL(
        "SELECT t.tgname::text AS name,\n"
        "                   (t.tgtype, t.tgfoid, t.tgargs, t.tgattr, {qual})::text AS shape\n"
        "              FROM pg_catalog.pg_trigger t\n"
        "             WHERE t.tgrelid = {relation} AND NOT t.tgisinternal\n"
        "               AND t.tgname::text IN (insert_name, update_name)"
    ).format(relation=relation, qual=_tree("t.tgqual"))


def swap_triggers(layout: Layout) -> sql.Composed:
    """Our triggers as this version makes them, older versions' gone; no lock if nothing differs."""
    n = Names(layout)
    probe_insert, probe_update = trigger_definitions(layout, PROBE)
    insert, update = trigger_definitions(layout, n.table)
    body = sql.SQL(
        """
DECLARE
    insert_name constant text := {insert_name};
    update_name constant text := {update_name};
    probe_columns text;
    probe_drops text;
    differs boolean;
    drop_old boolean;
BEGIN
{probe}
    {probe_insert};
    {probe_update};
    WITH wanted AS ({wanted}),
         present AS ({present})
    SELECT EXISTS (SELECT FROM wanted FULL JOIN present USING (name)
                    WHERE wanted.shape IS DISTINCT FROM present.shape)
      INTO differs;
    DROP TABLE {probe_ident};
    SELECT EXISTS (SELECT FROM pg_catalog.pg_trigger t
                    WHERE t.tgrelid = pg_catalog.to_regclass({table})
                      AND t.tgname::text IN ({old_names}))
      INTO drop_old;
    IF NOT differs AND NOT drop_old THEN
        RETURN;  -- nothing to change: no lock on the table at all
    END IF;
    -- The strongest lock this transaction will need, taken first and once:
    -- CREATE OR REPLACE TRIGGER wants SHARE ROW EXCLUSIVE, DROP TRIGGER
    -- ACCESS EXCLUSIVE. Asking for the weaker one and then the stronger
    -- one deadlocked with an application transaction that had done
    -- SELECT ... FOR UPDATE and then UPDATE.
    IF drop_old THEN
        LOCK TABLE {table_ident} IN ACCESS EXCLUSIVE MODE;
    ELSE
        LOCK TABLE {table_ident} IN SHARE ROW EXCLUSIVE MODE;
    END IF;
    {insert};
    {update};
    {drops}
END
"""
    ).format(
        insert_name=sql.Literal(n.insert_trigger_name),
        update_name=sql.Literal(n.update_trigger_name),
        probe=_probe(layout),
        probe_insert=probe_insert,
        probe_update=probe_update,
        wanted=_trigger_shapes(
            sql.SQL("{}::pg_catalog.regclass").format(sql.Literal(PROBE.as_string(None)))
        ),
        present=_trigger_shapes(sql.SQL("pg_catalog.to_regclass({})").format(table_text(layout))),
        probe_ident=PROBE,
        table=table_text(layout),
        old_names=sql.SQL(", ").join(sql.Literal(t) for t in n.old_trigger_names),
        table_ident=n.table,
        insert=insert,
        update=update,
        drops=sql.SQL("\n    ").join(
            sql.SQL("DROP TRIGGER IF EXISTS {trigger} ON {table};").format(
                trigger=sql.Identifier(t), table=n.table
            )
            for t in n.old_trigger_names
        ),
    )
    return do(body)


def drop_our_triggers(layout: Layout) -> sql.Composed:
    """Every version's triggers dropped under one ACCESS EXCLUSIVE lock; none if none is there."""
    n = Names(layout)
    triggers = (n.insert_trigger_name, n.update_trigger_name, *n.old_trigger_names)
    body = sql.SQL(
        """
BEGIN
    -- DROP TRIGGER IF EXISTS takes ACCESS EXCLUSIVE even when there is
    -- nothing to drop: ask the catalog first, then lock once for all of them.
    IF EXISTS (SELECT FROM pg_catalog.pg_trigger
                WHERE tgrelid = pg_catalog.to_regclass({table}) AND tgname::text IN ({names})) THEN
        LOCK TABLE {table_ident} IN ACCESS EXCLUSIVE MODE;
        {drops}
    END IF;
END
"""
    ).format(
        table=table_text(layout),
        names=sql.SQL(", ").join(sql.Literal(t) for t in triggers),
        table_ident=n.table,
        drops=sql.SQL("\n        ").join(
            sql.SQL("DROP TRIGGER IF EXISTS {trigger} ON {table};").format(
                trigger=sql.Identifier(t), table=n.table
            )
            for t in triggers
        ),
    )
    return do(body)


def reduce_function_acls(layout: Layout) -> sql.Composed:
    """EXECUTE on our functions for their owner, and on the write function for our role only."""
    n = Names(layout)
    body = sql.SQL(
        """
DECLARE
    item record;
BEGIN
    FOR item IN
        SELECT p.oid::pg_catalog.regprocedure AS f, p.proname::text AS name
          FROM pg_catalog.pg_proc p
          JOIN pg_catalog.pg_namespace s ON s.oid = p.pronamespace
         WHERE s.nspname = {schema} AND p.proname::text IN ({function}, {write_function})
    LOOP
        -- A function with no ACL yet is executable by PUBLIC: this makes the
        -- ACL explicit, which the loop below then reads.
        EXECUTE pg_catalog.format('REVOKE ALL ON FUNCTION %s FROM PUBLIC', item.f);
    END LOOP;
    -- Whatever ALTER DEFAULT PRIVILEGES or an earlier hand granted: a
    -- SECURITY DEFINER function runs with the owner's rights, so each grantee
    -- is one more role that may write orders (or the inbox) as the owner.
    FOR item IN
        SELECT DISTINCT p.oid::pg_catalog.regprocedure AS f, r.rolname
          FROM pg_catalog.pg_proc p
         CROSS JOIN LATERAL pg_catalog.aclexplode(p.proacl) AS acl
          JOIN pg_catalog.pg_roles r ON r.oid = acl.grantee
          JOIN pg_catalog.pg_namespace s ON s.oid = p.pronamespace
         WHERE s.nspname = {schema} AND p.proname::text IN ({function}, {write_function})
           AND acl.grantee <> p.proowner
           AND NOT (p.proname::text = {write_function} AND r.rolname = {role})
    LOOP
        EXECUTE pg_catalog.format('REVOKE ALL ON FUNCTION %s FROM %I CASCADE', item.f, item.rolname);
    END LOOP;
END
"""  # noqa: E501 (plpgsql a DBA reads: long messages stay on one line)
    ).format(
        schema=sql.Literal(layout.schema),
        function=sql.Literal(n.function_name),
        write_function=sql.Literal(n.write_function_name),
        role=sql.Literal(layout.role),
    )
    return do(body)


__all__ = [
    "DROP_UNDELIVERED",
    "PROBE",
    "add_column_if_missing",
    "as_table_owner",
    "check_index",
    "drop_our_triggers",
    "index_missing",
    "reduce_function_acls",
    "refuse_undelivered",
    "swap_triggers",
    "trigger_definitions",
]
