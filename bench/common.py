"""What the benchmark scenarios share: the server, the fake provider, the daemon, the measuring.

``bench/run.py`` and ``bench/trigger.py`` import this module (they are run as
scripts, so ``bench/`` is on ``sys.path``). Helpers live here once a second
scenario needs them; a scenario's own code stays in its module.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

import order_monitor
from order_monitor import schema
from order_monitor.config import Layout, ProviderConfig, ProviderLimits, Settings
from order_monitor.daemon import Daemon
from order_monitor.engine.handoff import Mode
from order_monitor.engine.policy import BackoffPolicy
from order_monitor.engine.scheduler import Scheduler
from order_monitor.metrics import counter_total
from order_monitor.redaction import Secret

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"


def write_report(
    report: dict[str, Any], started: dt.datetime, *, prefix: str = "", out: Path | None = None
) -> Path:
    """Write *report* to *out*, else to ``bench/results/<prefix><UTC timestamp>.json``."""
    path = out or RESULTS / f"{prefix}{started.strftime('%Y%m%dT%H%M%SZ')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    return path


REFERENCE_DDL = Path(order_monitor.__file__).with_name("product_orders.sql")
TOKEN = "bench-token"
PROVIDER_ID = "bench"

# Production settings, except where a scenario says otherwise.
PROVIDER_LIMITS = ProviderLimits()  # concurrency 8 per provider, as shipped
_DEFAULTS = Settings(dsn=Secret(""))
CONCURRENCY = _DEFAULTS.concurrency  # 64 requests under way, all providers together
BATCH_SIZE = _DEFAULTS.batch_size  # 500 orders a batch and a sweep page


# --- plumbing --------------------------------------------------------------------------


def say(text: str) -> None:
    sys.stderr.write(f"[{time.strftime('%H:%M:%S')}] {text}\n")
    sys.stderr.flush()


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (0..1) by linear interpolation; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    position = (len(ordered) - 1) * q
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


class Server:
    """The Postgres server: databases cloned from a template with table and install."""

    def __init__(self, admin_dsn: str) -> None:
        self.admin_dsn = admin_dsn
        self.template = f"om_bench_tpl_{os.getpid()}"
        self._made: list[str] = []

    def admin(self, query: sql.Composed) -> None:
        with psycopg.connect(self.admin_dsn, autocommit=True) as conn:
            conn.execute(query)

    def setup(self) -> None:
        self.admin(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(self.template)))
        self._made.append(self.template)
        with psycopg.connect(self.dsn(self.template), autocommit=True) as conn:
            conn.execute(REFERENCE_DDL.read_text().encode())
            for statement in schema.install_statements(Layout()):
                conn.execute(statement.query)

    def dsn(self, name: str) -> str:
        return make_conninfo(self.admin_dsn, dbname=name)

    def fresh(self, label: str) -> str:
        """A new database cloned from the template (the table, our install applied)."""
        name = f"om_bench_{label}_{uuid.uuid4().hex[:6]}"
        self.admin(
            sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                sql.Identifier(name), sql.Identifier(self.template)
            )
        )
        self._made.append(name)
        return self.dsn(name)

    def empty(self, label: str) -> str:
        """A new database with nothing in it (dropped with the others)."""
        name = f"om_bench_{label}_{uuid.uuid4().hex[:6]}"
        self.admin(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        self._made.append(name)
        return self.dsn(name)

    def drop_all(self) -> None:
        for name in reversed(self._made):
            with contextlib.suppress(psycopg.Error):
                self.admin(
                    sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
                )
        self._made.clear()

    def describe(self) -> dict[str, Any]:
        info: dict[str, Any] = {}
        with psycopg.connect(self.admin_dsn, autocommit=True) as conn:
            for name in (
                "server_version",
                "shared_buffers",
                "synchronous_commit",
                "fsync",
                "wal_level",
                "max_connections",
            ):
                row = conn.execute(sql.SQL("SHOW {}").format(sql.Identifier(name))).fetchone()
                info[name] = str(row[0]) if row else "?"
        return info


class Fake:
    """bench/fake_server.py in a subprocess."""

    def __init__(self, latency: float = 0.0) -> None:
        self.latency = latency
        self.process: subprocess.Popen[str] | None = None
        self.url = ""

    def start(self) -> str:
        self.process = subprocess.Popen(
            [
                sys.executable,
                str(BENCH / "fake_server.py"),
                "--token",
                TOKEN,
                "--latency",
                str(self.latency),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line.startswith("READY "):
            raise RuntimeError(f"the fake provider did not start: {line!r}")
        self.url = line.split()[1]
        return self.url

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)
            self.process = None

    def cpu_seconds(self) -> float:
        """User + system CPU time the fake's process has used so far."""
        assert self.process is not None
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks = os.sysconf("SC_CLK_TCK")
        return (int(fields[11]) + int(fields[12])) / ticks

    async def get(self, session: aiohttp.ClientSession, path: str, **params: str) -> Any:
        async with session.get(self.url + path, params=params) as response:
            response.raise_for_status()
            return await response.json()

    async def polls(self, prefix: str) -> dict[str, list[float]]:
        async with aiohttp.ClientSession() as session:
            result: dict[str, list[float]] = await self.get(session, "/_bench/polls", prefix=prefix)
            return result

    async def requests(self) -> int:
        async with aiohttp.ClientSession() as session:
            return int((await self.get(session, "/_bench/stats"))["requests"])

    async def reset(self) -> None:
        async with (
            aiohttp.ClientSession() as session,
            session.post(self.url + "/_bench/reset") as response,
        ):
            response.raise_for_status()


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

    It starts busy (reading the inbox) and goes idle after a calm window.
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


