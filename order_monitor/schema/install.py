"""Install, uninstall and role statements, in the order a DBA applies them."""

from __future__ import annotations

from psycopg import sql

from order_monitor.config import Layout, OutcomeWrites
from order_monitor.schema.names import (
    Names,
    Statement,
    dollar_quoted,
    idle_lock_key,
    in_flight_predicate,
)
from order_monitor.schema.write_function import write_function_statement, write_signature


def notify_function_body(layout: Layout) -> str:
    """The trigger function's plpgsql body: NOTIFY, or the inbox while the daemon is busy."""
    n = Names(layout)
    return (
        sql.SQL(
            "\nBEGIN\n"
            "    -- The daemon holds this lock (exclusively, for its session) while it\n"
            "    -- wants a NOTIFY per order: the shared try then fails at once, never\n"
            "    -- waits. While it does not hold it (busy, or not running), every\n"
            "    -- order goes to the inbox instead, and this transaction keeps the\n"
            "    -- shared lock until it ends: the daemon cannot take the lock back, and\n"
            "    -- so cannot stop reading the inbox, before this row is committed.\n"
            "    IF pg_try_advisory_xact_lock_shared({key}) THEN\n"
            "        INSERT INTO {inbox} (order_id) VALUES (NEW.{id});\n"
            "    ELSE\n"
            "        -- The payload is the id alone: far below NOTIFY's 8000-byte\n"
            "        -- limit, and the daemon reads the committed row itself.\n"
            "        PERFORM pg_notify(TG_ARGV[0], NEW.{id}::text);\n"
            "    END IF;\n"
            "    RETURN NULL;\n"
            "END\n"
        )
        .format(
            key=sql.Literal(idle_lock_key(layout)),
            inbox=n.inbox,
            id=sql.Identifier(layout.columns.id),
        )
        .as_string(None)
    )


def install_statements(layout: Layout, writes: OutcomeWrites | None = None) -> list[Statement]:
    n = Names(layout)
    c = layout.columns
    channel = sql.Literal(layout.channel)
    return [
        Statement(
            "Fail fast instead of queueing the application's writes behind us if the\n"
            "table is busy: re-run later when this times out.",
            sql.SQL("SET lock_timeout = '5s'"),
        ),
        Statement(
            "The provider's reference for an order. Nullable and without a default,\n"
            "so adding it changes only the catalog: no table rewrite.",
            sql.SQL("ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {ref} varchar(255)").format(
                table=n.table, ref=sql.Identifier(c.provider_ref)
            ),
        ),
        Statement(
            "The sweep's index: only orders in flight, keyed by id for keyset\n"
            "pagination. Small (finished orders leave it) and built CONCURRENTLY, so\n"
            "the application keeps writing while it builds. If a build is interrupted\n"
            "it leaves an INVALID index: DROP INDEX CONCURRENTLY it and run this again\n"
            "(`order-monitor doctor` reports it).",
            sql.SQL(
                "CREATE INDEX CONCURRENTLY IF NOT EXISTS {index} ON {table} ({id})\n"
                "    WHERE {predicate}"
            ).format(
                index=sql.Identifier(n.index_name),
                table=n.table,
                id=sql.Identifier(c.id),
                predicate=in_flight_predicate(layout),
            ),
        ),
        Statement(
            "Why not a NOTIFY per order: a transaction that has NOTIFYed takes one\n"
            "lock for the whole cluster at COMMIT and holds it through its WAL flush,\n"
            "so notifying commits run one at a time and lose group commit (pgbench\n"
            "on 2 cores: a quarter of the application's dispatch throughput). So the\n"
            "trigger NOTIFYs only while the daemon is idle enough to want it; while\n"
            "it is busy, order ids wait here and the daemon reads them every few\n"
            "milliseconds, and the application's commits take no lock of ours.\n"
            "UNLOGGED: no WAL for the application to write; after a crash it is\n"
            "empty, and the daemon sweeps the whole table on every reconnect anyway.\n"
            "No index: the daemon takes whatever is here, oldest pages first.",
            sql.SQL(
                "CREATE UNLOGGED TABLE IF NOT EXISTS {inbox} (\n"
                "    order_id uuid NOT NULL,\n"
                "    queued_at timestamptz NOT NULL DEFAULT now()\n"
                ")"
            ).format(inbox=n.inbox),
            replayable=False,
        ),
        Statement(
            "Announces an order: by NOTIFY on the channel named by the trigger's\n"
            "argument while the daemon holds its idle lock, else through the inbox.\n"
            "Either way the daemon sees the order only once it is committed.\n"
            "SECURITY DEFINER: the application's roles need no grant on the inbox.",
            sql.SQL(
                "CREATE OR REPLACE FUNCTION {function}() RETURNS trigger\n"
                "    LANGUAGE plpgsql\n"
                "    SECURITY DEFINER\n"
                "    SET search_path = pg_catalog, pg_temp\n"
                "AS {body}"
            ).format(function=n.function, body=dollar_quoted(notify_function_body(layout))),
        ),
        Statement(
            "The triggers are swapped in one transaction: every application commit\n"
            "sees either the version 1 triggers or these, never both, never neither.",
            sql.SQL("BEGIN"),
            replayable=False,
        ),
        Statement(
            "A new row that is already in flight (it has a provider reference).",
            sql.SQL(
                "CREATE OR REPLACE TRIGGER {trigger}\n"
                "    AFTER INSERT ON {table}\n"
                "    FOR EACH ROW\n"
                "    WHEN ({new_in_flight})\n"
                "    EXECUTE FUNCTION {function}({channel})"
            ).format(
                trigger=sql.Identifier(n.insert_trigger_name),
                table=n.table,
                new_in_flight=in_flight_predicate(layout, "NEW"),
                function=n.function,
                channel=channel,
            ),
        ),
        Statement(
            "A row that becomes in flight, or gets a new provider reference while in\n"
            "flight. Every other update (including the daemon's own result writes,\n"
            "which take the row out of flight) is kept out by UPDATE OF and WHEN,\n"
            "so it costs the application nothing.",
            sql.SQL(
                "CREATE OR REPLACE TRIGGER {trigger}\n"
                "    AFTER UPDATE OF {ref}, {external_status}, {status} ON {table}\n"
                "    FOR EACH ROW\n"
                "    WHEN ({new_in_flight}\n"
                "          AND (OLD.{ref} IS DISTINCT FROM NEW.{ref}\n"
                "               OR NOT coalesce({old_in_flight}, false)))\n"
                "    EXECUTE FUNCTION {function}({channel})"
            ).format(
                trigger=sql.Identifier(n.update_trigger_name),
                ref=sql.Identifier(c.provider_ref),
                external_status=sql.Identifier(c.external_status),
                status=sql.Identifier(c.status),
                table=n.table,
                new_in_flight=in_flight_predicate(layout, "NEW"),
                old_in_flight=in_flight_predicate(layout, "OLD"),
                function=n.function,
                channel=channel,
            ),
        ),
        Statement(
            "Version 1's triggers, which NOTIFYed for every order.",
            sql.SQL("DROP TRIGGER IF EXISTS {trigger} ON {table}").format(
                trigger=sql.Identifier(n.v1_insert_trigger_name), table=n.table
            ),
        ),
        Statement(
            "",
            sql.SQL("DROP TRIGGER IF EXISTS {trigger} ON {table}").format(
                trigger=sql.Identifier(n.v1_update_trigger_name), table=n.table
            ),
        ),
        Statement("", sql.SQL("COMMIT"), replayable=False),
        Statement(
            "Version 1's trigger function: no trigger uses it any more.",
            sql.SQL("DROP FUNCTION IF EXISTS {function}()").format(function=n.v1_function),
        ),
        write_function_statement(layout, writes or OutcomeWrites()),
        Statement(
            "Functions are executable by PUBLIC by default: this one only by the\n"
            "roles granted it (sql/role.sql).",
            sql.SQL("REVOKE ALL ON FUNCTION {function}({signature}) FROM PUBLIC").format(
                function=n.write_function, signature=write_signature()
            ),
        ),
        Statement("", sql.SQL("RESET lock_timeout")),
    ]


