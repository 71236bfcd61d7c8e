"""`order-monitor demo` end to end: its own embedded Postgres, the fake provider, the real daemon.

Each run starts and deletes a server of its own (about two seconds), so the
runs here are small: 40 orders, dispatched fast.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import structlog
from click.testing import CliRunner

from order_monitor.cli import cli
from order_monitor.demo import run_demo

SUMMARY_ROW = re.compile(r"^\s+(dispatched|done|failed|gave up|pending)\s+(\d+)\b", re.MULTILINE)
DELIVERY_ROW = re.compile(
    r"^\s+(approved|rejected|refunded|stray refunds|undelivered|dead letters)\s+(\d+)\b",
    re.MULTILINE,
)
REFUND_TOTAL = re.compile(
    r"^\s+refunded\s+\d+\s+into the customers' balances, (\d+\.\d\d) in all", re.MULTILINE
)
CLEANED = re.compile(r"Cleaned up: database stopped and (\S+) deleted\.")


def summary_counts(text: str) -> dict[str, int]:
    summary = text[text.index("\nSummary (") :]
    return {name: int(count) for name, count in SUMMARY_ROW.findall(summary)}


def delivery_counts(text: str) -> dict[str, int]:
    summary = text[text.index("\nIn the application (") :]
    return {name: int(count) for name, count in DELIVERY_ROW.findall(summary)}


def test_the_demo_command_exists() -> None:
    result = CliRunner().invoke(cli, ["demo", "--help"])
    assert result.exit_code == 0, result.output
    for option in ("--orders", "--rate", "--keep", "--seed"):
        assert option in result.output


def test_a_small_demo_ends_every_order_and_cleans_up(capsys: pytest.CaptureFixture[str]) -> None:
    logging_before = structlog.get_config()

    status = run_demo(orders=40, rate=200.0, keep=False, seed=1)

    out = capsys.readouterr().out
    assert status == 0, out
    assert "Summary (every order ended" in out
    counts = summary_counts(out)
    assert counts["dispatched"] == 40
    assert counts["pending"] == 0
    assert counts["done"] + counts["failed"] + counts["gave up"] == 40
    # The fake's mixture with seed 1 has all three endings among 40 orders;
    # if it did not, the demo would not show what it is for.
    assert min(counts["done"], counts["failed"], counts["gave up"]) > 0, counts
    # The application finished every ended order through the daemon's actions:
    # each done one approved, each failed one rejected and refunded exactly
    # once (the wallet's key allows no second refund; none of another order),
    # and nothing left undelivered or given up.
    delivered = delivery_counts(out)
    assert delivered == {
        "approved": counts["done"],
        "rejected": counts["failed"],
        "refunded": counts["failed"],
        "stray refunds": 0,
        "undelivered": 0,
        "dead letters": 0,
    }, out
    total = REFUND_TOTAL.search(out)
    assert total is not None, out
    assert float(total.group(1)) > 0, out
    assert "adds up: done" in out
    # The application's API answered 503 at first: the relay retried, and
    # still nothing was lost or delivered twice (the counts above).
    assert "delivery.failed" in out
    # Not a TTY here: the live view wrote plain progress lines.
    assert re.search(r"^\[\s*\d+\.\d+s\] dispatched \d+/40 ", out, re.MULTILINE)
    assert re.search(
        r"^The operator page, while the demo runs: http://127\.0\.0\.1:\d+/$", out, re.M
    )
    assert "\x1b[" not in out
    assert "SELECT provider_referans" in out
    # The embedded server's directory is gone, and our logging set-up is back.
    cleaned = CLEANED.search(out)
    assert cleaned is not None, out
    assert not Path(cleaned.group(1)).exists()
    assert structlog.get_config() == logging_before


def test_ctrl_c_stops_the_demo_and_cleans_up() -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "order_monitor", "demo", "--orders", "2000", "--rate", "100"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert process.stdout is not None
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 25
        # Interrupt once orders are being followed (a progress line shows some done).
        for line in process.stdout:
            lines.append(line)
            if re.search(r" done [1-9]", line) or time.monotonic() > deadline:
                break
        process.send_signal(signal.SIGINT)
        rest, _ = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    out = "".join(lines) + rest
    assert process.returncode == 130, out
    assert "Summary (interrupted" in out
    assert "Traceback" not in out
    # An interrupted run keeps the daemon's log for reading, and says where.
    kept_log = re.search(r"daemon log\s+(\S+\.log)", out)
    assert kept_log is not None, out
    Path(kept_log.group(1)).unlink()
    cleaned = CLEANED.search(out)
    assert cleaned is not None, out
    data = Path(cleaned.group(1))
    assert not data.exists()
    # No postgres of that cluster outlives the demo.
    if shutil.which("pgrep"):
        survivors = subprocess.run(
            ["pgrep", "-f", str(data)], capture_output=True, text=True, check=False
        ).stdout
        assert survivors.strip() == ""
