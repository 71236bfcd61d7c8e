"""The in-memory schedule of pending checks: a min-heap with one live entry per order.

Pure code: no I/O and no clock of its own (the caller passes ``now``), so
timing is tested with plain numbers.

Memory matters: a shop can have a million orders in flight. An order is held
as its UUID's 128-bit integer and a due time, nothing else (the checker
re-reads the row anyway); an order of a batched provider also has an entry in
its provider's *open* heap. Entries that no longer count (an order checked,
rescheduled or forgotten) are dropped lazily, and every structure is compacted
once its dead entries outnumber its live ones, so memory follows the orders
held, whatever the load: bench/memory.py measures it under sustained load.

Batched providers answer up to 50 orders a request, but orders dispatched at
different moments are due at different moments and would each go out alone.
So an order given back with a *group* (its provider) and an *opens* time (a
little before its due time: policy.PULL_SHARE) can be taken early, with
:meth:`pull_open`, by a request to that provider that goes out anyway.
"""

from __future__ import annotations

import heapq
from typing import TypeAlias

#: (due, order): an order's place in the schedule.
_Entry: TypeAlias = tuple[float, int]


class Scheduler:
    """Orders waiting for a check, and orders whose check is under way.

    An order is in one of two places: *scheduled* (in the heap, with a due
    time) or *in flight* (handed out by :meth:`pop_due`, not yet returned by
    :meth:`complete`). Offering an order that is in flight does not schedule
    a second check; it is remembered and applied when the first completes, so
    notifications and sweeps can never cause duplicate polling. An offer that
    names the provider reference the check itself saw is news of nothing (a
    notification or a sweep that read the row just before the check did): it
    is dropped at completion rather than bring a second request for the slot.
    """

    __slots__ = ("_due", "_heap", "_in_flight", "_open", "_open_entries", "_requeue", "_slack")

    def __init__(self, *, slack: int = 1024) -> None:
        #: Dead entries tolerated in a structure beyond its live ones before
        #: it is compacted (small in tests, so that compaction is exercised).
        self._slack = slack
        self._heap: list[_Entry] = []
        #: The order's live heap entry. Liveness is by identity, not by value:
        #: an order rescheduled at the very same due time (or in another
        #: group) leaves its old entries dead instead of alive twice.
        self._due: dict[int, _Entry] = {}
        self._in_flight: set[int] = set()
        #: Offers made while in flight: the earliest due time, and the
        #: reference they read (None when none was given, or they disagree).
        self._requeue: dict[int, tuple[float, str | None]] = {}
        #: Per group, (opens, entry) by opening time. Live while *entry* is
        #: still the order's heap entry; any other schedule change (a check,
        #: an earlier offer) leaves it dead, to be dropped when met or at the
        #: next compaction: no second index to keep in step.
        self._open: dict[str, list[tuple[float, _Entry]]] = {}
        #: Entries in every open heap together (live and dead).
        self._open_entries = 0

    def offer(
        self,
        order: int,
        due: float,
        *,
        group: str | None = None,
        opens: float | None = None,
        reference: str | None = None,
    ) -> bool:
        """Make sure *order* is checked no later than *due*.

        An order already scheduled earlier keeps its time. With a *group*
        and an *opens* time, :meth:`pull_open` may take it from *opens* on
        (as for :meth:`complete`). Returns True when the earliest due time
        of the whole schedule moved earlier, which is when a waiting
        dispatcher should be woken. *reference* is the provider reference
        the offer was made from, if it read the row (see the class docstring).
        """
        if order in self._in_flight:
            previous = self._requeue.get(order)
            if previous is None:
                self._requeue[order] = (due, reference)
            else:
                earlier, seen = previous
                self._requeue[order] = (
                    min(due, earlier),
                    reference if reference == seen else None,
                )
            return False
        current = self._due.get(order)
        if current is not None and current[0] <= due:
            return False
        head = self._heap[0][0] if self._heap else None
        self._push(order, due, group, opens)
        return head is None or due < head

    def pop_due(self, now: float, limit: int) -> list[int]:
        """Take up to *limit* orders due at or before *now*, earliest first."""
        taken: list[int] = []
        heap = self._heap
        while heap and len(taken) < limit and heap[0][0] <= now:
            entry = heapq.heappop(heap)
            order = entry[1]
            if self._due.get(order) is not entry:
                continue  # superseded by a later offer/reschedule
            del self._due[order]
            self._in_flight.add(order)
            taken.append(order)
        # Each order taken leaves its open entry, if any, dead.
        self._compact_if_needed()
        return taken

    def complete(
        self,
        order: int,
        next_due: float | None,
        *,
        group: str | None = None,
        opens: float | None = None,
        checked: str | None = None,
    ) -> None:
        """Return an order handed out by :meth:`pop_due` or :meth:`pull_open`.

        *next_due* is None when the order needs no further check. An offer
        made while it was in flight still applies (for example a new
        ``provider_referans``, which the finished check did not see), unless
        it read the very reference the check was made with (*checked*). With
        a *group* and an *opens* time (at most *next_due*), :meth:`pull_open`
        for that group may take the order from *opens* on.
        """
        self._in_flight.discard(order)
        offered = self._requeue.pop(order, None)
        requeued = None
        if offered is not None and (offered[1] is None or offered[1] != checked):
            requeued = offered[0]
        if requeued is not None and (next_due is None or requeued < next_due):
            self._push(order, requeued, None, None)
        elif next_due is not None:
            self._push(order, next_due, group, opens)

    def pull_open(self, group: str, now: float, limit: int) -> list[tuple[int, float]]:
        """Take up to *limit* orders of *group* whose opening time has come, earliest first.

        They are handed out as by :meth:`pop_due`, before their due time; each
        comes with that due time, for a caller that has to give it back.
        """
        heap = self._open.get(group)
        taken: list[tuple[int, float]] = []
        while heap and len(taken) < limit and heap[0][0] <= now:
            _, entry = heapq.heappop(heap)
            self._open_entries -= 1
            due, order = entry
            if self._due.get(order) is not entry:
                continue  # checked or rescheduled since: a dead entry
            del self._due[order]
            self._in_flight.add(order)
            taken.append((order, due))
        if heap is not None and not heap:
            del self._open[group]
        # Each order taken leaves its entry in the main heap dead.
        self._compact_if_needed()
        return taken

    def forget(self, order: int) -> None:
        """Drop an order entirely (it is no longer in flight in the database)."""
        self._due.pop(order, None)
        self._in_flight.discard(order)
        self._requeue.pop(order, None)
        self._compact_if_needed()

    def next_due(self) -> float | None:
        """The earliest due time, or None when nothing is scheduled."""
        self._drop_stale_head()
        return self._heap[0][0] if self._heap else None

    def lag(self, now: float) -> float:
        """How far the most overdue check is behind its due time (0 if none is)."""
        head = self.next_due()
        return max(0.0, now - head) if head is not None else 0.0

    def due_in(self, order: int) -> float | None:
        entry = self._due.get(order)
        return None if entry is None else entry[0]

    def __contains__(self, order: object) -> bool:
        return order in self._due or order in self._in_flight

    def __len__(self) -> int:
        return len(self._due) + len(self._in_flight)

    @property
    def scheduled(self) -> int:
        return len(self._due)

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    @property
    def entries(self) -> dict[str, int]:
        """Entries each internal structure holds, live or dead (for tests and bench/)."""
        return {
            "heap": len(self._heap),
            "open": self._open_entries,
            "due": len(self._due),
            "in_flight": len(self._in_flight),
            "requeue": len(self._requeue),
        }

    def _push(self, order: int, due: float, group: str | None, opens: float | None) -> None:
        entry = (due, order)
        self._due[order] = entry
        heapq.heappush(self._heap, entry)
        if group is not None and opens is not None:
            heapq.heappush(self._open.setdefault(group, []), (min(opens, due), entry))
            self._open_entries += 1
        self._compact_if_needed()

    def _compact_if_needed(self) -> None:
        # Each order an operation handles leaves at most one dead entry in
        # each heap, and a compaction runs only once the dead outnumber the
        # live (plus the slack), so its cost is paid by the operations that
        # made them: amortised O(1) an order, and each heap stays within
        # 2 * scheduled + slack.
        # Checked after every operation, not only on push: checks that return
        # no order (or forget) shrink the live set without pushing anything.
        bound = 2 * len(self._due) + self._slack
        if len(self._heap) > bound:
            self._heap = list(self._due.values())
            heapq.heapify(self._heap)
        if self._open_entries > bound:
            total = 0
            for group, entries in list(self._open.items()):
                live = [e for e in entries if self._due.get(e[1][1]) is e[1]]
                if live:
                    heapq.heapify(live)
                    self._open[group] = live
                    total += len(live)
                else:
                    del self._open[group]
            self._open_entries = total

    def _drop_stale_head(self) -> None:
        heap = self._heap
        while heap and self._due.get(heap[0][1]) is not heap[0]:
            heapq.heappop(heap)
