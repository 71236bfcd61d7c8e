"""The daemon as the benchmarks run it: production settings, in this process, and waiting for it."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

from common.services import TOKEN
from order_monitor.config import ProviderConfig, ProviderLimits, Settings
from order_monitor.daemon import Daemon
from order_monitor.engine.handoff import Mode
from order_monitor.engine.policy import BackoffPolicy
from order_monitor.engine.scheduler import Scheduler
from order_monitor.metrics import counter_total
from order_monitor.redaction import Secret

PROVIDER_ID = "bench"


# Production settings, except where a scenario says otherwise.
PROVIDER_LIMITS = ProviderLimits()  # concurrency 8 per provider, as shipped


_DEFAULTS = Settings(dsn=Secret(""))


CONCURRENCY = _DEFAULTS.concurrency  # 64 requests under way, all providers together


BATCH_SIZE = _DEFAULTS.batch_size  # 500 orders a batch and a sweep page


def daemon_settings(dsn: str, fake_url: str, policy: BackoffPolicy) -> Settings:
    provider = ProviderConfig(
        name="fake",
        kind="barakat",
        base_url=fake_url,
        provider_ids=(PROVIDER_ID,),
        limits=PROVIDER_LIMITS,
        secrets={"token": Secret(TOKEN)},
        options={},
    )
    # The defaults (batch 500, concurrency 64, sweep every 5 min...): only
    # the policy changes per scenario.
    return Settings(dsn=Secret(dsn), policy=policy, providers=(provider,))


@contextlib.asynccontextmanager
async def running(settings: Settings, scheduler: Scheduler | None = None) -> AsyncIterator[Daemon]:
    """The daemon, running, listening and past its first sweep, until the block ends."""
    daemon = Daemon(settings)
    if scheduler is not None:
        daemon.scheduler = scheduler
    task = asyncio.create_task(daemon.run(), name="daemon")
    try:
        deadline = time.monotonic() + 60
        while not (daemon.listener_connected and daemon.sweeper and daemon.sweeper.completed):
            if task.done():
                task.result()
                raise RuntimeError("the daemon stopped before it was ready")
            if time.monotonic() > deadline:
                raise RuntimeError("the daemon was not ready within 60 s")
            await asyncio.sleep(0.02)
        yield daemon
    finally:
        daemon.request_stop()
        await asyncio.wait_for(task, 120)


async def until_idle(daemon: Daemon, within: float) -> bool:
    """Wait for the daemon to hold its idle lock (the trigger NOTIFYs), as it does when quiet.

    It starts busy (reading what changed) and goes idle after a calm window.
    """
    deadline = time.monotonic() + within
    while daemon.handoff is None or daemon.handoff.mode is not Mode.IDLE:
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


def finished(daemon: Daemon) -> float:
    return counter_total(daemon.metrics.finished)


async def wait_finished(daemon: Daemon, count: int, within: float) -> None:
    deadline = time.monotonic() + within
    while finished(daemon) < count:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {finished(daemon):.0f} of {count} orders finished in time")
        await asyncio.sleep(0.01)
