"""Secrets in the settings: the DSN and its password, systemd credentials, secret files; none ever shows."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from order_monitor.config import environment, load_settings
from order_monitor.errors import ConfigError
from order_monitor.redaction import Secret, redact_dsn, redact_url
from tests.config.helpers import BASE, DSN, write_providers


def test_missing_dsn_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="no database configured: set ORDER_MONITOR_DSN"):
        load_settings({})


def test_libpq_environment_is_enough() -> None:
    assert load_settings({"PGHOST": "db", "PGDATABASE": "shop"}).dsn.reveal() == ""


def test_dsn_from_systemd_credential(tmp_path: Path) -> None:
    (tmp_path / "dsn").write_text(DSN + "\n")
    s = load_settings({"CREDENTIALS_DIRECTORY": str(tmp_path)})
    assert s.dsn.reveal() == DSN


def test_invalid_dsn_error_does_not_echo_the_password() -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings({"ORDER_MONITOR_DSN": "host=db password=hunter2 nonsense"})
    assert "hunter2" not in str(caught.value)


def test_settings_repr_hides_the_dsn_password() -> None:
    s = load_settings(BASE)
    assert "s3cr3t-pw" not in repr(s)
    assert s.safe_dsn == "postgresql://monitor:***@db.internal:5432/shop"


def test_secret_never_shows_itself() -> None:
    secret = Secret("tok-123")
    assert "tok-123" not in repr(secret)
    assert "tok-123" not in str(secret)
    assert "tok-123" not in f"{secret}"
    assert secret.reveal() == "tok-123"


@pytest.mark.parametrize(
    ("dsn", "expected"),
    [
        (DSN, "postgresql://monitor:***@db.internal:5432/shop"),
        ("host=db user=m password=pw dbname=shop", "host=db user=m password=*** dbname=shop"),
        (
            "postgresql://db/shop?password=pw&sslmode=require",
            "postgresql://db/shop?password=***&sslmode=require",
        ),
        ("host=db dbname=shop", "host=db dbname=shop"),
        ("host=db password=pw sslpassword=keypass", "host=db password=*** sslpassword=***"),
        (
            "postgresql://db/shop?sslpassword=kp&sslmode=require",
            "postgresql://db/shop?sslpassword=***&sslmode=require",
        ),
    ],
)
def test_redact_dsn(dsn: str, expected: str) -> None:
    assert redact_dsn(dsn) == expected


def test_redact_url_hides_query_credentials() -> None:
    url = (
        "https://panel.example/servis/pin_kontrol.php?kod=K0D&sifre=S1FRE&tahsilat_api_islem_id=42"
    )
    redacted = redact_url(url, {"kod", "sifre"})
    assert "K0D" not in redacted
    assert "S1FRE" not in redacted
    assert "tahsilat_api_islem_id=42" in redacted


def test_a_secret_file_that_is_not_utf8_is_a_config_error_without_its_bytes(
    tmp_path: Path,
) -> None:
    (tmp_path / "token").write_bytes(b"tok\xff\xfe-PW9z")
    env = write_providers(
        tmp_path,
        "[providers.a]\nkind='barakat'\nbase_url='https://x'\n"
        f"secrets={{token={{file='{tmp_path / 'token'}'}}}}",
    )
    with pytest.raises(ConfigError, match="is not UTF-8 text") as caught:
        load_settings(env)
    assert "PW9z" not in str(caught.value)
    assert "0xff" not in str(caught.value)


def test_a_credential_that_is_not_utf8_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "dsn").write_bytes(b"postgresql://m:pw\xff@db/shop")
    with pytest.raises(ConfigError, match=r"credential 'dsn' .* is not UTF-8 text") as caught:
        load_settings({"CREDENTIALS_DIRECTORY": str(tmp_path)})
    assert "0xff" not in str(caught.value)


# --- the service's own files, for an operator's command on its host ----------------------


@pytest.fixture
def system_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """/etc/order-monitor, as the package and the unit lay it out, in a temporary folder."""
    folder = tmp_path / "etc-order-monitor"
    folder.mkdir()
    monkeypatch.setattr(environment, "SYSTEM_CONFIG_DIR", folder)
    work = tmp_path / "work"  # no ./.env here
    work.mkdir()
    monkeypatch.chdir(work)
    for name in list(os.environ):
        if name.startswith("ORDER_MONITOR_") or name in ("CREDENTIALS_DIRECTORY", "PGHOST"):
            monkeypatch.delenv(name)
    return folder


def test_an_operator_command_reads_the_services_dsn_and_env_files(system_config: Path) -> None:
    # Before, `order-monitor doctor` on a packaged host needed
    # CREDENTIALS_DIRECTORY=/etc/order-monitor --env-file=/etc/order-monitor/env.
    (system_config / "dsn").write_text(DSN + "\n")
    (system_config / "env").write_text("ORDER_MONITOR_BATCH_SIZE=123\n")
    settings = load_settings()
    assert settings.dsn.reveal() == DSN
    assert settings.batch_size == 123


def test_the_service_reads_its_credential_not_the_file_behind_it(
    system_config: Path, tmp_path: Path
) -> None:
    (system_config / "dsn").write_text("host=not-this-one\n")
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "dsn").write_text(DSN)
    assert load_settings({"CREDENTIALS_DIRECTORY": str(credentials)}).dsn.reveal() == DSN


def test_the_environment_still_wins_over_the_services_files(
    system_config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (system_config / "dsn").write_text("host=not-this-one\n")
    (system_config / "env").write_text("ORDER_MONITOR_BATCH_SIZE=123\n")
    monkeypatch.setenv("ORDER_MONITOR_DSN", DSN)
    monkeypatch.setenv("ORDER_MONITOR_BATCH_SIZE", "7")
    settings = load_settings()
    assert (settings.dsn.reveal(), settings.batch_size) == (DSN, 7)


def test_without_the_services_files_nothing_changes(system_config: Path) -> None:
    with pytest.raises(ConfigError, match="no database configured"):
        load_settings()


def test_an_operator_command_reads_a_provider_credential_from_the_services_folder(
    system_config: Path, tmp_path: Path
) -> None:
    (system_config / "znet-sifre").write_text("s3cr:t%/\n")
    values = write_providers(
        tmp_path,
        '[providers.znet]\nkind = "znet"\nbase_url = "https://panel.example"\n'
        'secrets = { kod = "k", sifre = { credential = "znet-sifre" } }\n',
    )
    (provider,) = load_settings(values).providers
    assert provider.secrets["sifre"].reveal() == "s3cr:t%/"


PAGE_TOKEN = "p@ge:t0ken/with%25escapes&=+"


def test_the_page_token_from_the_environment_or_a_credential(tmp_path: Path) -> None:
    s = load_settings({**BASE, "ORDER_MONITOR_PAGE_TOKEN": PAGE_TOKEN})
    assert s.page_token is not None
    assert s.page_token.reveal() == PAGE_TOKEN
    assert PAGE_TOKEN not in repr(s)
    (tmp_path / "page-token").write_text(PAGE_TOKEN + "\n")
    s = load_settings({**BASE, "CREDENTIALS_DIRECTORY": str(tmp_path)})
    assert s.page_token == Secret(PAGE_TOKEN)
    assert load_settings(BASE).page_token is None


def test_a_short_page_token_is_refused_without_being_quoted() -> None:
    with pytest.raises(
        ConfigError, match="ORDER_MONITOR_PAGE_TOKEN is 7 characters long"
    ) as caught:
        load_settings({**BASE, "ORDER_MONITOR_PAGE_TOKEN": "hunter2"})
    assert "hunter2" not in str(caught.value)
