"""The orders that gave up lately, as the page lists them without scanning the table.

Pure code: the caller passes the clock's reading.

"Gave up in the last 24 hours" filters on ``"lastSyncAt"``, which the
application's table does not index: asked every refresh it would be a
sequential scan of the whole table every few seconds. Instead the page reads
the table once, when first shown in a term as leader (:meth:`seed`), and
the writer tells the ledger of every order it gives up from then on
(:meth:`record`). Each refresh re-reads only these ids, by primary key, so
an order a human has dealt with since leaves the list at the next refresh.

Bounded: at most *capacity* ids (the newest kept), none older than *window*.
"""

from __future__ import annotations

import uuid
from collections import OrderedDict
from collections.abc import Iterable
from typing import Final

DAY: Final = 86400.0
CAPACITY: Final = 1000


class GaveUpLedger:
    """Order ids that gave up within *window*, newest last, with when."""

    def __init__(self, *, window: float = DAY, capacity: int = CAPACITY) -> None:
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self.window = window
        self.capacity = capacity
        self._orders: OrderedDict[uuid.UUID, float] = OrderedDict()
        #: The leadership term the table was last read for; None: never.
        self.seeded_for: int | None = None
        #: True when more gave up than the ledger holds (the oldest were dropped).
        self.overflowed = False

    def record(self, order: uuid.UUID, at: float) -> None:
        """*order* gave up at *at* (a second give-up moves it to the newest)."""
        self._orders.pop(order, None)
        self._orders[order] = at
        while len(self._orders) > self.capacity:
            self._orders.popitem(last=False)
            self.overflowed = True

    def seed(self, found: Iterable[tuple[uuid.UUID, float]], *, term: int) -> None:
        """What a read of the table found for *term*: (id, when it gave up), any order.

        Kept beside what was recorded meanwhile: the writer may give an order
        up while the read runs, and a record is never older than the read.
        """
        merged = dict(found)
        for order, at in self._orders.items():
            merged[order] = max(at, merged.get(order, at))
        self._orders.clear()
        for order, at in sorted(merged.items(), key=lambda item: item[1]):
            self.record(order, at)
        self.seeded_for = term

    def forget(self, orders: Iterable[uuid.UUID]) -> None:
        """These no longer need a human (the row says so): drop them."""
        for order in orders:
            self._orders.pop(order, None)

    def recent(self, now: float) -> list[uuid.UUID]:
        """Ids that gave up within the window, newest first; older ones are dropped."""
        start = now - self.window
        while self._orders:
            oldest, at = next(iter(self._orders.items()))
            if at >= start:
                break
            del self._orders[oldest]
        return list(reversed(self._orders))

    def __len__(self) -> int:
        return len(self._orders)
