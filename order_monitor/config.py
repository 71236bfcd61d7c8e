"""Settings: from the environment, a .env file and the providers file.

Everything is read and validated once, at start-up (and again on SIGHUP), into
frozen objects. An invalid value raises one :class:`ConfigError` that names
the variable or key, shows the value (unless it is a secret) and says what is
expected.
"""

from __future__ import annotations

import difflib
import math
import os
import re
import tomllib
import unicodedata
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Final

import psycopg.conninfo
from dotenv import dotenv_values

from order_monitor.engine.policy import MAX_ATTEMPTS_LIMIT, BackoffPolicy, format_seconds
from order_monitor.errors import ConfigError
from order_monitor.redaction import Secret, redact_dsn

PREFIX: Final = "ORDER_MONITOR_"
DEFAULT_PROVIDERS_FILE: Final = Path("/etc/order-monitor/providers.toml")

# Postgres truncates identifiers longer than this silently; we refuse them.
_MAX_IDENTIFIER: Final = 63
_CHANNEL_RE: Final = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
# Line and paragraph breaks, NUL, tabs and invisible format characters. Any of
# them in a name or a word ends the `--` comment that `sql print` puts it in,
# and whatever follows runs when a DBA applies the file.
_CONTROL_CATEGORIES: Final = frozenset({"Cc", "Cf", "Zl", "Zp"})
#: The longest any interval, delay or age may be. Beyond a month a setting is a
#: mistake, and unbounded ones reach float('inf') ("9" * 400 parses).
_LONGEST: Final = 30 * 86400.0
#: ORDER_MONITOR_* names read outside load_settings, so Env never sees them
#: asked for: the env file is found before there is an Env, and the test suite
#: reads its own database (tests/conftest.py).
ENV_FILE_VARIABLE: Final = PREFIX + "ENV_FILE"
TEST_DSN_VARIABLE: Final = PREFIX + "TEST_DSN"
_READ_ELSEWHERE: Final = frozenset({ENV_FILE_VARIABLE, TEST_DSN_VARIABLE})
#: The test suite's own switches (the TEST_DSN above, TEST_SKIP_…): never
#: a setting of the daemon, so never reported as an unknown one.
TEST_PREFIX: Final = PREFIX + "TEST_"


@dataclass(frozen=True, slots=True)
class Columns:
    """Where each piece of order state lives in the orders table."""

    id: str = "id"
    status: str = "status"
    external_status: str = "externalStatus"
    provider_ref: str = "provider_referans"
    provider_id: str = "providerId"
    external_order_id: str = "externalOrderId"
    pin_code: str = "pinCode"
    provider_message: str = "providerMessage"
    last_message: str = "lastMessage"
    sent_at: str = "sentAt"
    last_sync_at: str = "lastSyncAt"
    completed_at: str = "completedAt"
    duration_ms: str = "durationMs"
    created_at: str = "createdAt"

    def configured(self) -> tuple[str, ...]:
        """Every column named here: each must exist in the table."""
        return tuple(getattr(self, f.name) for f in fields(self))

    def read(self) -> tuple[str, ...]:
        """Columns the daemon and its operator commands read (the role's SELECT grant).

        Not the PIN, the provider's message or the duration: the daemon writes
        those (through the write function) but never needs to see them.
        """
        return (
            self.id,
            self.status,
            self.external_status,
            self.provider_ref,
            self.provider_id,
            self.external_order_id,
            self.last_message,
            self.sent_at,
            self.last_sync_at,
            self.completed_at,
            self.created_at,
        )


@dataclass(frozen=True, slots=True)
class Layout:
    """The orders table as order-monitor sees it: names, channels, in-flight rule."""

    schema: str = "public"
    table: str = "product_orders"
    columns: Columns = field(default_factory=Columns)
    channel: str = "order_monitor"
    result_channel: str = "order_monitor_result"
    #: An order is in flight when its external status is one of these
    #: (compared case-insensitively), its status is not final, and it has a
    #: provider reference.
    in_flight_external_statuses: tuple[str, ...] = (
        "sent",
        "processing",
        "queued",
        "pending",
        "unknown",
    )
    final_statuses: tuple[str, ...] = ("approved", "rejected")
    role: str = "order_monitor"


