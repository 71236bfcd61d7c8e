"""Every adapter's parse boundary: hostile bytes and JSON in, clean bounded outcomes out.

Properties: anything a provider sends (arbitrary bytes decoded as the
transport decodes them, arbitrary JSON values) either parses or raises the
adapter's BadAnswer family, nothing else; FAILED only when the protocol's
failure word or code came; every string of an Outcome encodes as strict
UTF-8, holds no NUL or terminal escape and is bounded.
"""

from __future__ import annotations

import json
from io import StringIO
from typing import Any
from uuid import uuid4

import pytest
import structlog
from hypothesis import given, settings
from hypothesis import strategies as st

from order_monitor import logs
from order_monitor.providers import barakat, json_http, znet
from order_monitor.providers.answers import scalar_text
from order_monitor.providers.base import (
    MAX_MESSAGE,
    MAX_PIN,
    OrderRef,
    Outcome,
    Status,
    UnusablePin,
    clean_pin,
    clean_str,
)
from order_monitor.providers.http import BadAnswer
from tests.providers import client, json_reply, provider_config, reply, serve

HOSTILE = ["AB\ud800CD", "nul\x00here", "bell\x07", "\x1b[2J\x1b]0;pwned\x07", "csi\x9b31m"]


def check_strings(outcome: Outcome) -> None:
    for text in (outcome.pin, outcome.message, outcome.raw_status, outcome.error):
        if text is None:
            continue
        text.encode("utf-8")  # strict
        assert "\x00" not in text
        assert "\x1b" not in text
        assert clean_str(text) == text
        assert len(text) <= MAX_MESSAGE
    if outcome.pin is not None:
        assert len(outcome.pin) <= MAX_PIN


def transport_text(data: bytes) -> str:
    # What Transport.request hands a parser.
    return data.decode("utf-8", errors="replace")


# JSON values, with text from all of Unicode (lone surrogates included: json
# escapes them as \ud800, as a hostile provider may), and floats.
json_text = st.text(alphabet=st.characters(exclude_categories=()), max_size=30)
json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | json_text
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(json_text, inner, max_size=4),
    max_leaves=12,
)


def dumps(value: object) -> str:
    return json.dumps(value, ensure_ascii=True)


# --- the helpers every parser uses ------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "clean"),
    [
        ("AB\ud800CD", "AB\ufffdCD"),
        ("a\x00b", "a\ufffdb"),
        ("\x1b[2Jx", "\ufffd[2Jx"),
        ("line\r\nnext\tcol", "line\nnext\tcol"),
        ("csi\x9b", "csi\ufffd"),
        ("İşlem ✓ تم", "İşlem ✓ تم"),
    ],
)
def test_clean_str(text: str, clean: str) -> None:
    assert clean_str(text) == clean


@given(text=st.text(alphabet=st.characters(exclude_categories=())))
def test_clean_str_always_gives_storable_text(text: str) -> None:
    clean = clean_str(text)
    clean.encode("utf-8")
    assert "\x00" not in clean
    assert clean_str(clean) == clean


@pytest.mark.parametrize(
    "value", [1.5e3, 123456789012345678.0, 12.0, True, False, [1], {"pin": "x"}, *HOSTILE]
)
def test_pins_that_are_no_code_are_unusable(value: object) -> None:
    with pytest.raises(UnusablePin):
        clean_pin(value)


def test_pins_from_strings_and_integers_keep_every_digit() -> None:
    assert clean_pin(123456789012345678) == "123456789012345678"
    assert clean_pin(" 0012 ") == "0012"
    assert clean_pin(" - ") is None
    assert clean_pin(None) is None
    with pytest.raises(UnusablePin):
        clean_pin("9" * (MAX_PIN + 1))


def test_done_with_an_unusable_pin_is_an_error_never_done_nor_failed() -> None:
    outcome = Outcome.done(pin=1.5e3, message="ok", raw_status="2")
    assert outcome.status is Status.ERROR
    assert outcome.pin is None
    assert outcome.retry_after is None  # the normal schedule asks again
    assert outcome.error is not None
    assert "PIN is a JSON float" in outcome.error


def test_huge_messages_are_bounded() -> None:
    outcome = Outcome.failed(message="x" * 1_000_000, raw_status="y" * 10_000)
    assert outcome.message is not None
    assert len(outcome.message) == MAX_MESSAGE
    assert outcome.message.endswith("…")
    assert outcome.raw_status is not None
    assert len(outcome.raw_status) <= MAX_MESSAGE


