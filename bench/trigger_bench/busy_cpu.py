"""busy-cpu: what the daemon and the database spend per second while the daemon is busy.

While busy (orders arriving faster than 50/s), the daemon reads the orders
in flight written since its last read, every ``min(INITIAL_DELAY / 10, 1 s)``;
each read walks the partial index of orders in flight and reads each row's
``xmin`` (README, "Why the trigger does not always NOTIFY"), so its cost grows
with the orders in flight. This part measures that, at each of
``--busy-sizes`` (default 1,000, 10,000 and 100,000) orders in flight:

* the ``ours`` database's table holds N orders in flight, loaded with the
  triggers off (``databases.reset``, the ``unrelated`` form's state:
  references ``w.…``, pending for ever; vacuumed, then a CHECKPOINT);
* the daemon starts (``bench/common``, production settings, its start-up
  sweep schedules the N orders); its policy's ``initial_delay`` is an hour
  (:data:`INITIAL_DELAY_S`): the busy read's interval is then 1 s, as with any
  INITIAL_DELAY of 10 s or more (the shipped 60 s too), and no order falls due
  during the run, so the CPU measured is the busy mode's, not checks';
* the application, ``bench/app_writer.py``, dispatches ``--busy-rate``
  orders/s (default 100, twice the handoff's busy rate) for the whole run, so
  the daemon goes busy and stays busy, and each read has new orders to take.
  ``--busy-rate 0`` instead runs the daemon with ``ORDER_MONITOR_HANDOFF=scan``
  (``Settings.handoff="scan"``: it never takes the idle lock, so it is busy
  throughout) and dispatches nothing: the reads' cost alone, nothing new to take;
* after ``--busy-warmup`` seconds, a window of ``--busy-seconds``: CPU seconds
  per second of this process (the daemon runs in it; ``getrusage``), of the
  database server (every process of the postmaster that serves our
  connection, from ``/proc/<pid>/stat``: utime + stime of each child, and the
  postmaster's own including its reaped children's; split by session with
  ``pg_stat_activity``: the daemon's sessions, the application's, the rest:
  background processes and other databases' sessions), and of the fake
  provider; the busy reads in the window (``order_monitor_busy_read_seconds``:
  count, mean duration) and the orders they returned
  (``order_monitor_busy_read_orders_total`` by result); the share of the
  window in busy mode (sampled every 50 ms), and the provider requests made
  (0 expected).

With the ``decoding`` variant (the server has wal_level = logical), the same
sizes on a database deployed for ``ORDER_MONITOR_CAPTURE=decoding``
(``databases.install_decoding``: no trigger) with the daemon reading the slot
every second (the same policy): the reset's load is decoded too, so the
dispatch starts once the slot has confirmed past it (the start-up sweep has
scheduled those orders, so the slot's copy of them is "known"). Its read cost
is ``order_monitor_decoding_read_seconds`` (the server's decoding and the
parse here), the orders ``order_monitor_decoding_orders_total`` by result;
there is no busy mode (busy share: n/a), and ``--busy-rate 0`` dispatches
nothing (reads of a slot with nothing new: the idle cost).

The orders in flight grow by the dispatch rate over the run (the JSON has the
count at the window's start and end). The database's figure is only taken for
a server on this machine (its backend's pid must be visible in ``/proc``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
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
    cpu_seconds,
    daemon_settings,
    histogram_totals,
    running,
    say,
    start_app_writers,
)
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from order_monitor import schema
from order_monitor.engine.changes import read_interval
from order_monitor.engine.handoff import Mode
from order_monitor.engine.policy import BackoffPolicy
from order_monitor.metrics import Metrics, counter_total
from trigger_bench.databases import install_decoding, reset, slot_caught_up
from trigger_bench.first_check import ModeSampler
from trigger_bench.setup import DECODING, LAYOUT, NAMES, Plan

#: The daemon's first check an hour after dispatch: busy reads every second
#: (read_interval caps at 1 s from INITIAL_DELAY = 10 s on), no check in a run.
INITIAL_DELAY_S = 3600.0


def _ticks(stat: str) -> tuple[int, int, int]:
    """(ppid, utime + stime, cutime + cstime) from the text of /proc/<pid>/stat."""
    fields = stat.rsplit(")", 1)[1].split()
    return int(fields[1]), int(fields[11]) + int(fields[12]), int(fields[13]) + int(fields[14])


class ServerCpu:
    """CPU ticks of one PostgreSQL server's processes: the postmaster and its children.

    A backend that exits within the window takes its CPU time with it, into
    the postmaster's children's time: :meth:`watch` looks at the children
    every few tenths of a second, so such a process is named by its title
    (``postgres: user database host activity``, an autovacuum worker...) with
    the time it was seen to use; what it used after it was last seen stays in
    the postmaster's line.
    """

    def __init__(self, postmaster: int) -> None:
        self.postmaster = postmaster
        self.hz = os.sysconf("SC_CLK_TCK")
        #: pid -> (CPU seconds when first seen, when last seen, its title).
        self.seen: dict[int, tuple[float, float, str]] = {}
        #: CPU seconds this process spent looking (taken off the daemon's).
        self.cost = 0.0

    @classmethod
    def of(cls, backend_pid: int) -> ServerCpu | None:
        """The server whose backend is *backend_pid*, if it runs on this machine."""
        try:
            ppid = _ticks(Path(f"/proc/{backend_pid}/stat").read_text())[0]
            comm = Path(f"/proc/{ppid}/comm").read_text().strip()
        except OSError:
            return None
        return cls(ppid) if comm.startswith("postgres") else None

    def _children(self) -> list[int]:
        base = Path(f"/proc/{self.postmaster}/task")
        pids: list[int] = []
        for task in base.iterdir():
            with contextlib.suppress(OSError):
                pids += [int(p) for p in (task / "children").read_text().split()]
        return pids

    def snapshot(self) -> dict[int, float]:
        """pid -> CPU seconds now; the postmaster's entry includes its reaped children's."""
        started = time.process_time()
        out: dict[int, float] = {}
        _, own, children = _ticks(Path(f"/proc/{self.postmaster}/stat").read_text())
        out[self.postmaster] = (own + children) / self.hz
        for pid in self._children():
            try:
                used = _ticks(Path(f"/proc/{pid}/stat").read_text())[1] / self.hz
                title = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
            except (OSError, IndexError, ValueError):
                continue  # gone meanwhile
            out[pid] = used
            first = self.seen.get(pid, (used, used, ""))[0]
            self.seen[pid] = (first, used, title.decode(errors="replace").strip())
        self.cost += time.process_time() - started
        return out

    async def watch(self, every: float = 0.2) -> None:
        """Snapshots until cancelled, so that short-lived processes are seen."""
        while True:
            self.snapshot()
            await asyncio.sleep(every)


async def sessions(conn: psycopg.AsyncConnection[Any]) -> dict[int, tuple[str, str, str]]:
    """pid -> (database, application_name, backend_type) of every session of the server."""
    cursor = await conn.execute(
        "SELECT pid, coalesce(datname, ''), coalesce(application_name, ''),"
        " coalesce(backend_type, '') FROM pg_stat_activity"
    )
    return {pid: (db, app, kind) for pid, db, app, kind in await cursor.fetchall()}


def whose(
    pid: int, known: dict[int, tuple[str, str, str]], database: str, own_pid: int
) -> tuple[str, str]:
    """(group, detail) for a server process: the daemon's, the application's, or other."""
    if pid == own_pid:
        return "other", "the benchmark's measuring session"
    db, app, kind = known.get(pid, ("", "", "exited or unknown"))
    if db == database and app.startswith("order-monitor "):
        # "order-monitor <version> (<purpose>)"
        return "daemon", app.rsplit("(", 1)[-1].rstrip(")") if "(" in app else app
    if db == database and kind == "client backend":
        return "application", app or "client backend"
    return "other", kind or "postmaster"


async def in_flight(conn: psycopg.AsyncConnection[Any]) -> int:
    query = sql.SQL("SELECT count(*) FROM {table} WHERE {predicate}").format(
        table=NAMES.table, predicate=schema.in_flight_predicate(LAYOUT)
    )
    cursor = await conn.execute(query)
    row = await cursor.fetchone()
    assert row is not None
    return int(row[0])


def read_counts(metrics: Metrics, decoding: bool = False) -> dict[str, float]:
    """The busy reads so far; with *decoding*, the reads of the slot."""
    reads, orders = (
        (metrics.decoding_reads, metrics.decoding_orders)
        if decoding
        else (metrics.busy_reads, metrics.busy_read_orders)
    )
    total, count = histogram_totals(reads)
    return {
        "reads": count,
        "read_seconds": total,
        "taken": counter_total(orders, result="taken"),
        "known": counter_total(orders, result="known"),
        "notified": counter_total(metrics.notifications, result="accepted"),
    }


async def busy_cpu(
    server: Server,
    fake: Fake,
    dsn: str,
    size: int,
    plan: Plan,
    label: str,
    variant: str = "ours",
) -> dict[str, Any]:
    """One size: N orders in flight, the daemon busy, CPU per second over the window."""
    decoding = variant == DECODING
    await asyncio.to_thread(reset, dsn, "unrelated", size)
    await fake.reset()
    settings = replace(
        daemon_settings(dsn, fake.url, BackoffPolicy(initial_delay=INITIAL_DELAY_S)),
        sweep_interval=86400.0,
    )
    scan = plan.busy_rate <= 0
    if decoding:
        settings = replace(settings, capture="decoding")
    elif scan:
        settings = replace(settings, handoff="scan")
    database = str(conninfo_to_dict(dsn)["dbname"])
    prefix = f"d0.busy{label}"
    window = plan.busy_seconds
    async with (
        await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn,
        running(settings) as daemon,
    ):
        cursor = await conn.execute("SELECT pg_backend_pid()")
        row = await cursor.fetchone()
        assert row is not None
        own_pid = int(row[0])
        meter = ServerCpu.of(own_pid)
        slot_wait = None
        if decoding:
            # The reset's load is in the slot: the window must not measure its decoding.
            slot_wait = await slot_caught_up(dsn, 600.0)
        with tempfile.TemporaryDirectory(prefix="om-bench-busy-") as tmp:
            apps: list[asyncio.subprocess.Process] = []
            if not scan:
                # Dispatching from the warm-up to past the window's end.
                span = plan.busy_warmup + window + 2.0
                _, apps = await start_app_writers(
                    dsn, prefix, plan.busy_rate, span, [Path(tmp) / "commits.json"], lead=0.2
                )
            await asyncio.sleep(plan.busy_warmup + (0.4 if apps else 0.0))
            handoff = daemon.handoff
            busy_at_start = None if decoding else handoff is not None and handoff.mode is Mode.BUSY
            flight_start = await in_flight(conn)
            known = await sessions(conn)
            sampler = ModeSampler(daemon)
            requests_before = await fake.requests()
            # The window: nothing but reading counters between its two ends.
            sampler.start()
            t0, own0, fake0 = time.monotonic(), cpu_seconds(), fake.cpu_seconds()
            db0 = meter.snapshot() if meter else {}
            reads0 = read_counts(daemon.metrics, decoding)
            watching = asyncio.create_task(meter.watch()) if meter else None
            await asyncio.sleep(window)
            if watching is not None:
                watching.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watching
            db1 = meter.snapshot() if meter else {}
            t1, own1, fake1 = time.monotonic(), cpu_seconds(), fake.cpu_seconds()
            reads1 = read_counts(daemon.metrics, decoding)
            await sampler.stop()
            requests = await fake.requests() - requests_before
            known.update(await sessions(conn))
            flight_end = await in_flight(conn)
            for app in apps:
                if await app.wait() != 0:
                    raise RuntimeError("the application process failed")
            if decoding:
                # The next size truncates these orders: the slot must be past
                # them first (databases.slot_caught_up says why).
                await slot_caught_up(dsn, 600.0)
    seconds = t1 - t0
    delta = {k: reads1[k] - reads0[k] for k in reads0}
    result: dict[str, Any] = {
        "variant": variant,
        "orders_in_flight_loaded": size,
        "orders_in_flight_window_start": flight_start,
        "orders_in_flight_window_end": flight_end,
        "mode": (
            ("no dispatch" if decoding else "scan (no dispatch)")
            if scan
            else f"dispatch at {plan.busy_rate:g}/s"
        ),
        "slot_caught_up_before_s": slot_wait,
        "window_s": seconds,
        "busy_at_window_start": busy_at_start,
        "busy_share": None if decoding else sampler.busy_share(),
        # decoding: the slot's reads, at the same interval.
        "busy_read_interval_s": read_interval(INITIAL_DELAY_S, 0.0),
        # Less what looking at the server's processes cost this process.
        "daemon_cpu_per_s": (own1 - own0 - (meter.cost if meter else 0.0)) / seconds,
        "measuring_cpu_s": meter.cost if meter else 0.0,
        "fake_cpu_per_s": (fake1 - fake0) / seconds,
        "provider_requests": requests,
        "busy_reads": delta["reads"],
        "busy_reads_per_s": delta["reads"] / seconds,
        "busy_read_mean_ms": (
            1000 * delta["read_seconds"] / delta["reads"] if delta["reads"] else float("nan")
        ),
        "busy_read_orders_taken": delta["taken"],
        "busy_read_orders_known": delta["known"],
        "notified": delta["notified"],
    }
    if meter is None:
        result["db_cpu_per_s"] = None
        result["db_note"] = "the server's processes are not visible here (not this machine)"
        return result
    groups: dict[str, float] = {"daemon": 0.0, "application": 0.0, "other": 0.0}
    details: dict[str, float] = {}
    exited_seen = 0.0
    for pid in (set(db0) | set(db1) | set(meter.seen)) - {meter.postmaster}:
        # Not in the first snapshot: started within the window, from 0.
        if pid in db1:
            used = db1[pid] - db0.get(pid, 0.0)
            group, detail = whose(pid, known, database, own_pid)
        else:
            # Exited within the window: what it was seen to use, named by its title.
            _, last, title = meter.seen[pid]
            used = last - db0.get(pid, 0.0)
            exited_seen += used
            group, detail = whose(pid, known, database, own_pid)[0], f"exited: {title}"
        groups[group] += used
        details[f"{group}: {detail}"] = details.get(f"{group}: {detail}", 0.0) + used
    # The postmaster's own and its reaped children's, less what those were seen to use.
    rest = db1[meter.postmaster] - db0[meter.postmaster] - exited_seen
    groups["other"] += rest
    details["other: postmaster, and exited processes after last seen"] = rest
    result["db_cpu_per_s"] = sum(groups.values()) / seconds
    result["db_cpu_per_s_by_group"] = {k: v / seconds for k, v in groups.items()}
    result["db_cpu_per_s_by_process"] = {
        k: v / seconds for k, v in sorted(details.items(), key=lambda kv: -kv[1]) if v > 0
    }
    result["db_postmaster_pid"] = meter.postmaster
    return result


async def busy_cpu_series(
    plan: Plan, server: Server, fake: Fake, variant: str = "ours"
) -> list[dict[str, Any]]:
    decoding = variant == DECODING
    if decoding:
        dsn = await asyncio.to_thread(install_decoding, server, "busyd")
    else:
        dsn = server.fresh("busy")
    out: list[dict[str, Any]] = []
    for size in plan.busy_sizes:
        say(
            f"busy CPU ({variant}): {size:,} orders in flight,"
            + (
                f" {plan.busy_rate:g} orders/s dispatched,"
                if plan.busy_rate > 0
                else (" no dispatch," if decoding else " scan mode,")
            )
            + f" {plan.busy_warmup:g} s warm-up, {plan.busy_seconds:g} s measured"
        )
        r = await busy_cpu(server, fake, dsn, size, plan, str(size) + variant[0], variant)
        db = r["db_cpu_per_s"]
        say(
            f"  daemon {r['daemon_cpu_per_s']:.3f} CPU s/s, database "
            + (f"{db:.3f} CPU s/s" if db is not None else "not measured")
            + f"; {r['busy_reads_per_s']:.2f} reads/s, {r['busy_read_mean_ms']:.2f} ms each"
            + ("" if decoding else f"; busy {r['busy_share'] or 0:.0%} of the window")
        )
        out.append(r)
    return out