@dataclass(frozen=True, slots=True)
class OutcomeWrites:
    """What each outcome writes into the row besides timestamps and messages."""

    done_external_status: str = "done"
    failed_external_status: str = "failed"
    #: Written when the policy's limits are reached; 'manual_required' is the
    #: application's own word for "a human must look", and is outside the
    #: in-flight set, so the order leaves the sweep.
    gave_up_external_status: str = "manual_required"
    #: Off by default: in the application a status change moves money.
    done_status: str | None = None
    failed_status: str | None = None


@dataclass(frozen=True, slots=True)
class ProviderLimits:
    concurrency: int = 8
    #: Requests per second; None for no rate limit.
    rate: float | None = None
    burst: int = 1
    connect_timeout: float = 5.0
    read_timeout: float = 15.0
    #: Consecutive failed requests that open the circuit breaker.
    breaker_failures: int = 5
    breaker_cooldown: float = 30.0
    #: Largest response body read, in bytes.
    max_body: int = 1_048_576


@dataclass(frozen=True, slots=True)
class ProviderConfig:
    """One entry of the providers file."""

    name: str
    kind: str
    base_url: str
    #: Values of the orders' provider-id column this entry serves.
    provider_ids: tuple[str, ...]
    limits: ProviderLimits
    secrets: Mapping[str, Secret]
    #: Adapter-specific keys, validated by the adapter itself.
    options: Mapping[str, Any]

    def __repr__(self) -> str:
        return (
            f"ProviderConfig(name={self.name!r}, kind={self.kind!r}, "
            f"base_url={self.base_url!r}, provider_ids={self.provider_ids!r}, "
            f"secrets={sorted(self.secrets)!r})"
        )


@dataclass(frozen=True, slots=True)
class Settings:
    dsn: Secret
    layout: Layout = field(default_factory=Layout)
    policy: BackoffPolicy = field(default_factory=BackoffPolicy)
    writes: OutcomeWrites = field(default_factory=OutcomeWrites)
    sweep_interval: float = 300.0
    batch_size: int = 500
    #: Provider requests under way at once, all providers together.
    concurrency: int = 64
    #: How long a stopping daemon waits for checks under way.
    drain_timeout: float = 10.0
    #: How often the LISTEN connection is proven alive.
    listener_health_interval: float = 10.0
    providers_file: Path | None = None
    providers: tuple[ProviderConfig, ...] = ()
    log_level: str = "info"
    log_format: str = "auto"
    #: host:port for /healthz, /readyz and /metrics; None keeps it off.
    http_listen: str | None = None
    #: ORDER_MONITOR_* names in the environment that no setting reads (typos).
    #: Not part of the configuration: two loads differing only here are equal.
    unknown_variables: tuple[UnknownVariable, ...] = field(default=(), compare=False, repr=False)

    @property
    def safe_dsn(self) -> str:
        return redact_dsn(self.dsn.reveal())

    def provider_for(self, provider_id: str) -> ProviderConfig | None:
        for provider in self.providers:
            if provider_id in provider.provider_ids:
                return provider
        return None


@dataclass(frozen=True, slots=True)
class UnknownVariable:
    """An ORDER_MONITOR_* name nothing reads: most often a misspelt setting."""

    name: str
    #: The closest known name, if one is close.
    suggestion: str | None

    def __str__(self) -> str:
        hint = f"; did you mean {self.suggestion}?" if self.suggestion else ""
        return f"{self.name} is not an order-monitor setting and is ignored{hint}"


def unknown_variables(names: Iterable[str], known: Collection[str]) -> tuple[UnknownVariable, ...]:
    """The ORDER_MONITOR_* names among *names* that are not *known*, with a suggestion each.

    Environment names are case-sensitive: ``order_monitor_dsn`` is not read,
    so it is reported too (suggesting ``ORDER_MONITOR_DSN``).
    """
    # Compared without the prefix every name shares, which would make any two
    # names look alike.
    by_suffix = {k.removeprefix(PREFIX): k for k in known}
    found = []
    for name in sorted(names):
        if not name.upper().startswith(PREFIX) or name in known or name.startswith(TEST_PREFIX):
            continue
        close = difflib.get_close_matches(name.upper().removeprefix(PREFIX), by_suffix, n=1)
        found.append(UnknownVariable(name, by_suffix[close[0]] if close else None))
    return tuple(found)


