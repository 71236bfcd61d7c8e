"""An adapter's entry in the providers file: its options, checked, and its Transport."""

from __future__ import annotations

from collections.abc import Collection

import structlog

from order_monitor.config import ProviderConfig
from order_monitor.errors import ConfigError
from order_monitor.providers.http import Transport
from order_monitor.providers.limits import client_timeout

log = structlog.get_logger()

#: Longest piece of a provider's body that goes into a log line or an error.


def where(config: ProviderConfig) -> str:
    return f"[providers.{config.name}]"


def check_keys(
    config: ProviderConfig,
    options: Collection[str],
    required_secrets: Collection[str],
    optional_secrets: Collection[str] = (),
) -> None:
    """Refuse unknown option or secret keys and missing secrets, naming the key.

    A misspelt key would otherwise be silently ignored and its default used.
    """
    unknown = set(config.options) - set(options)
    if unknown:
        raise ConfigError(
            f"{where(config)}.options: unknown keys {sorted(unknown)}; allowed: {sorted(options)}"
        )
    allowed_secrets = set(required_secrets) | set(optional_secrets)
    unknown = set(config.secrets) - allowed_secrets
    if unknown:
        raise ConfigError(
            f"{where(config)}.secrets: unknown keys {sorted(unknown)}; "
            f"allowed: {sorted(allowed_secrets)}"
        )
    for name in required_secrets:
        if not config.secrets.get(name):
            raise ConfigError(f"{where(config)}.secrets.{name} is required")


def option_bool(config: ProviderConfig, key: str, default: bool) -> bool:
    value = config.options.get(key, default)
    if not isinstance(value, bool):
        raise ConfigError(f"{where(config)}.options.{key} = {value!r}: expected true or false")
    return value


def option_int(config: ProviderConfig, key: str, default: int, *, minimum: int = 1) -> int:
    value = config.options.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(
            f"{where(config)}.options.{key} = {value!r}: expected a whole number >= {minimum}"
        )
    return value


def option_str(
    config: ProviderConfig, key: str, default: str | None = None, *, allow_empty: bool = False
) -> str:
    value = config.options.get(key, default)
    if value is None:
        raise ConfigError(f"{where(config)}.options.{key} is required")
    if not isinstance(value, str) or (not value and not allow_empty):
        raise ConfigError(f"{where(config)}.options.{key} = {value!r}: expected a non-empty string")
    return value


def transport(config: ProviderConfig, secret_params: Collection[str] = ()) -> Transport:
    return Transport(
        provider=config.name,
        max_body=config.limits.max_body,
        secret_params=frozenset(p.lower() for p in secret_params),
        secrets=tuple(config.secrets.values()),
        timeout=client_timeout(config.limits),
    )
