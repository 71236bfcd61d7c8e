"""The application, in a process of its own: orders dispatched at a fixed rate.

Each order is one INSERT of an already dispatched row (``provider_referans``
set, ``"externalStatus"='sent'``) in its own transaction, the moment the
insert trigger fires its NOTIFY. Right after each COMMIT returns, the time
(``time.time``, the clock the fake provider stamps its requests with) is
recorded; the driver pairs it with the provider's first request for that
reference.

Usage: ``python bench/app_writer.py --dsn DSN --rate 200 --count 3000
--prefix d0.lat200 --out commits.json``
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
    parser.add_argument("--rate", type=float, required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    commits: dict[str, float] = {}
    behind = 0
    with psycopg.connect(args.dsn) as conn:
        conn.execute("SELECT 1")  # connect and warm up before the clock starts
        conn.commit()
        start = time.perf_counter()
        for n in range(args.count):
            # A fixed timetable: a slow COMMIT does not push later orders back.
            wait = start + n / args.rate - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            else:
                behind += 1
            reference = f"{args.prefix}.{n}"
            conn.execute(INSERT, (reference,))
            conn.commit()
            commits[reference] = time.time()
        elapsed = time.perf_counter() - start
    args.out.write_text(
        json.dumps(
            {
                "commits": commits,
                "elapsed_s": elapsed,
                "achieved_rate": args.count / elapsed,
                "late_starts": behind,
            }
        )
    )


if __name__ == "__main__":
    main()
