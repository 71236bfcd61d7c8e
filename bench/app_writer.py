"""The application, in a process of its own: orders dispatched at a fixed rate, or flat out.

Each order is one INSERT of an already dispatched row (``provider_referans``
set, ``"externalStatus"='sent'``) in its own transaction, the moment the
insert trigger fires. Right after each COMMIT returns, the time
(``time.time``, the clock the fake provider stamps its requests with) is
recorded; the driver pairs it with the provider's first request for that
reference.

Usage: ``python bench/app_writer.py --dsn DSN --rate 200 --count 3000
--prefix d0.lat200 --out commits.json``; ``--rate 0 --seconds 10`` commits
as fast as one connection can for ten seconds. ``--start-at T`` (a
``time.time()`` value) starts the timetable there instead of right after
connecting, so several writers can share one timetable.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import psycopg

INSERT = """INSERT INTO product_orders (provider_referans, "providerId", "externalStatus", "sentAt")
            VALUES (%s, 'bench', 'sent', now())"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--rate", type=float, required=True, help="orders/s; 0: as fast as it can")
    parser.add_argument("--count", type=int, help="orders to commit (needed with a rate)")
    parser.add_argument("--seconds", type=float, help="with --rate 0: how long to commit")
    parser.add_argument("--start-at", type=float, help="time.time() at which the timetable starts")
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.rate > 0 and args.count is None:
        parser.error("--count is needed with a rate")
    if args.rate <= 0 and args.seconds is None:
        parser.error("--seconds is needed with --rate 0")

    commits: dict[str, float] = {}
    behind = 0
    with psycopg.connect(args.dsn) as conn:
        conn.execute("SELECT 1")  # connect and warm up before the clock starts
        conn.commit()
        if args.start_at is not None:
            time.sleep(max(0.0, args.start_at - time.time()))
        start = time.perf_counter()
        n = 0
        while True:
            if args.rate > 0:
                if n == args.count:
                    break
                # A fixed timetable: a slow COMMIT does not push later orders back.
                wait = start + n / args.rate - time.perf_counter()
                if wait > 0:
                    time.sleep(wait)
                else:
                    behind += 1
            elif time.perf_counter() - start >= args.seconds:
                break
            reference = f"{args.prefix}.{n}"
            conn.execute(INSERT, (reference,))
            conn.commit()
            commits[reference] = time.time()
            n += 1
        elapsed = time.perf_counter() - start
    args.out.write_text(
        json.dumps(
            {
                "commits": commits,
                "elapsed_s": elapsed,
                "achieved_rate": len(commits) / elapsed,
                "late_starts": behind,
            }
        )
    )


if __name__ == "__main__":
    main()
