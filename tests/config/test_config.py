"""Settings: every invalid value gives one clear error; secrets never show."""

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
from order_monitor.config import UnknownVariable, load_providers, load_settings, parse_duration
from order_monitor.engine.policy import BackoffPolicy, describe
from order_monitor.errors import ConfigError
from order_monitor.redaction import Secret, redact_dsn, redact_url
from order_monitor.runner import log_unknown_variables

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


# --- bounds: no busy loops, no overflow ------------------------------------------------


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


# --- names and words that reach SQL --------------------------------------------------

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


# --- files that are not what they should be ----------------------------------------


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


def test_an_env_file_that_is_a_directory_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is a directory"):
        load_settings(env_file=tmp_path)


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "-1", "0", "+nan"])
@pytest.mark.parametrize("key", ["rate", "connect_timeout", "read_timeout", "breaker_cooldown"])
def test_provider_limits_must_be_finite_and_positive(tmp_path: Path, key: str, value: str) -> None:
    env = write_providers(
        tmp_path, f"[providers.a]\nkind='znet'\nbase_url='https://x'\nlimits={{{key}={value}}}"
    )
    with pytest.raises(ConfigError, match=rf"limits\.{key} = .* is invalid: expected a number > 0"):
        load_settings(env)


# --- unknown ORDER_MONITOR_* names ---------------------------------------------------


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
