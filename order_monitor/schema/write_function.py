"""The write function: the one statement through which the daemon writes a result."""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from psycopg import sql

from order_monitor.config import Layout, OutcomeWrites
from order_monitor.schema.names import Names, Statement, dollar_quoted, in_flight_predicate

#: The write function's parameters, in order: what the daemon sends per order.
WRITE_PARAMETERS: Final = (
    ("p_ids", "uuid[]"),
    ("p_references", "text[]"),
    ("p_provider_ids", "text[]"),
    ("p_kinds", "text[]"),
    ("p_pins", "text[]"),
    ("p_provider_messages", "text[]"),
    ("p_last_messages", "text[]"),
)
#: The outcomes the write function accepts; anything else is ignored.
WRITE_KINDS: Final = ("done", "failed", "gave_up", "pending")
#: The outcome of an order the write function skipped because another
#: transaction holds its row locked: nothing was written, try again.
LOCKED: Final = "locked"
#: From this share of the cluster's NOTIFY queue on, results are written
#: without being announced (see the function's body for why half).
NOTIFY_QUEUE_LIMIT: Final = 0.5


def write_signature() -> sql.Composed:
    """The write function's argument types, as DROP/GRANT/REVOKE name them."""
    return sql.SQL(", ").join(sql.SQL(t) for _, t in WRITE_PARAMETERS)


