"""The providers file (TOML): one entry per provider, its limits and its secrets.

The file also holds ``[actions.NAME]`` tables (``config.actions``): they use
the limits and secrets parsers here, and :func:`read_document` to read it.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

from order_monitor.config.secrets import resolve_secret
from order_monitor.config.settings import ProviderConfig, ProviderLimits
from order_monitor.errors import ConfigError
from order_monitor.redaction import Secret

#: The top-level tables of the file.
TOP_LEVEL: Final = ("providers", "actions")
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
    return parse_providers(
        read_document(path), environ, source=str(path), resolve_secrets=resolve_secrets
    )


def read_document(path: Path) -> dict[str, Any]:
    """The providers file as TOML; a ConfigError that quotes none of it when it is not."""
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"providers file {str(path)!r} cannot be read: {exc.strerror}") from None
    except UnicodeDecodeError:
        # Not the decoder's message: it quotes a byte, maybe of a literal secret.
        raise ConfigError(f"providers file {str(path)!r} is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"providers file {str(path)!r} is not valid TOML: {exc}") from None


def parse_providers(
    document: Mapping[str, Any],
    environ: Mapping[str, str],
    *,
    source: str = "providers file",
    resolve_secrets: bool = True,
) -> tuple[ProviderConfig, ...]:
    check_top_level(document, source)
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
                limits=parse_limits(entry.get("limits", {}), where),
                secrets=(
                    parse_secrets(entry.get("secrets", {}), where, environ)
                    if resolve_secrets
                    else {}
                ),
                options=options,
            )
        )
    return tuple(result)


def check_top_level(document: Mapping[str, Any], source: str) -> None:
    unknown_top = set(document) - set(TOP_LEVEL)
    if unknown_top:
        raise ConfigError(
            f"{source}: unknown top-level keys {sorted(unknown_top)}; "
            "expected [providers.NAME] and [actions.NAME] tables"
        )


def parse_limits(raw: object, where: str) -> ProviderLimits:
    """A ``limits`` table (a provider's or an action's): the gates of its requests."""
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


def parse_secrets(raw: object, where: str, environ: Mapping[str, str]) -> dict[str, Secret]:
    """A ``secrets`` table, each value resolved (see ``config.secrets.resolve_secret``)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: 'secrets' must be a table")
    return {
        key: resolve_secret(spec, f"{where}.secrets.{key}", environ) for key, spec in raw.items()
    }
