"""Doctor's checks of the capture mode: the logical decoding of ``sql/decoding.sql``, or none.

With ``ORDER_MONITOR_CAPTURE=decoding``: the server decodes its WAL
(``wal_level = logical``); decoding.sql's four functions exist and this role
may execute them; the slot exists and is not invalidated, and how much WAL it
holds back; ``max_slot_wal_keep_size`` bounds what a slot nobody reads may
keep; the publication is the one decoding.sql creates (our table, its id and
in-flight columns, inserts and updates only); and none of our triggers is
left on the table. With the trigger: a slot or publication of ours left
behind is reported, since that slot keeps WAL nobody reads.

Doctor usually runs as the daemon's role: nothing here needs REPLICATION or a
superuser. The slot is read through decoding.sql's ``_slot_v1()`` (SECURITY
INVOKER over ``pg_replication_slots``, which every role may read), or that
view directly when the function cannot be called; settings through
``current_setting``; the publication through ``pg_publication`` and
``pg_publication_tables``, which are readable by all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from psycopg import sql

from order_monitor import db, schema
from order_monitor.config import Layout, Settings
from order_monitor.db.checks import decoding_functions
from order_monitor.decoding.statements import DecodingStatements, SlotState
from order_monitor.operator.doctor.database import fetch_one
from order_monitor.operator.findings import Emit, Verdict
from order_monitor.operator.status import format_bytes
from order_monitor.schema.decoding import published_columns, slot_name_sql

DECODING_HINT: Final = (
    "run sql/decoding.sql as a superuser (`order-monitor sql print decoding`), after "
    "install.sql and role.sql"
)
#: What a slot nobody reads risks, said wherever it matters.
UNBOUNDED_RISK: Final = (
    "a slot nobody reads (the daemon stopped, or ORDER_MONITOR_CAPTURE set back to "
    "trigger) keeps every byte of WAL from then on, until the server's disk is full and "
    "it stops"
)
KEEP_SIZE_FIX: Final = (
    "ALTER SYSTEM SET max_slot_wal_keep_size = '10GB'; SELECT pg_reload_conf(); (a managed "
    "service: its parameter group) — a slot that falls further behind is then invalidated "
    "instead, and the daemon recreates it and sweeps"
)
#: The operations decoding.sql publishes.
PUBLISHED_OPERATIONS: Final = ("insert", "update")


async def check_decoding(conn: db.AsyncConn, settings: Settings, emit: Emit) -> None:
    layout = settings.layout
    if settings.capture == "decoding":
        await _wal_level(conn, emit)
        usable = await _functions(conn, layout, emit)
        await _slot(conn, layout, emit, usable)
        await _keep_size(conn, emit)
        await _publication(conn, layout, emit)
        await _triggers(conn, layout, emit)
    else:
        await _left_behind(conn, layout, emit)


# --- ORDER_MONITOR_CAPTURE=decoding ------------------------------------------------


async def _wal_level(conn: db.AsyncConn, emit: Emit) -> None:
    row = await fetch_one(conn, "SELECT pg_catalog.current_setting('wal_level')")
    level = str(row[0])
    if level == "logical":
        emit(Verdict.PASS, "wal_level", "logical: the server decodes its WAL")
    else:
        emit(
            Verdict.FAIL,
            "wal_level",
            f"is {level}, not logical: no slot can be read, and the daemon "
            "(ORDER_MONITOR_CAPTURE=decoding) sees no order but by its sweep — ALTER SYSTEM "
            "SET wal_level = logical (a managed service: its parameter group), restart the "
            f"server, then {DECODING_HINT}; or set ORDER_MONITOR_CAPTURE=trigger",
        )


async def _functions(conn: db.AsyncConn, layout: Layout, emit: Emit) -> bool:
    """decoding.sql's functions exist and this role may execute them; True when all may be."""
    missing, refused = await decoding_functions(conn, layout)
    if missing or refused:
        said = []
        if missing:
            said.append(f"missing: {', '.join(missing)}")
        if refused:
            said.append(f"this role may not execute: {', '.join(refused)}")
        emit(
            Verdict.FAIL,
            "decoding functions",
            f"{'; '.join(said)} — the daemon refuses to start in decoding mode: {DECODING_HINT} "
            "(it grants EXECUTE to ORDER_MONITOR_ROLE; run doctor as that role)",
        )
        return False
    emit(
        Verdict.PASS,
        "decoding functions",
        f"{len(schema.Names(layout).decoding_functions)} present, and this role may execute "
        "them (it needs no REPLICATION)",
    )
    return True


async def read_slot(conn: db.AsyncConn, layout: Layout, *, function: bool) -> SlotState | None:
    """The slot as decoding.sql's ``_slot_v1()`` reports it (or the view it reads)."""
    if function:
        return await DecodingStatements(layout).slot(conn)
    row = await fetch_one(
        conn,
        sql.SQL(
            "SELECT s.slot_name::text, s.wal_status,"
            " pg_catalog.pg_wal_lsn_diff(pg_catalog.pg_current_wal_lsn(),"
            "                            s.confirmed_flush_lsn)::bigint,"
            " s.safe_wal_size"
            " FROM pg_catalog.pg_replication_slots s WHERE s.slot_name = {slot}"
        ).format(slot=slot_name_sql(layout)),
    )
    return None if row is None else SlotState(str(row[0]), row[1], row[2], row[3])


