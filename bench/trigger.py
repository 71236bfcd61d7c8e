"""Issues #10 and #21: our trigger must not throttle the application's commits.

    python bench/trigger.py              # the issue's figures: ~20 min on 2 cores
    python bench/trigger.py --quick      # 3 s runs, two rounds: a smoke test, not figures
    python bench/trigger.py --no-decoding   # without the decoding variant on a logical server
    python bench/trigger.py --parts first-check,busy-cpu              # issue #21's two measures
    python bench/trigger.py --parts first-check --initial-delay 60    # the shipped INITIAL_DELAY
    python bench/trigger.py --dsn postgresql://postgres@db.example/postgres

Prints a table and writes ``bench/results/trigger-<timestamp>.json`` and the
table beside it (``.txt``). ``--parts`` picks among throughput, latency,
commit, first-check and busy-cpu (default: all).

The application is pgbench (its own processes, 16 connections, full speed,
``-M prepared``) against ``product_orders`` on a real server (default: the
local PostgreSQL at ``postgresql://postgres@127.0.0.1:5432/test``, a role that
may CREATE DATABASE; the throwaway databases are dropped at the end). Three
variants of the same table, side by side:

* ``ours``: our objects as ``sql/install.sql`` installs them (schema version
  6: NOTIFY while the daemon holds its idle lock; while it is busy the
  trigger's WHEN is false and the daemon reads what changed), with the daemon
  running in this process, as deployed between checks:
  its policy's first check is an hour away and its periodic sweep a day away,
  so during a run it only takes announced orders in;
* ``off``: the same database and daemon, our two triggers disabled (``ALTER
  TABLE ... DISABLE TRIGGER``): the application's own cost;
* ``v1``: ``tests/integration/fixtures/install_v1.sql`` (the last version 1
  release: a NOTIFY per order) on a database of its own, with a bare LISTEN
  session taking the notifications;
* ``decoding``: ``ORDER_MONITOR_CAPTURE=decoding`` (issue #21's opt-in, no
  trigger at all), only on a server with ``wal_level = logical``: a database of
  its own (the template's table and install, then ``role.sql`` and
  ``decoding.sql`` applied as the ``--dsn`` superuser, which drop our
  triggers), a second daemon in this process with ``capture="decoding"`` on
  it (the same policy as ``ours``: first check an hour away, sweep a day
  away) and its own scheduler recording offers. It is in by default when the
  server reports ``wal_level = logical`` (``--no-decoding`` leaves it out);
  otherwise it is left out and the output says so. With ``wal_level =
  logical`` every variant writes a little more WAL (what logical decoding
  needs) than under ``replica``; all variants run on the same server, so the
  ratios to ``off`` stay fair, but they are not comparable with figures taken
  under ``replica``. The decoding daemon reads its slot every second whatever
  runs, and the server decodes the whole cluster's WAL for it (another
  database's too, to skip it): each run's JSON has those reads' time
  (``decoding_reads_s``), so what they cost during the other variants' runs
  is seen.

Forms of the application's write: ``insert`` (a new dispatched order per
transaction), ``update`` (one of N undispatched rows is dispatched: reference,
"externalStatus" and "sentAt" set; the trigger fires on every one) and
``unrelated`` (``SET "lastSyncAt" = now()`` on one of N dispatched rows: the
trigger's ``UPDATE OF``/``WHEN`` keeps it out). Before every run the table is
reset to the same state (emptied, or reloaded with N rows, vacuumed) and a
CHECKPOINT taken, so no run inherits another's dead rows or WAL. Variants are
alternated within each round and the order reversed every other round
(``ours off v1``, ``v1 off ours``, ...), so a slow drift of the machine falls on
each alike; ratios are taken within a round, medians over rounds. The reset
of the ``decoding`` table is decoded too (the unrelated form's rows in flight
are taken in then, as a running daemon knows its orders in flight): its run
starts once the slot has confirmed past the WAL flushed at the end of the reset
(``pg_replication_slots.confirmed_flush_lsn`` against
``pg_current_wal_flush_lsn()``), so the run does not compete with that
decoding; the wait is in the JSON. It waits for the slot after a decoding run
too, before the run's orders are forgotten and truncated: the daemon does not
advance its slot while orders keep coming (``trigger_bench/databases.py``,
``slot_caught_up``), and orders it forgot, gone from the table, would be read
again at every read of a slot left short of them.

After every run the benchmark checks that nothing was missed: every row in
flight in the table after an ``ours`` run must have been offered to the daemon's
scheduler (by NOTIFY or by its reads), every one after a ``v1`` run must
have been notified to the LISTEN session, every one after a ``decoding`` run
must have been offered to its daemon's scheduler (read from the slot during
the run, or from the reset's load before it), and ``off`` and ``unrelated``
runs must have announced nothing (``decoding``: offered nothing new).

Latency at a fixed rate: pgbench ``-R 500 -c 8 -l`` (per-transaction logs);
average and p99, for every variant, insert and update forms.

Goals (issue #21), judged at the end: ``ours`` dispatch throughput (INSERT and
UPDATE forms) >= 85 % of ``off``, latency at 500 tps (average and p99) <= +10 %;
``decoding`` >= 97 % and <= +3 %; both: first check late by at most 1 s p99 at
every rate, and no order missed.

``--diagnose`` adds three variants: ``nodaemon``, our objects on a third
database with no daemon, so no order is announced (the trigger's own cost,
its WHEN, apart from what the daemon's reads cost); ``v5nodaemon``, the same
with version 5's install (its WHEN tested the in-flight rule before the idle
lock's try: what version 6 saved, in the same run); and ``whenfalse``, no
object of ours but two AFTER ROW triggers on the same events whose WHEN is
``false`` (what any trigger costs, whatever its condition: the floor under
every trigger design).

COMMIT to the provider's first request: ``bench/common``'s
``commit_to_request`` (``bench/app_writer.py`` processes insert and stamp
each COMMIT, ``bench/fake_server.py`` stamps each request, the daemon runs
with ``initial_delay=0``, idle when the writers start) at 20/s (below the
handoff's busy rate: by NOTIFY), 200/s (one writer), 1,000/s (four writers
sharing one timetable) and the maximum: ``--max-writers`` writers (default 4), one
connection each, committing one order per transaction as fast as they can;
the rate they reach is reported.

``first-check`` (``trigger_bench/first_check.py``, whose docstring has the
method): every order's first provider request against its slot ("sentAt" +
its first gap, INITIAL_DELAY with the order's jitter), at 20/s (by NOTIFY),
200/s (found by the busy reads) and ``--max-writers`` flat out, with the
daemon's ``initial_delay`` at ``--initial-delay`` (default 5 s: the busy reads
then come every 0.5 s, against 1 s at the shipped 60 s, and a run lasts its
dispatch plus about 6 s instead of plus a minute; ``--initial-delay 60``
measures the shipped value). Lateness p50/p99/max (negative = early), checks
before the slot's pull window, orders never checked, and how the orders
reached the daemon (NOTIFY or its reads). With the ``decoding`` variant, the
same rates again on a decoding database (orders read from the slot).

``busy-cpu`` (``trigger_bench/busy_cpu.py``): N orders in flight (default
1k, 10k, 100k), the daemon kept busy by ``--busy-rate`` orders/s (default
100; 0: scan mode, nothing dispatched); over ``--busy-seconds`` its CPU
seconds per second, the database server's (every process of it, split by
session), and its busy reads' rate and mean duration. With the ``decoding``
variant, the same sizes again on a decoding database, the read cost being
its reads of the slot (``order_monitor_decoding_read_seconds``).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

# bench/common: bench/ is on sys.path, this file being run as a script.
from common import (
    Fake,
    Server,
    machine,
    say,
    write_report,
)
from trigger_bench.busy_cpu import busy_cpu_series
from trigger_bench.first_check import first_check_series
from trigger_bench.hearing import MissedOrders
from trigger_bench.report import table, verdicts
from trigger_bench.runs import commit_series, trigger_series
from trigger_bench.setup import (
    DECODING,
    DEFAULT_DSN,
    DIAGNOSTICS,
    FORMS,
    PARTS,
    ROOT,
    VARIANTS,
    Plan,
    with_decoding,
)

import order_monitor
from order_monitor import logs, schema


def plan_from(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Plan:
    quick = args.quick
    pgbench, psql = shutil.which(args.pgbench), shutil.which("psql")
    if pgbench is None or psql is None:
        parser.error("pgbench and psql must be on PATH (the PostgreSQL client programs)")
    parts = args.parts or PARTS
    forms = tuple(args.forms or FORMS)
    if set(parts) - set(PARTS) or set(forms) - set(FORMS):
        parser.error(f"--parts is a subset of {PARTS}, --forms of {list(FORMS)}")
    if args.initial_delay < 0 or args.busy_rate < 0 or any(n <= 0 for n in args.busy_sizes or []):
        parser.error("--initial-delay and --busy-rate are >= 0, --busy-sizes > 0")
    return Plan(
        parts=parts,
        variants=(*VARIANTS, *DIAGNOSTICS) if args.diagnose else VARIANTS,
        forms=forms,
        rounds=args.rounds or (2 if quick else 3),
        seconds=args.seconds or (3.0 if quick else 12.0),
        clients=16,
        threads=2,
        latency_clients=8,
        latency_rate=500.0,
        rows=args.rows or (50_000 if quick else 200_000),
        # 20/s is below the handoff's busy rate (50/s): orders come by NOTIFY.
        # One connection reaches about 700 commits/s here: 1,000/s takes
        # four writers at 250/s each (slots interleaved).
        commit_rates=[(20.0, 1), (200.0, 1), (1000.0, 4)],
        commit_seconds=args.commit_seconds or (3.0 if quick else 15.0),
        max_writers=args.max_writers,
        pgbench=pgbench,
        psql=psql,
        # 20/s: below the handoff's busy rate, by NOTIFY; 200/s: busy, found
        # by the daemon's reads; then max_writers flat out.
        first_check_rates=[(20.0, 1), (200.0, 1)],
        first_check_seconds=args.first_check_seconds or (3.0 if quick else 30.0),
        initial_delay=args.initial_delay,
        busy_sizes=args.busy_sizes or [1_000, 10_000, 100_000],
        busy_seconds=args.busy_seconds or (3.0 if quick else 20.0),
        busy_warmup=args.busy_warmup or (2.0 if quick else 5.0),
        busy_rate=args.busy_rate,
    )


async def run(plan: Plan, server: Server, fake: Fake) -> dict[str, Any]:
    results: dict[str, Any] = {}
    if "throughput" in plan.parts or "latency" in plan.parts:
        results.update(await trigger_series(plan, server, fake))
    if "commit" in plan.parts:
        results["commit_to_request"] = await commit_series(plan, server, fake)
    if "first-check" in plan.parts:
        results["first_check"] = await first_check_series(plan, server, fake)
        if plan.decoding:
            results["first_check_decoding"] = await first_check_series(plan, server, fake, DECODING)
    if "busy-cpu" in plan.parts:
        results["busy_cpu"] = await busy_cpu_series(plan, server, fake)
        if plan.decoding:
            results["busy_cpu_decoding"] = await busy_cpu_series(plan, server, fake, DECODING)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="order-monitor: the trigger's cost to the application (issues #10, #21)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    parser.add_argument("--quick", action="store_true", help="3 s runs, 2 rounds: a smoke test")
    parser.add_argument(
        "--dsn",
        default=DEFAULT_DSN,
        help=f"a role that may CREATE DATABASE (default {DEFAULT_DSN})",
    )
    parser.add_argument(
        "--parts",
        type=lambda s: [x.strip() for x in s.split(",") if x.strip()],
        help=f"comma-separated subset of {','.join(PARTS)} (default: all)",
    )
    parser.add_argument(
        "--forms",
        type=lambda s: [x.strip() for x in s.split(",") if x.strip()],
        help=f"comma-separated subset of {','.join(FORMS)} (default: all)",
    )
    parser.add_argument("--rounds", type=int, help="rounds of the three variants (default 3)")
    parser.add_argument("--seconds", type=float, help="seconds a pgbench run (default 12)")
    parser.add_argument("--rows", type=int, help="rows the update forms draw from (default 200k)")
    parser.add_argument(
        "--commit-seconds", type=float, help="seconds of each COMMIT->request run (default 15)"
    )
    parser.add_argument(
        "--max-writers",
        type=int,
        default=4,
        help="application connections committing flat out for the maximum rate (default 4)",
    )
    parser.add_argument(
        "--initial-delay",
        type=float,
        default=5.0,
        help="first-check: the daemon's INITIAL_DELAY in seconds (default 5; shipped: 60)",
    )
    parser.add_argument(
        "--first-check-seconds",
        type=float,
        help="first-check: seconds of dispatch at each rate (default 30)",
    )
    parser.add_argument(
        "--busy-sizes",
        type=lambda s: [int(x) for x in s.split(",") if x.strip()],
        help="busy-cpu: orders in flight, comma-separated (default 1000,10000,100000)",
    )
    parser.add_argument(
        "--busy-seconds", type=float, help="busy-cpu: seconds measured at each size (default 20)"
    )
    parser.add_argument(
        "--busy-warmup", type=float, help="busy-cpu: seconds before the window (default 5)"
    )
    parser.add_argument(
        "--busy-rate",
        type=float,
        default=100.0,
        help="busy-cpu: orders/s dispatched to keep the daemon busy (default 100);"
        " 0: none, the daemon in scan mode (ORDER_MONITOR_HANDOFF=scan)",
    )
    parser.add_argument(
        "--diagnose",
        action="store_true",
        help="add a fourth variant: our objects with no daemon (nothing announced): "
        "the trigger's own cost, apart from the daemon's reads",
    )
    parser.add_argument(
        "--no-decoding",
        action="store_true",
        help="leave the decoding variant out (default: in when the server has wal_level = logical)",
    )
    parser.add_argument("--pgbench", default="pgbench", help="the pgbench program")
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="the daemon's log level; logs go to a temporary file",
    )
    parser.add_argument(
        "--out", type=Path, help="results file (default bench/results/trigger-<ts>.json)"
    )
    args = parser.parse_args(argv)
    plan = plan_from(args, parser)

    package = Path(order_monitor.__file__).resolve().parent
    if package.parent != ROOT:
        say(f"note: order_monitor is imported from {package}, not this checkout (PYTHONPATH=$PWD?)")
    started = dt.datetime.now(dt.UTC)
    host = machine()
    handle, log_name = tempfile.mkstemp(prefix="om-trig-daemon-", suffix=".log")
    log_file = os.fdopen(handle, "w", encoding="utf-8")
    logs.configure(args.log_level, "json", log_file)
    fake = Fake()
    server = Server(args.dsn)
    try:
        server.setup()
        plan = with_decoding(plan, server.setting("wal_level"), not args.no_decoding)
        if plan.decoding_note:
            say(plan.decoding_note)
        fake.start()
        results = asyncio.run(run(plan, server, fake))
        postgres = server.describe()
    except MissedOrders as exc:
        log_file.close()
        say(f"stopped: {exc}: {log_name}")
        return 1
    finally:
        fake.stop()
        server.drop_all()
        log_file.close()
    with open(log_name, encoding="utf-8") as written:
        log_lines = sum(1 for _ in written)
    os.unlink(log_name)
    pgbench_version = subprocess.run(
        [plan.pgbench, "--version"], capture_output=True, text=True, check=False
    ).stdout.strip()
    report = {
        "started": started.isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "order_monitor": str(package),
        "schema_version": schema.VERSION,
        "machine": {**host, "loadavg_end": os.getloadavg()},
        "postgres": postgres,
        "pgbench": pgbench_version,
        "daemon_log_lines": log_lines,
        "plan": plan.__dict__,
        "results": results,
        "targets": verdicts(results),
    }
    out = write_report(report, started, prefix="trigger-", out=args.out)
    text = table(report)
    out.with_suffix(".txt").write_text(text + "\n")
    print(text)
    print(f"\nwritten: {out} (and .txt)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
