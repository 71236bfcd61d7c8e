"""``order-monitor status`` end to end: the counts are the rows', the leader lock's holder is named."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import psycopg
from psycopg.conninfo import make_conninfo

from order_monitor.ops.leader import lock_key
from tests.conftest import as_daemon
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
