"""Measuring: orders committed and completed, CPU used, COMMIT to the provider's first request."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import resource
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
from prometheus_client import Histogram

from common.daemon import PROVIDER_ID, daemon_settings, running, until_idle, wait_finished
from common.report import BENCH, percentile
from common.services import Fake, Server
from order_monitor.engine.policy import BackoffPolicy
from order_monitor.metrics import counter_total


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
    goes busy (reads what changed) within a fraction of a second.
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
                _, apps = await start_app_writers(dsn, prefix, rate, seconds, outs, lead=1.0)
                for app in apps:
                    if await app.wait() != 0:
                        raise RuntimeError("an application process failed")
                written = [json.loads(out.read_text()) for out in outs]
                count = sum(len(w["commits"]) for w in written)
                await wait_finished(daemon, count, within=60 + count / 500)
            # How the orders reached the daemon: NOTIFY while it held its idle
            # lock, its reads of what changed once the rate made it let go.
            handoff = {
                "notified": counter_total(daemon.metrics.notifications, result="accepted"),
                "from_reads": counter_total(daemon.metrics.busy_read_orders, result="taken"),
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


async def start_app_writers(
    dsn: str,
    prefix: str,
    rate: float | None,
    seconds: float,
    outs: list[Path],
    *,
    lead: float = 1.0,
) -> tuple[float, list[asyncio.subprocess.Process]]:
    """Start ``len(outs)`` processes of ``bench/app_writer.py``, one connection each.

    As :func:`commit_to_request` runs them: at a *rate* they share one
    timetable (writer k takes every k-th slot) for *seconds*; with
    ``rate=None`` each commits as fast as it can for *seconds*. They start
    together, *lead* seconds (plus 0.2 s a writer) from now, once connected.
    Writer k's references are ``<prefix>.w<k>.<n>`` (``<prefix>.<n>`` for one
    writer); each writes its COMMIT times to its *outs* file on exit.
    Returns the ``time.time()`` at which they start, and the processes.
    """
    writers = len(outs)
    start_at = time.time() + lead + 0.2 * writers
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
    return start_at, apps


def histogram_totals(histogram: Histogram) -> tuple[float, float]:
    """An unlabelled Histogram's (sum of observations, number of observations) so far."""
    total = count = 0.0
    for metric in histogram.collect():
        for sample in metric.samples:
            if sample.name.endswith("_sum"):
                total = sample.value
            elif sample.name.endswith("_count"):
                count = sample.value
    return total, count
