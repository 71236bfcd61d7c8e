"""One run, and the series of them: the variants alternated over rounds, each run accounted for."""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

# bench/common: bench/ is on sys.path, bench/trigger.py being run as a script.
from common import (
    Fake,
    Server,
    commit_to_request,
    cpu_seconds,
    daemon_settings,
    histogram_totals,
    running,
    say,
    until_idle,
)

from order_monitor.daemon import Daemon
from order_monitor.engine.policy import BackoffPolicy
from order_monitor.metrics import counter_total
from order_monitor.redaction import Secret
from trigger_bench.databases import (
    in_flight_ids,
    install_decoding,
    install_empty_trigger,
    install_v1,
    install_v5,
    order_no_index,
    reset,
    set_triggers,
    slot_caught_up,
)
from trigger_bench.hearing import BareListener, MissedOrders, OfferLog
from trigger_bench.pgbench import Load, pgbench_run
from trigger_bench.setup import (
    DECODING,
    DIAGNOSTIC,
    DIAGNOSTICS,
    EMPTY_TRIGGER,
    LATENCY_FORMS,
    SCRIPTS,
    V5_DIAGNOSTIC,
    Plan,
)


@dataclass
class Bench:
    pgbench: str
    variants: tuple[str, ...]
    ours_dsn: str
    v1_dsn: str
    nodaemon_dsn: str | None
    daemon: Daemon
    offers: OfferLog
    v1: BareListener
    rows: int
    scripts: dict[str, Path]
    catch_up_within: float
    #: The decoding variant: its database, its daemon (capture="decoding") and
    #: that daemon's scheduler; None when the variant is left out.
    decoding_dsn: str | None = None
    decoding_daemon: Daemon | None = None
    decoding_offers: OfferLog | None = None
    #: How long a reset's bulk load may take to be decoded before a run.
    slot_within: float = 600.0
    #: The floor variant's database (--diagnose).
    empty_dsn: str | None = None
    #: Version 5's install, no daemon (--diagnose).
    v5_dsn: str | None = None

    def dsn(self, variant: str) -> str:
        if variant == DIAGNOSTIC:
            assert self.nodaemon_dsn is not None
            return self.nodaemon_dsn
        if variant == EMPTY_TRIGGER:
            assert self.empty_dsn is not None
            return self.empty_dsn
        if variant == V5_DIAGNOSTIC:
            assert self.v5_dsn is not None
            return self.v5_dsn
        if variant == DECODING:
            assert self.decoding_dsn is not None
            return self.decoding_dsn
        return self.v1_dsn if variant == "v1" else self.ours_dsn

    def daemon_for(self, variant: str) -> Daemon:
        if variant == DECODING:
            assert self.decoding_daemon is not None
            return self.decoding_daemon
        return self.daemon

    def offers_for(self, variant: str) -> OfferLog:
        if variant == DECODING:
            assert self.decoding_offers is not None
            return self.decoding_offers
        return self.offers


def metric(daemon: Daemon, name: str) -> float:
    m = daemon.metrics
    readers: dict[str, Callable[[], float]] = {
        "notified": lambda: counter_total(m.notifications, result="accepted"),
        "from_reads": lambda: (
            counter_total(m.busy_read_orders, result="taken")
            + counter_total(m.inbox_taken)
            + counter_total(m.decoding_orders, result="taken")
        ),
        "to_busy": lambda: counter_total(m.handoff_switches, to="busy"),
        "to_idle": lambda: counter_total(m.handoff_switches, to="idle"),
    }
    return readers[name]()


def decoding_reads(b: Bench) -> tuple[float, float]:
    """The decoding daemon's slot reads so far: (seconds spent, reads); zeros without it."""
    if b.decoding_daemon is None:
        return 0.0, 0.0
    return histogram_totals(b.decoding_daemon.metrics.decoding_reads)