def write_function_body(
    layout: Layout, writes: OutcomeWrites, *, queue_limit: float = NOTIFY_QUEUE_LIMIT
) -> str:
    """The plpgsql body of the write function, for these settings.

    What each outcome writes is fixed here, at install time, from the
    settings: the daemon sends only the outcome and the provider's text, so
    its role cannot set a status word the DBA did not install.

    It returns one row per order written (its outcome, and whether the
    result was announced) and one per order skipped because another
    transaction holds its row (outcome 'locked', nothing written); an order
    absent from the result is stale. *queue_limit* is the NOTIFY queue usage
    from which results are no longer announced: a parameter for tests only,
    since the queue cannot be filled quickly.
    """
    c = layout.columns
    o = sql.Identifier("o")

    def col(name: str) -> sql.Composed:
        return sql.Composed([o, sql.SQL("."), sql.Identifier(name)])

    def by_kind(column: str, values: dict[str, str | None]) -> sql.Composed:
        arms = [
            sql.SQL("WHEN {kind} THEN {value}").format(
                kind=sql.Literal(kind), value=sql.Literal(value)
            )
            for kind, value in values.items()
            if value is not None
        ]
        return sql.SQL(
            "CASE v.kind\n                {arms}\n                ELSE {old} END"
        ).format(arms=sql.SQL("\n                ").join(arms), old=col(column))

    sets = [
        sql.SQL("{column} = {value}").format(
            column=sql.Identifier(c.external_status),
            value=by_kind(
                c.external_status,
                {
                    "done": writes.done_external_status,
                    "failed": writes.failed_external_status,
                    "gave_up": writes.gave_up_external_status,
                },
            ),
        ),
        sql.SQL(
            "{pin} = CASE WHEN v.kind = 'done' THEN coalesce(v.pin, {o_pin}) ELSE {o_pin} END"
        ).format(pin=sql.Identifier(c.pin_code), o_pin=col(c.pin_code)),
        sql.SQL("{column} = coalesce(v.provider_message, {old})").format(
            column=sql.Identifier(c.provider_message), old=col(c.provider_message)
        ),
        sql.SQL("{column} = coalesce(v.last_message, {old})").format(
            column=sql.Identifier(c.last_message), old=col(c.last_message)
        ),
        sql.SQL("{column} = pg_catalog.now()").format(column=sql.Identifier(c.last_sync_at)),
        sql.SQL(
            "{column} = CASE WHEN v.kind <> 'pending' THEN pg_catalog.now() ELSE {old} END"
        ).format(column=sql.Identifier(c.completed_at), old=col(c.completed_at)),
        # Never negative (a "sentAt" in the future), never past integer
        # (dispatched 25 days ago or more), NULL when there is no finite
        # dispatch time: 'infinity' is a valid timestamptz, and subtracting it
        # raises, which would fail the whole batch for one row.
        sql.SQL(
            "{column} = CASE WHEN v.kind = 'pending' THEN {old}\n"
            "            WHEN pg_catalog.isfinite(coalesce({sent}, {created})) THEN\n"
            "                greatest(0, least(\n"
            "                    extract(epoch FROM pg_catalog.now() - coalesce({sent}, {created}))"
            " * 1000,\n"
            "                    2147483647))::integer\n"
            "            END"
        ).format(
            column=sql.Identifier(c.duration_ms),
            sent=col(c.sent_at),
            created=col(c.created_at),
            old=col(c.duration_ms),
        ),
    ]
    if writes.done_status is not None or writes.failed_status is not None:
        sets.append(
            sql.SQL("{column} = {value}").format(
                column=sql.Identifier(c.status),
                value=by_kind(
                    c.status, {"done": writes.done_status, "failed": writes.failed_status}
                ),
            )
        )
    params = [sql.SQL(name) for name, _ in WRITE_PARAMETERS]
    guard = sql.SQL(
        """{o_ref} = v.ref
      AND {o_provider_id}::text IS NOT DISTINCT FROM v.provider_id
      AND {in_flight}"""
    ).format(
        o_ref=col(c.provider_ref),
        o_provider_id=col(c.provider_id),
        in_flight=in_flight_predicate(layout, "o"),
    )
    # One set-based statement, not a loop with a PERFORM and RETURN NEXT per
    # row; in plpgsql, whose plan is prepared once per session (a LANGUAGE
    # sql body is planned again at every call). The names it returns are
    # plpgsql variables here (the OUT columns): the query uses others.
    body = sql.SQL(
        """
BEGIN
RETURN QUERY
WITH v AS (
    -- ROWS FROM, since a multi-argument unnest() is grammar that only the
    -- unqualified name gets: every call here is schema-qualified.
    SELECT * FROM ROWS FROM ({params})
        AS v(id, ref, provider_id, kind, pin, provider_message, last_message)
    WHERE v.kind IN ({kinds})
), target AS (
    -- The guard: the same reference and provider as when the daemon read
    -- the row, and the row still in flight. A result that lost a race
    -- (an operator finished the order, the application re-sent it) is
    -- not written, and a finished row, its PIN included, is out of reach.
    -- A row another transaction holds locked is skipped, not waited for:
    -- one idle-in-transaction session must not stop every other result.
    -- NO KEY UPDATE is the lock the UPDATE below takes, so a row that is
    -- merely referenced by a foreign key being inserted is not skipped.
    SELECT {o_id} AS id FROM {table} AS o JOIN v ON {o_id} = v.id
    WHERE {guard}
    FOR NO KEY UPDATE OF o SKIP LOCKED
), written AS (
    UPDATE {table} AS o SET
        {sets}
    FROM v
    WHERE {o_id} = v.id
      AND {o_id} IN (SELECT target.id FROM target)
      AND {guard}
    RETURNING {o_id} AS id, v.kind AS kind, {o_ref} AS ref,
        {o_external_status} AS external_status, {o_status} AS status{recorded_columns}
){recording}, gate AS (
    -- The announcement is a hint (the application re-reads the row before
    -- acting on it), the row is the truth: above half of the cluster's
    -- NOTIFY queue, a listener somewhere is stuck and a full queue would
    -- fail our COMMIT, the written rows with it. Half, not nearly full,
    -- because the usage is read now and the notifications queue up at
    -- COMMIT, in every session of the cluster at once, and because the
    -- application's own dispatches NOTIFY too and must keep room to commit.
    SELECT pg_catalog.pg_notification_queue_usage() < {queue_limit} AS has_room
), locked AS (
    -- Rows the guard still matches in this statement's snapshot but that
    -- were not written: another transaction holds them (or changed them
    -- while this ran: the daemon's retry then finds them stale).
    SELECT v.id, v.kind FROM v JOIN {table} AS o ON {o_id} = v.id
    WHERE {guard}
      AND NOT EXISTS (SELECT FROM written WHERE written.id = v.id)
)
SELECT written.id, written.kind,
    CASE WHEN written.kind <> 'pending' AND gate.has_room THEN
        -- pg_notify returns void; cast to text, it is '' (never NULL).
        pg_catalog.pg_notify({channel}, pg_catalog.json_build_object(
            'id', written.id, 'outcome', written.kind, 'reference', written.ref,
            'externalStatus', written.external_status, 'status', written.status
        )::text)::text IS NOT NULL
    ELSE false END
FROM written CROSS JOIN gate
UNION ALL
SELECT DISTINCT locked.id, {locked}, false FROM locked;
END
"""
    ).format(
        params=sql.SQL(",\n                 ").join(
            sql.SQL("pg_catalog.unnest({})").format(p) for p in params
        ),
        table=sql.Identifier(layout.schema, layout.table),
        sets=sql.SQL(",\n        ").join(sets),
        o_id=col(c.id),
        o_ref=col(c.provider_ref),
        guard=guard,
        kinds=sql.SQL(", ").join(sql.Literal(k) for k in WRITE_KINDS),
        o_external_status=col(c.external_status),
        o_status=col(c.status),
        channel=sql.Literal(layout.result_channel),
        queue_limit=sql.Literal(queue_limit),
        locked=sql.Literal(LOCKED),
        recorded_columns=_recorded_columns(layout, writes, col),
        recording=_recording(layout, writes),
    )
    return body.as_string(None)


