"""The write function: the one statement through which the daemon writes a result."""

from __future__ import annotations

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


def write_signature() -> sql.Composed:
    """The write function's argument types, as DROP/GRANT/REVOKE name them."""
    return sql.SQL(", ").join(sql.SQL(t) for _, t in WRITE_PARAMETERS)


def write_function_body(layout: Layout, writes: OutcomeWrites) -> str:
    """The plpgsql body of the write function, for these settings.

    What each outcome writes is fixed here, at install time, from the
    settings: the daemon sends only the outcome and the provider's text, so
    its role cannot set a status word the DBA did not install.
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
        sql.SQL("{column} = now()").format(column=sql.Identifier(c.last_sync_at)),
        sql.SQL("{column} = CASE WHEN v.kind <> 'pending' THEN now() ELSE {old} END").format(
            column=sql.Identifier(c.completed_at), old=col(c.completed_at)
        ),
        sql.SQL(
            "{column} = CASE WHEN v.kind <> 'pending' THEN least(\n"
            "            extract(epoch FROM now() - coalesce({sent}, {created})) * 1000,\n"
            "            2147483647)::integer ELSE {old} END"
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
    # One set-based statement, not a loop with a PERFORM and RETURN NEXT per
    # row; in plpgsql, whose plan is prepared once per session (a LANGUAGE
    # sql body is planned again at every call).
    body = sql.SQL(
        """
BEGIN
RETURN QUERY
WITH v AS (
    SELECT * FROM unnest({params})
        AS v(id, ref, provider_id, kind, pin, provider_message, last_message)
), written AS (
    UPDATE {table} AS o SET
        {sets}
    FROM v
    WHERE {o_id} = v.id
      -- The guard: the same reference and provider as when the daemon read
      -- the row, and the row still in flight. A result that lost a race
      -- (an operator finished the order, the application re-sent it) is
      -- not written, and a finished row, its PIN included, is out of reach.
      AND {o_ref} = v.ref
      AND {o_provider_id}::text IS NOT DISTINCT FROM v.provider_id
      AND v.kind IN ({kinds})
      AND {in_flight}
    RETURNING {o_id} AS id, v.kind AS kind,
        -- A hint for the application, in the same transaction: anyone may
        -- NOTIFY on any channel, so it re-reads the row (by id and reference)
        -- before acting on it. RETURNING runs for every row written.
        CASE WHEN v.kind <> 'pending' THEN pg_notify({channel}, json_build_object(
            'id', {o_id}, 'outcome', v.kind, 'reference', {o_ref},
            'externalStatus', {o_external_status}, 'status', {o_status})::text)::text
        END AS announced
)
SELECT written.id, written.kind FROM written;
END
"""
    ).format(
        params=sql.SQL(",\n                 ").join(params),
        table=sql.Identifier(layout.schema, layout.table),
        sets=sql.SQL(",\n        ").join(sets),
        o_id=col(c.id),
        o_ref=col(c.provider_ref),
        o_provider_id=col(c.provider_id),
        kinds=sql.SQL(", ").join(sql.Literal(k) for k in WRITE_KINDS),
        in_flight=in_flight_predicate(layout, "o"),
        o_external_status=col(c.external_status),
        o_status=col(c.status),
        channel=sql.Literal(layout.result_channel),
    )
    return body.as_string(None)


def write_function_statement(layout: Layout, writes: OutcomeWrites) -> Statement:
    n = Names(layout)
    params = sql.SQL(",\n    ").join(
        sql.SQL("{name} {type}").format(name=sql.SQL(name), type=sql.SQL(type_))
        for name, type_ in WRITE_PARAMETERS
    )
    return Statement(
        "The daemon's only way to write: one call applies a batch of results, each\n"
        "guarded (same reference and provider, row still in flight), and announces\n"
        "the finished ones on the result channel in the same transaction.\n"
        "SECURITY DEFINER: it runs with the rights of its owner (install as the\n"
        "table's owner, not as a superuser), so the daemon's role needs no UPDATE\n"
        "on the table and cannot touch a row that is not in flight. What each\n"
        "outcome writes is fixed here, from the settings at install time.",
        sql.SQL(
            "CREATE OR REPLACE FUNCTION {function}(\n    {params}\n)"
            " RETURNS TABLE (order_id uuid, outcome text)\n"
            "    LANGUAGE plpgsql\n"
            "    SECURITY DEFINER\n"
            "    SET search_path = pg_catalog, pg_temp\n"
            "AS {body}"
        ).format(
            function=n.write_function,
            params=params,
            body=dollar_quoted(write_function_body(layout, writes)),
        ),
    )
