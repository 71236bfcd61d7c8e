"""While busy, which orders to read back: those changed since a transaction id (pure).

While the daemon is busy the trigger calls nothing (engine.handoff), so
the daemon looks for new orders itself: every :func:`read_interval` it asks
for the orders in flight whose row was written by a transaction that the
previous read could not see. It remembers that boundary as a *mark*: the
``xmin`` of the previous read's snapshot, the oldest transaction still
running when it was taken. Every transaction that commits a row after that
read either was running then (so its id is at least the mark) or started
later (a larger id still); a row written in a subtransaction has an id
larger than its parent's. So ``row xmin >= mark`` returns every row the
previous read missed, and some it saw (those of transactions running at
the time, and rows updated since): the daemon drops the ones it knows.

Decided:

* the comparison runs in the server on 32-bit ids, with ``age()``: exact
  while the mark is less than 2^31 transactions old. The mark is kept as a
  64-bit ``xid8`` here; a read whose snapshot shows the mark more than
  :data:`MAX_MARK_AGE` old (a daemon busy and unable to read for a billion
  transactions) may have missed rows, so every order in flight is read
  instead (:meth:`Mark.exact_at`);
* a read moves the mark, whatever the handoff then takes in. The handoff
  takes every id (they are orders in flight, not notifications): leaving
  some for the next read made every later read return more;
* a long transaction that has written (so has an id: a read-only one has
  none) holds the snapshot's xmin back, so every read returns what changed
  since it began (bounded by the orders in flight): the daemon drops the
  known ones without another query,
  ``order_monitor_busy_read_orders_total{result="known"}`` counts them, and
  while they are most of a read the reads return ids, not rows
  (:func:`rows_pay`);
* going busy, the mark is taken in the same statement that releases the
  idle lock, before the release: every transaction the trigger then leaves
  unannounced is still running at that snapshot, or starts after it.

No clock, no I/O: the handoff passes the snapshots its reads saw.
"""

from __future__ import annotations

from typing import Final

#: 32-bit transaction ids wrap around; ``age()`` compares two of them
#: correctly while they are less than 2^31 apart. Half that, to be safe.
MAX_MARK_AGE: Final = 2**30
_XID_SPAN: Final = 2**32
#: Transaction ids below this are special (invalid, bootstrap, frozen):
#: ``age()`` of one is the largest integer, which would return no row.
_FIRST_NORMAL_XID: Final = 3

#: The busy read's interval: a tenth of the first check's delay, at most
#: this (an order is found well before its first slot)...
MAX_READ_INTERVAL: Final = 1.0
#: ...at least this (INITIAL_DELAY near 0: an order is then checked as soon as
#: it is found, so it is found within a few milliseconds, as NOTIFY would)...
MIN_READ_INTERVAL: Final = 0.005
#: ...and at least this many times the last read's duration, so the reads
#: never take more than a tenth of the database's time, however many orders
#: are in flight.
READ_COST_FACTOR: Final = 10.0


def read_interval(initial_delay: float, last_read_seconds: float) -> float:
    """Seconds between two busy reads (see the constants above)."""
    target = min(max(initial_delay, 0.0) / 10, MAX_READ_INTERVAL)
    return max(target, MIN_READ_INTERVAL, READ_COST_FACTOR * max(last_read_seconds, 0.0))


def rows_pay(taken: int, known: int) -> bool:
    """Whether the next busy read should return the orders' rows, not only their ids.

    A new order read as a row needs no confirm by primary key (a second
    statement, and most of the daemon's work per order); a known one, which
    the daemon drops, costs more as a row than as an id. A read that
    returned more known orders than new ones (a long writing transaction
    holds the mark back, so each read returns again all that changed since
    it began) is followed by one of ids; a read that returned mostly new
    ones, by one of rows.
    """
    return taken >= known


class Mark:
    """The oldest transaction whose rows the next busy read must return."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        #: A 64-bit transaction id (``xid8``), or None: read every order in flight.
        self.value: int | None = None

    def since(self) -> int | None:
        """The 32-bit id to compare row xmins with, or None for every order in flight."""
        if self.value is None:
            return None
        xid = self.value % _XID_SPAN
        return xid if xid >= _FIRST_NORMAL_XID else None

    def exact_at(self, next_xid: int) -> bool:
        """Whether ``age()`` compares rows with this mark exactly, at *next_xid* (xid8).

        A read's snapshot says how far the transaction ids have gone since
        (``pg_snapshot_xmax``); past :data:`MAX_MARK_AGE` a 32-bit age could
        have wrapped and the read left rows out.
        """
        return self.value is not None and next_xid - self.value <= MAX_MARK_AGE

    def read(self, snapshot_xmin: int) -> None:
        """After a read whose snapshot had *snapshot_xmin*: the next returns what it missed."""
        # max: a read's snapshot is never older than the mark it was given,
        # but a stale value must never move the mark back.
        self.value = snapshot_xmin if self.value is None else max(self.value, snapshot_xmin)

    def released(self, snapshot_xmin: int) -> None:
        """The idle lock was released in a statement whose snapshot had *snapshot_xmin*.

        While idle, every order was NOTIFYed: only what follows the release
        must be read back, and this mark is older than all of it.
        """
        self.value = snapshot_xmin

    # A lock lost with its session (no statement to take a mark in) needs
    # nothing: the mark kept from before is older than the loss, and an older
    # mark is always safe (every transaction running at any later moment has
    # an id at least that); with none yet, the next read takes everything.
