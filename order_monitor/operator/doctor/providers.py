"""Each provider answers a real status request about a reference no order carries."""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from typing import Final

import aiohttp

from order_monitor import __version__
from order_monitor.config import ProviderConfig, Settings
from order_monitor.engine.decisions import describe_outcome
from order_monitor.errors import OrderMonitorError, ProviderAuthError, ProviderError
from order_monitor.metrics import Metrics
from order_monitor.operator.findings import Emit, Verdict
from order_monitor.providers.base import OrderRef, Outcome, RateLimited
from order_monitor.providers.limits import request_budget
from order_monitor.providers.registry import build_provider
from order_monitor.redaction import redact_url, scrub

#: The reference asked about when probing a provider: no order carries it.
PROBE_REFERENCE: Final = "order-monitor-doctor"
PROBE_ORDER_ID: Final = uuid.UUID("00000000-0000-4000-8000-0000000d0c70")


async def check_providers(settings: Settings, emit: Emit) -> None:
    if not settings.providers:
        emit(
            Verdict.WARN,
            "providers",
            "no providers configured (set ORDER_MONITOR_PROVIDERS_FILE, or create "
            "/etc/order-monitor/providers.toml): no order will be checked",
        )
        return
    source = str(settings.providers_file) if settings.providers_file else "providers file"
    emit(
        Verdict.PASS,
        "providers",
        f"{source} parsed: {', '.join(p.name for p in settings.providers)}",
    )
    async with aiohttp.ClientSession(
        headers={"User-Agent": f"order-monitor/{__version__} (doctor)"}
    ) as session:
        metrics = Metrics()
        results = await asyncio.gather(
            *(probe(config, session, metrics) for config in settings.providers)
        )
    for verdict, detail, config in results:
        emit(verdict, f"provider {config.name}", detail)


async def probe(
    config: ProviderConfig, session: aiohttp.ClientSession, metrics: Metrics
) -> tuple[Verdict, str, ProviderConfig]:
    """One real status request for a reference no order carries.

    The provider is built exactly as the daemon builds it; the request goes to
    its adapter directly (not through the limits wrapper, which turns every
    failure into an ERROR outcome) so that refused credentials can be told
    apart from an unreachable host. It is bounded by the same time budget.
    """
    where = f"{config.kind} at {redact_url(config.base_url, set())}"
    try:
        provider = build_provider(
            config, session=session, session_limit=asyncio.Semaphore(1), metrics=metrics
        )
    except OrderMonitorError as exc:
        return Verdict.FAIL, f"{exc}", config
    hidden = [secret.reveal() for secret in config.secrets.values()]
    budget = request_budget(config.limits)
    started = time.monotonic()
    order = OrderRef(PROBE_ORDER_ID, PROBE_REFERENCE)
    try:
        async with asyncio.timeout(budget):
            answered = await provider.adapter.fetch(session, [order])
    except ProviderAuthError as exc:
        return (
            Verdict.FAIL,
            f"{where} refused us: {scrub(str(exc), hidden)} — check credentials / IP whitelist",
            config,
        )
    except RateLimited as exc:
        return (
            Verdict.WARN,
            f"{where} is reachable but asked us to wait ({scrub(str(exc), hidden)})",
            config,
        )
    except TimeoutError:
        return (
            Verdict.FAIL,
            f"{where} did not answer within {budget:g} s (limits.connect_timeout + "
            "read_timeout) — check base_url, DNS, the firewall and the provider's status",
            config,
        )
    except ProviderError as exc:
        text = scrub(str(exc), hidden)
        if re.search(r": HTTP 2\d\d: ", text):
            # A well-formed error answer: the provider was reached and read our
            # request. Some say "not found" this way; some say "bad credentials".
            return (
                Verdict.WARN,
                f"{where} answered with an error for the test reference "
                f"{PROBE_REFERENCE!r}: {text} — fine if that is its 'not found'; if it "
                "says the credentials are wrong, fix them (and list the code in "
                "options.auth_codes)",
                config,
            )
        return Verdict.FAIL, f"{where}: {text}", config
    except Exception as exc:  # an adapter bug must not hide the other providers' lines
        text = scrub(" ".join(str(exc).split()), hidden) or type(exc).__name__
        return Verdict.FAIL, f"{where}: unexpected {type(exc).__name__}: {text}", config
    elapsed_ms = (time.monotonic() - started) * 1000
    outcome = answered.get(order.order_id) or Outcome.unknown()
    return (
        Verdict.PASS,
        f"{where} answered in {elapsed_ms:.0f} ms ({describe_outcome(outcome)} for the test "
        f"reference {PROBE_REFERENCE!r})",
        config,
    )