async def one_run(
    b: Bench, variant: str, form: str, load: Load, logs_in: Path | None
) -> dict[str, Any]:
    dsn = b.dsn(variant)
    daemon, offers = b.daemon_for(variant), b.offers_for(variant)
    await asyncio.to_thread(reset, dsn, form, b.rows)
    if variant in ("ours", "off"):
        await asyncio.to_thread(set_triggers, dsn, variant == "ours")
    slot_wait = None
    if variant == DECODING:
        # The reset's bulk load is decoded too: the run starts once the slot
        # has confirmed past it, so it does not compete with that decoding.
        slot_wait = await slot_caught_up(dsn, b.slot_within)
    idle_at_start = await until_idle(b.daemon, 15.0)
    # Orders the decoding daemon took in from the reset (the unrelated form's
    # rows in flight): known to it during the run, as a running daemon knows
    # the orders in flight; forgotten after it.
    preloaded = set(offers.offered) if variant == DECODING else set()
    for log in (b.offers, b.decoding_offers):
        if log is not None:
            log.offered.clear()
    b.v1.received.clear()
    before = {name: metric(daemon, name) for name in ("notified", "from_reads", "to_busy")}
    v1_before = b.v1.notifications
    cpu_before = cpu_seconds()
    reads_before = decoding_reads(b)
    result = await pgbench_run(b.pgbench, dsn, b.scripts[form], load, logs_in)
    ended = time.monotonic()
    reads_after = decoding_reads(b)
    # This process: the daemons (ours and, with it, decoding's) and the v1 listener.
    result["bench_process_cpu_s"] = cpu_seconds() - cpu_before
    # The decoding daemon reads its slot every second whichever variant runs
    # (the server decodes the whole cluster's WAL for it): what that cost
    # during this run, every variant's.
    result["decoding_reads_s"] = reads_after[0] - reads_before[0]
    result["decoding_reads"] = reads_after[1] - reads_before[1]
    result.update(variant=variant, form=form, daemon_idle_at_start=idle_at_start)
    if slot_wait is not None:
        result["slot_caught_up_before_run_s"] = slot_wait
        result["orders_known_before_run"] = len(preloaded)
    result.update(await account(b, variant, form, ended, preloaded))
    result["notified"] = metric(daemon, "notified") - before["notified"]
    result["from_reads"] = metric(daemon, "from_reads") - before["from_reads"]
    result["switches_to_busy"] = metric(daemon, "to_busy") - before["to_busy"]
    if variant == "v1":
        result["notified"] = b.v1.notifications - v1_before
    elif variant in DIAGNOSTICS:
        result["notified"] = result["from_reads"] = 0.0  # nobody listens or reads there
    if variant == DECODING:
        # Before the run's orders are forgotten: while it dispatches, the
        # daemon does not advance its slot (see slot_caught_up), and a slot
        # left short of them would hand the forgotten (then truncated) orders
        # to it again at every read, and never be advanced.
        result["slot_caught_up_after_run_s"] = await slot_caught_up(dsn, b.slot_within)
    # The orders of this run are gone with the next reset: the daemon need not keep them.
    for order in offers.offered | preloaded:
        daemon.scheduler.forget(order)
    for log in (b.offers, b.decoding_offers):
        if log is not None:
            log.offered.clear()
    b.v1.received.clear()
    return result


