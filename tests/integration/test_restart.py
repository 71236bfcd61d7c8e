"""The daemon as a process: stopped with SIGTERM, killed with SIGKILL, restarted.

Nothing may be missed, no result may change once written, and the backoff
must resume where it stood instead of starting again at attempt 1.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from order_monitor.engine.policy import BackoffPolicy
from order_monitor.providers.fake import FakeProvider, Script, default_pin
from tests.daemon_fixtures import App, eventually

POLICY = BackoffPolicy(
    initial_delay=0.0, base=0.2, cap=1.0, jitter=0.1, max_attempts=200, max_age=3600
)


class DaemonProcess:
    """`order-monitor run` in a child process, its JSON log lines collected."""

    #: The log event that says it started, what it is while waiting for it, and its name.
    ready_event = "listener.connected"
    ready_state = "start listening"
    name = "the daemon"

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.events: list[dict[str, object]] = []
        self.process: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.events = []
        self.process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "order_monitor", "run",
            env=self.env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        self._reader = asyncio.create_task(self._read())
        await eventually(self._ready, within=30, what=f"{self.name} to {self.ready_state}")

    async def _read(self) -> None:
        assert self.process is not None
        assert self.process.stdout is not None
        async for line in self.process.stdout:
            try:
                self.events.append(json.loads(line))
            except json.JSONDecodeError:
                self.events.append({"event": "<not json>", "line": line.decode(errors="replace")})

    async def _ready(self) -> bool:
        if self.process is not None and self.process.returncode is not None:
            pytest.fail(f"{self.name} exited early: {self.events[-5:]}")
        return any(e["event"] == self.ready_event for e in self.events)

    def send(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    async def signal(self, signum: int) -> int:
        assert self.process is not None
        assert self._reader is not None
        self.process.send_signal(signum)
        code = await asyncio.wait_for(self.process.wait(), 30)
        await self._reader
        return code

    def named(self, event: str) -> list[dict[str, object]]:
        return [e for e in self.events if e["event"] == event]


def providers_toml(fake: FakeProvider, name: str = "fake") -> str:
    return f"""