def has_control_characters(text: str) -> bool:
    return any(unicodedata.category(ch) in _CONTROL_CATEGORIES for ch in text)


# --- reading -----------------------------------------------------------------


class Env:
    """Typed access to ORDER_MONITOR_* values with errors that name the variable."""

    def __init__(self, values: Mapping[str, str]) -> None:
        self._values = values
        #: Every name asked for, set or not (with the prefix). After
        #: load_settings this is the list of settings, kept by the code that
        #: reads them rather than by hand.
        self.asked: set[str] = set()

    def raw(self, name: str) -> str | None:
        self.asked.add(PREFIX + name)
        value = self._values.get(PREFIX + name)
        if value is None or value.strip() == "":
            return None
        return value.strip()

    def string(self, name: str, default: str) -> str:
        return self.raw(name) or default

    def optional(self, name: str) -> str | None:
        return self.raw(name)

    def integer(
        self, name: str, default: int, *, minimum: int = 1, maximum: int | None = None
    ) -> int:
        raw = self.raw(name)
        if raw is None:
            return default
        expected = f"a whole number >= {minimum}" + (
            "" if maximum is None else f" and <= {maximum}"
        )
        try:
            value = int(raw.replace("_", ""))
        except ValueError:
            raise self._error(name, raw, expected) from None
        if value < minimum or (maximum is not None and value > maximum):
            raise self._error(name, raw, expected)
        return value

    def number(self, name: str, default: float, *, minimum: float = 0.0) -> float:
        raw = self.raw(name)
        if raw is None:
            return default
        try:
            value = float(raw)
        except ValueError:
            raise self._error(name, raw, f"a number >= {minimum}") from None
        if not math.isfinite(value) or value < minimum:
            raise self._error(name, raw, f"a number >= {minimum}")
        return value

    def duration(
        self, name: str, default: float, *, minimum: float = 0.0, maximum: float = _LONGEST
    ) -> float:
        """Seconds; *minimum* keeps an interval from turning into a busy loop."""
        raw = self.raw(name)
        if raw is None:
            return default
        try:
            value = parse_duration(raw)
        except ValueError:
            raise self._error(
                name, raw, "a duration such as 30, 30s, 1.5m, 2h or 1h30m (no sign)"
            ) from None
        if not minimum <= value <= maximum:
            raise self._error(
                name,
                raw,
                f"a duration of at least {format_seconds(minimum)} "
                f"and at most {format_seconds(maximum)}",
            )
        return value

    def boolean(self, name: str, default: bool) -> bool:
        raw = self.raw(name)
        if raw is None:
            return default
        lowered = raw.lower()
        if lowered in {"1", "true", "yes", "on"}:
            return True
        if lowered in {"0", "false", "no", "off"}:
            return False
        raise self._error(name, raw, "one of true/false, yes/no, on/off, 1/0")

    def status_word(self, name: str, default: str) -> str:
        """A value of the status columns, written as given and compared with lower()."""
        return self._check_status_word(name, self.string(name, default))

    def optional_status_word(self, name: str) -> str | None:
        value = self.optional(name)
        return None if value is None else self._check_status_word(name, value)

    def status_words(self, name: str, default: tuple[str, ...]) -> tuple[str, ...]:
        """A comma-separated list of status words, lower-cased."""
        raw = self.raw(name)
        if raw is None:
            return default
        self._check_status_word(name, raw)
        words = tuple(w.strip().lower() for w in raw.split(",") if w.strip())
        if not words:
            raise self._error(name, raw, "a comma-separated list with at least one value")
        return words

    def choice(self, name: str, default: str, choices: tuple[str, ...]) -> str:
        raw = self.raw(name)
        if raw is None:
            return default
        if raw.lower() not in choices:
            raise self._error(name, raw, "one of " + ", ".join(choices))
        return raw.lower()

    def identifier(self, name: str, default: str) -> str:
        value = self.string(name, default)
        if len(value.encode()) > _MAX_IDENTIFIER or has_control_characters(value):
            raise self._error(
                name,
                value,
                f"a PostgreSQL name of at most {_MAX_IDENTIFIER} bytes, without line breaks, "
                "tabs or other control characters",
            )
        return value

    def channel(self, name: str, default: str) -> str:
        value = self.string(name, default)
        if not _CHANNEL_RE.match(value):
            raise self._error(name, value, "a channel name: letters, digits and _, at most 63")
        return value

    def _check_status_word(self, name: str, value: str) -> str:
        if has_control_characters(value):
            raise self._error(
                name, value, "words without line breaks, tabs or other control characters"
            )
        if not value.isascii():
            # Python's 'İ'.lower() is two code points, PostgreSQL's lower()
            # depends on the collation: the daemon's comparison and the index's
            # would disagree, and the order would never match.
            raise self._error(
                name,
                value,
                "ASCII words: Python and PostgreSQL lower-case other letters differently, "
                "so a non-ASCII status would never match",
            )
        return value

    @staticmethod
    def _error(name: str, raw: str, expected: str) -> ConfigError:
        return ConfigError(f"{PREFIX}{name}={raw!r} is invalid: expected {expected}")


