"""`order-monitor sql print` with hostile but legal names: every value stays inside
its comment, quoted identifier or literal, so the DBA's file runs exactly the
statements it runs for a plain layout."""

from __future__ import annotations

import os
from dataclasses import fields, replace
from pathlib import Path

import pytest
from click.testing import CliRunner

from order_monitor import schema
from order_monitor.cli import cli
from order_monitor.config import Columns, Layout

KINDS = ["install", "uninstall", "role"]
# Quotes of both kinds, a statement separator, comment openers, our
# dollar-quote tag, a psql meta-command and a backslash: all legal in a
# quoted identifier or a literal, all fatal if pasted into SQL text.
HOSTILE = "x\"; DROP TABLE t; -- /* $om$ \\! rm '"


def environment(value: str) -> dict[str, str | None]:
    """Every setting that reaches `sql print`, each set to *value* plus a suffix."""
    env: dict[str, str | None] = {
        k: None for k in os.environ if k.upper().startswith("ORDER_MONITOR_")
    }
    env.update(
        {
            "ORDER_MONITOR_SCHEMA": value + "s",
            "ORDER_MONITOR_TABLE": value + "t",
            "ORDER_MONITOR_ROLE": value + "r",
            "ORDER_MONITOR_IN_FLIGHT_EXTERNAL_STATUSES": value + "a," + value + "b",
            "ORDER_MONITOR_FINAL_STATUSES": value + "f",
            # Moves the status column into role.sql's UPDATE grant.
            "ORDER_MONITOR_DONE_STATUS": value + "d",
        }
    )
    for n, f in enumerate(fields(Columns)):
        env[f"ORDER_MONITOR_COLUMN_{f.name.upper()}"] = f"{value}{n}"
    return env


def shape(text: str) -> list[str]:
    """Each line as 'comment', 'blank' or 'code': psql runs the code lines."""
    return [
        "comment" if line.startswith("--") else "blank" if not line.strip() else "code"
        for line in text.splitlines()
    ]


def statements(text: str) -> int:
    """Runs of code lines: the renderer puts a comment or a blank line between statements."""
    kinds = shape(text)
    return sum(
        1 for n, kind in enumerate(kinds) if kind == "code" and (n == 0 or kinds[n - 1] != "code")
    )


@pytest.fixture(autouse=True)
def _no_dotenv_here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)


def sql_print(kind: str, env: dict[str, str | None]) -> str:
    result = CliRunner().invoke(cli, ["sql", "print", kind], env=env)
    assert result.exit_code == 0, result.output
    return result.stdout


@pytest.mark.parametrize("kind", KINDS)
def test_hostile_names_leave_the_statements_as_they_are(kind: str) -> None:
    plain = sql_print(kind, environment("plain"))
    hostile = sql_print(kind, environment(HOSTILE))
    assert HOSTILE.replace('"', '""') in hostile, "the values did not reach the SQL"
    assert shape(hostile) == shape(plain)
    assert statements(hostile) == len(list(schema.statements_for(kind, Layout())))


@pytest.mark.parametrize("kind", KINDS)
def test_the_comparison_would_see_a_name_breaking_out_of_its_comment(kind: str) -> None:
    """The check above is not blind: a table name with a newline (which config
    refuses) gives the file a line of SQL no plain file has."""
    broken = schema.render(kind, replace(Layout(), table="orders\nDROP TABLE x;--"))
    assert shape(broken) != shape(schema.render(kind, Layout()))
    code = [line for line in broken.splitlines() if not line.startswith("--")]
    assert any(line.startswith("DROP TABLE x;--") for line in code)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("setting", ["TABLE", "SCHEMA", "COLUMN_PROVIDER_REF", "ROLE"])
def test_sql_print_refuses_a_name_that_would_break_out(kind: str, setting: str) -> None:
    env = environment("plain")
    env[f"ORDER_MONITOR_{setting}"] = "orders\nDROP TABLE x;--"
    result = CliRunner().invoke(cli, ["sql", "print", kind], env=env)
    assert result.exit_code == 78
    assert result.stdout == ""
    assert result.stderr.startswith(f"order-monitor: ORDER_MONITOR_{setting}='orders\\nDROP")
    assert result.stderr.count("\n") == 1
