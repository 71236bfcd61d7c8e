"""The log renderer: odd text in any field never raises and stays one valid JSON line."""

from __future__ import annotations

import json
from collections.abc import Iterator
from io import StringIO
from uuid import UUID

import pytest
import structlog
from hypothesis import given, settings
from hypothesis import strategies as st

from order_monitor import logs

HOSTILE = "AB\ud800CD\x00\x1b[2J\r\n\x9b\udfff"


@pytest.fixture(autouse=True)
def restore_structlog() -> Iterator[None]:
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


def render(fmt: str, **fields: object) -> str:
    out = StringIO()
    logs.configure(fmt=fmt, stream=out)
    logs.get_logger().warning("provider.unrequested_orders", **fields)
    return out.getvalue()


def test_lone_surrogate_and_nul_render_as_valid_json() -> None:
    line = render(
        "json",
        order_keys=[HOSTILE, {"nested": HOSTILE}],
        message=HOSTILE,
        **{HOSTILE: "as a key"},
    )
    line.encode("utf-8")  # strict: no surrogate left
    assert line.count("\n") == 1
    event = json.loads(line)
    assert event["message"] == "AB\\ud800CD\\x00\\x1b[2J\\x0d\n\\x9b\\udfff"
    assert event["order_keys"][1]["nested"] == event["message"]
    assert "\x00" not in line
    assert "\x1b" not in line


def test_console_output_carries_no_terminal_escapes() -> None:
    text = render("console", message=HOSTILE)
    text.encode("utf-8")
    assert "\x1b" not in text
    assert "\x00" not in text


def test_objects_json_does_not_know_are_rendered_not_raised() -> None:
    class Awkward:
        def __str__(self) -> str:
            raise RuntimeError("no str for you")

    event = json.loads(
        render("json", order_id=UUID(int=1), thing=Awkward(), raw=b"\xff", odd={1, 2})
    )
    assert event["order_id"] == str(UUID(int=1))
    assert "Awkward" in event["thing"]
    assert event["raw"] == "b'\\xff'"


@given(text=st.text(alphabet=st.characters(exclude_categories=())))
@settings(max_examples=200)
def test_any_text_renders(text: str) -> None:
    line = render("json", message=text, order_keys=[text])
    line.encode("utf-8")
    assert json.loads(line)["message"] == logs.safe_text(text)
