"""first-check: is every order's first check at its slot, whichever way it reached the daemon?

The first check of an order is due at its dispatch time ("sentAt") plus the
first gap of the policy: ``INITIAL_DELAY`` with the order's own jitter (up
to ±10 %, derived from its id: ``BackoffPolicy.next_slot(id, None)``). A
busy daemon finds orders by reading what changed every
``min(INITIAL_DELAY / 10, 1 s)`` (``engine.changes.read_interval``), so an
order is found well before its slot; this part measures whether the check
then happens at the slot, at several dispatch rates.

For each rate: a fresh database, the daemon (``bench/common``: production
settings, the policy's ``initial_delay`` from ``--initial-delay``), idle when
the application starts (it holds the idle lock, as a quiet shop's daemon does
when a burst begins); ``bench/app_writer.py`` processes insert dispatched
orders one per transaction (references ``d0.…``: the fake answers "done" at
the first request, so each order is checked once). After the last COMMIT the
daemon is given until every order is finished, or until the last order's
latest possible slot plus a grace (``GRACE_S`` and a millisecond an order).
Then, per order: its row's "sentAt" (the server's clock) and id, the fake's
first request for its reference (``time.time()`` on the same machine), and

* lateness = first request - ("sentAt" + the order's first slot offset);
  negative = early. A batched provider's request that goes out anyway takes
  orders whose slot is at most ``PULL_SHARE`` (10 %) of their gap ahead
  (``Scheduler.pull_open``), so a check up to a tenth of INITIAL_DELAY early is
  the design; earlier than that (``before_pull_window``) is not;
* the same against "sentAt" + INITIAL_DELAY without the jitter
  (``vs_nominal``): off by up to ±10 % of INITIAL_DELAY by construction;
* missed: orders never requested by the end.

How the orders reached the daemon: ``order_monitor_notifications_total
{result="accepted"}`` (NOTIFY, while it held the idle lock) against
``order_monitor_busy_read_orders_total{result="taken"}`` (its reads while
busy), its switches to busy, and the share of the dispatch time it spent busy
(its mode sampled every 50 ms).

With the ``decoding`` variant (the server has wal_level = logical): the same
rates on a database deployed for ``ORDER_MONITOR_CAPTURE=decoding``
(``databases.install_decoding``: no trigger), the daemon reading the slot at
the same interval; it has no idle lock, so the writers start once its slot
has confirmed everything written before (the deploy), and the orders come by
``order_monitor_decoding_orders_total{result="taken"}`` (``from_reads``).

Why 5 s by default, when the shipped INITIAL_DELAY is 60 s: what could make an
order late is how long it waits to be found, and that is the read interval,
``min(INITIAL_DELAY / 10, 1 s)``: 0.5 s at 5 s, 1 s at 60 s, either way well
within the slot's one-second budget; the checks themselves go out when due
whatever the delay. At 5 s a rate's run lasts its dispatch plus about 6 s
instead of plus a minute. ``--initial-delay 60`` measures the shipped value
(the read interval then 1 s: the worst case of the rule).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import psycopg

# bench/common: bench/ is on sys.path, bench/trigger.py being run as a script.
from common import (
    Fake,
    Server,
    cpu_meter,
    daemon_settings,
    finished,
    percentile,
    running,
    say,
    start_app_writers,
    until_idle,
)
from psycopg import sql

from order_monitor.daemon import Daemon
from order_monitor.engine.changes import read_interval
from order_monitor.engine.handoff import Mode
from order_monitor.engine.policy import BackoffPolicy
from order_monitor.metrics import counter_total
from trigger_bench.databases import install_decoding, slot_caught_up
from trigger_bench.setup import DECODING, LAYOUT, NAMES, Plan

#: After the last order's latest possible slot, how long the daemon is given
#: to check what is left before those orders count as missed.
GRACE_S = 10.0


class ModeSampler:
    """The daemon's handoff mode, sampled every *every* seconds until stopped."""

    def __init__(self, daemon: Daemon, every: float = 0.05) -> None:
        self.daemon = daemon
        self.every = every
        self.samples: list[tuple[float, bool]] = []
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            handoff = self.daemon.handoff
            busy = handoff is not None and handoff.mode is Mode.BUSY
            self.samples.append((time.monotonic(), busy))
            await asyncio.sleep(self.every)

    def start(self) -> None:
        self.samples.clear()
        self._task = asyncio.create_task(self._run(), name="mode-sampler")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def busy_share(self, start: float | None = None, end: float | None = None) -> float | None:
        """The share of samples taken between *start* and *end* (monotonic) in busy mode."""
        within = [
            busy
            for at, busy in self.samples
            if (start is None or at >= start) and (end is None or at <= end)
        ]
        return sum(within) / len(within) if within else None