async def account(
    b: Bench, variant: str, form: str, ended: float, preloaded: set[int] | None = None
) -> dict[str, Any]:
    """Did every order the trigger announced reach whoever listens? (and nothing else).

    For ``decoding``: every order in flight after the run must have been
    offered to its daemon, during the run or, for the rows the reset loaded in
    flight (*preloaded*), while it decoded the reset; the unrelated form's
    updates of those rows must offer nothing new.
    """
    if variant == DECODING:
        expected = await in_flight_ids(b.dsn(variant))
        known = preloaded or set()
        # Filled as the daemon's reads of the slot bring orders in.
        offered = b.offers_for(variant).offered
        deadline = ended + b.catch_up_within
        while time.monotonic() < deadline:
            if expected <= offered | known:
                break
            await asyncio.sleep(0.02)
        caught_up = time.monotonic() - ended
        if form == "unrelated":
            await asyncio.sleep(1.5)  # a read of the slot or two: nothing new may come
        got = offered | known
        return {
            "orders_in_flight": len(expected),
            "orders_announced": len(got & expected),
            "orders_missed": len(expected - got),
            # Unrelated updates of orders it knows: nothing is new.
            "unexpected_announcements": len(offered if form == "unrelated" else offered - expected),
            "catch_up_s": caught_up if expected else 0.0,
        }
    # Triggers disabled, a write they keep out, or nobody holding the idle
    # lock (no daemon): nothing may be announced.
    announces = variant != "off" and variant not in DIAGNOSTICS and form != "unrelated"
    expected = await in_flight_ids(b.dsn(variant)) if announces else set()
    # Filled as announcements arrive (the same set objects throughout).
    got = b.v1.received if variant == "v1" else b.offers.offered
    deadline = ended + b.catch_up_within
    while time.monotonic() < deadline:
        if expected <= got:
            break
        await asyncio.sleep(0.02)
    caught_up = time.monotonic() - ended
    if not expected:
        # Give stray announcements a moment to show before saying there were none.
        await asyncio.sleep(0.5)
    out: dict[str, Any] = {
        "orders_in_flight": len(expected),
        "orders_announced": len(got & expected),
        "orders_missed": len(expected - got),
        "unexpected_announcements": len(got - expected),
        "catch_up_s": caught_up if expected else 0.0,
    }
    return out


def alternations(rounds: int, variants: tuple[str, ...]) -> list[tuple[str, ...]]:
    """v2 off v1, then v1 off v2, and so on: drift falls on each variant alike."""
    return [variants if r % 2 == 0 else tuple(reversed(variants)) for r in range(rounds)]


