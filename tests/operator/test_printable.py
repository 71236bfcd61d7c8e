"""Operator output: a provider's text reaches the terminal as text, never as a command."""

from __future__ import annotations

import json
import unicodedata

from hypothesis import given
from hypothesis import strategies as st

from order_monitor.operator import dumps, printable
from order_monitor.operator.doctor import format_finding
from order_monitor.operator.findings import Finding, Verdict

HOSTILE = "İşlem\x1b[2J\x1b]0;pwned\x07\x9b31m\u202edesrever\nPASS  fake: line\x00\ud800"


def unsafe(char: str) -> bool:
    return char != "\t" and unicodedata.category(char) in {"Cc", "Cf", "Cs", "Zl", "Zp"}


def test_escape_sequences_line_breaks_and_bidi_overrides_are_shown_escaped() -> None:
    shown = printable(HOSTILE)
    assert shown == (
        "İşlem\\x1b[2J\\x1b]0;pwned\\x07\\x9b31m\\u202edesrever\\x0aPASS  fake: line\\x00\\ud800"
    )
    assert not any(unsafe(c) for c in shown)


def test_a_doctor_line_cannot_forge_another_line() -> None:
    line = format_finding(Finding(Verdict.WARN, "provider fake", HOSTILE))
    assert "\n" not in line
    assert line.startswith("WARN  provider fake: İşlem\\x1b")


@given(st.text())
def test_printable_leaves_no_control_or_format_character(text: str) -> None:
    shown = printable(text)
    assert not any(unsafe(c) for c in shown)
    shown.encode("utf-8")  # a lone surrogate would raise here


@given(st.dictionaries(st.text(), st.text() | st.integers() | st.none(), max_size=5))
def test_json_output_is_the_same_document_and_safe_in_a_terminal(
    document: dict[str, object],
) -> None:
    text = dumps(document)
    assert json.loads(text) == document
    assert not any(unsafe(c) for c in text if c != "\n")
    text.encode("utf-8")
