"""`order-monitor deliveries`: the outbox listed, dead letters requeued and dropped.

Run as the daemon's least-privilege role (the command uses its settings), on
entries put in the outbox as the write function would have (the superuser
stands in for it; what the role may do is part of what is tested).
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from order_monitor import schema
from order_monitor.config import Layout
from tests.conftest import as_daemon
from tests.operator.helpers import environment, invoke

OUTBOX = schema.Names(Layout()).outbox
#: What a hostile application may answer: an escape sequence and a bidi override.
HOSTILE = "refused \x1b[31mRED\x1b[0m \u202eevil"


def record(
    db: str,
    *,
    outcome: str = "failed",
    dead: bool = False,
    error: str | None = None,
    verdict: str | None = None,
    tries: int = 0,
) -> tuple[uuid.UUID, uuid.UUID]:
    """One outbox entry (delivery id, order id), recorded an hour ago."""
    order = uuid.uuid4()
    with psycopg.connect(db, autocommit=True) as conn:
        row = conn.execute(
            sql.SQL(
                "INSERT INTO {} (order_id, outcome, provider_message, columns, recorded_at,"
                " due_at, tries, rejections, last_verdict, last_error, dead_at)"
                " VALUES (%s, %s, 'out of stock', %s, now() - interval '1 hour',"
                " now() + interval '10 minutes', %s, %s, %s, %s,"
                " CASE WHEN %s THEN now() END) RETURNING delivery_id"
            ).format(OUTBOX),
            (
                order,
                outcome,
                Jsonb({"tenantId": "t-1"}),
                tries,
                tries if dead else 0,
                verdict,
                error,
                dead,
            ),
        ).fetchone()
    assert row is not None
    return row[0], order


def rows(db: str) -> dict[uuid.UUID, dict[str, Any]]:
    with psycopg.connect(db) as conn:
        cursor = conn.execute(
            sql.SQL(
                "SELECT delivery_id, dead_at IS NOT NULL AS dead, tries, rejections,"
                " due_at <= now() AS due, requeued_at IS NOT NULL AS requeued FROM {}"
            ).format(OUTBOX)
        )
        names = [c.name for c in cursor.description or ()]
        return {r[0]: dict(zip(names, r, strict=True)) for r in cursor.fetchall()}


def test_an_empty_outbox_says_so(db: str, env_file: Path) -> None:
    result = invoke(["deliveries"], environment(as_daemon(db), env_file))
    assert result.exit_code == 0, result.output
    assert "Undelivered: 0" in result.stdout
    assert "Dead letters: 0" in result.stdout
    assert "Nothing to deliver." in result.stdout


def test_the_listing_counts_everything_and_shows_answers_as_text(db: str, env_file: Path) -> None:
    waiting, _ = record(db, outcome="done")
    auth, _ = record(db, verdict="auth", error="HTTP 401: refused")
    dead, dead_order = record(db, dead=True, verdict="rejected", error=HOSTILE, tries=5)
    env = environment(as_daemon(db), env_file)

    text = invoke(["deliveries"], env)
    assert text.exit_code == 0, text.output
    assert "Undelivered: 2 (done 1, failed 1)" in text.stdout
    assert "1 of them wait: the application refused our credentials" in text.stdout
    assert "Dead letters: 1" in text.stdout
    for delivery in (waiting, auth, dead):
        assert str(delivery) in text.stdout
    # Never a raw escape or bidi control from the application on the terminal.
    assert "\x1b" not in text.stdout
    assert "\u202e" not in text.stdout
    assert "RED" in text.stdout

    listed = json.loads(invoke(["deliveries", "--dead", "--json"], env).stdout)
    assert listed["summary"] == {
        "undelivered": 2,
        "oldest_undelivered_age_s": listed["summary"]["oldest_undelivered_age_s"],
        "dead": 1,
        "auth_waiting": 1,
        "by_outcome": {"done": 1, "failed": 1},
    }
    assert 3590 < listed["summary"]["oldest_undelivered_age_s"] < 3700
    assert [e["delivery_id"] for e in listed["entries"]] == [str(dead)]
    (entry,) = listed["entries"]
    assert entry["order_id"] == str(dead_order)
    assert entry["state"] == "dead"
    assert entry["last_error"] == HOSTILE  # --json has it whole, JSON-escaped
    assert entry["columns"] == {"tenantId": "t-1"}


def test_requeue_sends_a_dead_letter_again_by_its_order_id(db: str, env_file: Path) -> None:
    dead, order = record(db, dead=True, verdict="rejected", error="TENANT_MISMATCH", tries=5)
    other, _ = record(db, dead=True, verdict="rejected", error="TENANT_MISMATCH", tries=5)
    result = invoke(["deliveries", "requeue", str(order)], environment(as_daemon(db), env_file))
    assert result.exit_code == 0, result.output
    assert f"requeued {dead}" in result.stdout
    after = rows(db)
    assert after[dead] == {
        "delivery_id": dead,
        "dead": False,
        "tries": 0,
        "rejections": 0,
        "due": True,
        "requeued": True,
    }
    assert after[other]["dead"] is True  # only what was named


def test_requeue_leaves_entries_the_leader_retries_and_says_which_ids_it_did_not_find(
    db: str, env_file: Path
) -> None:
    waiting, _ = record(db)
    unknown = uuid.uuid4()
    result = invoke(
        ["deliveries", "requeue", str(waiting), str(unknown), "--json"],
        environment(as_daemon(db), env_file),
    )
    assert result.exit_code == 1
    answer = json.loads(result.stdout)
    assert answer["count"] == 0
    assert [e["delivery_id"] for e in answer["not_dead"]] == [str(waiting)]
    assert answer["unknown"] == [str(unknown)]
    assert rows(db)[waiting]["requeued"] is False


def test_requeue_all_dead_and_drop(db: str, env_file: Path) -> None:
    first, _ = record(db, dead=True, tries=5)
    second, _ = record(db, dead=True, tries=5)
    waiting, _ = record(db)
    env = environment(as_daemon(db), env_file)

    dropped = invoke(["deliveries", "drop", str(first), str(waiting)], env)
    assert dropped.exit_code == 1  # the waiting one is not a dead letter
    assert f"dropped {first}" in dropped.stdout
    assert "the application was not told" in dropped.stdout
    assert set(rows(db)) == {second, waiting}

    requeued = invoke(["deliveries", "requeue", "--all-dead"], env)
    assert requeued.exit_code == 0, requeued.output
    assert "requeued 1 dead letter" in requeued.stdout
    assert not any(r["dead"] for r in rows(db).values())


def test_an_id_that_is_no_uuid_is_a_usage_error(db: str, env_file: Path) -> None:
    result = invoke(["deliveries", "drop", "order-42"], environment(as_daemon(db), env_file))
    assert result.exit_code == 2
    assert "'order-42' is not a delivery id or an order id" in result.output


def test_status_shows_the_outbox_when_it_holds_entries(db: str, env_file: Path) -> None:
    record(db, dead=True, tries=5)
    env = environment(as_daemon(db), env_file)
    report = json.loads(invoke(["status", "--json"], env).stdout)
    assert report["deliveries"]["undelivered"] == 0
    assert report["deliveries"]["dead"] == 1
    assert report["deliveries"]["actions"] == {}
    text = invoke(["status"], env).stdout
    assert "Dead letters: 1" in text
