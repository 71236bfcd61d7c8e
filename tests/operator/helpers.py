"""What the operator tests share: the environment they run the CLI with, and reading its lines."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import psycopg
from click.testing import CliRunner, Result

from order_monitor.cli import cli

ROLE_PASSWORD = "s3cret-Doctor-pw"


def providers_file(tmp_path: Path, base_url: str, provider_ids: Sequence[str] = ("fake",)) -> Path:
    ids = ", ".join(json.dumps(i) for i in provider_ids)
    path = tmp_path / "providers.toml"
    path.write_text(
        f"""
[providers.fake]
kind = "barakat"
base_url = "{base_url}"
provider_ids = [{ids}]
secrets = {{ token = {{ env = "FAKE_TOKEN" }} }}
limits = {{ read_timeout = 3, breaker_failures = 50 }}
"""
    )
    return path


def environment(
    dsn: str, env_file: Path, providers: Path | None = None, **extra: str
) -> dict[str, str]:
    env = {
        "ORDER_MONITOR_DSN": dsn,
        "ORDER_MONITOR_ENV_FILE": str(env_file),
        "FAKE_TOKEN": "test-token",
        **{f"ORDER_MONITOR_{k}": v for k, v in extra.items()},
    }
    if providers is not None:
        env["ORDER_MONITOR_PROVIDERS_FILE"] = str(providers)
    return env


def invoke(args: Sequence[str], env: Mapping[str, str]) -> Result:
    return CliRunner().invoke(cli, list(args), env=dict(env), catch_exceptions=False)


async def invoke_async(args: Sequence[str], env: Mapping[str, str]) -> Result:
    """The CLI in a worker thread, while the fake provider serves from this loop."""
    return await asyncio.to_thread(invoke, args, env)


def lines(result: Result) -> dict[str, str]:
    """Doctor lines by check name: {'index': 'PASS  index: ...'}."""
    found: dict[str, str] = {}
    for line in result.stdout.splitlines():
        verdict, _, rest = line.partition("  ")
        assert verdict in {"PASS", "WARN", "FAIL"}, line
        check, _, _ = rest.partition(": ")
        found[check] = line
    return found


def verdicts(result: Result) -> dict[str, str]:
    return {check: line.split()[0] for check, line in lines(result).items()}


def execute(dsn: str, statement: str, params: Sequence[Any] = ()) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(statement, params)
