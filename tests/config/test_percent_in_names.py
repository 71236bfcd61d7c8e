"""A "%" in a configured name or status word: refused at load, since the driver cannot take it."""

from __future__ import annotations

import psycopg
import pytest
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st
from psycopg import sql

from order_monitor.cli import cli
from order_monitor.config import Env
from order_monitor.config.environment import has_control_characters
from order_monitor.errors import ConfigError
from tests.config.helpers import settings
from tests.config.test_environment import SQL_NAMES, SQL_WORDS
from tests.conftest import as_daemon

EVERY_NAME = [*SQL_NAMES, "COLUMN_PIN_CODE", "COLUMN_SENT_AT", "COLUMN_DURATION_MS"]
CHANNELS = ["CHANNEL", "RESULT_CHANNEL"]


def test_the_driver_reads_a_percent_in_a_composed_name_as_a_placeholder(db: str) -> None:
    # Why "%" is refused rather than composed: psycopg does not escape it in
    # the names and literals it composes, so every query the daemon runs with
    # parameters fails, while the same SQL without parameters (install.sql,
    # rendered by us) runs. Shown on a real server, as the daemon's role.
    name = sql.Identifier("pin%Code")
    word = sql.Literal("100%done")
    with psycopg.connect(as_daemon(db), autocommit=True) as conn:
        assert conn.execute(sql.SQL("SELECT 1 AS {}, {}").format(name, word)).fetchone() == (
            1,
            "100%done",
        )
        for composed in (
            sql.SQL("SELECT 1 AS {} WHERE %s").format(name),
            sql.SQL("SELECT {} WHERE %s").format(word),
        ):
            with pytest.raises(psycopg.ProgrammingError, match="placeholder"):
                conn.execute(composed, (True,))


@pytest.mark.parametrize("name", EVERY_NAME)
def test_a_percent_in_a_name_is_refused_naming_the_variable(name: str) -> None:
    with pytest.raises(ConfigError, match="without '%'") as caught:
        settings(**{name: "pin%Code"})
    message = str(caught.value)
    assert message.startswith(f"ORDER_MONITOR_{name}='pin%Code' is invalid")
    assert "placeholder" in message


@pytest.mark.parametrize("name", SQL_WORDS)
def test_a_percent_in_a_status_word_is_refused_naming_the_variable(name: str) -> None:
    with pytest.raises(ConfigError, match="without '%'") as caught:
        settings(**{name: "100%done"})
    assert str(caught.value).startswith(f"ORDER_MONITOR_{name}='100%done' is invalid")


@pytest.mark.parametrize("name", CHANNELS)
def test_a_percent_in_a_channel_is_refused_naming_the_variable(name: str) -> None:
    with pytest.raises(ConfigError, match="a channel name") as caught:
        settings(**{name: "order%s"})
    assert str(caught.value).startswith(f"ORDER_MONITOR_{name}='order%s' is invalid")


def test_the_command_line_refuses_it_with_exit_78() -> None:
    result = CliRunner().invoke(
        cli,
        ["sql", "print", "install"],
        env={"ORDER_MONITOR_DSN": "", "ORDER_MONITOR_COLUMN_STATUS": "st%s"},
    )
    assert result.exit_code == 78, result.output
    assert "ORDER_MONITOR_COLUMN_STATUS='st%s' is invalid" in result.output
    assert "Traceback" not in result.output


@given(value=st.text(min_size=1, max_size=70))
def test_a_name_is_accepted_exactly_when_nothing_refuses_it(value: str) -> None:
    stripped = value.strip()
    refused = len(stripped.encode()) > 63 or has_control_characters(stripped) or "%" in stripped
    env = Env({"ORDER_MONITOR_TABLE": value})
    if not stripped:
        assert env.identifier("TABLE", "orders") == "orders"  # empty means the default
    elif refused:
        with pytest.raises(ConfigError, match="ORDER_MONITOR_TABLE="):
            env.identifier("TABLE", "orders")
    else:
        assert env.identifier("TABLE", "orders") == stripped