def handoff_counts(daemon: Daemon) -> dict[str, float]:
    m = daemon.metrics
    if daemon.settings.capture == "decoding":
        return {
            "notified": 0.0,
            "from_reads": counter_total(m.decoding_orders, result="taken"),
            "read_known": counter_total(m.decoding_orders, result="known"),
            "switches_to_busy": 0.0,
            "switches_to_idle": 0.0,
        }
    return {
        "notified": counter_total(m.notifications, result="accepted"),
        "from_reads": counter_total(m.busy_read_orders, result="taken"),
        "read_known": counter_total(m.busy_read_orders, result="known"),
        "switches_to_busy": counter_total(m.handoff_switches, to="busy"),
        "switches_to_idle": counter_total(m.handoff_switches, to="idle"),
    }


async def dispatched_rows(dsn: str, prefix: str) -> dict[str, tuple[int, float]]:
    """reference -> (the order's key, "sentAt" as seconds since the epoch), for the run's orders."""
    c = LAYOUT.columns
    query = sql.SQL(
        "SELECT {ref}, {id}, extract(epoch FROM {sent})::float8 FROM {table} WHERE {ref} LIKE %s"
    ).format(
        ref=sql.Identifier(c.provider_ref),
        id=sql.Identifier(c.id),
        sent=sql.Identifier(c.sent_at),
        table=NAMES.table,
    )
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cursor = await conn.execute(query, (prefix + ".%",))
        return {ref: (id_.int, sent) for ref, id_, sent in await cursor.fetchall()}


def lateness(
    rows: dict[str, tuple[int, float]], polls: dict[str, list[float]], policy: BackoffPolicy
) -> dict[str, Any]:
    """Each order's first request against its first slot (see the module docstring)."""
    late: list[float] = []
    nominal: list[float] = []
    early = before_pull = 0
    missed: list[str] = []
    for ref, (key, sent) in rows.items():
        times = polls.get(ref)
        if not times:
            missed.append(ref)
            continue
        slot = policy.next_slot(key, None)
        assert slot is not None  # a policy always has a first slot
        first = min(times)
        late.append(first - (sent + slot.offset))
        nominal.append(first - (sent + policy.initial_delay))
        if first < sent + slot.offset:
            early += 1
        if first < sent + slot.pull_from:
            before_pull += 1

    def stats(values: list[float]) -> dict[str, float]:
        return {
            "p50_s": percentile(values, 0.5),
            "p90_s": percentile(values, 0.9),
            "p99_s": percentile(values, 0.99),
            "max_s": max(values) if values else float("nan"),
            "min_s": min(values) if values else float("nan"),
        }

    return {
        "measured": len(late),
        **stats(late),
        "early": early,
        "before_pull_window": before_pull,
        "late_over_1s": sum(1 for x in late if x > 1.0),
        "missed": len(missed),
        "missed_examples": sorted(missed)[:5],
        "checked_twice_or_more": sum(1 for ref in rows if len(polls.get(ref, ())) > 1),
        "vs_nominal": stats(nominal),
    }


