"""Configuration mistakes end the command with exit 78 and one line, never a traceback.

`run` is started as a real process for the listen errors: the bind happens in
the daemon's event loop, and what matters is the exit status systemd sees.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
from click.testing import CliRunner

from order_monitor.cli import cli

ROOT = Path(__file__).resolve().parents[2]
DSN = "postgresql://monitor:s3cr3t-pw@127.0.0.1:1/shop"


def clean_environment(**settings: str) -> dict[str, str]:
    """This process's environment without any ORDER_MONITOR_* or libpq setting of ours."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.upper().startswith("ORDER_MONITOR_") and not k.startswith("PG")
    }
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.update({f"ORDER_MONITOR_{k}": v for k, v in settings.items()})
    return env


def run_daemon(tmp_path: Path, **settings: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "order_monitor", "run"],
        env=clean_environment(DSN=DSN, LOG_FORMAT="json", **settings),
        cwd=tmp_path,  # no ./.env
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def assert_one_line_config_error(code: int, stderr: str, *expected: str) -> None:
    assert code == 78, stderr
    assert "Traceback" not in stderr
    lines = stderr.splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("order-monitor: ")
    for text in expected:
        assert text in lines[0]
    assert "s3cr3t-pw" not in stderr


@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def test_run_with_the_http_port_taken_exits_78(tmp_path: Path, taken_port: int) -> None:
    result = run_daemon(tmp_path, HTTP_LISTEN=f"127.0.0.1:{taken_port}")
    assert_one_line_config_error(
        result.returncode,
        result.stderr,
        f"127.0.0.1:{taken_port}",
        "address already in use",
        "ORDER_MONITOR_HTTP_LISTEN",
    )


@pytest.mark.parametrize(
    "listen",
    [
        "192.0.2.1:9187",  # TEST-NET-1: an address this machine does not have
        "256.0.0.1:9187",  # not an address at all
    ],
)
def test_run_with_an_http_address_it_cannot_bind_exits_78(tmp_path: Path, listen: str) -> None:
    result = run_daemon(tmp_path, HTTP_LISTEN=listen)
    assert_one_line_config_error(result.returncode, result.stderr, listen)


def test_run_with_a_busy_loop_interval_exits_78(tmp_path: Path) -> None:
    result = run_daemon(tmp_path, LISTENER_HEALTH_INTERVAL="1ms")
    assert_one_line_config_error(
        result.returncode,
        result.stderr,
        "ORDER_MONITOR_LISTENER_HEALTH_INTERVAL='1ms'",
        "at least 1s",
    )


# --- in-process, through click ------------------------------------------------------


@pytest.fixture(autouse=True)
def _no_dotenv_here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # a developer's ./.env must not take part


def invoke(
    args: list[str], other: Mapping[str, str] | None = None, **settings: str
) -> tuple[int, str]:
    env: dict[str, str | None] = {
        k: None for k in os.environ if k.upper().startswith("ORDER_MONITOR_")
    }
    env.update(other or {})
    env.update({f"ORDER_MONITOR_{k}": v for k, v in settings.items()})
    result = CliRunner().invoke(cli, args, env=env)
    return result.exit_code, result.stderr


def test_an_env_file_that_is_a_directory_exits_78(tmp_path: Path) -> None:
    code, stderr = invoke(["--env-file", str(tmp_path), "schedule"])
    assert_one_line_config_error(code, stderr, str(tmp_path), "is a directory")


def test_an_env_file_variable_naming_a_directory_exits_78(tmp_path: Path) -> None:
    code, stderr = invoke(["schedule"], ENV_FILE=str(tmp_path))
    assert_one_line_config_error(code, stderr, "is a directory")


def providers(tmp_path: Path, body: str) -> str:
    path = tmp_path / "providers.toml"
    path.write_text("[providers.a]\nkind = 'barakat'\nbase_url = 'https://x'\n" + body)
    return str(path)


def test_a_secret_file_that_is_not_utf8_exits_78(tmp_path: Path) -> None:
    (tmp_path / "token").write_bytes(b"\xfftok")
    path = providers(tmp_path, f"secrets = {{ token = {{ file = '{tmp_path / 'token'}' }} }}\n")
    code, stderr = invoke(["run"], PROVIDERS_FILE=path, DSN="postgresql://om@127.0.0.1:9/x")
    assert_one_line_config_error(code, stderr, "secrets.token", "not UTF-8")


def test_rendering_the_sql_reads_no_secret(tmp_path: Path) -> None:
    """The DBA renders install.sql without the providers' or the actions' tokens."""
    path = providers(tmp_path, "secrets = { token = { env = 'UNSET_TOKEN' } }\n")
    code, stderr = invoke(["sql", "print", "install"], PROVIDERS_FILE=path)
    assert code == 0, stderr


def test_a_credential_that_is_not_utf8_exits_78(tmp_path: Path) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "dsn").write_bytes(b"postgresql://m:s3cr3t-pw\xff@db/shop")
    code, stderr = invoke(["status"], {"CREDENTIALS_DIRECTORY": str(creds)})
    assert_one_line_config_error(code, stderr, "credential 'dsn'", "not UTF-8")


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "-2.5"])
def test_a_provider_limit_that_is_no_number_exits_78(tmp_path: Path, value: str) -> None:
    path = providers(
        tmp_path, f"secrets = {{ token = 't' }}\nlimits = {{ read_timeout = {value} }}\n"
    )
    code, stderr = invoke(["schedule"], PROVIDERS_FILE=path)
    assert_one_line_config_error(code, stderr, "limits.read_timeout", "expected a number > 0")
