"""The page's HTML from its views: every outside string shown as text, never as markup.

Property tests: whatever a provider or the table holds (markup, entities,
bidi overrides, lone surrogates, NUL, line separators), the text a browser
shows for it is exactly :func:`~order_monitor.page.render.shown` of it,
which has no invisible character left. Parsed with the standard library's
HTML parser, as a browser would, not matched by pattern.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import unicodedata
import uuid

from hypothesis import given, settings
from hypothesis import strategies as st

from order_monitor.delivery.store import OutboxSummary
from order_monitor.operator.status import GaveUpOrder
from order_monitor.page.activity import HourCounts
from order_monitor.page.reading import DeadLetter, InFlightGroup, OrderRow
from order_monitor.page.render import ago, render, shown, span
from order_monitor.page.view import (
    DaemonFacts,
    Deliveries,
    GaveUpLine,
    NextCheck,
    OrderView,
    Overview,
    ProviderLine,
)
from tests.page.dom import Page

NOW = dt.datetime(2026, 12, 7, 21, 0, tzinfo=dt.UTC)
ORDER = uuid.UUID("0b9f5c3e-8a7d-4f7e-9c1a-2f4b6d8e0a1c")

#: Any code point, surrogates included, with the ones that matter drawn often.
hostile = st.lists(
    st.one_of(
        st.text(
            st.one_of(
                st.characters(codec=None, exclude_categories=()),
                st.sampled_from(list("<>&\"'\u202e\u202d\u200b\u2028\x00\x1b\ud800\udfff")),
            ),
            max_size=20,
        ),
        st.sampled_from(["<script>document.title='pwned'</script>", "&lt;", "]]>", "{{ 7*7 }}"]),
    ),
    max_size=4,
).map("".join)


def _daemon(**overrides: object) -> DaemonFacts:
    facts = DaemonFacts(
        version="0.5.0",
        role="leader",
        database_unreachable=False,
        listener_up=True,
        capture="trigger",
        handoff="notify",
        last_sweep_s=12.0,
        sweep_interval_s=300.0,
        queue_lag_s=0.0,
        scheduled=3,
        being_checked=1,
        unwritten_s=0.0,
        started_at=NOW,
        uptime_s=3600.0,
    )
    return dataclasses.replace(facts, **overrides)


def _overview(text: str) -> Overview:
    line = ProviderLine(
        name="znet",
        kind="znet",
        provider_ids=("znet",),
        in_flight=7,
        oldest_s=90.0,
        hour=HourCounts({"done": 3, "error": 1}, 3600.0),
        circuit="open",
        paused_for_s=30.0,
        paused_until=NOW,
    )
    summary = OutboxSummary(2, 40.0, 1, 0, {"done": 2})
    return Overview(
        daemon=_daemon(not_ready=(text,), ready=False),
        read_at=NOW,
        read_age_s=1.0,
        read_problem=text,
        providers=[line],
        unserved=[InFlightGroup(text, 4, None)],
        in_flight_total=11,
        gave_up=[GaveUpLine(GaveUpOrder(ORDER, text, text, 60.0, text), None)],
        gave_up_count=1,
        gave_up_note=None,
        deliveries=Deliveries(
            summary, [DeadLetter(ORDER, ORDER, "done", 5, text, 10.0)], {"done": "approve"}
        ),
        refresh_s=5.0,
    )


def _invisible(text: str) -> list[str]:
    return [
        c for c in text if c != "\t" and unicodedata.category(c) in {"Cc", "Cf", "Cs", "Zl", "Zp"}
    ]


@settings(max_examples=300)
@given(text=hostile)
def test_every_outside_string_on_the_overview_is_shown_as_text(text: str) -> None:
    html = render("overview.html", view=_overview(text), refresh_s=5, version="0")
    page = Page(html)
    expected = " ".join(shown(text).split())
    assert not _invisible(shown(text).replace("\n", ""))
    gave_up = page.fields[("data-order", str(ORDER))]
    for field in ("provider", "reference", "message"):
        assert gave_up[field] == expected, field
    assert page.fields[("data-delivery", str(ORDER))]["error"] == expected
    if text:
        assert page.by_id["read-problem"] == f"The latest read failed: {expected}".strip()
    # No element but the template's own: no script, no image, no handler.
    assert "<script" not in html.lower()
    assert not _invisible(page.text.replace("\n", ""))


@settings(max_examples=300)
@given(text=hostile)
def test_every_outside_string_on_an_order_is_shown_as_text(text: str) -> None:
    row = OrderRow(
        id=ORDER,
        status=text,
        external_status=text,
        reference=text,
        provider_id=text,
        in_flight=False,
        dispatched_s=None,
        dispatch_issue=None,
        last_sync_s=5.0,
        completed_s=None,
        last_message=text,
    )
    view = OrderView(ORDER, row, (text, "znet"), text, NextCheck("finished"))
    page = Page(render("order.html", view=view, refresh_s=5, version="0"))
    expected = " ".join(shown(text).split())
    for field in ("status", "external-status", "reference", "last-message"):
        assert page.by_id[field] == expected, field
    assert not _invisible(page.text.replace("\n", ""))


def test_a_completed_orders_message_is_not_shown() -> None:
    row = OrderRow(
        ORDER, "pending", "done", "R1", "znet", False, 60.0, None, 5.0, 5.0, "code 1234-5678"
    )
    view = OrderView(
        ORDER, row, ("znet", "znet"), "finished", NextCheck("finished"), message_shown=False
    )
    html = render("order.html", view=view, refresh_s=5, version="0")
    assert "1234-5678" not in html
    assert Page(html).by_id["last-message"].startswith("not shown")


def test_the_overview_lays_out_the_numbers() -> None:
    page = Page(render("overview.html", view=_overview("x"), refresh_s=5, version="0"))
    znet = page.fields[("data-provider", "znet")]
    assert znet["in-flight"] == "7"
    assert znet["checks"] == "4"
    assert znet["error-ratio"] == "25 %"
    assert znet["circuit"] == "open"
    assert znet["paused"].startswith("30s more, until 2026-12-07 21:00:00 UTC")
    assert page.by_id["in-flight-total"] == "11"
    assert page.by_id["dead"] == "1"
    assert page.by_id["undelivered"] == "2"
    assert page.title.startswith("⚠")


def test_ages_read_as_an_operator_reads_them() -> None:
    assert ago(None) == "—"
    assert ago(0.0000731) == "0.0s"
    assert ago(0.5) == "0.5s"
    assert ago(-3.0) == "in the future"
    assert ago(4000.0) == "1h6m"
    assert span(-90.0) == "1m30s"


def test_shown_cuts_long_text_and_escapes_what_cannot_be_seen() -> None:
    assert shown(None) == "—"
    assert shown("a\u202eb") == "a\\u202eb"
    assert shown("\ud800") == "\\ud800"
    assert len(shown("x" * 1000)) == 300
    assert shown("Türkçe عربي") == "Türkçe عربي"
