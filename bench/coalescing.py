"""Requests per check over a simulated day: the real schedule code on an injected clock.

    python bench/coalescing.py                   # 1,000 and 10,000 pending (about a minute)
    python bench/coalescing.py --pending 1000 --hours 6

What runs is the engine's own pure code: ``Scheduler`` (``pop_due``,
``pull_open``, ``complete``), ``BackoffPolicy`` with the production defaults,
``decide`` and ``spare_in_request``, driven the way the checker and the writer
drive them. What is simulated is everything around it: the clock (events are
processed in time order; a day takes seconds), the table (orders arrive as a
Poisson stream, each is answered "pending" until its own finishing time, drawn
from an exponential distribution, then "done"), and the providers (a request
answers at once). Each check measures its own elapsed time off by up to
±``--clock-noise`` seconds, as a re-read's server clock does.

Two providers side by side, each with its own stream of orders: ``batched``
(50 orders a request, barakat/apstore) and ``single`` (one a request, znet).
Each size runs twice on the same stream of orders, with coalescing and without
(no order pulled forward), so the ratios compare like with like.

Reported, for the hours after the warm-up (the first ``--warmup`` hours, while
the pending count climbs to its steady state):

* orders per request, requests and checks per finished order, per provider;
* how early a check came, as a share of its slot's gap (bounded by
  ``policy.PULL_SHARE``), and how many checks came after their slot (none:
  the simulation has no load);
* slots checked twice (must be 0) and slots skipped while the order was
  pending (must be 0);
* the busiest minute's requests against the mean (a thundering herd would
  show here);
* the ceiling: orders a request had every slot been checked with the fewest
  requests any rule could make within the same windows (``fewest_requests``),
  also for wider windows with ``--ceiling-share``.

Writes ``bench/results/coalescing-<timestamp>.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import heapq
import math
import platform
import random
import sys
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import write_report

from order_monitor.config import OutcomeWrites
from order_monitor.db import ColumnLimits, InFlightRow, SweepRow
from order_monitor.engine.checker import spare_in_request
from order_monitor.engine.decisions import decide
from order_monitor.engine.policy import PULL_SHARE, BackoffPolicy, Slot
from order_monitor.engine.scheduler import Scheduler
from order_monitor.engine.sweep import schedule_row
from order_monitor.providers.base import Outcome

BENCH = Path(__file__).resolve().parent

PROVIDERS = {"batched": 50, "single": 1}
#: The daemon's default ORDER_MONITOR_BATCH_SIZE: orders taken off the schedule at once.
POP_LIMIT = 500
#: Mean time an order of the steady flow stays pending.
MEAN_LIFE = 2 * 3600.0
LIMITS = ColumnLimits(pin_code=None, provider_message=None, last_message=None)
WRITES = OutcomeWrites()


@dataclass
class Order:
    key: int
    provider: str
    dispatched: float
    finishes: float
    #: The slot the next check is for, and the attempt the last check served.
    slot: Slot | None = None
    served: int = 0
    checks: int = 0


@dataclass
class Tally:
    requests: int = 0
    checks: int = 0
    finished: int = 0
    finished_checks: int = 0
    early_shares: list[float] = field(default_factory=list)
    #: Each check's slot as (absolute time, gap before it), batched providers
    #: only: its window is the slot and a share of the gap before it.
    slots: list[tuple[float, float]] = field(default_factory=list)
    late: int = 0
    twice: int = 0
    skipped: int = 0
    per_minute: Counter[int] = field(default_factory=Counter)


def arrivals(rate: float, seconds: float, mean_life: float, seed: int) -> list[Order]:
    """One provider's orders: Poisson arrivals, exponential time until the provider is done."""
    rng = random.Random(seed)
    orders: list[Order] = []
    t = 0.0
    while True:
        t += rng.expovariate(rate)
        if t >= seconds:
            return orders
        life = rng.expovariate(1 / mean_life) if math.isfinite(mean_life) else math.inf
        orders.append(Order(rng.getrandbits(128), "", t, t + life))


