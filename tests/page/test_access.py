"""Who may see the page: pure checks of the access rules and the Authorization header."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given
from hypothesis import strategies as st

from order_monitor.page.server import access_rule, host_of, is_loopback, token_given
from order_monitor.redaction import Secret

TOKEN = "p@ss:w0rd/with%escapes&more=="


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.8.9.1", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("LOCALHOST", True),
        ("0.0.0.0", False),
        ("", False),
        (None, False),
        ("10.0.0.1", False),
        ("localhost.evil.example", False),
        ("127.0.0.1.nip.io", False),
    ],
)
def test_loopback(host: str | None, loopback: bool) -> None:
    assert is_loopback(host) is loopback


@pytest.mark.parametrize(
    ("header", "host"),
    [
        ("127.0.0.1:9187", "127.0.0.1"),
        ("[::1]:9187", "::1"),
        ("[::1]", "::1"),
        ("localhost", "localhost"),
        ("evil.example:80", "evil.example"),
        (None, None),
        ("[::1", None),
    ],
)
def test_host_header(header: str | None, host: str | None) -> None:
    assert host_of(header) == host


def test_access_needs_a_token_off_loopback() -> None:
    assert access_rule("127.0.0.1", None) == "loopback"
    assert access_rule(None, None) == "refused"
    assert access_rule("0.0.0.0", None) == "refused"
    assert access_rule("0.0.0.0", Secret(TOKEN)) == "token"
    assert access_rule("127.0.0.1", Secret(TOKEN)) == "token"


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def test_the_token_as_basic_auth_password_or_bearer() -> None:
    assert token_given(_basic("ops", TOKEN), TOKEN)
    assert token_given(_basic("", TOKEN), TOKEN)
    assert token_given(f"Bearer {TOKEN}", TOKEN)
    assert token_given(f"bearer   {TOKEN}", TOKEN)
    assert not token_given(_basic(TOKEN, "x"), TOKEN)
    assert not token_given(f"Bearer {TOKEN} ", TOKEN[:-1])
    assert not token_given(None, TOKEN)
    assert not token_given("Digest abc", TOKEN)
    assert not token_given("Basic not base64!", TOKEN)
    assert not token_given("Basic " + base64.b64encode(b"no colon").decode(), TOKEN)


@given(header=st.text())
def test_any_header_is_answered_without_raising(header: str) -> None:
    opened = token_given(header, TOKEN)
    assert isinstance(opened, bool)
    if opened:
        assert header.partition(" ")[0].lower() in {"bearer", "basic"}
