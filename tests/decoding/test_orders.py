"""Which decoded rows are handed to the confirmer (pure): never one the server's rule keeps."""

from __future__ import annotations

import uuid

from hypothesis import given
from hypothesis import strategies as st

from order_monitor.config import Layout
from order_monitor.decoding.orders import may_be_in_flight, order_ids
from order_monitor.decoding.pgoutput import UNCHANGED_TOAST

LAYOUT = Layout()


def row(**values: object) -> dict[str, object]:
    base: dict[str, object] = {
        "id": str(uuid.uuid4()),
        "provider_referans": "R1",
        "externalStatus": "sent",
        "status": "pending",
    }
    base.update(values)
    return base


def test_a_dispatched_order_is_handed_on_and_the_others_are_not() -> None:
    assert may_be_in_flight(row(), LAYOUT)  # type: ignore[arg-type]
    assert may_be_in_flight(row(externalStatus="SENT"), LAYOUT)  # type: ignore[arg-type]
    assert not may_be_in_flight(row(provider_referans=None), LAYOUT)  # type: ignore[arg-type]
    assert not may_be_in_flight(row(externalStatus="done"), LAYOUT)  # type: ignore[arg-type]
    assert not may_be_in_flight(row(status="Approved"), LAYOUT)  # type: ignore[arg-type]
    assert not may_be_in_flight(row(externalStatus=None), LAYOUT)  # type: ignore[arg-type]


def test_what_python_cannot_judge_as_postgresql_would_is_handed_on() -> None:
    """The confirmer reads the row with the server's own rule: erring this way loses nothing."""
    assert may_be_in_flight(row(externalStatus="SENT\u0130"), LAYOUT)  # type: ignore[arg-type]
    assert may_be_in_flight(row(status=UNCHANGED_TOAST), LAYOUT)  # type: ignore[arg-type]
    assert may_be_in_flight(row(status="approvéd"), LAYOUT)  # type: ignore[arg-type]


def test_ids_are_handed_on_once_in_order_and_junk_is_counted() -> None:
    a, b = uuid.uuid4(), uuid.uuid4()
    rows = [row(id=str(a)), row(id=str(b)), row(id=str(a)), row(id="not-a-uuid"), row(id=None)]
    assert order_ids(rows, LAYOUT) == ([a, b], 2)  # type: ignore[arg-type]


SQL_LOWER_ASCII = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def server_rule(external: str | None, status: str | None, reference: str | None) -> bool:
    """The in-flight rule as PostgreSQL evaluates it on ASCII text (lower() maps A-Z only)."""
    if reference is None or external is None or status is None:
        return False
    return (
        external.translate(SQL_LOWER_ASCII) in LAYOUT.in_flight_external_statuses
        and status.translate(SQL_LOWER_ASCII) not in LAYOUT.final_statuses
    )


WORDS = st.sampled_from(
    [*LAYOUT.in_flight_external_statuses, *LAYOUT.final_statuses, "done", "Sent", "PENDING"]
)
TEXT = st.one_of(st.none(), WORDS, st.text(max_size=12))


@given(TEXT, TEXT, st.one_of(st.none(), st.text(max_size=5)))
def test_no_row_the_server_keeps_in_flight_is_ever_left_out(
    external: str | None, status: str | None, reference: str | None
) -> None:
    decoded = row(externalStatus=external, status=status, provider_referans=reference)
    if server_rule(external, status, reference):
        assert may_be_in_flight(decoded, LAYOUT)  # type: ignore[arg-type]