def slot_windows(slots: list[tuple[float, float]], share: float) -> list[tuple[float, float]]:
    """Each slot's window: from *share* of its gap before it, to the slot."""
    return [(at - share * gap, at) for at, gap in slots]


def fewest_requests(windows: list[tuple[float, float]], size: int) -> int:
    """The fewest requests of at most *size* orders that check every window within it.

    Greedy: a request at the earliest deadline left, carrying the open windows
    with the earliest deadlines. Some request must fall in that first window,
    and moving it to the deadline only adds windows it can carry, so no rule
    needs fewer: a bound on orders a request for any pull-forward rule within
    the same windows, whatever it knows in advance.
    """
    ordered = sorted(windows)
    waiting: list[tuple[float, float]] = []  # (deadline, opening)
    i, requests = 0, 0
    while i < len(ordered) or waiting:
        if not waiting:
            opening, deadline = ordered[i]
            heapq.heappush(waiting, (deadline, opening))
            i += 1
        while i < len(ordered) and ordered[i][0] <= waiting[0][0]:
            opening, deadline = ordered[i]
            heapq.heappush(waiting, (deadline, opening))
            i += 1
        # Every window waiting is open at the first deadline: each came in
        # opening no later than some deadline then waiting, and a window that
        # opened later than a deadline also ends later.
        requests += 1
        for _ in range(min(size, len(waiting))):
            heapq.heappop(waiting)
    return requests