def test_scalar_text_cleans_and_keeps_big_integers_apart_from_floats() -> None:
    assert scalar_text("AB\ud800CD") == "AB\ufffdCD"
    assert scalar_text(2.0**60) == str(2.0**60)  # not an exact integer any more
    assert scalar_text(12.0) == "12"


# --- znet ---------------------------------------------------------------------------


def znet_bodies() -> st.SearchStrategy[str]:
    field = st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=20)
    head = st.sampled_from(["OK", "ok ", "3", "99", "x", ""])
    durum = st.sampled_from(["1", "2", "3", " 2 ", "9", ""]) | field
    pipes = st.tuples(head, durum, st.lists(field, max_size=3)).map(
        lambda t: "|".join([t[0], t[1], *t[2]])
    )
    wrapped = st.dictionaries(
        st.sampled_from([*znet.WRAPPER_KEYS, "other"]), json_values | pipes
    ).map(dumps)
    return st.binary().map(transport_text) | pipes | wrapped | json_values.map(dumps)


@given(text=znet_bodies())
@settings(max_examples=400)
def test_znet_parser_property(text: str) -> None:
    try:
        outcome = znet.parse_answer(text)
    except BadAnswer:
        return
    check_strings(outcome)
    if outcome.status is Status.FAILED:
        assert znet.unwrap(text).split("|")[1].strip() == "3"


@pytest.mark.parametrize("bad", HOSTILE)
def test_znet_hostile_pin_is_an_error_hostile_message_is_cleaned(bad: str) -> None:
    for text in (f"OK|2|{bad}|done", dumps({"result": f"OK|2|{bad}|done"})):
        if "\ud800" in text and not text.startswith("{"):
            continue  # a raw lone surrogate cannot come off the wire; only JSON's escape can
        outcome = znet.parse_answer(text)
        assert outcome.status is Status.ERROR
        assert outcome.pin is None
    outcome = znet.parse_answer(dumps({"result": f"OK|3|-|{bad}"}))
    assert outcome.status is Status.FAILED
    check_strings(outcome)


# --- barakat / apstore --------------------------------------------------------------


def barakat_bodies() -> st.SearchStrategy[str]:
    keys = st.sampled_from(["order_id", "status", *barakat.PIN_KEYS, *barakat.MESSAGE_KEYS])
    item = st.dictionaries(keys | json_text, json_values | st.sampled_from(["done", "reject"]))
    answer = st.fixed_dictionaries(
        {"status": st.sampled_from(["OK", "ok", "fail"]) | json_values, "data": st.lists(item)}
    ).map(dumps)
    return st.binary().map(transport_text) | answer | json_values.map(dumps)


@given(text=barakat_bodies())
@settings(max_examples=400)
def test_barakat_parser_property(text: str) -> None:
    try:
        data = barakat.parse_answer(text)
    except BadAnswer:
        return
    for item in data:
        if not isinstance(item, dict):
            continue
        outcome = barakat.outcome_of(item)
        check_strings(outcome)
        if outcome.status is Status.FAILED:
            assert (scalar_text(item.get("status")) or "").lower() in barakat.FAILED_WORDS
    matched = barakat.match(data, {"1": [uuid4()]}, fold=False)
    for key in matched.unrequested:
        key.encode("utf-8")


@pytest.mark.parametrize(
    ("item", "status"),
    [
        ({"status": "done", "pin": 1.5e3}, Status.ERROR),
        ({"status": "done", "pin": 123456789012345678}, Status.DONE),
        ({"status": "done", "pin": True, "code": "C-1"}, Status.ERROR),
        ({"status": "done", "pin": ["A"]}, Status.ERROR),
        ({"status": "done", "pin": "-", "code": {"x": 1}}, Status.ERROR),
        ({"status": "done", "pin": "AB\ud800CD"}, Status.ERROR),
        ({"status": "done", "pin": "AB\x1b[2JCD"}, Status.ERROR),
        ({"status": "reject", "pin": 1.5e3}, Status.FAILED),  # no PIN read for a failure
    ],
)
def test_barakat_pin_types(item: dict[str, Any], status: Status) -> None:
    outcome = barakat.outcome_of(item)
    assert outcome.status is status
    if status is Status.DONE:
        assert outcome.pin == "123456789012345678"