async def _slot(conn: db.AsyncConn, layout: Layout, emit: Emit, function: bool) -> None:
    state = await read_slot(conn, layout, function=function)
    if state is None:
        name = await fetch_one(conn, sql.SQL("SELECT {}").format(slot_name_sql(layout)))
        emit(
            Verdict.FAIL,
            "slot",
            f"{name[0]} is missing: no order is read from the WAL — a running daemon "
            "recreates it at its next read and then sweeps (orders dispatched meanwhile are "
            f"checked late, found by that sweep); else {DECODING_HINT}",
        )
        return
    lag = "" if state.lag_bytes is None else f", {format_bytes(state.lag_bytes)} behind"
    room = (
        ""
        if state.safe_wal_size is None
        else f"; {format_bytes(state.safe_wal_size)} more before it is invalidated"
    )
    if state.wal_status == "lost":
        emit(
            Verdict.FAIL,
            "slot",
            f"{state.name} is lost: invalidated for falling behind by more than "
            "max_slot_wal_keep_size, so the changes it held are gone — a running daemon "
            "recreates it at its next read and then sweeps (the orders dispatched since it "
            "fell behind are checked late, found by that sweep); find why nothing read it "
            "(the daemon stopped, or was not the leader for long: "
            "`journalctl -u order-monitor | grep capture.`)",
        )
    elif state.wal_status in ("unreserved", "extended"):
        emit(
            Verdict.WARN,
            "slot",
            f"{state.name} is {state.wal_status}{lag}{room}: it holds back more WAL than "
            "max_wal_size"
            + (
                ", and is invalidated at the next checkpoint unless the daemon catches up"
                if state.wal_status == "unreserved"
                else ""
            )
            + " — is the daemon running and leading? (`order-monitor status`, "
            "order_monitor_decoding_slot_lag_bytes)",
        )
    else:
        emit(Verdict.PASS, "slot", f"{state.name} is {state.wal_status or 'in use'}{lag}{room}")


async def _keep_size(conn: db.AsyncConn, emit: Emit) -> None:
    row = await fetch_one(conn, "SELECT pg_catalog.current_setting('max_slot_wal_keep_size', true)")
    value = None if row is None else row[0]
    if value is None:
        emit(
            Verdict.WARN,
            "max_slot_wal_keep_size",
            "this server has no such setting (before PostgreSQL 13): nothing bounds the WAL "
            f"the slot keeps: {UNBOUNDED_RISK}",
        )
    elif str(value).strip() == "-1":
        emit(
            Verdict.FAIL,
            "max_slot_wal_keep_size",
            f"is -1 (unlimited): {UNBOUNDED_RISK} — set it: {KEEP_SIZE_FIX}",
        )
    else:
        emit(
            Verdict.PASS,
            "max_slot_wal_keep_size",
            f"{value}: a slot further behind is invalidated (the daemon recreates it and "
            "sweeps) instead of filling the disk",
        )


@dataclass(frozen=True, slots=True)
class _Publication:
    all_tables: bool
    operations: tuple[str, ...]
    #: (schema, table, published columns, row filter) of each table it publishes.
    tables: tuple[tuple[str, str, tuple[str, ...], str | None], ...]


async def _read_publication(conn: db.AsyncConn, name: str) -> _Publication | None:
    row = await fetch_one(
        conn,
        "SELECT p.puballtables, ARRAY["
        " CASE WHEN p.pubinsert THEN 'insert' END, CASE WHEN p.pubupdate THEN 'update' END,"
        " CASE WHEN p.pubdelete THEN 'delete' END, CASE WHEN p.pubtruncate THEN 'truncate' END]"
        " FROM pg_catalog.pg_publication p WHERE p.pubname = %s",
        (name,),
    )
    if row is None:
        return None
    # attnames and rowfilter: PostgreSQL 15, which column lists need anyway.
    cursor = await conn.execute(
        "SELECT t.schemaname::text, t.tablename::text, t.attnames::text[], t.rowfilter"
        " FROM pg_catalog.pg_publication_tables t WHERE t.pubname = %s ORDER BY 1, 2",
        (name,),
    )
    tables = tuple(
        (str(s), str(t), tuple(str(a) for a in attnames or ()), rowfilter)
        for s, t, attnames, rowfilter in await cursor.fetchall()
    )
    return _Publication(bool(row[0]), tuple(op for op in row[1] if op is not None), tables)


