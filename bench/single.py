"""A one-reference-per-request provider (znet): the daemon beside its bare-HTTP ceiling.

    python bench/single.py                      # 0 ms and 100 ms provider latency (~2 min)
    python bench/single.py --orders 20000 --repeats 5
    py-spy record -r 250 -f raw -o /tmp/daemon.txt -- python bench/single.py --latencies 0

For each provider latency, the same N orders twice, back to back and alternated
over the repeats:

* the daemon: N dispatched orders committed in one transaction, each done at
  its first check, every check one znet request; orders/s from that COMMIT to
  the last result written (database clock), and the daemon's CPU (this
  process: the daemon runs in it) per completed order;
* the bare loop: the same N znet requests to the same fake with the same
  concurrency, each answer read and split, nothing else: no database.

The ratio of the two, in the same run, is the figure: what the daemon's own
work (re-read, decision, guarded write, schedule) costs against the requests
alone. The median repeat is reported.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import statistics
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import aiohttp
from common import (
    PROVIDER_ID,
    Fake,
    Server,
    cpu_meter,
    insert_dispatched,
    last_completed,
    machine,
    run_header,
    running,
    say,
    wait_finished,
    write_report,
)

from order_monitor import logs
from order_monitor.config import ProviderConfig, ProviderLimits, Settings
from order_monitor.embedded import throwaway_postgres
from order_monitor.engine.policy import BackoffPolicy
from order_monitor.providers.fake import ZNET_PATH
from order_monitor.redaction import Secret

#: Requests under way at once, daemon and bare loop alike: the daemon's global
#: default, and the provider's limit raised to it, so that at 0 ms the loop is
#: bound by CPU and at 100 ms by the provider's latency.
CONCURRENCY = 64
KOD, SIFRE = "kod", "sifre"  # the fake's own test credentials


def znet_settings(dsn: str, fake_url: str) -> Settings:
    provider = ProviderConfig(
        name="znet",
        kind="znet",
        base_url=fake_url,
        provider_ids=(PROVIDER_ID,),
        limits=ProviderLimits(concurrency=CONCURRENCY),
        secrets={"kod": Secret(KOD), "sifre": Secret(SIFRE)},
        options={},
    )
    return Settings(
        dsn=Secret(dsn),
        policy=BackoffPolicy(initial_delay=0.0),
        providers=(provider,),
        concurrency=CONCURRENCY,
    )


async def daemon_run(server: Server, fake: Fake, n: int, label: str) -> dict[str, Any]:
    dsn = server.fresh(label)
    prefix = f"d0.s{label}"
    async with running(znet_settings(dsn, fake.url)) as daemon:
        with cpu_meter(fake) as cpu:
            committed = await insert_dispatched(dsn, prefix, n)
            await wait_finished(daemon, n, within=max(120.0, n / 50))
        done_at = await last_completed(dsn, prefix)
    seconds = (done_at - committed).total_seconds()
    return {
        "orders": n,
        "seconds": seconds,
        "orders_per_s": n / seconds,
        "daemon_cpu_us_per_order": cpu["daemon_cpu_s"] / n * 1e6,
        **cpu,
    }


async def bare_run(fake: Fake, n: int, label: str) -> dict[str, Any]:
    """The ceiling: N znet requests, CONCURRENCY under way, each answer read and split."""
    limit = asyncio.Semaphore(CONCURRENCY)
    answered = 0

    async def check(session: aiohttp.ClientSession, ref: str) -> None:
        nonlocal answered
        query = urlencode([("kod", KOD), ("sifre", SIFRE), ("tahsilat_api_islem_id", ref)])
        async with limit, session.get(f"{fake.url}{ZNET_PATH}?{query}") as response:
            fields = (await response.text()).split("|", 3)
        if fields[0] == "OK":
            answered += 1

    connector = aiohttp.TCPConnector(limit=CONCURRENCY)
    async with aiohttp.ClientSession(connector=connector) as session:
        with cpu_meter(fake) as cpu:
            started = time.perf_counter()
            await asyncio.gather(*(check(session, f"d0.b{label}.{i}") for i in range(n)))
            seconds = time.perf_counter() - started
    assert answered == n, (answered, n)
    return {
        "orders": n,
        "seconds": seconds,
        "orders_per_s": n / seconds,
        "cpu_us_per_order": cpu["daemon_cpu_s"] / n * 1e6,
        **cpu,
    }


async def measure(server: Server, fake: Fake, n: int, repeats: int) -> dict[str, Any]:
    runs = []
    for i in range(repeats):
        label = f"{int(fake.latency * 1000)}ms{i}"
        # Alternate which goes first, so neither always meets a warmer machine.
        if i % 2:
            bare = await bare_run(fake, n, label)
            daemon = await daemon_run(server, fake, n, label)
        else:
            daemon = await daemon_run(server, fake, n, label)
            bare = await bare_run(fake, n, label)
        runs.append(
            {"daemon": daemon, "bare": bare, "ratio": daemon["orders_per_s"] / bare["orders_per_s"]}
        )
        say(
            f"  {daemon['orders_per_s']:,.0f} vs {bare['orders_per_s']:,.0f} orders/s"
            f" ({runs[-1]['ratio']:.0%}), daemon {daemon['daemon_cpu_us_per_order']:.0f} µs/order"
        )
    median = sorted(runs, key=lambda r: r["ratio"])[len(runs) // 2]
    return {
        "provider_latency_s": fake.latency,
        "orders": n,
        "ratio": median["ratio"],
        "daemon_orders_per_s": median["daemon"]["orders_per_s"],
        "bare_orders_per_s": median["bare"]["orders_per_s"],
        "daemon_cpu_us_per_order_median": statistics.median(
            r["daemon"]["daemon_cpu_us_per_order"] for r in runs
        ),
        "runs": runs,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--orders", type=int, default=10_000, help="orders a run (default 10000)")
    parser.add_argument("--repeats", type=int, default=3, help="runs a latency (default 3)")
    parser.add_argument(
        "--latencies",
        type=lambda s: [float(x) / 1000 for x in s.split(",")],
        default=[0.0, 0.1],
        help="provider latencies in ms (default 0,100)",
    )
    parser.add_argument("--dsn", help="an existing server (may CREATE DATABASE); default: embedded")
    parser.add_argument("--out", type=Path, help="results file (default bench/results/<ts>.json)")
    args = parser.parse_args(argv)

    started = dt.datetime.now(dt.UTC)
    host = machine()
    log_file = open("/dev/null", "w", encoding="utf-8")  # noqa: SIM115 - closed below
    logs.configure("info", "json", log_file)
    results = []
    with contextlib.ExitStack() as stack:
        admin = args.dsn or stack.enter_context(throwaway_postgres())
        server = Server(admin)
        try:
            server.setup()
            for latency in args.latencies:
                fake = Fake(latency=latency)
                fake.start()
                try:
                    say(f"znet answering in {latency * 1000:g} ms, {args.orders:,} orders")
                    results.append(asyncio.run(measure(server, fake, args.orders, args.repeats)))
                finally:
                    fake.stop()
            postgres = server.describe()
        finally:
            server.drop_all()
            log_file.close()
    report = {
        **run_header(started, host, postgres, dsn=args.dsn),
        "concurrency": CONCURRENCY,
        "results": results,
    }
    out = write_report(report, started, out=args.out, prefix="single-")
    for r in results:
        print(
            f"{r['provider_latency_s'] * 1000:>5g} ms: daemon {r['daemon_orders_per_s']:>7,.0f}"
            f" orders/s, bare {r['bare_orders_per_s']:>7,.0f}/s, ratio {r['ratio']:.0%},"
            f" daemon CPU {r['daemon_cpu_us_per_order_median']:.0f} µs/order"
        )
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