async def test_barakat_lone_surrogates_over_the_wire_do_not_break_logging() -> None:
    a = uuid4()
    body = (
        '{"status":"OK","data":[{"order_id":"R1","status":"reject","note":"n\\ud800\\u0000"},'
        '{"order_id":"X\\ud800","status":"done","pin":"P"},'
        '{"order_id":"R2","status":"done","pin":"AB\\ud800CD"}]}'
    )
    out = StringIO()
    saved = structlog.get_config()
    logs.configure(fmt="json", stream=out)
    try:
        async with serve(reply(body, content_type="application/json")) as srv, client() as s:
            adapter = barakat.build(
                provider_config("barakat", srv.base_url, secrets={"token": "t"})
            )
            b = uuid4()
            answered = await adapter.fetch(s, [OrderRef(a, "R1"), OrderRef(b, "R2")])
    finally:
        structlog.configure(**saved)
    assert answered[a].status is Status.FAILED
    assert answered[a].message == "n\ufffd\ufffd"
    assert answered[b].status is Status.ERROR
    for line in out.getvalue().splitlines():
        line.encode("utf-8")
        json.loads(line)


# --- json_http ----------------------------------------------------------------------

SPEC = json_http.AnswerSpec(
    status_path=("status",),
    status_map={"approved": "done", "rejected": "failed", "sent": "pending"},
    items_path=("data",),
    id_path=("id",),
    pin_paths=(("pin",), ("codes", "0")),
    message_paths=(("replies",), ("note",)),
    success_path=("ok",),
    success_values=frozenset({"true", "1"}),
)


def json_http_bodies() -> st.SearchStrategy[str]:
    keys = st.sampled_from(["id", "status", "pin", "codes", "replies", "note"])
    words = st.sampled_from(["approved", "REJECTED", "sent", "other"])
    item = st.dictionaries(keys | json_text, json_values | words)
    answer = st.fixed_dictionaries(
        {"ok": st.sampled_from(["true", 1, True, "no"]), "data": st.lists(item) | json_values}
    ).map(dumps)
    return st.binary().map(transport_text) | answer | json_values.map(dumps)


@given(text=json_http_bodies())
@settings(max_examples=400)
def test_json_http_parser_property(text: str) -> None:
    try:
        items = json_http.items_of(json_http.parse_document(text), SPEC, text)
    except BadAnswer:
        return
    for item in items:
        outcome = SPEC.outcome(item)
        if outcome is None:
            continue
        check_strings(outcome)
        if outcome.status is Status.FAILED:
            word = scalar_text(json_http.get_path(item, ("status",)))
            assert word is not None
            assert SPEC.status_map.get(word.lower()) == "failed"
    single = json_http.AnswerSpec(status_path=("status",), status_map=SPEC.status_map)
    try:
        outcome = json_http.parse_single(text, single)
    except BadAnswer:
        return
    if outcome is not None:
        check_strings(outcome)


def test_json_http_float_pin_is_an_error() -> None:
    unusable = SPEC.outcome({"status": "approved", "pin": 1.5e3})
    assert unusable is not None
    assert unusable.status is Status.ERROR
    outcome = SPEC.outcome({"status": "approved", "codes": [123456789012345678]})
    assert outcome is not None
    assert outcome.pin == "123456789012345678"


# --- the transport's side: huge bodies, logs of odd ids ----------------------------------


async def test_huge_body_is_refused_before_parsing() -> None:
    async with serve(reply("OK|3||" + "x" * 2_000_000)) as srv, client() as session:
        adapter = znet.build(
            provider_config("znet", srv.base_url, secrets={"kod": "k1", "sifre": "s1"})
        )
        with pytest.raises(Exception, match="larger than 1048576 bytes"):
            await adapter.fetch(session, [OrderRef(uuid4(), "R")])


async def test_a_message_just_under_max_body_is_carried_bounded() -> None:
    async with (
        serve(
            json_reply(
                {
                    "status": "OK",
                    "data": [{"order_id": "R", "status": "reject", "note": "y" * 1_000_000}],
                }
            )
        ) as srv,
        client() as session,
    ):
        adapter = barakat.build(provider_config("barakat", srv.base_url, secrets={"token": "t"}))
        order = OrderRef(uuid4(), "R")
        outcome = (await adapter.fetch(session, [order]))[order.order_id]
    assert outcome.message is not None
    assert len(outcome.message) == MAX_MESSAGE