async def insert_dispatched(dsn: str, prefix: str, count: int) -> dt.datetime:
    """Commit *count* dispatched orders in one transaction; return the COMMIT time (server clock).

    The trigger queues one NOTIFY per row; all are delivered at COMMIT.
    """
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        await conn.execute(
            """INSERT INTO product_orders
                   (provider_referans, "providerId", "externalStatus", "sentAt")
               SELECT %s || '.' || g, %s, 'sent', now() FROM generate_series(1, %s) g""",
            (prefix, PROVIDER_ID, count),
        )
        cursor = await conn.execute("SELECT clock_timestamp()")
        row = await cursor.fetchone()
        await conn.commit()
    assert row is not None
    at: dt.datetime = row[0]
    return at


async def last_completed(dsn: str, prefix: str) -> dt.datetime:
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cursor = await conn.execute(
            'SELECT max("completedAt") FROM product_orders WHERE provider_referans LIKE %s',
            (prefix + ".%",),
        )
        row = await cursor.fetchone()
    assert row is not None
    assert row[0] is not None, "no order of the run was completed"
    at: dt.datetime = row[0]
    return at


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@contextlib.contextmanager
def cpu_meter(fake: Fake) -> Iterator[dict[str, float]]:
    """CPU seconds used by this process (the daemon) and the fake during the block."""
    box: dict[str, float] = {}
    own, provider = cpu_seconds(), fake.cpu_seconds()
    try:
        yield box
    finally:
        box["daemon_cpu_s"] = cpu_seconds() - own
        box["fake_cpu_s"] = fake.cpu_seconds() - provider


# --- scenarios ---------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "platform": platform.platform(),
        "psycopg": psycopg.__version__,
        "libpq": psycopg.pq.version(),
        "aiohttp": aiohttp.__version__,
        "loadavg_start": os.getloadavg(),
    }
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                info["memory_gib"] = round(int(line.split()[1]) / 1024**2, 1)
    return info


# --- COMMIT to the provider's first request --------------------------------------------