_DURATION_PART: Final = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?", re.IGNORECASE)
_UNIT_SECONDS: Final = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_duration(text: str) -> float:
    """Seconds in '90', '90s', '1.5m', '2h', '1h30m', '250ms'."""
    text = text.strip().lower()
    total = 0.0
    position = 0
    while position < len(text):
        match = _DURATION_PART.match(text, position)
        if match is None or match.end() == position:
            raise ValueError(text)
        unit = match.group(2)
        if unit is None and match.end() != len(text):
            raise ValueError(text)
        total += float(match.group(1)) * _UNIT_SECONDS[unit]
        position = match.end()
        while position < len(text) and text[position] == " ":
            position += 1
    if not text:
        raise ValueError(text)
    return total


def load_environment(env_file: Path | None = None) -> dict[str, str]:
    """The process environment over the .env file (the environment wins)."""
    path = env_file
    if path is None:
        configured = os.environ.get(ENV_FILE_VARIABLE)
        path = Path(configured) if configured else Path(".env")
        if not configured and not path.exists():
            return dict(os.environ)
    if path.is_dir():
        raise ConfigError(f"env file {str(path)!r} is a directory: name the file in it")
    if not path.is_file():
        raise ConfigError(f"env file {str(path)!r} does not exist or is not a file")
    try:
        file_values = dotenv_values(path)
    except OSError as exc:
        raise ConfigError(f"env file {str(path)!r} cannot be read: {exc.strerror}") from None
    except UnicodeDecodeError:
        # The decoder's message quotes a byte of the file, which may hold the DSN.
        raise ConfigError(f"env file {str(path)!r} is not UTF-8 text") from None
    merged = {k: v for k, v in file_values.items() if v is not None}
    merged.update(os.environ)
    return merged


