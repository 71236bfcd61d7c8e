"""Install, uninstall and role statements, in the order a DBA applies them."""

from __future__ import annotations

from psycopg import sql

from order_monitor.config import Layout, OutcomeWrites
from order_monitor.schema import guards, role_guards
from order_monitor.schema.decoding import decoding_uninstall_statements
from order_monitor.schema.names import (
    V1_WRITE_SIGNATURE,
    Names,
    Statement,
    dollar_quoted,
    in_flight_predicate,
    pin_search_path_again,
)
from order_monitor.schema.outbox import OUTBOX_UPDATABLE, outbox_statements
from order_monitor.schema.write_function import write_function_statement, write_signature


def notify_function_body(layout: Layout) -> str:
    """The trigger function's plpgsql body: called only while the daemon is idle.

    The in-flight rule is tested here rather than in the triggers' WHEN
    (versions 3 to 5): PostgreSQL prepares a trigger's WHEN again for every
    statement, so a WHEN that calls lower() and compares lists cost the
    application up to a third of its dispatch throughput while the daemon
    was busy and the function never ran (``bench/when_parts.sh``). The WHEN
    is now the idle lock's try alone; this body runs only when it failed.
    """
    c = layout.columns
    return (
        sql.SQL(
            "\nBEGIN\n"
            "    -- Called only when the trigger's WHEN found the idle lock held by\n"
            "    -- the daemon (the shared try failed): it wants a NOTIFY per order.\n"
            "    -- While it is busy the try succeeds, this is never called, and the\n"
            "    -- daemon finds the order by reading what changed in the table.\n"
            "    -- Only an order in flight is announced ...\n"
            "    IF ({new_in_flight}) IS NOT TRUE THEN\n"
            "        RETURN NULL;\n"
            "    END IF;\n"
            "    -- ... once: when it enters flight, or gets a new provider reference.\n"
            "    IF TG_OP = 'UPDATE' THEN\n"
            "        IF OLD.{ref} IS NOT DISTINCT FROM NEW.{ref}\n"
            "           AND ({old_in_flight}) IS TRUE THEN\n"
            "            RETURN NULL;\n"
            "        END IF;\n"
            "    END IF;\n"
            "    -- The payload is the id alone: far below NOTIFY's 8000-byte limit,\n"
            "    -- and the daemon reads the committed row itself.\n"
            "    PERFORM pg_catalog.pg_notify(TG_ARGV[0], NEW.{id}::text);\n"
            "    RETURN NULL;\n"
            "END\n"
        )
        .format(
            id=sql.Identifier(c.id),
            ref=sql.Identifier(c.provider_ref),
            new_in_flight=in_flight_predicate(layout, "NEW"),
            old_in_flight=in_flight_predicate(layout, "OLD"),
        )
        .as_string(None)
    )


#: How long a statement of ours waits for a lock on the orders table before it
#: fails. While it waits, every later statement of the application on the
#: table that conflicts with the lock we asked for queues behind our request:
#: for at most this long, then the file stops with "canceling statement due
#: to lock timeout", having changed nothing in that step (each step is
#: idempotent: run the file again when the table is quieter). A re-run that
#: has nothing to change asks for no lock on the table at all.
LOCK_TIMEOUT = "3s"


def _pin_search_path() -> Statement:
    return Statement(
        "Every name this file resolves comes from pg_catalog first: a role that\n"
        "may CREATE in a schema on the default path (public, before PostgreSQL\n"
        "15) could otherwise put its own lower(varchar) in front of ours, and it\n"
        "would run as whoever runs this file. Restored at the end.",
        sql.SQL("SET search_path = pg_catalog, pg_temp"),
        replayable=False,
    )


def _set_lock_timeout() -> Statement:
    return Statement(
        "Wait at most this long for a lock on the orders table. While we wait,\n"
        "the application's statements that conflict with the lock we asked for\n"
        "queue behind our request, for at most that long; then this file stops\n"
        'with "lock timeout", having changed nothing in that step: run it again\n'
        "when the table is quieter (every step is idempotent). A re-run that has\n"
        "nothing to change takes no lock on the orders table at all.",
        sql.SQL("SET lock_timeout = {}").format(sql.Literal(LOCK_TIMEOUT)),
    )


