"""``order-monitor status`` shows the capture mode, and in decoding mode the slot.

On a wal_level = logical server, deployed as tests/decoding/test_capture.py
deploys it; status runs as the daemon's least-privilege role.
"""

from __future__ import annotations

import json
from pathlib import Path

from order_monitor.decoding.statements import SlotState
from order_monitor.operator.status import CaptureInfo, _capture_text
from tests.conftest import as_daemon
from tests.decoding.conftest import logical_dsn, logical_server
from tests.decoding.test_capture import db, slot_state
from tests.operator.helpers import environment, execute, invoke


def test_status_shows_the_slot_in_decoding_mode(db: str, env_file: Path) -> None:
    env = environment(as_daemon(db), env_file, CAPTURE="decoding")
    state = slot_state(db)
    assert state is not None

    report = json.loads(invoke(["status", "--json"], env).stdout)

    capture = report["capture"]
    assert capture["mode"] == "decoding"
    assert capture["problem"] is None
    assert capture["slot"]["name"] == state[0]
    assert capture["slot"]["wal_status"] == "reserved"
    assert isinstance(capture["slot"]["lag_bytes"], int)
    assert capture["slot"]["lag_bytes"] >= 0
    # No max_slot_wal_keep_size on this server: nothing bounds it.
    assert capture["slot"]["safe_wal_size_bytes"] is None

    text = invoke(["status"], env)
    assert text.exit_code == 0, text.output
    line = next(x for x in text.stdout.splitlines() if x.startswith("Capture: "))
    assert line.startswith(f"Capture: logical decoding, slot {state[0]} reserved, ")
    assert line.endswith(" behind")


def test_status_says_when_the_slot_is_missing(db: str, env_file: Path) -> None:
    state = slot_state(db)
    assert state is not None
    execute(db, "SELECT pg_drop_replication_slot(%s)", (state[0],))
    env = environment(as_daemon(db), env_file, CAPTURE="decoding")

    report = json.loads(invoke(["status", "--json"], env).stdout)

    assert report["capture"]["slot"] is None
    assert report["capture"]["problem"].startswith("the slot is missing: the daemon recreates it")
    assert "Capture: logical decoding — the slot is missing" in invoke(["status"], env).stdout


def test_status_in_trigger_mode_shows_no_slot(db: str, env_file: Path) -> None:
    env = environment(as_daemon(db), env_file)

    report = json.loads(invoke(["status", "--json"], env).stdout)

    assert report["capture"] == {"mode": "trigger", "slot": None, "problem": None}
    assert "Capture: trigger (ORDER_MONITOR_CAPTURE)\n" in invoke(["status"], env).stdout


def test_the_text_of_a_lost_and_a_lagging_slot() -> None:
    lost = CaptureInfo("decoding", SlotState("order_monitor_x", "lost", None, None))
    assert _capture_text(lost).startswith(
        "Capture: logical decoding, slot order_monitor_x is LOST (invalidated for falling "
        "behind): the daemon recreates it and sweeps"
    )
    lagging = CaptureInfo("decoding", SlotState("order_monitor_x", "unreserved", 3 << 30, 0))
    assert _capture_text(lagging) == (
        "Capture: logical decoding, slot order_monitor_x unreserved, 3.0 GB behind (0 bytes "
        "more before it is invalidated): it holds back more WAL than max_wal_size — is the "
        "daemon reading it?"
    )


__all__ = ["db", "logical_dsn", "logical_server"]