def load_settings(
    environ: Mapping[str, str] | None = None,
    *,
    env_file: Path | None = None,
    need_database: bool = True,
    need_provider_secrets: bool = True,
    also_known: Collection[str] = (),
) -> Settings:
    """Read and validate every setting. Raises ConfigError on the first problem.

    With ``need_database=False`` (rendering SQL, printing the schedule) a
    missing DSN is not an error. With ``need_provider_secrets=False``
    (`order-monitor status`, which asks no provider) the providers file is
    read but its secrets are not: a systemd credential exists only inside
    the service, and an operator's shell must still get a status.

    ``also_known`` names ORDER_MONITOR_* variables read by someone else (the
    command line's own options), so they are not reported as unknown.
    """
    values = load_environment(env_file) if environ is None else dict(environ)
    env = Env(values)

    columns = Columns(
        **{
            f.name: env.identifier("COLUMN_" + f.name.upper(), getattr(Columns(), f.name))
            for f in fields(Columns)
        }
    )
    layout = Layout(
        schema=env.identifier("SCHEMA", "public"),
        table=env.identifier("TABLE", "product_orders"),
        columns=columns,
        channel=env.channel("CHANNEL", "order_monitor"),
        result_channel=env.channel("RESULT_CHANNEL", "order_monitor_result"),
        in_flight_external_statuses=env.status_words(
            "IN_FLIGHT_EXTERNAL_STATUSES", Layout().in_flight_external_statuses
        ),
        final_statuses=env.status_words("FINAL_STATUSES", Layout().final_statuses),
        role=env.identifier("ROLE", "order_monitor"),
    )
    if layout.channel == layout.result_channel:
        raise ConfigError(
            f"{PREFIX}CHANNEL and {PREFIX}RESULT_CHANNEL are both {layout.channel!r}: "
            "the daemon would read its own result announcements; use two names"
        )

    try:
        policy = BackoffPolicy(
            initial_delay=env.duration("INITIAL_DELAY", 60.0),
            # A zero gap would check an order back to back; a tenth of a second
            # is already more than any provider wants, but tests need short ones.
            base=env.duration("BACKOFF_BASE", 30.0, minimum=0.1),
            cap=env.duration("BACKOFF_CAP", 6900.0, minimum=0.1),
            jitter=env.number("BACKOFF_JITTER", 0.1),
            max_attempts=env.integer("MAX_ATTEMPTS", 20, maximum=MAX_ATTEMPTS_LIMIT),
            max_age=env.duration("MAX_AGE", 86400.0, minimum=1.0),
        )
    except ValueError as exc:
        raise ConfigError(f"backoff settings are inconsistent: {exc}") from None

    defaults = OutcomeWrites()
    writes = OutcomeWrites(
        done_external_status=env.status_word("DONE_EXTERNAL_STATUS", defaults.done_external_status),
        failed_external_status=env.status_word(
            "FAILED_EXTERNAL_STATUS", defaults.failed_external_status
        ),
        gave_up_external_status=env.status_word(
            "GAVE_UP_EXTERNAL_STATUS", defaults.gave_up_external_status
        ),
        done_status=env.optional_status_word("DONE_STATUS"),
        failed_status=env.optional_status_word("FAILED_STATUS"),
    )
    for name, value in (
        ("DONE_EXTERNAL_STATUS", writes.done_external_status),
        ("FAILED_EXTERNAL_STATUS", writes.failed_external_status),
        ("GAVE_UP_EXTERNAL_STATUS", writes.gave_up_external_status),
    ):
        if value.lower() in layout.in_flight_external_statuses:
            raise ConfigError(
                f"{PREFIX}{name}={value!r} is one of {PREFIX}IN_FLIGHT_EXTERNAL_STATUSES: "
                "the order would never leave the in-flight set"
            )

    providers_path = _providers_path(env)
    settings = Settings(
        dsn=_dsn(env, values, required=need_database),
        layout=layout,
        policy=policy,
        writes=writes,
        # Each sweep reads every order in flight: seconds apart would keep the
        # database busy for a safety net.
        sweep_interval=env.duration("SWEEP_INTERVAL", 300.0, minimum=10.0, maximum=86400.0),
        batch_size=env.integer("BATCH_SIZE", 500),
        concurrency=env.integer("CONCURRENCY", 64),
        drain_timeout=env.duration("DRAIN_TIMEOUT", 10.0, maximum=3600.0),
        # A round trip on the LISTEN connection each time.
        listener_health_interval=env.duration(
            "LISTENER_HEALTH_INTERVAL", 10.0, minimum=1.0, maximum=3600.0
        ),
        providers_file=providers_path,
        providers=(
            load_providers(providers_path, values, resolve_secrets=need_provider_secrets)
            if providers_path
            else ()
        ),
        log_level=env.choice("LOG_LEVEL", "info", ("debug", "info", "warning", "error")),
        log_format=env.choice("LOG_FORMAT", "auto", ("auto", "json", "console")),
        http_listen=_http_listen(env),
    )
    return replace(
        settings,
        unknown_variables=unknown_variables(values, env.asked | _READ_ELSEWHERE | set(also_known)),
    )


