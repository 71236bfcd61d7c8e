"""scrub()'s worst case: a secret ending in "*" whose replacement chains through the text.

"a**" in "aaaa…a**": each replacement made another occurrence out of the
marker, one round a character, which made scrubbing quadratic (a 4 KB answer
took seconds). Times scrub() on that text and on ordinary text of the same
sizes; linear means the time grows as the size does. Prints one JSON object.

    .venv/bin/python bench/scrub.py
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from functools import partial

from order_monitor.redaction import scrub

SIZES = (4096, 16384, 65536)
CASES: dict[str, tuple[str, Callable[[int], str]]] = {
    "chain a** in a...a**": ("a**", lambda n: "a" * (n - 2) + "**"),
    "chain **a in **a...a": ("**a", lambda n: "**" + "a" * (n - 2)),
    "stars ***a*** in *...*": ("***a***", lambda n: "*" * n),
    "ordinary: a query string with the secret": (
        "Zs+9/Qw=x&k7~Q!",
        lambda n: ("kod=1&sifre=Zs%2B9/Qw%3Dx%26k7~Q!&id=7 " * n)[:n],
    ),
}


def best_of(runs: int, call: Callable[[], object]) -> float:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    results: dict[str, dict[str, float]] = {}
    for name, (secret, make) in CASES.items():
        results[name] = {
            f"{size}": round(best_of(3, partial(scrub, make(size), [secret])), 4) for size in SIZES
        }
    print(json.dumps({"seconds_by_text_size": results}, indent=2))


if __name__ == "__main__":
    main()
