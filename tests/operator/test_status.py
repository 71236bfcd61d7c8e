"""``order-monitor status`` end to end: the counts are the rows', the leader lock's holder is named."""

from __future__ import annotations

import datetime as dt
import json
import uuid
from pathlib import Path

import psycopg
from psycopg.conninfo import make_conninfo

from order_monitor import __version__
from order_monitor.ops.leader import lock_key
from tests.conftest import as_daemon
from tests.db.test_dispatch_times import grant_nullable
from tests.operator.helpers import environment, invoke, providers_file


def seed_orders(dsn: str) -> dict[str, uuid.UUID]:
    """Orders in every state status reports on, by a name saying what each is."""
    rows = {
        # name: (providerId, externalStatus, referans, sent ago, lastSyncAt ago, completedAt ago)
        "fake-old": ("fake", "sent", "R1", "2 hours", None, None),
        "fake-new": ("fake", "processing", "R2", "5 minutes", "1 minute", None),
        "fake-upper": ("fake", "PENDING", "R3", "10 minutes", None, None),
        "ghost": ("ghost", "sent", "G1", "1 hour", None, None),
        "not-sent": ("fake", "not_sent", None, None, None, None),
        "gave-up": ("fake", "manual_required", "M1", "25 hours", "3 hours", None),
        "gave-up-long-ago": ("fake", "manual_required", "M2", "50 hours", "26 hours", None),
        "done-1": ("fake", "done", "D1", "30 minutes", "10 minutes", "10 minutes"),
        "done-2": ("fake", "done", "D2", "40 minutes", "20 minutes", "20 minutes"),
        "done-long-ago": ("fake", "done", "D3", "3 hours", "2 hours", "2 hours"),
        "failed": ("fake", "failed", "F1", "20 minutes", "5 minutes", "5 minutes"),
    }
    ids = {}
    with psycopg.connect(dsn, autocommit=True) as conn:
        for name, (pid, ext, ref, sent, synced, completed) in rows.items():
            row = conn.execute(
                """INSERT INTO product_orders
                       ("providerId", "externalStatus", provider_referans, "sentAt",
                        "lastSyncAt", "completedAt", "lastMessage")
                   VALUES (%s, %s, %s, now() - %s::interval, now() - %s::interval,
                           now() - %s::interval, %s)
                   RETURNING id""",
                (pid, ext, ref, sent, synced, completed, f"note {name}"),
            ).fetchone()
            assert row is not None
            ids[name] = row[0]
    return ids


def test_status_counts_match_the_rows(db: str, env_file: Path, tmp_path: Path) -> None:
    ids = seed_orders(db)
    env = environment(as_daemon(db), env_file, providers_file(tmp_path, "http://127.0.0.1:9"))

    result = invoke(["status", "--json"], env)

    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    in_flight = report["in_flight"]
    assert in_flight["total"] == 4
    by_provider = {line["provider_id"]: line for line in in_flight["by_provider"]}
    assert {k: v["count"] for k, v in by_provider.items()} == {"fake": 3, "ghost": 1}
    assert by_provider["fake"]["served_by"] == "fake"
    assert by_provider["ghost"]["served_by"] is None
    assert 7200 <= by_provider["fake"]["oldest_age_s"] < 7200 + 60
    assert 3600 <= by_provider["ghost"]["oldest_age_s"] < 3600 + 60
    assert in_flight["oldest"]["id"] == str(ids["fake-old"])
    assert in_flight["oldest"]["reference"] == "R1"
    gave_up = report["gave_up_24h"]
    assert gave_up["count"] == 1
    assert [o["id"] for o in gave_up["recent"]] == [str(ids["gave-up"])]
    assert gave_up["recent"][0]["last_message"] == "note gave-up"
    assert 3 * 3600 <= gave_up["recent"][0]["age_s"] < 3 * 3600 + 60
    assert report["finished_1h"] == {"done": 2, "failed": 1}
    assert report["leader"] is None
    assert report["table"] == "public.product_orders"

    text = invoke(["status"], env)
    assert text.exit_code == 0, text.output
    assert "In flight: 4 orders" in text.stdout
    assert "NOT CONFIGURED" in next(ln for ln in text.stdout.splitlines() if "ghost" in ln)
    assert f"oldest: {ids['fake-old']}" in text.stdout
    assert "Gave up in the last 24 h: 1 (externalStatus = 'manual_required'" in text.stdout
    assert f"{ids['gave-up']}  providerId fake  reference M1  3h ago — note gave-up" in text.stdout
    assert "Finished in the last hour: 2 done ('done'), 1 failed ('failed')" in text.stdout
    assert "no session holds the leader lock" in text.stdout


def test_status_names_the_session_holding_the_leader_lock(db: str, env_file: Path) -> None:
    with psycopg.connect(
        make_conninfo(db, application_name="order-monitor test (leader lock)"), autocommit=True
    ) as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", (lock_key("public", "product_orders"),))
        pid = holder.info.backend_pid

        result = invoke(["status", "--json"], environment(as_daemon(db), env_file))

    assert result.exit_code == 0, result.output
    leader = json.loads(result.stdout)["leader"]
    assert leader["pid"] == pid
    assert leader["application_name"] == "order-monitor test (leader lock)"
    assert json.loads(result.stdout)["in_flight"] == {"total": 0, "by_provider": [], "oldest": None}


