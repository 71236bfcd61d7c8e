"""load_settings as a whole: the defaults, the command line's handling of its errors, the bounds, unknown names."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import given
from hypothesis import settings as settings_
from hypothesis import strategies as st
from structlog.testing import capture_logs

from order_monitor.cli import cli
from order_monitor.config import UnknownVariable, load_settings
from order_monitor.engine.policy import BackoffPolicy, describe
from order_monitor.errors import ConfigError
from order_monitor.runner import log_unknown_variables
from tests.config.helpers import BASE, DSN, settings


def test_defaults_follow_the_reference_application() -> None:
    s = load_settings(BASE)
    assert s.layout.table == "product_orders"
    assert s.layout.columns.external_status == "externalStatus"
    assert s.layout.in_flight_external_statuses == (
        "sent",
        "processing",
        "queued",
        "pending",
        "unknown",
    )
    assert s.policy.initial_delay == 60
    assert s.policy.max_attempts == 20
    assert s.sweep_interval == 300
    assert s.writes.done_status is None  # status (money) is left alone by default


def test_config_error_exits_78_with_one_line_and_no_traceback() -> None:
    result = CliRunner().invoke(
        cli,
        ["sql", "install"],
        env={"ORDER_MONITOR_DSN": "", "PGHOST": "", "ORDER_MONITOR_ENV_FILE": ""},
    )
    assert result.exit_code == 78
    assert "no database configured" in result.output
    assert "Traceback" not in result.output


def test_help_shows_no_secret() -> None:
    token = "page-token-" + "q" * 16
    for args in (["--help"], ["run", "--help"]):
        result = CliRunner().invoke(
            cli, args, env={"ORDER_MONITOR_DSN": DSN, "ORDER_MONITOR_PAGE_TOKEN": token}
        )
        assert result.exit_code == 0, result.output
        assert "s3cr3t-pw" not in result.output
        assert token not in result.output


def test_sql_print_needs_no_database() -> None:
    result = CliRunner().invoke(cli, ["sql", "print", "install"], env={"ORDER_MONITOR_DSN": ""})
    assert result.exit_code == 0, result.output
    assert "CREATE INDEX CONCURRENTLY" in result.output


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("SWEEP_INTERVAL", "0", "at least 10s"),
        ("SWEEP_INTERVAL", "9s", "at least 10s"),
        ("SWEEP_INTERVAL", "9" * 400, "at most 24h"),  # float('9' * 400) is inf
        ("LISTENER_HEALTH_INTERVAL", "0", "at least 1s"),
        ("LISTENER_HEALTH_INTERVAL", "1ms", "at least 1s"),
        ("DRAIN_TIMEOUT", "2h", "at most 1h"),
        ("BACKOFF_BASE", "0", "at least 0.1s"),
        ("BACKOFF_CAP", "1ms", "at least 0.1s"),
        ("INITIAL_DELAY", "31d", "at most 720h"),
        ("MAX_AGE", "365d", "at most 720h"),
        ("MAX_AGE", "0", "at least 1s"),
        ("MAX_ATTEMPTS", "2000", "a whole number >= 1 and <= 1000"),
        ("BACKOFF_JITTER", "inf", "a number >= 0"),
        ("BACKOFF_JITTER", "nan", "a number >= 0"),
    ],
)
def test_intervals_and_limits_out_of_bounds_name_variable_value_and_bound(
    name: str, value: str, expected: str
) -> None:
    with pytest.raises(ConfigError, match=expected) as caught:
        settings(**{name: value})
    message = str(caught.value)
    assert message.startswith(f"ORDER_MONITOR_{name}={value!r} is invalid")
    assert "\n" not in message


def test_the_bounds_themselves_are_accepted_and_the_schedule_computes() -> None:
    s = load_settings(
        {
            **BASE,
            "ORDER_MONITOR_SWEEP_INTERVAL": "10s",
            "ORDER_MONITOR_LISTENER_HEALTH_INTERVAL": "1s",
            "ORDER_MONITOR_DRAIN_TIMEOUT": "0",
            "ORDER_MONITOR_MAX_ATTEMPTS": "1000",
            "ORDER_MONITOR_MAX_AGE": "30d",
            "ORDER_MONITOR_BACKOFF_BASE": "0.1s",
            "ORDER_MONITOR_BACKOFF_CAP": "30d",
        }
    )
    assert (s.sweep_interval, s.listener_health_interval, s.drain_timeout) == (10, 1, 0)
    assert "max_attempts=1000" in describe(s.policy)


def test_the_command_line_refuses_the_overflowing_schedule_with_exit_78() -> None:
    """MAX_ATTEMPTS=2000 with MAX_AGE=365d was an OverflowError traceback."""
    result = CliRunner().invoke(
        cli,
        ["schedule"],
        env={"ORDER_MONITOR_MAX_ATTEMPTS": "2000", "ORDER_MONITOR_MAX_AGE": "365d"},
    )
    assert result.exit_code == 78, result.output
    assert result.stderr.count("\n") == 1
    assert "ORDER_MONITOR_MAX_ATTEMPTS='2000'" in result.stderr


@pytest.mark.parametrize(
    "change",
    [{"max_attempts": 2000}, {"base": float("nan")}, {"max_age": float("inf")}],
)
def test_the_policy_refuses_what_its_arithmetic_cannot_take(change: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="must be"):
        BackoffPolicy(**change)  # type: ignore[arg-type]


DAY = 86400.0


@given(
    initial=st.floats(min_value=0, max_value=30 * DAY),
    base=st.floats(min_value=0.1, max_value=30 * DAY),
    cap=st.floats(min_value=0.1, max_value=30 * DAY),
    jitter=st.floats(min_value=0, max_value=0.49),
    attempts=st.integers(min_value=1, max_value=1000),
    age=st.floats(min_value=1, max_value=30 * DAY),
)
@settings_(max_examples=60, deadline=None)
def test_every_accepted_backoff_setting_gives_a_finite_schedule(
    initial: float, base: float, cap: float, jitter: float, attempts: int, age: float
) -> None:
    s = load_settings(
        {
            **BASE,
            # Durations take no exponent: fixed-point, rounded down to stay in range.
            "ORDER_MONITOR_INITIAL_DELAY": f"{math.floor(initial * 1000) / 1000:.3f}",
            "ORDER_MONITOR_BACKOFF_BASE": f"{math.floor(base * 1000) / 1000:.3f}",
            "ORDER_MONITOR_BACKOFF_CAP": f"{math.floor(cap * 1000) / 1000:.3f}",
            "ORDER_MONITOR_BACKOFF_JITTER": repr(jitter),
            "ORDER_MONITOR_MAX_ATTEMPTS": str(attempts),
            "ORDER_MONITOR_MAX_AGE": f"{math.floor(age * 1000) / 1000:.3f}",
        }
    )
    slots = s.policy.slots(12345)
    assert 1 <= len(slots) <= attempts
    offsets = [slot.offset for slot in slots]
    assert all(math.isfinite(o) for o in offsets)
    assert offsets == sorted(offsets)
    describe(s.policy)


def test_a_misspelt_setting_is_reported_with_the_name_it_resembles() -> None:
    s = load_settings({**BASE, "ORDER_MONITOR_MAX_ATEMPTS": "5", "order_monitor_table": "x"})
    assert s.policy.max_attempts == 20  # ignored, as before: but now said
    assert s.unknown_variables == (
        UnknownVariable("ORDER_MONITOR_MAX_ATEMPTS", "ORDER_MONITOR_MAX_ATTEMPTS"),
        UnknownVariable("order_monitor_table", "ORDER_MONITOR_TABLE"),
    )
    assert str(s.unknown_variables[0]) == (
        "ORDER_MONITOR_MAX_ATEMPTS is not an order-monitor setting and is ignored; "
        "did you mean ORDER_MONITOR_MAX_ATTEMPTS?"
    )
    # Not part of the configuration: a reload does not see a change.
    assert s == load_settings(BASE)


def test_a_name_like_nothing_gets_no_suggestion() -> None:
    (unknown,) = load_settings({**BASE, "ORDER_MONITOR_XYZZY": "1"}).unknown_variables
    assert unknown.suggestion is None
    assert str(unknown).endswith("is ignored")


def test_names_read_elsewhere_are_known() -> None:
    s = load_settings(
        {
            **BASE,
            "ORDER_MONITOR_TEST_DSN": DSN,
            "ORDER_MONITOR_TEST_SKIP_PROMETHEUS": "1",
            "ORDER_MONITOR_ENV_FILE": "",
            "ORDER_MONITOR_DOCTOR_NOTIFY_TIMEOUT": "3",
            "OTHER_MAX_ATEMPTS": "1",
        },
        also_known={"ORDER_MONITOR_DOCTOR_NOTIFY_TIMEOUT"},
    )
    assert s.unknown_variables == ()


def test_the_command_line_warns_once_per_unknown_name_on_stderr(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # no ./.env of the developer's
    env = {k: None for k in os.environ if k.upper().startswith("ORDER_MONITOR_")}
    result = CliRunner().invoke(
        cli,
        ["schedule"],
        env={
            **env,
            "ORDER_MONITOR_MAX_ATEMPTS": "5",
            # The doctor's own option: read by the command line, not a typo.
            "ORDER_MONITOR_DOCTOR_NOTIFY_TIMEOUT": "3",
            "ORDER_MONITOR_TEST_DSN": DSN,
        },
    )
    assert result.exit_code == 0, result.output
    assert result.stderr.splitlines() == [
        "order-monitor: warning: ORDER_MONITOR_MAX_ATEMPTS is not an order-monitor setting "
        "and is ignored; did you mean ORDER_MONITOR_MAX_ATTEMPTS?"
    ]


def test_the_daemon_logs_each_unknown_name() -> None:
    s = load_settings({**BASE, "ORDER_MONITOR_SWEEP_INTERVALL": "5m"})
    with capture_logs() as logs:
        log_unknown_variables(s)
    assert [(e["event"], e["variable"], e["did_you_mean"]) for e in logs] == [
        ("config.unknown_variable", "ORDER_MONITOR_SWEEP_INTERVALL", "ORDER_MONITOR_SWEEP_INTERVAL")
    ]