def publication_differences(layout: Layout, found: _Publication) -> list[str]:
    """How *found* differs from the publication decoding.sql creates (none: [])."""
    differences = []
    if found.all_tables:
        differences.append("it is FOR ALL TABLES")
    if found.operations != PUBLISHED_OPERATIONS:
        differences.append(
            f"it publishes {', '.join(found.operations) or 'nothing'} "
            f"(decoding.sql: {', '.join(PUBLISHED_OPERATIONS)})"
        )
    ours = [t for t in found.tables if (t[0], t[1]) == (layout.schema, layout.table)]
    others = [f"{s}.{t}" for s, t, _, _ in found.tables if (s, t) != (layout.schema, layout.table)]
    if not ours:
        differences.append(f"it does not publish {layout.schema}.{layout.table}")
    else:
        _, _, columns, rowfilter = ours[0]
        expected = published_columns(layout)
        if sorted(columns) != sorted(expected):
            differences.append(
                f"its columns are {', '.join(columns)} (decoding.sql: {', '.join(expected)})"
            )
        if rowfilter is not None:
            differences.append(f"it filters the rows (WHERE {rowfilter})")
    if others and not found.all_tables:
        differences.append(f"it also publishes {', '.join(others)}")
    return differences


async def _publication(conn: db.AsyncConn, layout: Layout, emit: Emit) -> None:
    names = schema.Names(layout)
    row = await fetch_one(conn, "SELECT pg_catalog.current_setting('server_version_num')::int")
    if int(row[0]) < 150000:
        emit(
            Verdict.FAIL,
            "publication",
            "decoding needs PostgreSQL 15 or newer (a publication's column list): set "
            "ORDER_MONITOR_CAPTURE=trigger",
        )
        return
    found = await _read_publication(conn, names.publication_name)
    if found is None:
        emit(
            Verdict.FAIL,
            "publication",
            f"{names.publication_name} is missing: the slot's reads find no order — "
            f"{DECODING_HINT}",
        )
        return
    differences = publication_differences(layout, found)
    if differences:
        emit(
            Verdict.FAIL,
            "publication",
            f"{names.publication_name} is not the one decoding.sql creates: "
            f"{'; '.join(differences)} — orders may be missed, or other data decoded for "
            f"nothing; as a superuser: DROP PUBLICATION {names.publication.as_string(conn)}; "
            "then run sql/decoding.sql again (it creates it when missing)",
        )
        return
    emit(
        Verdict.PASS,
        "publication",
        f"{names.publication_name}: {', '.join(PUBLISHED_OPERATIONS)} of "
        f"{layout.schema}.{layout.table} ({', '.join(published_columns(layout))})",
    )


async def _our_triggers(conn: db.AsyncConn, layout: Layout) -> list[str]:
    names = schema.Names(layout)
    cursor = await conn.execute(
        "SELECT t.tgname::text FROM pg_catalog.pg_trigger t"
        " WHERE t.tgrelid = pg_catalog.to_regclass(%s) AND t.tgname = ANY(%s)"
        " AND NOT t.tgisinternal ORDER BY 1",
        (
            names.table.as_string(conn),
            [names.insert_trigger_name, names.update_trigger_name, *names.old_trigger_names],
        ),
    )
    return [str(name) for (name,) in await cursor.fetchall()]


async def _triggers(conn: db.AsyncConn, layout: Layout, emit: Emit) -> None:
    left = await _our_triggers(conn, layout)
    if left:
        emit(
            Verdict.FAIL,
            "capture triggers",
            f"{', '.join(left)} still on the table in decoding mode: they cost the "
            "application's commits for nothing (the slot brings the orders) — run "
            "sql/decoding.sql again as a superuser (it drops them; install.sql puts them back)",
        )
    else:
        emit(
            Verdict.PASS,
            "capture triggers",
            "none of ours on the table: the application's commits do no work of ours",
        )


# --- ORDER_MONITOR_CAPTURE=trigger -------------------------------------------------


async def _left_behind(conn: db.AsyncConn, layout: Layout, emit: Emit) -> None:
    names = schema.Names(layout)
    row = await fetch_one(
        conn,
        "SELECT EXISTS (SELECT FROM pg_catalog.pg_publication WHERE pubname = %s)",
        (names.publication_name,),
    )
    publication = bool(row[0])
    slot = await read_slot(conn, layout, function=False)
    if slot is None and not publication:
        emit(Verdict.PASS, "capture", "trigger (install.sql's trigger); no slot of ours")
        return
    found = []
    if slot is not None:
        lag = "" if slot.lag_bytes is None else f", {format_bytes(slot.lag_bytes)} behind"
        found.append(f"slot {slot.name} ({slot.wal_status or 'in use'}{lag})")
    if publication:
        found.append(f"publication {names.publication_name}")
    emit(
        Verdict.WARN,
        "capture",
        f"ORDER_MONITOR_CAPTURE=trigger, but decoding.sql's {' and '.join(found)} "
        f"{'are' if len(found) > 1 else 'is'} still there"
        + (
            ": the slot keeps WAL while nobody reads it, until the server's disk is full "
            "(or until max_slot_wal_keep_size invalidates it)"
            if slot is not None
            else ""
        )
        + " — as a superuser, run uninstall's decoding part (the DO block of "
        '`order-monitor sql print uninstall` under "The logical decoding capture"), or '
        "set ORDER_MONITOR_CAPTURE=decoding",
    )
