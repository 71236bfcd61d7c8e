"""The trigger's announcement rule, against a model, over every sequence of writes.

Since schema version 6 the in-flight rule and the "entered flight, or got a
new reference" test run in the trigger function (the WHEN only tries the
idle lock), so they are plpgsql now: this checks them against the rule as
the README states it (in Python, as the decoding capture's
:func:`~order_monitor.decoding.orders.may_be_in_flight` applies it), for any
row the application may write and any sequence of updates, with the daemon
idle (it holds the idle lock, so the function runs). The application's session LISTENs too: a session receives
its own notifications at its COMMIT, before the statement returns, so what
a write announced is known without waiting for anything.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from order_monitor import schema
from order_monitor.config import Layout
from order_monitor.decoding.orders import may_be_in_flight
from tests.conftest import as_daemon

LAYOUT = Layout()
Conn = psycopg.Connection[tuple[object, ...]]

#: Every case the rule distinguishes: in or out of the lists, in any case.
EXTERNAL = ("sent", "SENT", "Processing", "unknown", "done", "not_sent", "manual_required")
STATUS = ("pending", "PENDING", "processing", "approved", "Rejected", "REJECTED")
REFERENCE = (None, "R-1", "R-2")


@dataclass(frozen=True)
class Row:
    reference: str | None
    external: str
    status: str

    def in_flight(self) -> bool:
        # The decoding capture's rule in Python: exact for these values, all ASCII.
        c = LAYOUT.columns
        row = {
            c.provider_ref: self.reference,
            c.external_status: self.external,
            c.status: self.status,
        }
        return may_be_in_flight(row, LAYOUT)


def announces(old: Row | None, new: Row, touched: bool) -> bool:
    """The rule: an order is announced when it enters flight or gets a new reference in flight.

    *touched*: whether the UPDATE names the reference or a status column
    (UPDATE OF); an INSERT always is.
    """
    if not new.in_flight() or not touched:
        return False
    return old is None or not old.in_flight() or old.reference != new.reference


rows = st.builds(
    Row,
    reference=st.sampled_from(REFERENCE),
    external=st.sampled_from(EXTERNAL),
    status=st.sampled_from(STATUS),
)
#: An update: the columns it sets (a subset, possibly to the value they have), or
#: None for an update of a column the triggers do not watch.
updates = st.one_of(
    st.none(),
    st.fixed_dictionaries(
        {},
        optional={
            "reference": st.sampled_from(REFERENCE),
            "external": st.sampled_from(EXTERNAL),
            "status": st.sampled_from(STATUS),
        },
    ).filter(bool),
)
COLUMN = {"reference": "provider_referans", "external": "externalStatus", "status": "status"}


@pytest.fixture
def sessions(db: str) -> Iterator[tuple[Conn, list[str]]]:
    """The application's session, which LISTENs, and the payloads it received."""
    with (
        psycopg.connect(as_daemon(db), autocommit=True) as daemon,
        psycopg.connect(db, autocommit=True) as app,
    ):
        daemon.execute("SELECT pg_catalog.pg_advisory_lock(%s)", (schema.idle_lock_key(LAYOUT),))
        received: list[str] = []
        app.add_notify_handler(lambda n: received.append(n.payload))
        app.execute("LISTEN order_monitor")
        yield app, received


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(first=rows, changes=st.lists(updates, max_size=4))
def test_the_function_announces_exactly_what_the_rule_says(
    sessions: tuple[Conn, list[str]], first: Row, changes: list[dict[str, object] | None]
) -> None:
    app, received = sessions
    received.clear()
    inserted = app.execute(
        'INSERT INTO product_orders (provider_referans, "externalStatus", status)'
        " VALUES (%s, %s, %s) RETURNING id",
        (first.reference, first.external, first.status),
    ).fetchone()
    assert inserted is not None
    order = str(inserted[0])
    expected = [order] if announces(None, first, touched=True) else []
    assert received == expected, f"insert {first}"

    row = first
    for change in changes:
        received.clear()
        if change is None:
            app.execute("UPDATE product_orders SET notes = '{}' WHERE id = %s", (uuid.UUID(order),))
            expected = []
        else:
            assignments = ", ".join(f'"{COLUMN[field]}" = %s' for field in change)
            app.execute(
                f"UPDATE product_orders SET {assignments} WHERE id = %s",
                (*change.values(), uuid.UUID(order)),
            )
            new = replace(row, **change)  # type: ignore[arg-type]
            expected = [order] if announces(row, new, touched=True) else []
            row = new
        assert received == expected, f"{row} after {change}"
