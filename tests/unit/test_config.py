"""Settings: every invalid value gives one clear error; secrets never show."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from order_monitor.cli import cli
from order_monitor.config import load_providers, load_settings, parse_duration
from order_monitor.errors import ConfigError
from order_monitor.redaction import Secret, redact_dsn, redact_url

DSN = "postgresql://monitor:s3cr3t-pw@db.internal:5432/shop"
BASE = {"ORDER_MONITOR_DSN": DSN}


def settings(**extra: str) -> object:
    return load_settings({**BASE, **{f"ORDER_MONITOR_{k}": v for k, v in extra.items()}})


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


# --- providers file --------------------------------------------------------------------


def write_providers(tmp_path: Path, text: str) -> dict[str, str]:
    path = tmp_path / "providers.toml"
    path.write_text(text)
    return {**BASE, "ORDER_MONITOR_PROVIDERS_FILE": str(path)}


def test_providers_file_with_secrets_from_env_file_and_credentials(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("file-token\n")
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "znet-sifre").write_text("cred-sifre")
    env = write_providers(
        tmp_path,
        f"""
[providers.znet]
kind = "znet"
base_url = "https://panel.example.com/"
provider_ids = ["znet", 7]
[providers.znet.secrets]
kod = {{ env = "ZNET_KOD" }}
sifre = {{ credential = "znet-sifre" }}
[providers.znet.limits]
concurrency = 4
rate = 2.5

[providers.barakat]
kind = "barakat"
base_url = "https://api.barakat.example"
secrets = {{ token = {{ file = "{tmp_path / "token"}" }} }}
options = {{ chunk_size = 50 }}
""",
    )
    s = load_settings({**env, "ZNET_KOD": "env-kod", "CREDENTIALS_DIRECTORY": str(creds)})
    znet, barakat = s.providers
    assert znet.base_url == "https://panel.example.com"
    assert znet.provider_ids == ("znet", "7")
    assert znet.secrets["kod"].reveal() == "env-kod"
    assert znet.secrets["sifre"].reveal() == "cred-sifre"
    assert (znet.limits.concurrency, znet.limits.rate) == (4, 2.5)
    assert barakat.provider_ids == ("barakat",)
    assert barakat.secrets["token"].reveal() == "file-token"
    assert barakat.options == {"chunk_size": 50}
    assert s.provider_for("7") is znet
    assert s.provider_for("other") is None
    for text in (repr(s), repr(znet), str(znet.secrets)):
        assert "env-kod" not in text
        assert "cred-sifre" not in text
        assert "file-token" not in text


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("[providers.a]\nbase_url='https://x'", r"\[providers.a\]: 'kind' is required"),
        ("[providers.a]\nkind='znet'\nbase_url='ftp://x'", "must start with http"),
        ("[providers.a]\nkind='znet'\nbase_url='https://x'\ncolour='red'", "unknown keys"),
        (
            "[providers.a]\nkind='znet'\nbase_url='https://x'\nlimits={rate=-1}",
            r"limits.rate = -1 is invalid",
        ),
        (
            "[providers.a]\nkind='znet'\nbase_url='https://x'\nlimits={concurrency=1.5}",
            "a whole number",
        ),
        (
            "[providers.a]\nkind='znet'\nbase_url='https://x'\nsecrets={kod={env='NOPE_UNSET'}}",
            "NOPE_UNSET is not set",
        ),
        (
            "[providers.a]\nkind='znet'\nbase_url='https://x'\nsecrets={kod={vault='x'}}",
            "unknown source",
        ),
        (
            "[providers.a]\nkind='znet'\nbase_url='https://x'\n[providers.b]\nkind='znet'\nbase_url='https://y'\nprovider_ids=['a']",
            "already served by",
        ),
        ("not toml [", "not valid TOML"),
    ],
)
def test_providers_file_errors_name_the_key(tmp_path: Path, body: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        load_settings(write_providers(tmp_path, body))


# --- redaction -------------------------------------------------------------------------


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


# --- the command line ------------------------------------------------------------------


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
    result = CliRunner().invoke(cli, ["--help"], env={"ORDER_MONITOR_DSN": DSN})
    assert result.exit_code == 0
    assert "s3cr3t-pw" not in result.output


def test_sql_print_needs_no_database() -> None:
    result = CliRunner().invoke(cli, ["sql", "print", "install"], env={"ORDER_MONITOR_DSN": ""})
    assert result.exit_code == 0, result.output
    assert "CREATE INDEX CONCURRENTLY" in result.output


def test_provider_secrets_can_be_left_unresolved_for_commands_that_ask_no_provider(
    tmp_path: Path,
) -> None:
    env = write_providers(
        tmp_path,
        "[providers.znet]\nkind='znet'\nbase_url='https://x'\nsecrets={kod={credential='k'}}",
    )
    with pytest.raises(ConfigError, match="credential 'k' is not available"):
        load_settings(env)
    (provider,) = load_settings(env, need_provider_secrets=False).providers
    assert provider.provider_ids == ("znet",)
    assert provider.secrets == {}


def test_the_readme_provider_examples_parse_and_build(tmp_path: Path) -> None:
    """The examples an operator copies must be valid: they cannot drift from the code."""
    from order_monitor.providers.registry import build_adapter

    readme = (Path(__file__).parents[2] / "README.md").read_text()
    blocks = [b.split("```", 1)[0] for b in readme.split("```toml\n")[1:]]
    examples = [b for b in blocks if b.lstrip().startswith("[providers.")]
    assert len(examples) >= 2
    (tmp_path / "znet-sifre").write_text("s")
    env = {"ZNET_KOD": "k", "INTERNAL_TOKEN": "t", "CREDENTIALS_DIRECTORY": str(tmp_path)}
    for example in examples:
        path = tmp_path / "providers.toml"
        path.write_text(example)
        for provider in load_providers(path, env):
            assert build_adapter(provider).max_batch >= 1