def _dsn(env: Env, values: Mapping[str, str], *, required: bool) -> Secret:
    dsn = env.raw("DSN") or ""
    if not dsn:
        dsn = read_credential("dsn", values) or ""
    if not dsn and not required:
        return Secret("")
    if not dsn and not any(values.get(v) for v in ("PGHOST", "PGDATABASE", "PGSERVICE")):
        raise ConfigError(
            f"no database configured: set {PREFIX}DSN (a libpq connection string or "
            "postgresql:// URI), a 'dsn' systemd credential, or libpq's PGHOST/PGDATABASE"
        )
    try:
        psycopg.conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        # libpq's message may quote the string, password included: ours does not.
        raise ConfigError(
            f"{PREFIX}DSN is not a valid connection string (expected key=value pairs "
            "or a postgresql:// URI)"
        ) from None
    return Secret(dsn)


def read_credential(name: str, values: Mapping[str, str]) -> str | None:
    """A systemd credential (LoadCredential=) by name, if the service has one."""
    directory = values.get("CREDENTIALS_DIRECTORY")
    if not directory:
        return None
    path = Path(directory) / name
    try:
        return path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(f"credential {name!r} cannot be read: {exc.strerror}") from None
    except UnicodeDecodeError:
        # The decoder's message quotes the offending byte: part of the secret.
        raise ConfigError(f"credential {name!r} ({path}) is not UTF-8 text") from None


def _providers_path(env: Env) -> Path | None:
    raw = env.optional("PROVIDERS_FILE")
    if raw is not None:
        path = Path(raw)
        if not path.is_file():
            raise ConfigError(f"{PREFIX}PROVIDERS_FILE={raw!r}: no such file")
        return path
    return DEFAULT_PROVIDERS_FILE if DEFAULT_PROVIDERS_FILE.is_file() else None


def _http_listen(env: Env) -> str | None:
    raw = env.optional("HTTP_LISTEN")
    if raw is None or raw.lower() in {"off", "no", "false", "0"}:
        return None
    _host, sep, port = raw.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(
            f"{PREFIX}HTTP_LISTEN={raw!r} is invalid: expected host:port, e.g. 127.0.0.1:9187"
        )
    return raw


# --- the providers file ----------------------------------------------------------

_PROVIDER_KEYS: Final = {"kind", "base_url", "provider_ids", "limits", "secrets", "options"}
_LIMIT_TYPES: Final[dict[str, type]] = {
    "concurrency": int,
    "rate": float,
    "burst": int,
    "connect_timeout": float,
    "read_timeout": float,
    "breaker_failures": int,
    "breaker_cooldown": float,
    "max_body": int,
}


def load_providers(
    path: Path, environ: Mapping[str, str], *, resolve_secrets: bool = True
) -> tuple[ProviderConfig, ...]:
    """Parse the providers file (TOML).

    Layout::

        [providers.znet-main]
        kind = "znet"
        base_url = "https://panel.example.com"
        provider_ids = ["znet", "7"]     # values of the orders' providerId
        [providers.znet-main.secrets]
        kod = { env = "ZNET_KOD" }       # or { file = "..." }, { credential = "..." }, "literal"
        sifre = { credential = "znet-sifre" }
        [providers.znet-main.limits]
        concurrency = 4
        rate = 10
    """
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"providers file {str(path)!r} cannot be read: {exc.strerror}") from None
    except UnicodeDecodeError:
        # Not the decoder's message: it quotes a byte, maybe of a literal secret.
        raise ConfigError(f"providers file {str(path)!r} is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"providers file {str(path)!r} is not valid TOML: {exc}") from None
    return parse_providers(document, environ, source=str(path), resolve_secrets=resolve_secrets)


def parse_providers(
    document: Mapping[str, Any],
    environ: Mapping[str, str],
    *,
    source: str = "providers file",
    resolve_secrets: bool = True,
) -> tuple[ProviderConfig, ...]:
    unknown_top = set(document) - {"providers"}
    if unknown_top:
        raise ConfigError(
            f"{source}: unknown top-level keys {sorted(unknown_top)}; "
            "expected [providers.NAME] tables"
        )
    table = document.get("providers", {})
    if not isinstance(table, dict):
        raise ConfigError(f"{source}: 'providers' must be a table of [providers.NAME] entries")
    result: list[ProviderConfig] = []
    claimed: dict[str, str] = {}
    for name, entry in table.items():
        where = f"{source}: [providers.{name}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where} must be a table")
        unknown = set(entry) - _PROVIDER_KEYS
        if unknown:
            raise ConfigError(
                f"{where}: unknown keys {sorted(unknown)}; allowed: {sorted(_PROVIDER_KEYS)}"
            )
        kind = entry.get("kind")
        if not isinstance(kind, str) or not kind:
            raise ConfigError(f"{where}: 'kind' is required (znet, barakat, apstore or json_http)")
        base_url = entry.get("base_url")
        if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
            raise ConfigError(
                f"{where}: 'base_url' is required and must start with http:// or https://"
            )
        ids = entry.get("provider_ids", [name])
        if not isinstance(ids, list) or not ids or not all(isinstance(i, str | int) for i in ids):
            raise ConfigError(f"{where}: 'provider_ids' must be a non-empty list of strings")
        provider_ids = tuple(str(i) for i in ids)
        for pid in provider_ids:
            if pid in claimed:
                raise ConfigError(
                    f"{where}: provider id {pid!r} is already served by [providers.{claimed[pid]}]"
                )
            claimed[pid] = name
        options = entry.get("options", {})
        if not isinstance(options, dict):
            raise ConfigError(f"{where}: 'options' must be a table")
        result.append(
            ProviderConfig(
                name=name,
                kind=kind,
                base_url=base_url.rstrip("/"),
                provider_ids=provider_ids,
                limits=_limits(entry.get("limits", {}), where),
                secrets=(
                    _secrets(entry.get("secrets", {}), where, environ) if resolve_secrets else {}
                ),
                options=options,
            )
        )
    return tuple(result)


