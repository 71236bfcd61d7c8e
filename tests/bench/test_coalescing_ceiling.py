"""The ceiling bench/coalescing.py reports: the fewest requests any rule could make.

The bench's claim that the daemon's batching is as good as any rule's rests
on ``fewest_requests`` being the true minimum, so it is held to a brute
force over small random cases.
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

# The bench's scripts import their helpers as top-level modules (``common``).
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from coalescing import fewest_requests

Window = tuple[float, float]


def fewest_by_search(windows: list[Window], size: int) -> int:
    """Try every placement of k requests at window deadlines, k = 1, 2, ...

    Deadlines are enough: a request can move to the earliest deadline among
    the windows it carries and still be inside each of them.
    """
    deadlines = sorted({end for _, end in windows})
    for k in range(1, len(windows) + 1):
        for times in itertools.combinations_with_replacement(deadlines, k):
            if _carries_all(windows, [t for t in times for _ in range(size)]):
                return k
    raise AssertionError("one request per window always suffices")


def _carries_all(windows: list[Window], places: list[float]) -> bool:
    """A matching of every window to a place in it (Kuhn's augmenting paths)."""
    taken: dict[int, int] = {}

    def place(w: int, seen: set[int]) -> bool:
        start, end = windows[w]
        for p, at in enumerate(places):
            if start <= at <= end and p not in seen:
                seen.add(p)
                if p not in taken or place(taken[p], seen):
                    taken[p] = w
                    return True
        return False

    return all(place(w, set()) for w in range(len(windows)))


windows_strategy = st.lists(
    st.tuples(st.integers(0, 12), st.integers(0, 5)).map(lambda t: (float(t[0]), float(sum(t)))),
    min_size=1,
    max_size=6,
)


@given(windows=windows_strategy, size=st.integers(1, 3))
def test_the_greedy_ceiling_is_the_true_minimum(windows: list[Window], size: int) -> None:
    assert fewest_requests(windows, size) == fewest_by_search(windows, size)


def test_disjoint_windows_need_a_request_each_and_nested_ones_share() -> None:
    assert fewest_requests([(0.0, 1.0), (2.0, 3.0), (4.0, 5.0)], 50) == 3
    assert fewest_requests([(0.0, 10.0), (1.0, 9.0), (2.0, 8.0)], 50) == 1
    assert fewest_requests([(0.0, 10.0), (1.0, 9.0), (2.0, 8.0)], 2) == 2