async def series(
    b: Bench, forms: tuple[str, ...], load: Load, rounds: int, logged: bool
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for form in forms:
        runs: list[dict[str, Any]] = []
        for number, order in enumerate(alternations(rounds, b.variants)):
            for variant in order:
                with tempfile.TemporaryDirectory(prefix="om-trig-") as tmp:
                    run = await one_run(b, variant, form, load, Path(tmp) if logged else None)
                run["round"] = number
                runs.append(run)
                say(
                    f"  {form} {variant:>8} round {number + 1}: {run['tps']:,.0f} tps"
                    + (
                        f", avg {run['latency_avg_ms']:.2f} / p99 {run['latency_p99_ms']:.2f} ms"
                        if logged
                        else ""
                    )
                    + f"; {run['orders_announced']:,}/{run['orders_in_flight']:,} orders heard"
                    + (f", {run['orders_missed']} MISSED" if run["orders_missed"] else "")
                )
                if run["orders_missed"]:
                    # Figures from a run that lost orders measure a broken daemon.
                    raise MissedOrders(
                        f"{run['orders_missed']:,} orders missed in a {variant} {form} run; "
                        "the daemon's log (kept) says why"
                    )
        out[form] = summarise(runs, b.variants, logged)
    return out


def summarise(
    runs: list[dict[str, Any]], variants: tuple[str, ...], logged: bool
) -> dict[str, Any]:
    def figures(variant: str, key: str) -> list[float]:
        return [r[key] for r in sorted(runs, key=lambda r: r["round"]) if r["variant"] == variant]

    keys = ["tps"] + (["latency_avg_ms", "latency_p99_ms"] if logged else [])
    summary: dict[str, Any] = {"runs": runs, "medians": {}, "ratios": {}}
    for variant in variants:
        summary["medians"][variant] = {k: statistics.median(figures(variant, k)) for k in keys}
    for variant in (v for v in variants if v != "off"):
        for key in keys:
            # Within a round: the two runs are minutes apart at most.
            per_round = [
                a / b for a, b in zip(figures(variant, key), figures("off", key), strict=True)
            ]
            summary["ratios"][f"{variant}_{key}"] = {
                "per_round": per_round,
                "median": statistics.median(per_round),
            }
    return summary


async def trigger_series(plan: Plan, server: Server, fake: Fake) -> dict[str, Any]:
    ours_dsn = server.fresh("trig_v2")
    await asyncio.to_thread(order_no_index, ours_dsn)
    v1_dsn = await asyncio.to_thread(install_v1, server, plan.psql)
    nodaemon_dsn = None
    if DIAGNOSTIC in plan.variants:
        nodaemon_dsn = server.fresh("trig_nod")
        await asyncio.to_thread(order_no_index, nodaemon_dsn)
    empty_dsn = None
    if EMPTY_TRIGGER in plan.variants:
        empty_dsn = await asyncio.to_thread(install_empty_trigger, server)
    v5_dsn = None
    if V5_DIAGNOSTIC in plan.variants:
        v5_dsn = await asyncio.to_thread(install_v5, server, plan.psql)
    decoding_dsn = None
    if DECODING in plan.variants:
        decoding_dsn = await asyncio.to_thread(install_decoding, server, "trig_dec")
    offers = OfferLog()
    # As deployed between checks: the first check an hour away, the sweep a
    # day away, so the daemon only takes announced orders in during a run.
    policy = BackoffPolicy(initial_delay=3600.0)
    settings = daemon_settings(ours_dsn, fake.url, policy)
    settings = replace(settings, sweep_interval=86400.0)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="om-trig-scripts-") as tmp:
        scripts = {}
        for form, text in SCRIPTS.items():
            scripts[form] = Path(tmp) / f"{form}.sql"
            scripts[form].write_text(text.format(rows=plan.rows))
        async with contextlib.AsyncExitStack() as stack:
            daemon = await stack.enter_async_context(running(settings, offers))
            v1 = await stack.enter_async_context(BareListener(v1_dsn).running())
            decoding_daemon = decoding_offers = None
            if decoding_dsn is not None:
                # The same policy, on its own database, reading the slot.
                decoding_offers = OfferLog()
                decoding_settings = replace(settings, dsn=Secret(decoding_dsn), capture="decoding")
                decoding_daemon = await stack.enter_async_context(
                    running(decoding_settings, decoding_offers)
                )
            b = Bench(
                pgbench=plan.pgbench,
                variants=plan.variants,
                ours_dsn=ours_dsn,
                v1_dsn=v1_dsn,
                nodaemon_dsn=nodaemon_dsn,
                empty_dsn=empty_dsn,
                v5_dsn=v5_dsn,
                daemon=daemon,
                offers=offers,
                v1=v1,
                rows=plan.rows,
                scripts=scripts,
                catch_up_within=60.0,
                decoding_dsn=decoding_dsn,
                decoding_daemon=decoding_daemon,
                decoding_offers=decoding_offers,
            )
            if "throughput" in plan.parts:
                load = Load(plan.clients, plan.threads, plan.seconds)
                say(f"throughput: {plan.clients} connections, full speed, {plan.seconds:g} s a run")
                results["throughput"] = await series(b, plan.forms, load, plan.rounds, False)
            if "latency" in plan.parts:
                load = Load(plan.latency_clients, plan.threads, plan.seconds, plan.latency_rate)
                say(f"latency: {plan.latency_rate:g} tps, {plan.latency_clients} connections")
                forms = tuple(f for f in plan.forms if f in LATENCY_FORMS)
                results["latency"] = await series(b, forms, load, plan.rounds, True)
    return results


async def commit_series(plan: Plan, server: Server, fake: Fake) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for rate, writers in [*plan.commit_rates, (None, plan.max_writers)]:
        what = f"{rate:g}/s, {writers} writer(s)" if rate else f"max, {writers} writers flat out"
        say(f"COMMIT -> first request: {what}, {plan.commit_seconds:g} s")
        result = await commit_to_request(server, fake, rate, plan.commit_seconds, writers=writers)
        say(
            f"  {result['achieved_rate']:,.0f} orders/s reached;"
            f" p50 {result['p50_ms']:.1f} ms, p99 {result['p99_ms']:.1f} ms"
        )
        out.append(result)
    return out