def _triggers(layout: Layout, capture: str) -> Statement:
    if capture == "decoding":
        return Statement(
            "Rendered for ORDER_MONITOR_CAPTURE=decoding: no trigger of ours; any\n"
            "left is dropped (the daemon reads the WAL: sql/decoding.sql).",
            guards.drop_our_triggers(layout),
        )
    return Statement(
        "The triggers: on every insert, and every update of the provider\n"
        "reference or a status, their WHEN tries the daemon's idle lock shared,\n"
        "without waiting, and that is all they do. The try fails while the daemon\n"
        "holds the lock (it wants a NOTIFY: the function is called, and announces\n"
        "the order if it entered flight or got a new reference); it succeeds while\n"
        "the daemon does not (busy, or not running: nothing is called, and the\n"
        "shared lock is held until this transaction ends, so the daemon cannot go\n"
        "back to NOTIFY before it has seen this row committed). The in-flight rule\n"
        "is in the function, not in the WHEN, because PostgreSQL prepares a WHEN\n"
        "for every statement: the rule there cost the application up to a third\n"
        "of its dispatch throughput (version 5). Every other update is kept out by\n"
        "UPDATE OF. Compared first with what this file would create (on a temporary copy\n"
        "of the columns): when they match and earlier versions' are gone, this\n"
        "takes no lock on the table; else it takes the one lock the change needs,\n"
        "once (SHARE ROW EXCLUSIVE to replace version 5's in place, ACCESS\n"
        "EXCLUSIVE when an earlier version's triggers are dropped).",
        guards.swap_triggers(layout),
    )


def install_statements(
    layout: Layout, writes: OutcomeWrites | None = None, *, capture: str = "trigger"
) -> list[Statement]:
    n = Names(layout)
    return [
        _pin_search_path(),
        _set_lock_timeout(),
        Statement(
            "The rest runs as the table's owner: the SECURITY DEFINER functions\n"
            "below run with their owner's rights, which must not be a superuser's.\n"
            "Run by a superuser (or a member of the owner role), this switches to\n"
            "the owner (SET ROLE, until the end of the file) and hands back any\n"
            "function an earlier superuser install left; on a table a superuser\n"
            "owns it goes on with a WARNING. Any other role is refused.",
            guards.as_table_owner(layout),
            replayable=False,
        ),
        Statement(
            "The provider's reference for an order. Nullable and without a default,\n"
            "so adding it changes only the catalog: no table rewrite.",
            guards.add_column_if_missing(layout),
            replayable=False,
        ),
        Statement(
            "The sweep's index: only orders in flight, keyed by id for keyset\n"
            "pagination. Small (finished orders leave it) and built CONCURRENTLY, so\n"
            "the application keeps writing while it builds. Built only when missing:\n"
            "CREATE INDEX ... IF NOT EXISTS takes a lock on the table before it\n"
            "finds the index there.",
            sql.SQL(
                "CREATE INDEX CONCURRENTLY IF NOT EXISTS {index} ON {table} ({id})\n"
                "    WHERE {predicate}"
            ).format(
                index=sql.Identifier(n.index_name),
                table=n.table,
                id=sql.Identifier(layout.columns.id),
                predicate=in_flight_predicate(layout),
            ),
            only_if=guards.index_missing(layout),
        ),
        Statement(
            "Stops here when the index is INVALID (a build interrupted, by a lock\n"
            "timeout for one: DROP INDEX CONCURRENTLY it and run this file again) or\n"
            "was built for another in-flight rule: the sweep could not use it.\n"
            "Compared with the same index built on a temporary copy of the columns.",
            guards.check_index(layout),
            replayable=False,
        ),
        Statement(
            "Everything else in one transaction: every application commit sees\n"
            "the old objects or the new ones, never a mix, and a run that stops\n"
            "(lock timeout) leaves nothing half done.",
            sql.SQL("BEGIN"),
            replayable=False,
        ),
        *outbox_statements(layout, writes or OutcomeWrites()),
        Statement(
            "Announces an order that entered flight, or got a new provider\n"
            "reference, with NOTIFY on the channel named by the trigger's argument.\n"
            "The triggers call it only while the daemon holds its idle lock, that is\n"
            "while orders arrive slowly enough that a call per write and a NOTIFY per\n"
            "order cost nothing. A transaction that has NOTIFYed takes one lock for\n"
            "the whole cluster at COMMIT and holds it through its WAL flush, so\n"
            "notifying commits run one at a time (pgbench on 2 cores: a quarter of\n"
            "the application's dispatch throughput); while the daemon is busy the\n"
            "trigger's WHEN is false and nothing of ours runs for the row: the daemon\n"
            "reads the orders that changed since its last read instead. Not SECURITY\n"
            "DEFINER: it touches no table. Replacing a function takes no lock on the\n"
            "orders table, and the triggers are replaced in this same transaction.",
            sql.SQL(
                "CREATE OR REPLACE FUNCTION {function}() RETURNS trigger\n"
                "    LANGUAGE plpgsql\n"
                "    SET search_path = pg_catalog, pg_temp\n"
                "AS {body}"
            ).format(function=n.function, body=dollar_quoted(notify_function_body(layout))),
        ),
        Statement(
            "Only the triggers call it (a trigger's call needs no EXECUTE): no role\nneeds to.",
            sql.SQL("REVOKE ALL ON FUNCTION {function}() FROM PUBLIC").format(function=n.function),
        ),
        write_function_statement(layout, writes or OutcomeWrites()),
        Statement(
            "Functions are executable by PUBLIC by default: this one only by the\n"
            "roles granted it (sql/role.sql).",
            sql.SQL("REVOKE ALL ON FUNCTION {function}({signature}) FROM PUBLIC").format(
                function=n.write_function, signature=write_signature()
            ),
        ),
        Statement(
            "And by no other role, whatever ALTER DEFAULT PRIVILEGES or an earlier\n"
            "GRANT gave: the owner, and the daemon's role for the write function.",
            guards.reduce_function_acls(layout),
            replayable=False,
        ),
        _triggers(layout, capture),
        Statement(
            "Versions 1 and 2's trigger functions: no trigger uses them any more.",
            sql.SQL("DROP FUNCTION IF EXISTS {function}()").format(function=n.v1_function),
        ),
        Statement(
            "", sql.SQL("DROP FUNCTION IF EXISTS {function}()").format(function=n.v2_function)
        ),
        Statement(
            "Versions 2 to 4's UNLOGGED inbox, where their trigger put order ids\n"
            "while the daemon was busy: nothing writes to it any more. Ids still in it\n"
            "belong to orders that a daemon of this release also finds by reading\n"
            "what changed in the table (upgrade the daemons first), and the sweep\n"
            "finds any order in flight.",
            sql.SQL("DROP TABLE IF EXISTS {inbox}").format(inbox=n.inbox),
            replayable=False,
        ),
        Statement(
            "Versions 1 and 2's write function, which returned another shape. A\n"
            "daemon of those versions can no longer write: stop every instance\n"
            "(standbys included) before running this file, start the new ones after.",
            sql.SQL("DROP FUNCTION IF EXISTS {function}({signature})").format(
                function=n.v1_write_function, signature=V1_WRITE_SIGNATURE
            ),
        ),
        Statement("", sql.SQL("COMMIT"), replayable=False),
        Statement("", sql.SQL("RESET lock_timeout")),
        Statement("", sql.SQL("RESET ROLE"), replayable=False),
        Statement("", sql.SQL("RESET search_path"), replayable=False),
    ]


