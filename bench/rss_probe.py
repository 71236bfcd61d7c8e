"""Memory of the schedule: RSS before and after offering N orders to a Scheduler.

Run in a process of its own so nothing else the benchmark allocated is
counted. Orders are random 128-bit integers (what the daemon keeps of a
UUID) with due times spread over an hour, offered one by one as the sweep
and the listener do. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import resource
import time

from order_monitor.engine.scheduler import Scheduler


def vm_rss() -> int:
    """Resident set size now, in bytes (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--orders", type=int, default=1_000_000)
    args = parser.parse_args()
    rng = random.Random(1)
    gc.collect()
    before = vm_rss()
    scheduler = Scheduler()
    now = time.monotonic()
    started = time.perf_counter()
    for _ in range(args.orders):
        scheduler.offer(rng.getrandbits(128), now + rng.random() * 3600)
    offer_s = time.perf_counter() - started
    gc.collect()
    after = vm_rss()
    assert len(scheduler) == args.orders
    print(
        json.dumps(
            {
                "orders": args.orders,
                "rss_before": before,
                "rss_after": after,
                "bytes_per_order": (after - before) / args.orders,
                "max_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                "offer_seconds": offer_s,
            }
        )
    )


if __name__ == "__main__":
    main()