def uninstall_statements(layout: Layout) -> list[Statement]:
    n = Names(layout)

    def drop_trigger(name: str) -> sql.Composed:
        return sql.SQL("DROP TRIGGER IF EXISTS {trigger} ON {table}").format(
            trigger=sql.Identifier(name), table=n.table
        )

    return [
        Statement("See install.sql.", sql.SQL("SET lock_timeout = '5s'")),
        Statement(
            "Triggers first, this version's and version 1's: from here on the\n"
            "application's writes announce nothing.",
            drop_trigger(n.insert_trigger_name),
        ),
        Statement("", drop_trigger(n.update_trigger_name)),
        Statement("", drop_trigger(n.v1_insert_trigger_name)),
        Statement("", drop_trigger(n.v1_update_trigger_name)),
        Statement(
            "",
            sql.SQL("DROP FUNCTION IF EXISTS {function}()").format(function=n.function),
        ),
        Statement(
            "",
            sql.SQL("DROP FUNCTION IF EXISTS {function}()").format(function=n.v1_function),
        ),
        Statement(
            "Order ids still waiting in it are orders in flight: the table keeps them\n"
            "and the partial index finds them.",
            sql.SQL("DROP TABLE IF EXISTS {inbox}").format(inbox=n.inbox),
        ),
        Statement(
            "From here on the daemon cannot write results.",
            sql.SQL("DROP FUNCTION IF EXISTS {function}({signature})").format(
                function=n.write_function, signature=write_signature()
            ),
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
    ]


def role_statements(layout: Layout) -> list[Statement]:
    n = Names(layout)
    c = layout.columns
    create_role = sql.SQL(
        "\nBEGIN\n"
        "    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = {name}) THEN\n"
        "        CREATE ROLE {role} LOGIN;\n"
        "    END IF;\n"
        "    EXECUTE format('GRANT CONNECT ON DATABASE %I TO %I', current_database(), {name});\n"
        "END\n"
    ).format(name=sql.Literal(layout.role), role=n.role)
    return [
        Statement(
            "A login role for the daemon, created once. Give it a password or a\n"
            "certificate yourself (ALTER ROLE ... PASSWORD), outside this file.",
            sql.SQL("DO {body}").format(body=dollar_quoted(create_role.as_string(None))),
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
            "message or the duration: it writes those, and never needs to see them.",
            sql.SQL("GRANT SELECT ({columns}) ON TABLE {table} TO {role}").format(
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
            "The inbox (install.sql): the daemon takes the order ids the trigger left\n"
            "there while it was busy. DELETE needs SELECT to find the rows it takes.",
            sql.SQL("GRANT SELECT, DELETE ON TABLE {inbox} TO {role}").format(
                inbox=n.inbox, role=n.role
            ),
        ),
    ]
