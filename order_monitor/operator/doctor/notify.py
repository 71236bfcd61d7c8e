"""LISTEN/NOTIFY round-trips on this connection, and the notification queue has room."""

from __future__ import annotations

import os
import secrets
import time
from typing import Final

import psycopg
from psycopg import sql

from order_monitor import db
from order_monitor.operator.doctor.database import fetch_one
from order_monitor.operator.findings import Emit, Verdict
from order_monitor.ops.housekeeping import QUEUE_WARN

#: How long the self-NOTIFY may take to come back.
NOTIFY_TIMEOUT: Final = 2.0


_POOLER_TEXT: Final = (
    "ORDER_MONITOR_DSN probably goes through PgBouncer (or another pooler) in transaction "
    "or statement mode, where LISTEN does not work and the leader lock is not held — "
    "connect to Postgres directly or through a session-mode pool"
)


async def check_listen_notify(conn: db.AsyncConn, emit: Emit, wait: float) -> None:
    channel = f"order_monitor_doctor_{os.getpid()}_{secrets.token_hex(4)}"
    token = secrets.token_hex(8)
    reported_pid = conn.info.backend_pid
    try:
        (pid_before,) = await fetch_one(conn, "SELECT pg_backend_pid()")
        await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
        started = time.monotonic()
        await conn.execute("SELECT pg_notify(%s, %s)", (channel, token))
        arrived = False
        async for notify in conn.notifies(timeout=wait, stop_after=1):
            arrived = notify.channel == channel and notify.payload == token
        elapsed_ms = (time.monotonic() - started) * 1000
        (pid_after,) = await fetch_one(conn, "SELECT pg_backend_pid()")
        await conn.execute(sql.SQL("UNLISTEN {}").format(sql.Identifier(channel)))
    except psycopg.Error as exc:
        text = " ".join(str(exc).split())
        hint = (
            "the server is a standby — point ORDER_MONITOR_DSN at the primary"
            if "recovery" in text
            else _POOLER_TEXT
        )
        emit(Verdict.FAIL, "listen/notify", f"LISTEN failed ({text}) — {hint}")
        return
    if pid_before != pid_after:
        emit(
            Verdict.FAIL,
            "listen/notify",
            "two statements on one connection ran in different server sessions "
            f"(backend pid {pid_before} then {pid_after}): {_POOLER_TEXT}",
        )
    elif not arrived:
        emit(
            Verdict.FAIL,
            "listen/notify",
            f"a NOTIFY sent on this connection did not come back within {wait:g} s: "
            + _POOLER_TEXT,
        )
    elif reported_pid != pid_before:
        emit(
            Verdict.WARN,
            "listen/notify",
            f"the round trip works, but a pooler sits in between (the server's backend pid "
            f"is {pid_before}, the connection was told {reported_pid}): make sure it pools "
            "by session, or connect to Postgres directly",
        )
    else:
        emit(Verdict.PASS, "listen/notify", f"a self-NOTIFY came back in {elapsed_ms:.0f} ms")


async def check_notification_queue(conn: db.AsyncConn, emit: Emit) -> None:
    (usage,) = await fetch_one(conn, "SELECT pg_notification_queue_usage()")
    percent = f"{float(usage) * 100:.1f} %"
    if usage >= QUEUE_WARN:
        emit(
            Verdict.WARN,
            "notification queue",
            f"{percent} full: some session LISTENs but does not read (often one idle in an "
            "open transaction; see pg_stat_activity). When it is full, every commit that "
            "NOTIFYs fails — including the application's dispatches through our trigger",
        )
    else:
        emit(Verdict.PASS, "notification queue", f"{percent} used")