def uninstall_statements(layout: Layout) -> list[Statement]:
    n = Names(layout)

    def drop_function(function: sql.Identifier, signature: sql.Composable) -> sql.Composed:
        return sql.SQL("DROP FUNCTION IF EXISTS {function}({signature})").format(
            function=function, signature=signature
        )

    return [
        _pin_search_path(),
        Statement(
            "See install.sql.", sql.SQL("SET lock_timeout = {}").format(sql.Literal(LOCK_TIMEOUT))
        ),
        Statement(
            "Results written but not yet delivered to the application (an approval,\n"
            "a refund) are in the outbox: this file refuses to drop them, before it\n"
            "changes anything, unless told to in this session with\n"
            "    SET order_monitor.drop_undelivered = on;\n"
            "(order-monitor sql uninstall --drop-undelivered). Dead letters count too.",
            guards.refuse_undelivered(layout, drop=False),
        ),
        *decoding_uninstall_statements(layout),
        Statement(
            "Triggers first, every version's: from here on the application's writes\n"
            "announce nothing.",
            guards.drop_our_triggers(layout),
        ),
        Statement(
            "The trigger functions of versions 5 and 6 (one), 2 to 4, and 1.",
            drop_function(n.function, sql.SQL("")),
        ),
        Statement("", drop_function(n.v2_function, sql.SQL(""))),
        Statement("", drop_function(n.v1_function, sql.SQL(""))),
        Statement(
            "Versions 2 to 4's inbox. Order ids still waiting in it are orders in\n"
            "flight: the table keeps them and the partial index finds them.",
            sql.SQL("DROP TABLE IF EXISTS {inbox}").format(inbox=n.inbox),
        ),
        Statement(
            "From here on the daemon cannot write results (this version's write\n"
            "function, and that of versions 1 and 2).",
            drop_function(n.write_function, write_signature()),
        ),
        Statement("", drop_function(n.v1_write_function, V1_WRITE_SIGNATURE)),
        Statement(
            "The outbox, now that nothing records into it: locked, checked again (a\n"
            "result written since the check above is refused the same way: run this\n"
            "file again once it is delivered), and dropped with its index, in one\n"
            "transaction.",
            guards.refuse_undelivered(layout, drop=True),
        ),
        Statement(
            "CONCURRENTLY: dropping the index does not block the application's writes.",
            sql.SQL("DROP INDEX CONCURRENTLY IF EXISTS {index}").format(index=n.index),
        ),
        Statement(
            "The provider reference column and every row stay: they are the\n"
            "application's data now.",
            sql.SQL("RESET lock_timeout"),
        ),
        Statement("", sql.SQL("RESET search_path"), replayable=False),
    ]


