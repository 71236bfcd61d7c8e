"""From a providers-file entry to a ready :class:`LimitedProvider`.

Each adapter module exposes ``build(config: ProviderConfig) -> Adapter``. They
are imported only when a provider of that kind is configured, so a daemon
serving barakat alone never imports the others, and an adapter with a broken
optional dependency cannot stop the rest.
"""

from __future__ import annotations

import asyncio
import importlib
import time
from collections.abc import Callable, Mapping
from typing import Final, cast

import aiohttp

from order_monitor.config import ProviderConfig, Settings
from order_monitor.errors import ConfigError
from order_monitor.metrics import Metrics
from order_monitor.providers.base import Adapter, Provider
from order_monitor.providers.limits import LimitedProvider

#: kind (as written in the providers file) -> adapter module.
KINDS: Final[dict[str, str]] = {
    "znet": "order_monitor.providers.znet",
    "barakat": "order_monitor.providers.barakat",
    # apstore is another deployment of the barakat API.
    "apstore": "order_monitor.providers.barakat",
    "json_http": "order_monitor.providers.json_http",
    # The in-repo fake provider speaks the barakat protocol (and znet's, for kind = "znet").
    "fake": "order_monitor.providers.barakat",
}


def build_adapter(config: ProviderConfig) -> Adapter:
    """The adapter for *config*; ConfigError for an unknown or unavailable kind."""
    module_name = KINDS.get(config.kind.lower())
    if module_name is None:
        raise ConfigError(
            f"[providers.{config.name}]: unknown kind {config.kind!r}; "
            f"valid kinds: {', '.join(sorted(KINDS))}"
        )
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name:
            raise  # the adapter exists but one of its own imports is missing: a real bug
        raise ConfigError(
            f"[providers.{config.name}]: kind {config.kind!r} is not available in this "
            f"installation (module {module_name} is missing)"
        ) from None
    build = getattr(module, "build", None)
    if not callable(build):
        raise ConfigError(
            f"[providers.{config.name}]: module {module_name} has no build(config) function"
        )
    return cast(Adapter, build(config))


def build_provider(
    config: ProviderConfig,
    *,
    session: aiohttp.ClientSession,
    session_limit: asyncio.Semaphore,
    metrics: Metrics,
    clock: Callable[[], float] = time.monotonic,
) -> LimitedProvider:
    """A provider ready for the checker: adapter + limits + the shared session.

    *session_limit* is the daemon-wide semaphore (ORDER_MONITOR_CONCURRENCY)
    that every provider shares; pass the same object to every call.
    """
    return LimitedProvider(
        config.name,
        build_adapter(config),
        config.limits,
        session=session,
        session_limit=session_limit,
        metrics=metrics,
        secrets=config.secrets.values(),
        clock=clock,
    )


ProviderFactory = Callable[
    [Settings, aiohttp.ClientSession, asyncio.Semaphore, Metrics], Mapping[str, Provider]
]


def build_providers(
    settings: Settings,
    session: aiohttp.ClientSession,
    session_limit: asyncio.Semaphore,
    metrics: Metrics,
) -> dict[str, Provider]:
    """Every configured provider, keyed by each provider id it serves."""
    by_id: dict[str, Provider] = {}
    for config in settings.providers:
        provider = build_provider(
            config, session=session, session_limit=session_limit, metrics=metrics
        )
        for provider_id in config.provider_ids:
            by_id[provider_id] = provider
    return by_id


def validate_providers(settings: Settings) -> None:
    """Build every configured adapter once: a bad option is a ConfigError now."""
    for config in settings.providers:
        build_adapter(config)
