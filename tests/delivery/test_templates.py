"""An action's templates: parsing, escaping, and what a value becomes where it stands."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from order_monitor.delivery.templates import (
    Placeholder,
    TemplateError,
    Values,
    body_keys,
    body_strings,
    dump_json,
    group_key,
    parse_template,
    placeholders_of,
    render_body,
    render_header,
    render_url,
    template_texts,
)

SECRET = 'p@ss:w/rd?&%"é'


def values(**changes: Any) -> Values:
    fields: dict[str, Any] = {
        "outcome": "done",
        "message": "PIN sent",
        "columns": {"tenantId": "t-1", "price": 12.5},
        "request_id": "rid-1",
        "order_ids": ["o1", "o2"],
        "delivery_ids": ["d1", "d2"],
        "secrets": {"token": SECRET},
    }
    fields.update(changes)
    return Values(**fields)


# --- parsing ------------------------------------------------------------------------------


def test_a_template_is_literals_and_placeholders() -> None:
    parsed = parse_template("/t/{column:tenantId}/{outcome}?k={secret:token}")
    assert parsed.parts == (
        "/t/",
        Placeholder("column", "tenantId"),
        "/",
        Placeholder("outcome"),
        "?k=",
        Placeholder("secret", "token"),
    )
    assert parsed.whole is None
    assert parse_template("{ids}").whole == Placeholder("ids")


def test_doubled_braces_are_literal_braces() -> None:
    parsed = parse_template("{{ids}} {{{outcome}}} }}{{")
    assert parsed.parts == ("{ids} {", Placeholder("outcome"), "} }{")
    assert parsed.literal == "{ids} {} }{"
    assert render_header("{{x}}={outcome}", values()) == "{x}=done"


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("{", "lone '{'"),
        ("a}b", "lone '}'"),
        ("{ids", "lone '{'"),
        ("{unknown}", "unknown placeholder {unknown}"),
        ("{}", "unknown placeholder {}"),
        ("{column:}", r"\{column:\} needs a name"),
        ("{secret:}", r"\{secret:\} needs a name"),
        ("{secret}", "unknown placeholder {secret}"),
        ("{ids:x}", "unknown placeholder {ids:x}"),
        ("{Outcome}", "unknown placeholder {Outcome}"),
        ("{" + "x" * 500 + "}", "unknown placeholder {x{40}…}"),
    ],
)
def test_a_bad_template_says_what_is_wrong(text: str, why: str) -> None:
    with pytest.raises(TemplateError, match=why):
        parse_template(text)


def test_the_known_placeholders_are_listed_when_one_is_unknown() -> None:
    with pytest.raises(TemplateError) as caught:
        parse_template("{tenant}")
    for known in ("{ids}", "{outcome}", "{message}", "{column:NAME}", "{secret:NAME}"):
        assert known in str(caught.value)


def test_every_template_of_an_action_and_its_placeholders() -> None:
    body = {"ids": "{ids}", "meta": [{"t": "{column:tenantId}"}, 3, None], "n": "{outcome}"}
    texts = template_texts("/x/{column:tenantId}", {"A": "Bearer {secret:token}"}, body)
    assert texts == [
        "/x/{column:tenantId}",
        "Bearer {secret:token}",
        "{ids}",
        "{column:tenantId}",
        "{outcome}",
    ]
    assert [str(p) for p in placeholders_of(texts)] == [
        "{column:tenantId}",
        "{secret:token}",
        "{ids}",
        "{column:tenantId}",
        "{outcome}",
    ]
    assert body_strings(body) == ["{ids}", "{column:tenantId}", "{outcome}"]
    assert body_keys(body) == ["ids", "meta", "n", "t"]


@given(st.text())
def test_parsing_any_text_gives_a_template_or_a_template_error(text: str) -> None:
    try:
        parsed = parse_template(text)
    except TemplateError:
        return
    # What was parsed is what was written: literals and placeholders again.
    rebuilt = "".join(
        str(p) if isinstance(p, Placeholder) else p.replace("{", "{{").replace("}", "}}")
        for p in parsed.parts
    )
    assert parse_template(rebuilt) == parsed


@given(st.text())
def test_any_text_escaped_is_that_text_again(text: str) -> None:
    escaped = text.replace("{", "{{").replace("}", "}}")
    parsed = parse_template(escaped)
    assert parsed.placeholders == ()
    assert parsed.literal == text


# --- the URL ------------------------------------------------------------------------------


def test_a_value_in_the_url_is_one_encoded_piece() -> None:
    url = render_url(
        "https://app.example/t/{column:tenantId}/x?o={outcome}&m={message}",
        values(columns={"tenantId": "a/b?c"}, message="50% & more #1"),
    )
    assert url == "https://app.example/t/a%2Fb%3Fc/x?o=done&m=50%25%20%26%20more%20%231"


def test_url_values_of_other_types_nul_and_surrogates() -> None:
    url = render_url(
        "/{column:n}/{column:b}/{column:none}/{column:missing}/{message}",
        values(columns={"n": 1.5, "b": True, "none": None}, message="a\x00b\ud800é"),
    )
    assert url == "/1.5/true///a%EF%BF%BDb%EF%BF%BD%C3%A9"


@given(st.text())
def test_a_url_value_never_leaves_its_place(value: str) -> None:
    url = render_url("https://h/{column:v}/end", values(columns={"v": value}))
    middle = url.removeprefix("https://h/").removesuffix("/end")
    assert re.fullmatch(r"(?:[A-Za-z0-9_.~-]|%[0-9A-F]{2})*", middle)


# --- headers ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "hostile",
    ["a\r\nX-Evil: 1", "a\nb", "a\rb", "a\x00b", "a\x1b[2Jb", "a\x7fb", "a\x85b", "a\ud800b"],
)
def test_a_header_value_cannot_carry_a_line_break_or_a_control(hostile: str) -> None:
    rendered = render_header(
        "{message}|{column:t}", values(message=hostile, columns={"t": hostile})
    )
    assert "\ufffd" in rendered
    assert not re.search("[\x00-\x1f\x7f-\x9f\ud800-\udfff]", rendered)


def test_a_header_secret_is_written_as_it_is() -> None:
    assert render_header("Bearer {secret:token}", values()) == f"Bearer {SECRET}"


def test_a_secret_or_literal_with_a_line_break_cannot_add_a_header() -> None:
    rendered = render_header("Bearer {secret:token}\r\nX: y", values(secrets={"token": "a\nb"}))
    assert rendered == "Bearer a\ufffdb\ufffd\ufffdX: y"


def test_a_secret_without_a_value_is_an_error_that_quotes_no_value() -> None:
    with pytest.raises(TemplateError, match=r"\{secret:other\} has no value"):
        render_header("{secret:other}", values())
    with pytest.raises(TemplateError, match="has no value"):
        render_header("{secret:token}", values(secrets=None))


@given(message=st.text(), tenant=st.text(), secret=st.text())
def test_no_header_value_ever_breaks_a_header(message: str, tenant: str, secret: str) -> None:
    rendered = render_header(
        "{message} {column:t} {secret:s}",
        values(message=message, columns={"t": tenant}, secrets={"s": secret}),
    )
    assert not re.search("[\x00-\x1f\x7f-\x9f\ud800-\udfff]", rendered)
    rendered.encode("utf-8")


# --- the body -----------------------------------------------------------------------------


def test_a_whole_placeholder_is_the_value_itself() -> None:
    body = {
        "ids": "{ids}",
        "deliveries": "{delivery_ids}",
        "price": "{column:price}",
        "missing": "{column:nope}",
        "note": "{message}",
        "text": "{column:tenantId}: {message} ({outcome}, {request_id}) {{x}}",
        "fixed": [1, True, None, {"deep": "{outcome}"}],
    }
    assert render_body(body, values()) == {
        "ids": ["o1", "o2"],
        "deliveries": ["d1", "d2"],
        "price": 12.5,
        "missing": None,
        "note": "PIN sent",
        "text": "t-1: PIN sent (done, rid-1) {x}",
        "fixed": [1, True, None, {"deep": "done"}],
    }


def test_no_message_is_null_alone_and_nothing_in_text() -> None:
    rendered = render_body({"note": "{message}", "text": "m={message}"}, values(message=None))
    assert rendered == {"note": None, "text": "m="}


def test_the_body_is_utf8_json_whatever_the_values() -> None:
    hostile = '\x00\ud800\udfff\u2028"\\'
    body = {"{k}": "{message}", "t": "{column:t}", "x": "x{column:t}", hostile: 1}
    rendered = render_body(body, values(message=hostile, columns={"t": {hostile: [hostile]}}))
    sent = dump_json(rendered)
    decoded = json.loads(sent.decode("utf-8"))
    clean = '\ufffd\ufffd\ufffd\u2028"\\'
    # Inside text, a table is written as JSON text (cleaned like any string;
    # a NUL there is JSON's escape, six characters).
    text = decoded.pop("x")
    assert not re.search("[\x00\ud800-\udfff]", text)
    assert json.loads(text.removeprefix("x")) == {
        '\x00\ufffd\ufffd\u2028"\\': ['\x00\ufffd\ufffd\u2028"\\']
    }
    assert decoded == {"{k}": clean, "t": {clean: [clean]}, clean: 1}


# --- grouping -----------------------------------------------------------------------------


def test_group_key_tells_every_two_different_json_values_apart() -> None:
    distinct = [1, "1", True, 1.5, None, "", "null", [1], ["1"], {"a": 1}, {"a": "1"}, 0, False]
    keys = [group_key(v) for v in distinct]
    assert len(set(keys)) == len(distinct)
    assert group_key({"a": 1, "b": 2}) == group_key({"b": 2, "a": 1})


@given(st.text(), st.text())
def test_group_key_is_equality_for_strings(a: str, b: str) -> None:
    assert (group_key(a) == group_key(b)) is (a == b)