def test_status_names_a_lock_holder_that_is_not_an_order_monitor_session(
    db: str, env_file: Path
) -> None:
    # Any role that can connect may take the leader lock (or the idle lock)
    # and keep every instance standing by; status says who.
    with psycopg.connect(make_conninfo(db, application_name="psql"), autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", (lock_key("public", "product_orders"),))
        pid = holder.info.backend_pid
        text = invoke(["status"], environment(as_daemon(db), env_file))
        as_json = invoke(["status", "--json"], environment(as_daemon(db), env_file))

    assert text.exit_code == 0, text.output
    assert f"Lock: the leader lock is held by pid {pid} (psql, user " in text.stdout
    assert "not an order-monitor session" in text.stdout
    report = json.loads(as_json.stdout)
    assert report["replica"] is False
    assert [(h["lock"], h["pid"], h["application_name"]) for h in report["lock_holders"]] == [
        ("leader", pid, "psql")
    ]


def test_status_keeps_quiet_about_lock_holders_that_are_order_monitor_sessions(
    db: str, env_file: Path
) -> None:
    with psycopg.connect(
        make_conninfo(db, application_name=f"order-monitor {__version__} (leader lock)"),
        autocommit=True,
    ) as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", (lock_key("public", "product_orders"),))
        result = invoke(["status", "--json"], environment(as_daemon(db), env_file))
    assert json.loads(result.stdout)["lock_holders"] == []


def test_status_names_orders_whose_dispatch_time_is_unusable(
    db: str, env_file: Path, tmp_path: Path
) -> None:
    """Infinite, future and missing dispatch times, an infinite last sync on a given-up
    order, and table text that is long or carries terminal escapes: before db.dispatch
    the first of them ended `status` in a traceback (cannot subtract infinite timestamps)."""
    grant_nullable(db)
    weird = "ref\x1b[31m-" + "x" * 240
    rows = {
        # name: (externalStatus, referans, "sentAt", "approvedAt", "lastSyncAt", "lastMessage")
        "good": ("sent", "G1", "-1 hour", None, None, None),
        "inf": ("sent", "INF", "infinity", None, None, None),
        "minus": ("sent", "MINUS", "-infinity", None, None, None),
        "ahead": ("sent", "AHEAD", "+3 hours", None, None, None),
        "none": ("sent", weird, None, None, None, None),
        "later": ("processing", "L1", "-10 minutes", None, None, None),
        "gave-up-inf": ("manual_required", "M1", "-2 hours", None, "infinity", "\x07" * 250),
    }
    ids: dict[str, uuid.UUID] = {}
    with psycopg.connect(db, autocommit=True) as conn:
        for name, (ext, ref, sent, created, synced, message) in rows.items():
            row = conn.execute(
                """INSERT INTO product_orders
                       ("providerId", "externalStatus", provider_referans, "sentAt", "approvedAt",
                        "lastSyncAt", "lastMessage")
                   VALUES ('fake', %s, %s, %s, %s, %s, %s) RETURNING id""",
                (ext, ref, _moment(sent), _moment(created), _moment(synced), message),
            ).fetchone()
            assert row is not None
            ids[name] = row[0]
    env = environment(
        as_daemon(db),
        env_file,
        providers_file(tmp_path, "http://127.0.0.1:9"),
        COLUMN_CREATED_AT="approvedAt",
    )

    text = invoke(["status"], env)
    report = invoke(["status", "--json"], env)

    assert text.exit_code == 0, text.output
    assert report.exit_code == 0, report.output
    out = text.stdout
    assert "In flight: 6 orders" in out
    assert "Dispatch time unusable: 4 in flight" in out
    listed = ["inf", "minus", "ahead", "none", "gave-up-inf"]
    by_id = {name: next(ln for ln in out.splitlines() if str(ids[name]) in ln) for name in listed}
    assert by_id["inf"].endswith("sentAt is infinity")
    assert by_id["minus"].endswith("sentAt is -infinity")
    assert "s ahead of the database's clock" in by_id["ahead"]
    assert by_id["none"].endswith("sentAt and approvedAt are both NULL")
    # The oldest with a usable time: neither -infinity nor anything computed from it.
    assert f"oldest: {ids['good']}" in out
    assert "at an unusable time" in by_id["gave-up-inf"]
    assert "\x1b" not in out
    assert "\x07" not in out
    assert by_id["none"].count("x") < 200  # cut, not the whole 240

    unusable = json.loads(report.stdout)["dispatch_time_unusable"]
    assert unusable["count"] == 4
    assert {o["id"]: o["reason"] for o in unusable["orders"]} == {
        str(ids["inf"]): "infinite",
        str(ids["minus"]): "infinite",
        str(ids["ahead"]): "future",
        str(ids["none"]): "missing",
    }
    (gave_up,) = json.loads(report.stdout)["gave_up_24h"]["recent"]
    assert gave_up["age_s"] is None


def _moment(relative: str | None) -> str | None:
    """'-1 hour' as a timestamp text relative to now; 'infinity' and None as they are."""
    if relative is None or relative.endswith("infinity"):
        return relative
    amount, unit = relative.split()
    delta = dt.timedelta(**{unit.rstrip("s") + "s": int(amount)})
    return (dt.datetime.now(dt.UTC) + delta).isoformat()