async def commit_to_request(
    server: Server,
    fake: Fake,
    rate: float | None,
    seconds: float,
    *,
    writers: int = 1,
    label: str | None = None,
) -> dict[str, Any]:
    """COMMIT (the application's processes) to the provider's first request (the fake's).

    A fresh database, the daemon with ``initial_delay=0``; *writers*
    processes of ``bench/app_writer.py``, one connection each, insert one
    dispatched order per transaction. At a *rate*, the writers share one
    timetable (writer k takes every k-th slot), so together they offer
    *rate* orders/s evenly spaced; with ``rate=None`` each commits as fast
    as it can for *seconds*: the application's own maximum on this machine.
    Latency = the fake's first request for a reference minus that
    reference's COMMIT time (``time.time()`` on both sides). The writers
    start once the daemon has gone idle (NOTIFY mode), as a quiet shop's
    daemon is when a burst begins; above the handoff's busy rate it then
    switches to the inbox within a fraction of a second.
    """
    tag = label or (f"{int(rate)}" if rate is not None else f"max{writers}")
    dsn = server.fresh(f"lat{tag}")
    prefix = f"d0.l{tag}"
    await fake.reset()
    policy = BackoffPolicy(initial_delay=0.0)
    with tempfile.TemporaryDirectory(prefix="om-bench-") as tmp:
        outs = [Path(tmp) / f"commits-{k}.json" for k in range(writers)]
        async with running(daemon_settings(dsn, fake.url, policy)) as daemon:
            idle_at_start = await until_idle(daemon, 15.0)
            with cpu_meter(fake) as cpu:
                # Far enough ahead for every writer to start, connect and warm up.
                start_at = time.time() + 1.0 + 0.2 * writers
                apps = []
                for k, out in enumerate(outs):
                    if rate is not None:
                        share = round(rate * seconds / writers)
                        pace = ["--rate", str(rate / writers), "--count", str(share)]
                    else:
                        pace = ["--rate", "0", "--seconds", str(seconds)]
                    offset = k / rate if rate is not None else 0.0
                    apps.append(
                        await asyncio.create_subprocess_exec(
                            sys.executable,
                            str(BENCH / "app_writer.py"),
                            "--dsn",
                            dsn,
                            *pace,
                            "--start-at",
                            str(start_at + offset),
                            "--prefix",
                            f"{prefix}.w{k}" if writers > 1 else prefix,
                            "--out",
                            str(out),
                        )
                    )
                for app in apps:
                    if await app.wait() != 0:
                        raise RuntimeError("an application process failed")
                written = [json.loads(out.read_text()) for out in outs]
                count = sum(len(w["commits"]) for w in written)
                await wait_finished(daemon, count, within=60 + count / 500)
            # How the orders reached the daemon: NOTIFY while it held its idle
            # lock, the inbox table once the rate made it let go.
            handoff = {
                "notified": counter_total(daemon.metrics.notifications, result="accepted"),
                "from_inbox": counter_total(daemon.metrics.inbox_taken),
                "switches_to_busy": counter_total(daemon.metrics.handoff_switches, to="busy"),
            }
    polls = await fake.polls(prefix)
    commits: dict[str, float] = {}
    for w in written:
        commits.update(w["commits"])
    latencies = [(polls[ref][0] - at) * 1000 for ref, at in commits.items() if polls.get(ref)]
    elapsed = max(w["elapsed_s"] for w in written)
    return {
        "rate": rate,
        "writers": writers,
        "orders": count,
        "achieved_rate": count / elapsed,
        "late_starts": sum(w["late_starts"] for w in written),
        "measured": len(latencies),
        "p50_ms": percentile(latencies, 0.5),
        "p90_ms": percentile(latencies, 0.9),
        "p99_ms": percentile(latencies, 0.99),
        "max_ms": max(latencies) if latencies else float("nan"),
        "min_ms": min(latencies) if latencies else float("nan"),
        "daemon_idle_at_start": idle_at_start,
        **handoff,
        **cpu,
    }