async def first_check(
    server: Server,
    fake: Fake,
    rate: float | None,
    seconds: float,
    initial_delay: float,
    *,
    writers: int = 1,
    variant: str = "ours",
) -> dict[str, Any]:
    """One rate (None: *writers* flat out): every order's first check against its slot."""
    decoding = variant == DECODING
    tag = (f"{int(rate)}" if rate is not None else f"max{writers}") + ("d" if decoding else "")
    prefix = f"d0.fc{tag}"
    if decoding:
        dsn = await asyncio.to_thread(install_decoding, server, f"fc{tag}")
    else:
        dsn = server.fresh(f"fc{tag}")
    await fake.reset()
    policy = BackoffPolicy(initial_delay=initial_delay)
    settings = daemon_settings(dsn, fake.url, policy)
    if decoding:
        settings = replace(settings, capture="decoding")
    sampler_start = sampler_end = 0.0
    with tempfile.TemporaryDirectory(prefix="om-bench-fc-") as tmp:
        outs = [Path(tmp) / f"commits-{k}.json" for k in range(writers)]
        async with running(settings) as daemon:
            if decoding:
                # No idle lock: ready once the slot has read past the deploy.
                await slot_caught_up(dsn, 120.0)
                idle_at_start = True
            else:
                idle_at_start = await until_idle(daemon, 15.0)
            before = handoff_counts(daemon)
            sampler = ModeSampler(daemon)
            sampler.start()
            with cpu_meter(fake) as cpu:
                start_at, apps = await start_app_writers(dsn, prefix, rate, seconds, outs)
                sampler_start = time.monotonic() + (start_at - time.time())
                for app in apps:
                    if await app.wait() != 0:
                        raise RuntimeError("an application process failed")
                sampler_end = time.monotonic()
                written = [json.loads(out.read_text()) for out in outs]
                count = sum(len(w["commits"]) for w in written)
                last_commit = max(max(w["commits"].values(), default=0.0) for w in written)
                # The latest any order's first slot can be, then the grace.
                deadline = (
                    last_commit + initial_delay * (1 + policy.jitter) + GRACE_S + count / 1000
                )
                while finished(daemon) < count:
                    if time.time() > deadline:
                        break  # what is left counts as missed
                    await asyncio.sleep(0.1)
                waited = time.time() - last_commit
            await sampler.stop()
            after = handoff_counts(daemon)
    rows = await dispatched_rows(dsn, prefix)
    polls = await fake.polls(prefix)
    elapsed = max(w["elapsed_s"] for w in written)
    result: dict[str, Any] = {
        "variant": variant,
        "rate": rate,
        "writers": writers,
        "initial_delay_s": initial_delay,
        "busy_read_interval_s": read_interval(initial_delay, 0.0),
        "orders": count,
        "rows": len(rows),
        "achieved_rate": count / elapsed,
        "late_starts": sum(w["late_starts"] for w in written),
        "daemon_idle_at_start": idle_at_start,
        # decoding: no handoff, no busy mode (it reads the slot throughout).
        "busy_share_while_dispatching": (
            None if decoding else sampler.busy_share(sampler_start, sampler_end)
        ),
        "waited_after_last_commit_s": waited,
        **lateness(rows, polls, policy),
        **{name: after[name] - before[name] for name in after},
        **cpu,
    }
    return result


async def first_check_series(
    plan: Plan, server: Server, fake: Fake, variant: str = "ours"
) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for rate, writers in [*plan.first_check_rates, (None, plan.max_writers)]:
        what = f"{rate:g}/s, {writers} writer(s)" if rate else f"max, {writers} writers flat out"
        say(
            f"first check at its slot ({variant}): {what}, {plan.first_check_seconds:g} s,"
            f" initial_delay {plan.initial_delay:g} s"
        )
        r = await first_check(
            server,
            fake,
            rate,
            plan.first_check_seconds,
            plan.initial_delay,
            writers=writers,
            variant=variant,
        )
        say(
            f"  {r['achieved_rate']:,.0f} orders/s reached, {r['orders']:,} orders;"
            f" late p50 {r['p50_s']:.3f} s, p99 {r['p99_s']:.3f} s, max {r['max_s']:.3f} s;"
            f" {r['early']:,} early ({r['before_pull_window']} before the pull window),"
            f" {r['missed']:,} missed; {r['notified']:,.0f} by NOTIFY,"
            f" {r['from_reads']:,.0f} "
            + ("read from the slot" if variant == DECODING else "read while busy")
        )
        out.append(r)
    return out
