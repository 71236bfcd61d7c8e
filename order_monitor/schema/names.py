"""Our objects' names, the advisory lock keys, and the in-flight predicate."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Final

from psycopg import sql

from order_monitor.config import Layout

#: The schema version the files announce: that of the newest object.
VERSION = 6


@dataclass(frozen=True, slots=True)
class Statement:
    """One SQL statement and the comment a reader sees above it."""

    comment: str
    query: sql.SQL | sql.Composed
    #: Whether doctor replays it on a temporary copy of the table to learn
    #: what the install creates (a transaction block or an UNLOGGED table
    #: cannot be replayed there).
    replayable: bool = True
    #: A SELECT of one boolean: run the statement only when it is true. For
    #: what must run outside a transaction (CREATE INDEX CONCURRENTLY) and so
    #: cannot sit in a DO block, yet takes a lock on the table even when it
    #: has nothing to do. psql runs it through \gset and \if.
    only_if: sql.Composed | None = None

    def text(self) -> str:
        if self.only_if is None:
            return self.query.as_string(None)
        return (
            f"SELECT ({self.only_if.as_string(None)}) AS needed \\gset order_monitor_\n"
            f"\\if :order_monitor_needed\n{self.query.as_string(None)};\n\\endif"
        )


def object_name(prefix: str, table: str, suffix: str) -> str:
    """A name for an object we create, kept within Postgres' 63-byte limit."""
    name = f"{prefix}_{table}_{suffix}"
    if len(name.encode()) <= 63:
        return name
    digest = hashlib.sha1(table.encode(), usedforsecurity=False).hexdigest()[:8]
    keep = 63 - len(prefix) - len(suffix) - len(digest) - 3
    return f"{prefix}_{table.encode()[:keep].decode(errors='ignore')}{digest}_{suffix}"


class Names:
    """Identifiers of the table, its columns and the objects we install."""

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self.table = sql.Identifier(layout.schema, layout.table)
        self.index_name = object_name("order_monitor", layout.table, "inflight_v1")
        self.index = sql.Identifier(layout.schema, self.index_name)
        #: The trigger function: called only while the daemon is idle, it
        #: NOTIFYs an order that entered flight or got a new reference. Its
        #: name is version 5's: version 6 moved the in-flight rule from the
        #: triggers' WHEN into its body, and replaces both in one transaction.
        self.function_name = object_name("order_monitor", layout.table, "notify_v3")
        self.function = sql.Identifier(layout.schema, self.function_name)
        self.write_function_name = object_name("order_monitor", layout.table, "write_v2")
        self.write_function = sql.Identifier(layout.schema, self.write_function_name)
        #: Written results waiting to be delivered to the application (version 4).
        self.outbox_name = object_name("order_monitor", layout.table, "outbox_v1")
        self.outbox = sql.Identifier(layout.schema, self.outbox_name)
        self.outbox_due_index_name = object_name("order_monitor", layout.table, "outbox_due_v1")
        self.insert_trigger_name = "order_monitor_insert_v3"
        self.update_trigger_name = "order_monitor_update_v3"
        self.role = sql.Identifier(layout.role)
        #: What version 1 installed and version 2 replaces (dropped by install).
        self.v1_function_name = object_name("order_monitor", layout.table, "notify_v1")
        self.v1_function = sql.Identifier(layout.schema, self.v1_function_name)
        self.v1_insert_trigger_name = "order_monitor_insert_v1"
        self.v1_update_trigger_name = "order_monitor_update_v1"
        #: What version 2 installed and version 3 replaces (dropped by install):
        #: the write function before its return shape changed.
        self.v1_write_function_name = object_name("order_monitor", layout.table, "write_v1")
        self.v1_write_function = sql.Identifier(layout.schema, self.v1_write_function_name)
        #: What versions 2 to 4 installed and version 5 replaces (dropped by
        #: install): triggers whose function ran for every dispatched row and,
        #: while the daemon was busy, wrote its id to the UNLOGGED inbox.
        self.v2_function_name = object_name("order_monitor", layout.table, "notify_v2")
        self.v2_function = sql.Identifier(layout.schema, self.v2_function_name)
        self.inbox_name = object_name("order_monitor", layout.table, "inbox_v2")
        self.inbox = sql.Identifier(layout.schema, self.inbox_name)
        self.v2_insert_trigger_name = "order_monitor_insert_v2"
        self.v2_update_trigger_name = "order_monitor_update_v2"

        #: Logical decoding capture (``sql/decoding.sql``, opt-in): the
        #: publication, the NOLOGIN role with REPLICATION that owns the slot's
        #: functions, and those functions.
        self.publication_name = object_name("order_monitor", layout.table, "pub_v1")
        self.publication = sql.Identifier(self.publication_name)
        self.decoder_role_name = f"{layout.role}_decoder"[:63]
        self.decoder_role = sql.Identifier(self.decoder_role_name)
        self.changes_function_name = object_name("order_monitor", layout.table, "changes_v1")
        self.changes_function = sql.Identifier(layout.schema, self.changes_function_name)
        self.advance_function_name = object_name("order_monitor", layout.table, "advance_v1")
        self.advance_function = sql.Identifier(layout.schema, self.advance_function_name)
        self.slot_function_name = object_name("order_monitor", layout.table, "slot_v1")
        self.slot_function = sql.Identifier(layout.schema, self.slot_function_name)
        self.recreate_function_name = object_name("order_monitor", layout.table, "recreate_v1")
        self.recreate_function = sql.Identifier(layout.schema, self.recreate_function_name)

    @property
    def decoding_functions(self) -> tuple[tuple[sql.Identifier, str], ...]:
        """(function, argument types) of every function decoding.sql creates."""
        return (
            (self.changes_function, "integer"),
            (self.advance_function, "pg_catalog.pg_lsn"),
            (self.slot_function, ""),
            (self.recreate_function, ""),
        )

    @property
    def old_trigger_names(self) -> tuple[str, ...]:
        """Every earlier version's triggers: install drops them, uninstall too."""
        return (
            self.v1_insert_trigger_name,
            self.v1_update_trigger_name,
            self.v2_insert_trigger_name,
            self.v2_update_trigger_name,
        )


