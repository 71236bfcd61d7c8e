"""`doctor --json` and `check --json`: the same results as the text, for scripts.

Real Postgres and the fake provider over loopback, through the real CLI, as
in test_doctor.py, test_status.py and test_check.py (whose helpers these tests reuse).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from order_monitor.providers.fake import MSG_DONE, FakeProvider, Script
from tests.daemon_fixtures import App
from tests.operator.helpers import (
    environment,
    invoke,
    invoke_async,
    verdicts,
)

DOCTOR_KEYS = {"ok", "exit_status", "counts", "findings"}
CHECK_KEYS = {
    "checked",
    "order",
    "provider",
    "kind",
    "dispatched_s_ago",
    "asked_in_s",
    "answer",
    "decision",
    "dry_run",
    "written",
    "notes",
    "exit_status",
}


def parsed(stdout: str) -> dict[str, Any]:
    """The whole of stdout is one JSON object (nothing else mixed in)."""
    value = json.loads(stdout)
    assert isinstance(value, dict)
    return value


async def test_doctor_json_has_the_text_reports_findings(check_env: dict[str, str]) -> None:
    text = await invoke_async(["doctor"], check_env)
    result = await invoke_async(["doctor", "--json"], check_env)

    report = parsed(result.stdout)
    assert set(report) == DOCTOR_KEYS
    assert result.exit_code == report["exit_status"] == text.exit_code == 0
    assert report["ok"] is True
    found = {f["check"]: f["verdict"] for f in report["findings"]}
    assert found == verdicts(text)
    assert all(set(f) == {"check", "verdict", "detail"} for f in report["findings"])
    assert set(report["counts"]) == {"pass", "warn", "fail"}
    assert sum(report["counts"].values()) == len(report["findings"])
    assert report["counts"]["fail"] == 0


def test_doctor_json_on_a_database_without_the_install(bare_db: str, env_file: Path) -> None:
    result = invoke(["doctor", "--json"], environment(bare_db, env_file))

    report = parsed(result.stdout)
    assert result.exit_code == report["exit_status"] == 1
    assert report["ok"] is False
    assert report["counts"]["fail"] >= 1
    failed = [f for f in report["findings"] if f["verdict"] == "FAIL"]
    assert all(f["detail"] for f in failed)


def test_doctor_json_for_a_config_error_exits_78(db: str, env_file: Path) -> None:
    result = invoke(["doctor", "--json"], environment(db, env_file, BATCH_SIZE="lots"))

    assert result.exit_code == 78
    assert parsed(result.stdout) == {
        "ok": False,
        "exit_status": 78,
        "counts": {"pass": 0, "warn": 0, "fail": 1},
        "findings": [
            {
                "check": "settings",
                "verdict": "FAIL",
                "detail": "ORDER_MONITOR_BATCH_SIZE='lots' is invalid: expected a whole number >= 1",
            }
        ],
    }


async def test_check_json_writes_done_and_says_so(
    app: App, fake: FakeProvider, check_env: dict[str, str]
) -> None:
    fake.set_script("J1", Script.done("PIN-9"))
    (order,) = await app.dispatch(["J1"], sent_ago=90)

    result = await invoke_async(["check", str(order), "--json"], check_env)

    assert result.exit_code == 0, result.output
    out = parsed(result.stdout)
    assert set(out) == CHECK_KEYS
    assert out["checked"] is True
    assert out["order"] == {
        "id": str(order),
        "status": "pending",
        "external_status": "sent",
        "provider_reference": "J1",
        "provider_id": "fake",
        "in_flight": True,
    }
    assert (out["provider"], out["kind"]) == ("fake", "barakat")
    assert out["dispatched_s_ago"] >= 90
    assert out["answer"] == {
        "raw_status": "accept",
        "outcome": "done",
        "pin": "PIN-9",
        "message": MSG_DONE,
        "error": None,
    }
    assert out["decision"]["kind"] == "done"
    assert out["decision"]["writes"] is True
    assert out["decision"]["finished"] is True
    assert out["decision"]["external_status"] == "done"
    assert (out["dry_run"], out["written"], out["exit_status"]) == (False, True, 0)
    rows = await app.rows()
    assert rows["J1"]["externalStatus"] == "done"


async def test_check_json_dry_run_writes_nothing(
    app: App, fake: FakeProvider, check_env: dict[str, str]
) -> None:
    fake.set_script("J2", Script.pending())
    (order,) = await app.dispatch(["J2"], sent_ago=90)

    result = await invoke_async(["check", str(order), "--json", "--dry-run"], check_env)

    out = parsed(result.stdout)
    assert out["answer"]["outcome"] == "pending"
    assert out["decision"]["kind"] == "pending"
    assert out["decision"]["finished"] is False
    assert isinstance(out["decision"]["next_check_in_s"], float)
    assert (out["dry_run"], out["written"]) == (True, None)
    assert (await app.rows())["J2"]["lastSyncAt"] is None


async def test_check_json_of_an_order_not_in_flight(
    app: App, fake: FakeProvider, check_env: dict[str, str]
) -> None:
    (order,) = await app.dispatch(["J3"])
    await app.conn.execute(
        """UPDATE product_orders SET "externalStatus" = 'done' WHERE id = %s""", (order,)
    )

    result = await invoke_async(["check", str(order), "--json"], check_env)

    assert result.exit_code == 1
    out = parsed(result.stdout)
    assert set(out) == {"checked", "order_id", "error", "exit_status"}
    assert (out["checked"], out["order_id"], out["exit_status"]) == (False, str(order), 1)
    assert "is not in flight, so no provider was asked" in out["error"]
    assert fake.requests_total == 0
