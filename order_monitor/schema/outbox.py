"""The outbox (schema version 4): written results waiting to be delivered to the application.

The write function records an entry in the transaction that writes the row
(see ``write_function``); the leader's relay delivers it and DELETEs it, or
updates its bookkeeping after a failed attempt, or marks it a dead letter.
So the table holds only what is not yet delivered, and the dead letters.
"""

from __future__ import annotations

from typing import Final

from psycopg import sql

from order_monitor.config import DELIVERABLE_OUTCOMES, Layout, OutcomeWrites
from order_monitor.schema.guards import do, table_text
from order_monitor.schema.names import Names, Statement

#: (name, type and constraints) of the outbox's columns, in order.
OUTBOX_COLUMNS: Final = (
    ("delivery_id", "uuid PRIMARY KEY DEFAULT pg_catalog.gen_random_uuid()"),
    ("order_id", "uuid NOT NULL"),
    ("outcome", "text NOT NULL"),
    ("provider_message", "text"),
    ("last_message", "text"),
    ("columns", "jsonb NOT NULL DEFAULT '{}'"),
    ("recorded_at", "timestamptz NOT NULL DEFAULT pg_catalog.now()"),
    ("due_at", "timestamptz NOT NULL DEFAULT pg_catalog.now()"),
    ("tries", "integer NOT NULL DEFAULT 0"),
    ("rejections", "integer NOT NULL DEFAULT 0"),
    ("last_verdict", "text"),
    ("last_error", "text"),
    ("dead_at", "timestamptz"),
    ("requeued_at", "timestamptz"),
)

#: The columns the daemon's role may UPDATE: its bookkeeping of the attempts.
OUTBOX_UPDATABLE: Final = (
    "due_at",
    "tries",
    "rejections",
    "last_verdict",
    "last_error",
    "dead_at",
    "requeued_at",
)


def check_deliverable(layout: Layout, writes: OutcomeWrites) -> None:
    """Refuse settings the outbox must never be rendered for (a PIN, a 'pending' result)."""
    unknown = [o for o in writes.deliver if o not in DELIVERABLE_OUTCOMES]
    if unknown:
        raise ValueError(f"only {', '.join(DELIVERABLE_OUTCOMES)} can be delivered, not {unknown}")
    if layout.columns.pin_code in writes.deliver_columns:
        raise ValueError(
            f"the column {layout.columns.pin_code} (the PIN) is never copied into the outbox"
        )


def outbox_statements(layout: Layout, writes: OutcomeWrites) -> list[Statement]:
    """The outbox and its index (always), and the check of the actions' columns (if any)."""
    n = Names(layout)
    columns = sql.SQL(",\n    ").join(
        sql.SQL("{name} {definition}").format(
            name=sql.Identifier(name), definition=sql.SQL(definition)
        )
        for name, definition in OUTBOX_COLUMNS
    )
    statements = [
        Statement(
            "The outbox: one row per result the write function wrote and an action\n"
            "of the application delivers (approve; reject and refund), recorded in\n"
            "the very transaction that writes the result. So a written result is\n"
            "never left undelivered (the daemon killed between its write and its\n"
            "call: the next leader delivers it), and nothing is delivered for a\n"
            "result that was not written. LOGGED, unlike the inbox: it must survive\n"
            "a crash and a failover. delivery_id is the stable id the application\n"
            "can deduplicate on (at least once). Delivered entries are DELETEd, so\n"
            "it holds only what is not delivered yet and the dead letters (dead_at\n"
            "set), which an operator re-queues or drops (order-monitor deliveries).\n"
            "No foreign key to the orders table: one would lock that table here and\n"
            "on every write. Never a PIN. Rows arrive only through the write\n"
            "function: empty, and unused, until actions are configured.",
            sql.SQL("CREATE TABLE IF NOT EXISTS {outbox} (\n    {columns}\n)").format(
                outbox=n.outbox, columns=columns
            ),
            replayable=False,
        ),
        Statement(
            "What the relay asks for: the entries due, not dead, oldest due first.\n"
            "Built only when missing (CREATE INDEX ... IF NOT EXISTS would lock the\n"
            "outbox first, queueing the daemon's writes behind this file); on a new,\n"
            "empty table, so not CONCURRENTLY. The orders table is not touched.",
            _create_due_index(layout),
            replayable=False,
        ),
    ]
    check_deliverable(layout, writes)
    if writes.deliver_columns:
        statements.append(
            Statement(
                "The row columns the actions send ({column:NAME}) must exist: the\n"
                "write function copies their values into each entry, and a missing\n"
                "one would fail every write instead of this file.",
                _check_columns(layout, writes.deliver_columns),
                replayable=False,
            )
        )
    return statements


def _create_due_index(layout: Layout) -> sql.Composed:
    n = Names(layout)
    body = sql.SQL(
        """
BEGIN
    IF pg_catalog.to_regclass({index}) IS NULL THEN
        CREATE INDEX IF NOT EXISTS {index_name} ON {outbox} (due_at) WHERE dead_at IS NULL;
    END IF;
END
"""
    ).format(
        index=sql.Literal(sql.Identifier(layout.schema, n.outbox_due_index_name).as_string(None)),
        index_name=sql.Identifier(n.outbox_due_index_name),
        outbox=n.outbox,
    )
    return do(body)


def _check_columns(layout: Layout, columns: tuple[str, ...]) -> sql.Composed:
    body = sql.SQL(
        """
DECLARE
    missing text;
BEGIN
    SELECT pg_catalog.string_agg(col, ', ') INTO missing
      FROM pg_catalog.unnest(ARRAY[{columns}]::text[]) AS col
     WHERE NOT EXISTS (SELECT FROM pg_catalog.pg_attribute a
                        WHERE a.attrelid = pg_catalog.to_regclass({table})
                          AND a.attname = col AND a.attnum > 0 AND NOT a.attisdropped);
    IF missing IS NOT NULL THEN
        RAISE EXCEPTION 'order-monitor: table % has no column % (used by {{column:...}} in [actions.*] of the providers file)', {table}, missing
            USING HINT = 'correct the actions in the providers file, then render this file again';
    END IF;
END
"""  # noqa: E501 (plpgsql a DBA reads: long messages stay on one line)
    ).format(
        columns=sql.SQL(", ").join(sql.Literal(c) for c in columns),
        table=table_text(layout),
    )
    return do(body)
