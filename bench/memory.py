"""Memory of the schedule under sustained load: bytes per live order, counted by tracemalloc.

bench/rss_probe.py measures a schedule that was only offered to. This drives
the real Scheduler the way a busy daemon does, cycle after cycle: due orders
are popped and completed with their next slot, half of them for a batched
provider (so they also get an *open* entry) whose requests are always full
(no room to pull, the case that once grew without bound), a sweep offers a
tenth of the orders again, and some orders leave and new ones arrive so the
live count stays put. The allocations still held at the end, and the peak
over the whole run, are divided by the live orders; the entries of each
internal structure are printed beside them, so a leak shows as growth from
one report to the next. Prints one JSON object.

    .venv/bin/python bench/memory.py --orders 100000 --cycles 30
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import time
import tracemalloc
from typing import Any

from order_monitor.engine.scheduler import Scheduler

BATCHED = "barakat"


def drive(orders: int, cycles: int, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    gc.collect()
    tracemalloc.start()
    scheduler = Scheduler()
    live = [rng.getrandbits(128) for _ in range(orders)]
    now = 0.0
    for order in live:
        scheduler.offer(order, now + rng.random() * 60)
    checks = 0
    samples: list[dict[str, int]] = []
    started = time.perf_counter()
    for cycle in range(cycles):
        now += 30.0
        for order in scheduler.pop_due(now, orders):
            checks += 1
            delay = rng.uniform(5.0, 60.0)
            if order % 2:
                # A batched provider's order: may be pulled from opens on.
                scheduler.complete(order, now + delay, group=BATCHED, opens=now + 0.8 * delay)
            else:
                scheduler.complete(order, now + delay)
        # The sweep sees a tenth of the orders again (most offers change nothing).
        for order in rng.sample(live, orders // 10):
            scheduler.offer(order, now + rng.uniform(0.0, 120.0))
        # Finished orders leave, new ones arrive: the live count stays put.
        for _ in range(orders // 100):
            index = rng.randrange(orders)
            scheduler.forget(live[index])
            live[index] = rng.getrandbits(128)
            scheduler.offer(live[index], now + rng.random() * 60)
        if cycle % 5 == 4:
            samples.append({"cycle": cycle + 1, **scheduler.entries})
    seconds = time.perf_counter() - started
    gc.collect()
    current, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    held = len(scheduler)
    return {
        "orders": held,
        "cycles": cycles,
        "checks": checks,
        "bytes_per_order": round(current / held, 1),
        "peak_bytes_per_order": round(peak / held, 1),
        "traced_bytes": current,
        "traced_peak_bytes": peak,
        "entries": samples,
        "seconds": round(seconds, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--orders", type=int, default=100_000)
    parser.add_argument("--cycles", type=int, default=30)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    print(json.dumps(drive(args.orders, args.cycles, args.seed), indent=2))


if __name__ == "__main__":
    main()