def role_statements(layout: Layout) -> list[Statement]:
    n = Names(layout)
    c = layout.columns
    return [
        pin_search_path_again(),
        Statement(
            "One transaction: a daemon working while this runs sees the grants as\n"
            "they were or as they are after, never the moment between the REVOKE\n"
            'and the GRANTs below (that gave it "permission denied").',
            sql.SQL("BEGIN"),
            replayable=False,
        ),
        Statement(
            "First, whether this role can grant all of it: a GRANT without the\n"
            'grant option is only a WARNING ("no privileges were granted") and psql\n'
            "would exit 0. Then a login role for the daemon, created once, with\n"
            "every power an older role may have been given taken back (it keeps\n"
            "LOGIN). Give it a password or a certificate yourself (ALTER ROLE ...\n"
            "PASSWORD), outside this file.",
            role_guards.check_and_create_role(layout),
        ),
        Statement(
            "",
            sql.SQL("GRANT USAGE ON SCHEMA {schema} TO {role}").format(
                schema=sql.Identifier(layout.schema), role=n.role
            ),
        ),
        Statement(
            "Start from nothing on the table (this also takes back what an older\n"
            "release granted: UPDATE on columns, SELECT on the PIN).",
            sql.SQL("REVOKE ALL ON TABLE {table} FROM {role}").format(table=n.table, role=n.role),
        ),
        Statement(
            "Read: only the columns the daemon looks at. Not the PIN, the provider's\n"
            "message or the duration: it writes those, and never needs to see them.\n"
            "And xmin, the id of the transaction that wrote a row: while the daemon is\n"
            "busy the trigger announces nothing, and the daemon reads the orders in\n"
            "flight written since its last read by comparing it.",
            sql.SQL("GRANT SELECT ({columns}, xmin) ON TABLE {table} TO {role}").format(
                columns=sql.SQL(", ").join(sql.Identifier(x) for x in c.read()),
                table=n.table,
                role=n.role,
            ),
        ),
        Statement(
            "Write: only through the write function (install.sql), which writes\n"
            "nothing but results into rows still in flight. No UPDATE, INSERT or\n"
            "DELETE on the table itself.",
            sql.SQL("GRANT EXECUTE ON FUNCTION {function}({signature}) TO {role}").format(
                function=n.write_function, signature=write_signature(), role=n.role
            ),
        ),
        Statement(
            "The outbox (install.sql): the daemon reads the entries due, DELETEs the\n"
            "delivered ones and, on a failed attempt, updates only its bookkeeping\n"
            "(when to try again, how often it tried, why it failed, a dead letter's\n"
            "mark). No INSERT: only the write function records a delivery, in the\n"
            "transaction that writes the result, so the daemon's role cannot ask the\n"
            "application to approve or refund an order whose result was not written.\n"
            "First, whether this role can grant that (else an ERROR, nothing changed).",
            role_guards.check_outbox_grant(layout),
        ),
        Statement(
            "Start from nothing on the outbox (takes back what was granted by hand).",
            sql.SQL("REVOKE ALL ON TABLE {outbox} FROM {role}").format(
                outbox=n.outbox, role=n.role
            ),
        ),
        Statement(
            "",
            sql.SQL("GRANT SELECT, DELETE ON TABLE {outbox} TO {role}").format(
                outbox=n.outbox, role=n.role
            ),
        ),
        Statement(
            "",
            sql.SQL("GRANT UPDATE ({columns}) ON TABLE {outbox} TO {role}").format(
                columns=sql.SQL(", ").join(sql.Identifier(x) for x in OUTBOX_UPDATABLE),
                outbox=n.outbox,
                role=n.role,
            ),
        ),
        Statement("", sql.SQL("COMMIT"), replayable=False),
        Statement("", sql.SQL("RESET search_path"), replayable=False),
    ]