def _recorded_columns(
    layout: Layout, writes: OutcomeWrites, col: Callable[[str], sql.Composed]
) -> sql.Composable:
    """What the outbox entry copies from the row as written (only when delivering)."""
    if not writes.deliver:
        return sql.SQL("")
    c = layout.columns
    if writes.deliver_columns:
        columns: sql.Composable = sql.SQL("pg_catalog.jsonb_build_object({})").format(
            sql.SQL(", ").join(
                sql.SQL("{name}, {value}").format(name=sql.Literal(name), value=col(name))
                for name in writes.deliver_columns
            )
        )
    else:
        columns = sql.SQL("'{}'::jsonb")
    return sql.SQL(
        ",\n        {provider_message} AS provider_message, {last_message} AS last_message,"
        "\n        {columns} AS recorded_columns"
    ).format(
        provider_message=col(c.provider_message),
        last_message=col(c.last_message),
        columns=columns,
    )


def _recording(layout: Layout, writes: OutcomeWrites) -> sql.Composable:
    """The outbox entry of each written result an action delivers, in this transaction."""
    if not writes.deliver:
        return sql.SQL("")
    return sql.SQL(
        """, recorded AS (
    -- The delivery to the application (approve; reject and refund), recorded
    -- in the transaction that writes the result: written and recorded
    -- commit together or not at all, so no written result goes undelivered
    -- and nothing is delivered for a result that was not written. Runs
    -- though nothing reads it (a data-modifying WITH always does). Never
    -- the PIN: only the messages and the columns the actions use.
    INSERT INTO {outbox} (order_id, outcome, provider_message, last_message, columns)
    SELECT written.id, written.kind, written.provider_message, written.last_message,
        written.recorded_columns
    FROM written
    WHERE written.kind IN ({deliver})
)"""
    ).format(
        outbox=Names(layout).outbox,
        deliver=sql.SQL(", ").join(sql.Literal(k) for k in writes.deliver),
    )


def write_function_statement(
    layout: Layout, writes: OutcomeWrites, *, queue_limit: float = NOTIFY_QUEUE_LIMIT
) -> Statement:
    n = Names(layout)
    params = sql.SQL(",\n    ").join(
        sql.SQL("{name} {type}").format(name=sql.SQL(name), type=sql.SQL(type_))
        for name, type_ in WRITE_PARAMETERS
    )
    return Statement(
        "The daemon's only way to write: one call applies a batch of results, each\n"
        "guarded (same reference and provider, row still in flight), skipping rows\n"
        "another transaction holds locked (returned as 'locked', to try again),\n"
        "and announces the finished ones on the result channel in the same\n"
        "transaction while the cluster's NOTIFY queue is less than half full.\n"
        "When actions deliver results to the application, it also records each\n"
        "such result in the outbox, in the same transaction.\n"
        "SECURITY DEFINER: it runs with the rights of its owner (install as the\n"
        "table's owner, not as a superuser), so the daemon's role needs no UPDATE\n"
        "on the table and cannot touch a row that is not in flight. What each\n"
        "outcome writes is fixed here, from the settings at install time.\n"
        "plan_cache_mode: planned for each batch, with the arrays' real lengths.\n"
        "A generic plan, which plpgsql switches to after five calls, guesses a\n"
        "few rows for the batch; once autovacuum has analyzed the table, that\n"
        "guess joins the batch to itself row by row: bench/delivery.py wrote\n"
        "8,268 results/s that way, 23,343 with a plan per batch.",
        sql.SQL(
            "CREATE OR REPLACE FUNCTION {function}(\n    {params}\n)"
            " RETURNS TABLE (order_id uuid, outcome text, announced boolean)\n"
            "    LANGUAGE plpgsql\n"
            "    SECURITY DEFINER\n"
            "    SET search_path = pg_catalog, pg_temp\n"
            "    SET plan_cache_mode = force_custom_plan\n"
            "AS {body}"
        ).format(
            function=n.write_function,
            params=params,
            body=dollar_quoted(write_function_body(layout, writes, queue_limit=queue_limit)),
        ),
    )
