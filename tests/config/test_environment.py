"""ORDER_MONITOR_* values: typed, bounded, named in every error; the .env file; names and words that reach SQL."""

from __future__ import annotations

from pathlib import Path

import pytest

from order_monitor.config import load_settings, parse_duration
from order_monitor.errors import ConfigError
from tests.config.helpers import BASE, DSN, settings


def test_values_are_read_and_typed() -> None:
    s = load_settings(
        {
            **BASE,
            "ORDER_MONITOR_INITIAL_DELAY": "1m30s",
            "ORDER_MONITOR_MAX_AGE": "12h",
            "ORDER_MONITOR_BATCH_SIZE": "1_000",
            "ORDER_MONITOR_TABLE": "orders",
            "ORDER_MONITOR_COLUMN_PIN_CODE": "pin",
            "ORDER_MONITOR_IN_FLIGHT_EXTERNAL_STATUSES": "Sent, WAITING",
            "ORDER_MONITOR_DONE_STATUS": "approved",
        }
    )
    assert s.policy.initial_delay == 90
    assert s.policy.max_age == 12 * 3600
    assert s.batch_size == 1000
    assert s.layout.table == "orders"
    assert s.layout.columns.pin_code == "pin"
    assert s.layout.in_flight_external_statuses == ("sent", "waiting")
    assert s.writes.done_status == "approved"


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("INITIAL_DELAY", "soon", "a duration"),
        ("BATCH_SIZE", "0", "a whole number >= 1"),
        ("CONCURRENCY", "many", "a whole number"),
        ("BACKOFF_JITTER", "0.7", "jitter must be"),
        ("LOG_LEVEL", "loud", "one of debug, info"),
        ("CHANNEL", "bad channel!", "a channel name"),
        ("TABLE", "x" * 64, "at most 63 bytes"),
        ("HTTP_LISTEN", "9187", "host:port"),
        ("IN_FLIGHT_EXTERNAL_STATUSES", " , ", "at least one value"),
        ("DONE_EXTERNAL_STATUS", "sent", "never leave the in-flight set"),
        ("RESULT_CHANNEL", "order_monitor", "use two names"),
        ("PROVIDERS_FILE", "/nonexistent/providers.toml", "no such file"),
    ],
)
def test_each_invalid_value_names_its_variable(name: str, value: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected) as caught:
        settings(**{name: value})
    if "jitter" not in expected:
        assert f"ORDER_MONITOR_{name}" in str(caught.value)


def test_env_file_is_read_and_the_environment_wins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env_file = tmp_path / "env"
    env_file.write_text(
        f"ORDER_MONITOR_DSN={DSN}\nORDER_MONITOR_BATCH_SIZE=7\nORDER_MONITOR_CONCURRENCY=3\n"
    )
    monkeypatch.setenv("ORDER_MONITOR_CONCURRENCY", "9")
    s = load_settings(env_file=env_file)
    assert (s.batch_size, s.concurrency) == (7, 9)


def test_missing_env_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(env_file=tmp_path / "nope")


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90", 90),
        ("90s", 90),
        ("1.5m", 90),
        ("2h", 7200),
        ("1h30m", 5400),
        ("250ms", 0.25),
        ("1d", 86400),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "-5", "5x", "m", "1h x", "5 5"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError):  # noqa: PT011
        parse_duration(text)


HOSTILE_BREAKS = ["\n", "\r", "\t", "\x00", "\x0b", "\x85", "\u2028", "\u2029", "\u200b", "\ufeff"]


SQL_NAMES = ["SCHEMA", "TABLE", "ROLE", "COLUMN_ID", "COLUMN_PROVIDER_REF", "COLUMN_STATUS"]


SQL_WORDS = [
    "IN_FLIGHT_EXTERNAL_STATUSES",
    "FINAL_STATUSES",
    "DONE_EXTERNAL_STATUS",
    "FAILED_EXTERNAL_STATUS",
    "GAVE_UP_EXTERNAL_STATUS",
    "DONE_STATUS",
    "FAILED_STATUS",
]


def test_a_newline_in_the_table_name_cannot_smuggle_a_statement() -> None:
    with pytest.raises(ConfigError, match="without line breaks") as caught:
        settings(TABLE="orders\nDROP TABLE x;--")
    assert str(caught.value).startswith("ORDER_MONITOR_TABLE='orders\\nDROP TABLE x;--'")
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("name", SQL_NAMES + SQL_WORDS)
@pytest.mark.parametrize("char", HOSTILE_BREAKS)
def test_control_characters_are_refused_in_every_name_and_word(name: str, char: str) -> None:
    with pytest.raises(ConfigError, match="control characters") as caught:
        settings(**{name: f"x{char}y"})
    message = str(caught.value)
    assert message.startswith(f"ORDER_MONITOR_{name}=")
    # The message itself is one line whatever the value held.
    assert len(message.splitlines()) == 1


@pytest.mark.parametrize("name", SQL_WORDS)
@pytest.mark.parametrize("word", ["İptal", "onaylandı", "gönderildi", "ｓｅｎｔ"])
def test_non_ascii_status_words_are_refused_with_the_reason(name: str, word: str) -> None:
    with pytest.raises(ConfigError, match="ASCII words: Python and PostgreSQL") as caught:
        settings(**{name: word})
    assert f"ORDER_MONITOR_{name}=" in str(caught.value)


def test_non_ascii_table_and_column_names_are_still_fine() -> None:
    # Identifiers are compared by PostgreSQL byte for byte, never case-folded by us.
    s = settings(TABLE="siparişler", COLUMN_PIN_CODE="pinKodu_İ")
    assert (s.layout.table, s.layout.columns.pin_code) == ("siparişler", "pinKodu_İ")


def test_an_env_file_that_is_a_directory_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is a directory"):
        load_settings(env_file=tmp_path)