def _limits(raw: object, where: str) -> ProviderLimits:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: 'limits' must be a table")
    unknown = set(raw) - set(_LIMIT_TYPES)
    if unknown:
        raise ConfigError(
            f"{where}.limits: unknown keys {sorted(unknown)}; allowed: {sorted(_LIMIT_TYPES)}"
        )
    values: dict[str, Any] = {}
    for key, value in raw.items():
        expected = _LIMIT_TYPES[key]
        # TOML has nan and inf; neither is a timeout or a rate (nan <= 0 is False).
        ok = (
            isinstance(value, int | float)
            and not isinstance(value, bool)
            and math.isfinite(value)
            and value > 0
        )
        if expected is int:
            ok = ok and float(value).is_integer()
        if not ok:
            kind = "a whole number" if expected is int else "a number"
            raise ConfigError(f"{where}.limits.{key} = {value!r} is invalid: expected {kind} > 0")
        values[key] = expected(value)
    return ProviderLimits(**values)


def _secrets(raw: object, where: str, environ: Mapping[str, str]) -> dict[str, Secret]:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: 'secrets' must be a table")
    resolved: dict[str, Secret] = {}
    for key, spec in raw.items():
        at = f"{where}.secrets.{key}"
        value: str | None
        if isinstance(spec, str):
            value = spec
        elif isinstance(spec, dict) and len(spec) == 1:
            ((source, ref),) = spec.items()
            if not isinstance(ref, str):
                raise ConfigError(f"{at}: the {source!r} reference must be a string")
            if source == "env":
                value = environ.get(ref)
                if not value:
                    raise ConfigError(f"{at}: environment variable {ref} is not set")
            elif source == "file":
                try:
                    value = Path(ref).read_text(encoding="utf-8").strip()
                except OSError as exc:
                    raise ConfigError(
                        f"{at}: file {ref!r} cannot be read: {exc.strerror}"
                    ) from None
                except UnicodeDecodeError:
                    # The decoder's message quotes the offending byte of the secret.
                    raise ConfigError(f"{at}: file {ref!r} is not UTF-8 text") from None
            elif source == "credential":
                value = read_credential(ref, environ)
                if value is None:
                    raise ConfigError(
                        f"{at}: systemd credential {ref!r} is not available "
                        "(is it in LoadCredential= and CREDENTIALS_DIRECTORY set?)"
                    )
            else:
                raise ConfigError(f"{at}: unknown source {source!r}; use env, file or credential")
        else:
            raise ConfigError(
                f'{at}: expected a string or one of {{ env = "VAR" }}, '
                '{ file = "/path" }, { credential = "name" }'
            )
        if not value:
            raise ConfigError(f"{at} is empty")
        resolved[key] = Secret(value)
    return resolved
