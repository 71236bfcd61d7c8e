"""The one-line error of a failed start reaches journald at priority err.

Under systemd the daemon's stderr is a journal stream (JOURNAL_STREAM set);
journald reads a leading ``<N>`` as the line's priority. The configuration
error is printed before logging is configured, so it needs the prefix itself.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from order_monitor.cli import cli, error_line


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str | None]:
    empty = tmp_path / "empty.env"
    empty.write_text("")
    return {
        "ORDER_MONITOR_ENV_FILE": str(empty),
        "ORDER_MONITOR_DSN": "postgresql://127.0.0.1:1/none",
        "ORDER_MONITOR_BATCH_SIZE": "banana",
    }


def test_a_config_error_under_journald_is_prefixed_err(env: dict[str, str | None]) -> None:
    result = CliRunner().invoke(cli, ["run"], env={**env, "JOURNAL_STREAM": "8:12345"})
    assert result.exit_code == 78
    assert result.stderr.startswith("<3>order-monitor: ")
    assert "ORDER_MONITOR_BATCH_SIZE" in result.stderr
    assert result.stderr.count("\n") == 1


def test_on_a_terminal_the_line_has_no_prefix(env: dict[str, str | None]) -> None:
    result = CliRunner().invoke(cli, ["run"], env={**env, "JOURNAL_STREAM": None})
    assert result.exit_code == 78
    assert result.stderr.startswith("order-monitor: ORDER_MONITOR_BATCH_SIZE")


def test_error_line_follows_journal_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JOURNAL_STREAM", "8:1")
    assert error_line("order-monitor: x") == "<3>order-monitor: x"
    monkeypatch.delenv("JOURNAL_STREAM")
    assert error_line("order-monitor: x") == "order-monitor: x"
