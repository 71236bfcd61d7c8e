"""Orders in flight whose dispatch time cannot be used, named by id (a WARN, never a FAIL).

The daemon copes with them (db.dispatch, engine.anchors: scheduled from when
it first saw them), but a wrong "sentAt" usually means the application wrote
it wrong (local time stored as UTC, a sentinel 'infinity'), which a human
should fix at the source. Read with the same never-failing expressions as the
daemon, so a row like that can no longer fail the doctor itself.
"""

from __future__ import annotations

from order_monitor import db
from order_monitor.config import Settings
from order_monitor.operator.findings import Emit, Verdict
from order_monitor.operator.status import read_odd


async def check_dispatch_times(conn: db.AsyncConn, settings: Settings, emit: Emit) -> None:
    count, listed = await read_odd(conn, settings)
    c = settings.layout.columns
    if not count:
        emit(
            Verdict.PASS,
            "dispatch times",
            f"every order in flight has a usable {c.sent_at} (or {c.created_at})",
        )
        return
    names = "; ".join(f"{order.id} ({order.why})" for order in listed)
    more = f"; and {count - len(listed)} more" if count > len(listed) else ""
    emit(
        Verdict.WARN,
        "dispatch times",
        f"{count} order{'' if count == 1 else 's'} in flight with a {c.sent_at} the schedule "
        f"cannot use: {names}{more} — the daemon schedules them from when it first sees them; "
        f"fix {c.sent_at} where the application writes it (is local time stored as UTC?)",
    )