def simulate(
    streams: dict[str, list[Order]],
    policy: BackoffPolicy,
    *,
    coalesce: bool,
    seconds: float,
    warmup: float,
    clock_noise: float,
    seed: int,
    ceiling_shares: tuple[float, ...] = (),
) -> dict[str, Any]:
    rng = random.Random(seed)
    scheduler = Scheduler()
    orders: dict[int, Order] = {}
    tallies = {name: Tally() for name in streams}
    pending_samples: list[int] = []
    incoming = [(o.dispatched, i, name, o) for name in streams for i, o in enumerate(streams[name])]
    heapq.heapify(incoming)
    next_sample = warmup

    def check(now: float, group: list[Order]) -> None:
        for order in group:
            elapsed = now - order.dispatched
            tally = tallies[order.provider]
            measuring = now >= warmup
            # The slot this check was scheduled for.
            slot = order.slot or policy.next_slot(order.key, None)
            assert slot is not None
            if measuring:
                tally.checks += 1
                if elapsed < slot.offset - clock_noise:
                    tally.early_shares.append((slot.offset - elapsed) / max(slot.gap, 1e-9))
                if elapsed > slot.offset + clock_noise + 1e-6 and order.served:
                    tally.late += 1
                if PROVIDERS[order.provider] > 1:
                    tally.slots.append((order.dispatched + slot.offset, slot.gap))
            measured = elapsed + rng.uniform(-clock_noise, clock_noise)
            after = policy.next_slot(order.key, measured)
            attempt = (after.attempt - 1) if after is not None else len(policy.slots(order.key))
            if measuring and order.served and attempt == order.served:
                tally.twice += 1
            if measuring and order.served and attempt > order.served + 1:
                tally.skipped += attempt - order.served - 1
            order.served, order.slot = attempt, after
            order.checks += 1
            outcome = Outcome.done("PIN") if now >= order.finishes else Outcome.pending("1", None)
            row = InFlightRow(uuid.UUID(int=order.key), "ref", order.provider, None, measured, None)
            decision = decide(
                row,
                order.provider,
                outcome,
                elapsed=measured,
                policy=policy,
                writes=WRITES,
                limits=LIMITS,
                group=group_for(order.provider),
            )
            if decision.finished:
                scheduler.complete(order.key, None)
                del orders[order.key]
                if measuring and order.dispatched >= warmup:
                    tally.finished += 1
                    tally.finished_checks += order.checks
            else:
                # What Writer._settle does with a pending decision.
                assert decision.next_check_in is not None
                opens = None if decision.pull_in is None else now + decision.pull_in
                scheduler.complete(
                    order.key, now + decision.next_check_in, group=decision.group, opens=opens
                )

    def group_for(provider_id: str | None) -> str | None:
        # Checker.group_for, without coalescing: no order is ever pullable.
        return provider_id if coalesce and PROVIDERS.get(provider_id or "", 1) > 1 else None

    started = time.perf_counter()
    while True:
        due = scheduler.next_due()
        now = min(incoming[0][0] if incoming else math.inf, due if due is not None else math.inf)
        if now >= seconds:
            break
        while now >= next_sample:
            pending_samples.append(len(orders))
            next_sample += 60.0
        if incoming and incoming[0][0] <= now:
            _, _, name, order = heapq.heappop(incoming)
            order.provider = name
            orders[order.key] = order
            # What the listener does with a notified order.
            row = SweepRow(uuid.UUID(int=order.key), name, 0.0, None)
            schedule_row(scheduler, policy, row, now, group_for)
            continue
        taken = scheduler.pop_due(now, POP_LIMIT)
        groups: defaultdict[str, list[Order]] = defaultdict(list)
        for key in taken:
            groups[orders[key].provider].append(orders[key])
        for name, group in groups.items():
            size = PROVIDERS[name]
            pulled: list[Order] = []
            spare = spare_in_request(len(group), size, room=10**9)
            if spare and group_for(name) is not None:
                pulled = [orders[key] for key, _ in scheduler.pull_open(name, now, spare)]
            requests = -(-(len(group) + len(pulled)) // size)
            if now >= warmup:
                tallies[name].requests += requests
                tallies[name].per_minute[int(now // 60)] += requests
            check(now, group + pulled)
    wall = time.perf_counter() - started

    report: dict[str, Any] = {
        "coalesce": coalesce,
        "wall_s": round(wall, 2),
        # Per provider: both streams are the same size.
        "pending_mean": round(sum(pending_samples) / max(len(pending_samples), 1) / len(streams)),
    }
    for name, t in tallies.items():
        minutes = max(1, len(t.per_minute))
        mean_per_minute = t.requests / minutes
        early = sorted(t.early_shares)
        size = PROVIDERS[name]
        fewest = fewest_requests(slot_windows(t.slots, PULL_SHARE), size) if t.slots else None
        # The same ceiling had the windows been wider (what a wider rule could reach).
        wider = {
            str(share): round(t.checks / fewest_requests(slot_windows(t.slots, share), size), 2)
            for share in ceiling_shares
            if t.slots
        }
        report[name] = {
            "requests": t.requests,
            "checks": t.checks,
            "orders_per_request": round(t.checks / t.requests, 2) if t.requests else None,
            "fewest_requests_any_rule": fewest,
            "orders_per_request_at_best": round(t.checks / fewest, 2) if fewest else None,
            "orders_per_request_at_best_with_window_share": wider,
            "finished_orders": t.finished,
            "checks_per_finished_order": round(t.finished_checks / t.finished, 2)
            if t.finished
            else None,
            "checked_early": len(early),
            "early_share_p50": round(early[len(early) // 2], 4) if early else 0.0,
            "early_share_max": round(early[-1], 4) if early else 0.0,
            "checked_after_slot": t.late,
            "slots_checked_twice": t.twice,
            "slots_skipped": t.skipped,
            "busiest_minute_over_mean": round(max(t.per_minute.values()) / mean_per_minute, 2)
            if t.per_minute
            else None,
        }
    return report


def run(
    population: str,
    pending: int,
    hours: float,
    warmup_hours: float,
    seed: int,
    noise: float,
    ceiling_shares: tuple[float, ...] = (),
) -> dict[str, Any]:
    policy = BackoffPolicy()
    if population == "backlog":
        # The case: a provider with a backlog. The orders come in over
        # an hour and stay pending all day (given up after max_age).
        warmup_hours = 0.0
        seconds = hours * 3600
        streams = {
            name: arrivals(pending / 3600, 3600, math.inf, seed + i)
            for i, name in enumerate(PROVIDERS)
        }
    else:
        # A steady flow: Poisson arrivals, each order done after an exponential
        # time (mean MEAN_LIFE); Little's law gives the arrival rate for the
        # pending count (the give-up after max_age trims the tail a little).
        seconds = (hours + warmup_hours) * 3600
        streams = {
            name: arrivals(pending / MEAN_LIFE, seconds, MEAN_LIFE, seed + i)
            for i, name in enumerate(PROVIDERS)
        }
    figures = {}
    for coalesce in (True, False):
        # Without coalescing the unbatched provider runs exactly as with it
        # (it never pulls an order forward): run it once.
        fresh = {
            name: [Order(o.key, "", o.dispatched, o.finishes) for o in stream]
            for name, stream in streams.items()
            if coalesce or PROVIDERS[name] > 1
        }
        figures["coalesced" if coalesce else "one_by_one"] = simulate(
            fresh,
            policy,
            coalesce=coalesce,
            seconds=seconds,
            warmup=warmup_hours * 3600,
            clock_noise=noise,
            ceiling_shares=ceiling_shares,
            seed=seed,
        )
    on, off = figures["coalesced"], figures["one_by_one"]
    figures["batched_requests_saved"] = round(
        1 - on["batched"]["requests"] / off["batched"]["requests"], 3
    )
    return {"population": population, "pending_per_provider": pending, **figures}


def table(results: dict[str, Any]) -> str:
    lines = [
        "| orders | pending / provider | provider | coalescing | orders / request "
        "| at best, any rule | requests "
        "| checks / finished order | early (p50 / max of gap) | twice | skipped "
        "| busiest minute / mean |",
        "| --- | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for size in results["sizes"]:
        for name, mode in (
            ("batched", "coalesced"),
            ("batched", "one_by_one"),
            ("single", "coalesced"),
        ):
            r = size[mode][name]
            lines.append(
                f"| {size['population']} | {size['pending_per_provider']:,} "
                f"(mean {size[mode]['pending_mean']:,}) "
                f"| {name} | {'on' if mode == 'coalesced' else 'off'} "
                f"| {r['orders_per_request']} | {r['orders_per_request_at_best'] or '–'} "
                f"| {r['requests']:,} "
                f"| {r['checks_per_finished_order']} "
                f"| {r['early_share_p50']:.1%} / {r['early_share_max']:.1%} "
                f"| {r['slots_checked_twice']} | {r['slots_skipped']} "
                f"| {r['busiest_minute_over_mean']} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pending", type=int, action="append", help="orders pending per provider")
    parser.add_argument("--hours", type=float, default=24.0, help="measured hours")
    parser.add_argument("--warmup", type=float, default=6.0, help="hours before measuring")
    parser.add_argument("--clock-noise", type=float, default=0.005, help="seconds, each way")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--ceiling-share",
        type=float,
        action="append",
        help="also work out the ceiling for windows this share of the gap wide (repeatable)",
    )
    parser.add_argument(
        "--population", choices=["backlog", "flow"], action="append", help="default: both"
    )
    args = parser.parse_args(argv)
    sizes = []
    for population in args.population or ["backlog", "flow"]:
        for pending in args.pending or [1000, 10_000]:
            print(f"== {population}: {pending:,} orders per provider", file=sys.stderr)
            sizes.append(
                run(
                    population,
                    pending,
                    args.hours,
                    args.warmup,
                    args.seed,
                    args.clock_noise,
                    tuple(args.ceiling_share or ()),
                )
            )
    started = dt.datetime.now(dt.UTC)
    results = {
        "when": started.isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "hours": args.hours,
        "warmup_hours": args.warmup,
        "clock_noise_s": args.clock_noise,
        "sizes": sizes,
    }
    print(table(results))
    for size in sizes:
        for mode in ("coalesced", "one_by_one"):
            for share, best in size[mode]["batched"][
                "orders_per_request_at_best_with_window_share"
            ].items():
                print(
                    f"{size['population']} {size['pending_per_provider']:,} batched {mode}: "
                    f"at best {best} orders a request with windows of {float(share):.0%}"
                )
    out = write_report(results, started, prefix="coalescing-")
    print(f"\nwrote {out.relative_to(BENCH.parent)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
