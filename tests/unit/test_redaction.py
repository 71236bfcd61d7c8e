"""Redaction: secrets gone from free text in every encoding, DSNs and URLs by position."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from order_monitor import redaction
from order_monitor.redaction import REDACTED, redact_dsn, redact_url, scrub
from tests.providers import PRINTABLE, forms, leaks, yarl_form

SIFRE = "Zs+9/Qw=x&k7~Q!"


# Everything a secret could be: printable ASCII, controls, any script, emoji.
# Credentials are printable text (a token, a password): all of it, ASCII or not.
secrets = st.text(PRINTABLE, min_size=1, max_size=24).filter(lambda s: s != REDACTED)
# What a provider's answer or an exception text may put around it.
surroundings = st.text(max_size=20)


@pytest.mark.parametrize(
    "form",
    [
        SIFRE,
        "Zs%2B9/Qw%3Dx%26k7~Q!",  # yarl, as aiohttp's ConnectionTimeoutError shows it
        "Zs%2B9%2FQw%3Dx%26k7~Q%21",  # urlencode
        "Zs%2b9%2fQw%3dx%26k7%7eQ%21",  # lower-case hex, ~ encoded too
        "Zs%2B9/Qw=x&k7~Q!",  # partly encoded
        "Zs+9\\/Qw=x\\u0026k7~Q!",  # JSON-escaped
        "Zs+9/Qw=x&amp;k7~Q!",  # an HTML error page
        "Zs%252B9%252FQw%253Dx%2526k7~Q%2521",  # encoded twice
    ],
)
def test_every_form_of_the_znet_password_is_scrubbed(form: str) -> None:
    text = f"Connection timeout to host http://h/p?kod=1&sifre={form}&id=7 (and again: {form})"
    scrubbed = scrub(text, [SIFRE])
    assert not leaks(scrubbed, SIFRE), scrubbed
    assert "Qw" not in scrubbed
    assert scrubbed.startswith("Connection timeout to host http://h/p?kod=1&sifre=***")


def test_non_ascii_secret_percent_encoded_as_utf8() -> None:
    assert scrub("token=%C3%A4%C3%B6%C3%BC-%F0%9F%94%91 ok", ["äöü-🔑"]) == "token=*** ok"


@given(secret=secrets, before=surroundings, after=surroundings, data=st.data())
@settings(max_examples=300)
@example(secret=SIFRE, before="", after="", data=None)
@example(secret="p@ss word/+&", before="x", after="y", data=None)
def test_no_form_of_a_secret_survives_scrub(
    secret: str, before: str, after: str, data: st.DataObject | None
) -> None:
    form = data.draw(st.sampled_from(sorted(forms(secret)))) if data else yarl_form(secret)
    # As a parameter value, so that the rule for short secrets applies too.
    text = f"{before} sifre={form}&next=1 {after}"
    assert not leaks(scrub(text, [secret]), secret)


@given(secret=secrets, text=st.text(max_size=60))
@settings(max_examples=300)
def test_scrub_of_any_text_never_shows_the_secret(secret: str, text: str) -> None:
    assert not leaks(scrub(text, [secret]), secret)


def test_replacing_cannot_build_the_secret_from_the_marker() -> None:
    # "xx**" -> "x***" would show "x**" again; scrub keeps going.
    assert "x**" not in scrub("xx**", ["x**"])


@pytest.mark.parametrize(
    ("secret", "text"),
    [
        ("a**", "a" * 65536 + "**"),  # each round of replacing made one more "a**"
        ("**a", "**" + "a" * 65536),
        ("***a***", "*" * 65536),
        ("***a***", "***a" * 16384),
    ],
)
def test_scrub_searches_the_text_a_bounded_number_of_times(
    secret: str, text: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each search is linear in the text; a search per replaced occurrence
    # made a 4 KB answer take seconds (65,536 searches of 64 KiB here).
    searches = 0
    readings = redaction._readings

    def counted(text: str) -> list[Any]:
        nonlocal searches
        searches += 1
        assert searches <= 8, "scrub searched the text again and again"
        return readings(text)

    monkeypatch.setattr(redaction, "_readings", counted)
    scrubbed = scrub(text, [secret])
    assert not leaks(scrubbed, secret)
    assert searches <= 8


# Secrets bounded by "*" and text made of their pieces: where replacing
# chains through the marker.
starred = st.builds(
    lambda head, core, tail: head + core + tail,
    st.text("*", max_size=3),
    st.text("ab*%+", min_size=1, max_size=4),
    st.text("*", max_size=3),
).filter(lambda s: s != REDACTED)


@given(secret=starred, data=st.data())
@settings(max_examples=300)
def test_no_chain_of_replacements_leaves_a_secret_that_starts_or_ends_with_a_star(
    secret: str, data: st.DataObject
) -> None:
    pieces = st.sampled_from([secret, secret[:-1], secret[1:], "*", "a", "%2A", " ", "="])
    text = "".join(data.draw(st.lists(pieces, max_size=30)))
    assert not leaks(scrub(text, [secret]), secret)


# --- short secrets -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("kod=ab&sifre=c", "kod=***&sifre=***"),
        ("OK|3||invalid request: kod=ab&sifre=c|", "OK|3||invalid request: kod=***&sifre=***|"),
        ("kod=%61b x", "kod=*** x"),
        ('{"kod": "ab", "sifre":"c"}', '{"kod": "***", "sifre":"***"}'),
        ("https://ab:c@host/x", "https://ab:***@host/x"),
        # Not as a value: left alone, or the holes would spell the secret.
        ("a cab abc", "a cab abc"),
        ("kod=abc", "kod=abc"),
    ],
)
def test_short_secrets_are_hidden_as_values_only(text: str, expected: str) -> None:
    assert scrub(text, ["ab", "c"]) == expected


def test_a_one_character_secret_is_hidden_in_our_own_urls() -> None:
    url = "https://panel/p.php?kod=7&sifre=%2B&id=7"
    assert redact_url(url, {"kod", "sifre"}) == "https://panel/p.php?kod=***&sifre=***&id=7"
    assert scrub(url, ["+", "7"]) == "https://panel/p.php?kod=***&sifre=***&id=***"


# --- passwords by position -----------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "hidden"),
    [
        ("failed: password='a\\'b c' user=u", ["'a", " c'"]),
        ("failed: password=a\\ b user=u", ["=a", " b "]),
        ("password = 'unterminated and more", ["unterminated", "more"]),
        ("sslpassword=kp host=h", ["kp"]),
        ("connect postgresql://u:p@ss@host/db failed", ["p@", "ss"]),
    ],
)
def test_scrub_hides_passwords_it_was_not_told_about(text: str, hidden: list[str]) -> None:
    scrubbed = scrub(text, [])
    assert REDACTED in scrubbed
    for piece in hidden:
        assert piece not in scrubbed


@pytest.mark.parametrize(
    ("dsn", "expected"),
    [
        ("host=h password='a\\'b c' user=u", "host=h password=*** user=u"),
        ("host=h password=a\\ b user=u", "host=h password=*** user=u"),
        ("postgresql://u:p@ss@host/db", "postgresql://u:***@host/db"),
        ("postgresql://u:p/s@host/db", "postgresql://u:***@host/db"),
        (
            "postgresql://u:pw@h1:5432,h2:5433/db?target_session_attrs=read-write",
            "postgresql://u:***@h1:5432,h2:5433/db?target_session_attrs=read-write",
        ),
        (
            "postgresql://u@/db?host=/run/pg,/tmp&options=-c%20search_path%3Dshop&Pass%77ord=x",
            "postgresql://u@/db?host=/run/pg,/tmp&options=-c%20search_path%3Dshop&Pass%77ord=***",
        ),
        (
            "host=a,b port=1,2 password=x options='-c statement_timeout=5s'",
            "host=a,b port=1,2 password=*** options='-c statement_timeout=5s'",
        ),
        ("postgresql://[::1]:5432,[::2]/db", "postgresql://[::1]:5432,[::2]/db"),
    ],
)
def test_redact_dsn_forms(dsn: str, expected: str) -> None:
    assert redact_dsn(dsn) == expected


@given(password=st.text(min_size=1).filter(lambda p: "\x00" not in p))
def test_redact_dsn_hides_any_quoted_conninfo_password(password: str) -> None:
    quoted = "'" + password.replace("\\", "\\\\").replace("'", "\\'") + "'"
    redacted = redact_dsn(f"host=db password={quoted} dbname=shop")
    assert redacted == "host=db password=*** dbname=shop"


@given(dsn=st.text())
def test_redact_dsn_never_raises(dsn: str) -> None:
    redact_dsn(dsn)
    redact_url(dsn, {"token"})