#: The argument types of the ``_write_v1`` function (versions 1 and 2), as DROP names them.
V1_WRITE_SIGNATURE: Final = sql.SQL("uuid[], text[], text[], text[], text[], text[], text[]")


def advisory_key(name: str) -> int:
    """A bigint advisory lock key for *name*: the first 64 bits of its MD5, signed.

    Stable across versions, hosts and processes, and computable in psql as
    ``('x' || left(md5(name), 16))::bit(64)::bigint``.
    """
    digest = hashlib.md5(name.encode(), usedforsecurity=False)
    return int.from_bytes(digest.digest()[:8], "big", signed=True)


def advisory_key_parts(key: int) -> tuple[int, int]:
    """(classid, objid): how pg_locks shows a bigint advisory key (high and low 32 bits)."""
    unsigned = key & 0xFFFF_FFFF_FFFF_FFFF
    return unsigned >> 32, unsigned & 0xFFFF_FFFF


def idle_lock_key(layout: Layout) -> int:
    """The advisory lock the daemon holds while it wants NOTIFYs (see handoff).

    Like the leader lock's key, the first 64 bits of an MD5, as a signed
    bigint, computable in psql::

        SELECT ('x' || left(md5('order_monitor:idle:public.product_orders'), 16))::bit(64)::bigint;
    """
    return advisory_key(f"order_monitor:idle:{layout.schema}.{layout.table}")


def in_flight_predicate(layout: Layout, row: str | None = None) -> sql.Composed:
    """The "order is in flight" rule, optionally on a row alias (NEW, OLD, o).

    The partial index is built on this exact expression and the sweep query
    repeats it, with the values as literals: the planner can only use a
    partial index when the query's predicate visibly implies the index's.
    ``pg_catalog.lower``, never ``lower``: where a role may CREATE in a schema
    on the caller's search_path (``public`` before PostgreSQL 15), its own
    ``lower(varchar)`` would be a better match than ``pg_catalog.lower(text)``
    and would run with the rights of whoever evaluates the rule.
    """
    c = layout.columns

    def ref(column: str) -> sql.Composable:
        if row is None:
            return sql.Identifier(column)
        # The row alias is one of our constants (NEW, OLD, o), never configuration.
        return sql.Composed([sql.SQL(row + "."), sql.Identifier(column)])

    external = sql.SQL(", ").join(sql.Literal(s) for s in layout.in_flight_external_statuses)
    final = sql.SQL(", ").join(sql.Literal(s) for s in layout.final_statuses)
    return sql.SQL(
        "{ref} IS NOT NULL AND pg_catalog.lower({external_status}) IN ({external}) "
        "AND pg_catalog.lower({status}) NOT IN ({final})"
    ).format(
        ref=ref(c.provider_ref),
        external_status=ref(c.external_status),
        external=external,
        status=ref(c.status),
        final=final,
    )


def dollar_quoted(body: str) -> sql.SQL:
    """*body* as a dollar-quoted string whose tag does not occur inside it.

    The body contains configured identifiers; a fixed ``$$`` could be closed
    by one of them.
    """
    tag = "$om$"
    n = 0
    while tag in body:
        n += 1
        tag = f"$om{n}$"
    return sql.SQL(tag + body + tag)  # the tag is ours, the body was composed


def pin_search_path_again() -> Statement:
    """The first statement of role.sql and decoding.sql (install.sql says why at length)."""
    return Statement(
        "Names resolve in pg_catalog first (see install.sql).",
        sql.SQL("SET search_path = pg_catalog, pg_temp"),
        replayable=False,
    )