[providers.{name}]
kind = "barakat"
base_url = "{fake.base_url}"
secrets = {{ token = {{ env = "FAKE_TOKEN" }} }}
limits = {{ concurrency = 8, read_timeout = 2, breaker_failures = 50 }}
"""


@pytest.fixture
def daemon_env(db: str, fake: FakeProvider, tmp_path: Path) -> dict[str, str]:
    providers = tmp_path / "providers.toml"
    providers.write_text(providers_toml(fake))
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("ORDER_MONITOR_") and not key.startswith("PG")
    }
    env.update(
        {
            "ORDER_MONITOR_DSN": db,
            "ORDER_MONITOR_PROVIDERS_FILE": str(providers),
            "ORDER_MONITOR_LOG_FORMAT": "json",
            "ORDER_MONITOR_LOG_LEVEL": "info",
            "ORDER_MONITOR_INITIAL_DELAY": str(POLICY.initial_delay),
            "ORDER_MONITOR_BACKOFF_BASE": str(POLICY.base),
            "ORDER_MONITOR_BACKOFF_CAP": str(POLICY.cap),
            "ORDER_MONITOR_BACKOFF_JITTER": str(POLICY.jitter),
            "ORDER_MONITOR_MAX_ATTEMPTS": str(POLICY.max_attempts),
            "ORDER_MONITOR_MAX_AGE": str(POLICY.max_age),
            "ORDER_MONITOR_SWEEP_INTERVAL": "60",
            "ORDER_MONITOR_DRAIN_TIMEOUT": "3",
            "FAKE_TOKEN": "test-token",
        }
    )
    return env


@pytest.mark.slow
async def test_stopped_and_killed_daemons_miss_nothing_and_resume_the_backoff(
    daemon_env: dict[str, str], app: App, fake: FakeProvider
) -> None:
    fake.behaviour.latency = 0.02
    forever = [f"forever-{n}" for n in range(5)]
    for ref in forever:
        fake.set_script(ref, Script.pending())
    waves = [[f"w{w}-{n}" for n in range(100)] for w in range(4)]
    for wave in waves:
        for n, ref in enumerate(wave):
            fake.set_script(ref, Script.done(after=n % 4))

    daemon = DaemonProcess(daemon_env)
    started = time.time()
    await app.dispatch(forever)
    await daemon.start()
    await app.dispatch(waves[0])
    await eventually(lambda: _some_done(app, 30), what="progress before SIGTERM")

    assert await daemon.signal(signal.SIGTERM) == 0
    assert daemon.named("daemon.stopped"), "no clean stop was logged"
    await app.dispatch(waves[1])  # while nothing runs: found by the start sweep

    await daemon.start()
    await app.dispatch(waves[2])
    await eventually(lambda: _some_done(app, 200), what="progress before SIGKILL")
    assert await daemon.signal(signal.SIGKILL) == -signal.SIGKILL
    await app.dispatch(waves[3])

    await daemon.start()
    await eventually(
        lambda: _only_forever_left(app, len(forever)), within=90, what="every order to finish"
    )
    elapsed = time.time() - started
    assert await daemon.signal(signal.SIGTERM) == 0

    rows = await app.rows()
    for wave in waves:
        for n, ref in enumerate(wave):
            assert rows[ref]["externalStatus"] == "done", ref
            assert rows[ref]["pinCode"] == default_pin(ref), ref
            # Script: n % 4 pending answers, then done. A check cut off by a
            # stop or a kill may be repeated: at most one extra per restart.
            assert fake.poll_count(ref) <= n % 4 + 1 + 2, ref

    # The backoff resumed: each never-ending order was polled no more often
    # than its slots allow over the whole run. One extra poll is allowed for
    # the SIGKILL (a check made but never written); a clean stop needs none,
    # because the restart waits for the slot after the last written sync.
    for ref in forever:
        key = rows[ref]["id"].int
        allowed = sum(1 for s in POLICY.slots(key) if s.offset <= elapsed) + 1
        assert fake.poll_count(ref) <= allowed, (ref, fake.poll_count(ref), allowed)
        assert rows[ref]["externalStatus"] == "sent"


async def _some_done(app: App, count: int) -> bool:
    cursor = await app.conn.execute(
        """SELECT count(*) FROM product_orders WHERE "externalStatus" = 'done'"""
    )
    row = await cursor.fetchone()
    return row is not None and row[0] >= count


async def _only_forever_left(app: App, forever: int) -> bool:
    return await app.in_flight() == forever


async def test_sighup_rejects_a_bad_providers_file_and_applies_a_good_one(
    daemon_env: dict[str, str], app: App, fake: FakeProvider
) -> None:
    providers = Path(daemon_env["ORDER_MONITOR_PROVIDERS_FILE"])
    daemon = DaemonProcess(daemon_env)
    await daemon.start()
    await app.dispatch(["late-provider"], provider_id="latecomer")

    providers.write_text(providers_toml(fake) + "\n[providers.broken]\nkind = 'znet'\n")  # noqa: ASYNC240 - a tiny file, in a test
    daemon.send(signal.SIGHUP)
    await eventually(lambda: _logged(daemon, "config.reload_rejected"), what="the rejection")
    (rejected,) = daemon.named("config.reload_rejected")
    assert "[providers.broken]" in str(rejected["error"])
    assert rejected["level"] == "error"

    providers.write_text(providers_toml(fake) + providers_toml(fake, "latecomer"))  # noqa: ASYNC240
    daemon.send(signal.SIGHUP)
    await eventually(lambda: _only_forever_left(app, 0), what="the latecomer's order to finish")
    assert await daemon.signal(signal.SIGTERM) == 0
    assert (await app.rows())["late-provider"]["externalStatus"] == "done"


async def _logged(daemon: DaemonProcess, event: str) -> bool:
    return bool(daemon.named(event))
