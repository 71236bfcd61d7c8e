"""load_settings: every setting read and validated at once, into one Settings."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import fields, replace
from pathlib import Path
from typing import Final

from order_monitor.config.actions import (
    action_columns,
    delivered_columns,
    delivered_outcomes,
    parse_actions,
)
from order_monitor.config.environment import (
    PREFIX,
    READ_ELSEWHERE,
    Env,
    load_environment,
    unknown_variables,
)
from order_monitor.config.providers_file import parse_providers, read_document
from order_monitor.config.secrets import read_dsn, read_page_token
from order_monitor.config.settings import (
    ActionConfig,
    Columns,
    Layout,
    OutcomeWrites,
    ProviderConfig,
    Settings,
)
from order_monitor.engine.policy import MAX_ATTEMPTS_LIMIT, BackoffPolicy
from order_monitor.errors import ConfigError

DEFAULT_PROVIDERS_FILE: Final = Path("/etc/order-monitor/providers.toml")


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
    providers, actions = (
        load_providers_file(providers_path, values, resolve_secrets=need_provider_secrets)
        if providers_path
        else ((), ())
    )
    _check_actions(actions, writes, layout, source=str(providers_path))
    writes = replace(
        writes, deliver=delivered_outcomes(actions), deliver_columns=delivered_columns(actions)
    )
    settings = Settings(
        dsn=read_dsn(env, values, required=need_database),
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
        # "inbox" is the name this setting had while versions 2 to 4's
        # trigger put ids in an inbox table: the same choice, never to NOTIFY.
        handoff=env.choice("HANDOFF", "auto", ("auto", "scan", "inbox")).replace("inbox", "scan"),
        capture=env.choice("CAPTURE", "trigger", ("trigger", "decoding")),
        providers_file=providers_path,
        providers=providers,
        actions=actions,
        log_level=env.choice("LOG_LEVEL", "info", ("debug", "info", "warning", "error")),
        log_format=env.choice("LOG_FORMAT", "auto", ("auto", "json", "console")),
        http_listen=_http_listen(env),
        page_token=read_page_token(env, values),
        # Every viewer shares one reading per refresh: a second apart at most.
        page_refresh=env.duration("PAGE_REFRESH", 5.0, minimum=1.0, maximum=300.0),
    )
    return replace(
        settings,
        unknown_variables=unknown_variables(values, env.asked | READ_ELSEWHERE | set(also_known)),
    )


def load_providers_file(
    path: Path, environ: Mapping[str, str], *, resolve_secrets: bool = True
) -> tuple[tuple[ProviderConfig, ...], tuple[ActionConfig, ...]]:
    """The providers file's providers and actions (``resolve_secrets`` as for load_settings)."""
    document = read_document(path)
    source = str(path)
    return (
        parse_providers(document, environ, source=source, resolve_secrets=resolve_secrets),
        parse_actions(document, environ, source=source, resolve_secrets=resolve_secrets),
    )


def _check_actions(
    actions: tuple[ActionConfig, ...], writes: OutcomeWrites, layout: Layout, *, source: str
) -> None:
    """What the actions cannot do together with the environment's settings."""
    by_outcome = {outcome: action for action in actions for outcome in action.outcomes}
    for outcome, variable, status, consequence in (
        (
            "done",
            "DONE_STATUS",
            writes.done_status,
            "an approved order's wallet record is never marked approved",
        ),
        ("failed", "FAILED_STATUS", writes.failed_status, "a rejected order is never refunded"),
    ):
        action = by_outcome.get(outcome)
        if action is None or status is None:
            continue
        # The application's transition runs only from a pending order: with
        # the status already written it would refuse (or skip) every one.
        raise ConfigError(
            f"{PREFIX}{variable}={status!r} sets status in SQL, which skips the "
            f"application's own transition ({consequence}), and {source}: [actions.{action.name}] "
            f"delivers {outcome} results through the application: keep one — unset "
            f"{PREFIX}{variable} or take {outcome!r} out of [actions.{action.name}] outcomes"
        )
    pin = layout.columns.pin_code
    for action in actions:
        if pin in action_columns(action):
            raise ConfigError(
                f"{source}: [actions.{action.name}] uses the column {pin!r}, the PIN column "
                f"({PREFIX}COLUMN_PIN_CODE): a PIN never goes into the outbox, nor to the "
                "application by this road"
            )


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
