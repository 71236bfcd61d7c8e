"""The shared transport: status codes, Retry-After, bounded bodies, no secrets."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote, quote_plus
from uuid import uuid4

import pytest
from aiohttp import web
from structlog.testing import capture_logs

from order_monitor.errors import ConfigError, ProviderAuthError, ProviderError
from order_monitor.providers.answers import first_text, match_items, scalar_text
from order_monitor.providers.base import Outcome, RateLimited
from order_monitor.providers.http import Transport, excerpt, parse_retry_after
from order_monitor.providers.options import check_keys
from order_monitor.redaction import Secret
from tests.providers import (
    client,
    closed_port,
    endless_body,
    flatten,
    provider_config,
    reply,
    serve,
    stalled,
)

NOW = datetime(2015, 10, 21, 7, 26, 0, tzinfo=UTC).timestamp()
DATE = "Wed, 21 Oct 2015 07:28:00 GMT"  # 120 s after NOW
SECRET = "p@ss word/+&"


def transport(max_body: int = 1024) -> Transport:
    return Transport(
        provider="prov",
        max_body=max_body,
        secret_params=frozenset({"sifre"}),
        secrets=(Secret(SECRET),),
        clock=lambda: NOW,
    )


# --- Retry-After (pure) --------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("120", 120.0),
        (" 0 ", 0.0),
        ("1.5", 1.5),
        (DATE, 120.0),
        ("Wednesday, 21-Oct-15 07:28:00 GMT", 120.0),  # RFC 850, still allowed
        ("Wed Oct 21 07:28:00 2015", 120.0),  # asctime, no zone: GMT by definition
        ("Wed, 21 Oct 2015 07:00:00 GMT", 0.0),  # already past
        ("", None),
        ("soon", None),
        ("-5", None),
        ("١٢", None),  # non-ASCII digits are no delta-seconds
        ("Wed, 99 Foo 2015 07:28:00 GMT", None),
    ],
)
def test_parse_retry_after(value: str, seconds: float | None) -> None:
    assert parse_retry_after(value, NOW) == seconds


# --- small helpers (pure) ------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "text"),
    [("a ", "a"), (12, "12"), (12.0, "12"), (1.5, "1.5"), ("", None), (True, None), ([1], None)],
)
def test_scalar_text(value: object, text: str | None) -> None:
    assert scalar_text(value) == text


def test_first_text() -> None:
    assert first_text(["", None, " x ", "y"]) == "x"
    assert first_text(" z ") == "z"
    assert first_text([1, ""]) is None
    assert first_text(None) is None


def test_excerpt_bounds_length() -> None:
    assert excerpt("x" * 500) == "x" * 200 + "…"
    assert excerpt("  short \n") == "short"


def test_match_items() -> None:
    a, b = uuid4(), uuid4()
    items: list[Any] = [{"id": "A1"}, {"id": "a1"}, {"id": "zz"}, {"x": 1}, {"id": "b2"}]
    matched = match_items(
        items,
        {"a1": [a], "b2": [b]},
        fold=True,
        id_of=lambda item: item.get("id"),
        outcome_of=lambda item: None if item.get("id") == "b2" else Outcome.pending(),
    )
    assert matched.outcomes == {a: Outcome.pending()}
    assert matched.duplicates == ["a1"]
    assert matched.unrequested == ["zz"]
    assert matched.unusable == 2  # no id, and an item without an outcome


def test_check_keys_names_the_key() -> None:
    config = provider_config("x", "https://x", options={"a": 1, "zz": 2})
    with pytest.raises(ConfigError, match=r"\[providers.p1\].options: unknown keys \['zz'\]"):
        check_keys(config, {"a"}, required_secrets=())
    config = provider_config("x", "https://x", secrets={"token": "t"})
    with pytest.raises(ConfigError, match=r"\[providers.p1\].secrets.kod is required"):
        check_keys(config, (), required_secrets=("kod",), optional_secrets=("token",))


def test_safe_removes_raw_and_encoded_secrets() -> None:
    t = transport()
    for leaked in (quote_plus(SECRET), quote(SECRET, safe="")):
        text = t.safe_url(f"http://h/p?kod=1&sifre={leaked}&x={leaked}")
        assert "sifre=***" in text
        assert "p%40ss" not in text
    assert SECRET not in t.safe(f"echo {SECRET} and p%40ss%20word%2F%2B%26")
    assert "p%40ss" not in t.safe("echo p%40ss%20word%2F%2B%26")


# --- against a server ----------------------------------------------------------------


async def request(handler: Any, max_body: int = 1024, total: float = 5.0) -> Any:
    async with serve(handler) as srv, client(total=total) as session:
        return await transport(max_body).request(session, "GET", f"{srv.base_url}/x?sifre={SECRET}")


async def test_success_decodes_utf8_and_replaces_garbage() -> None:
    result = await request(reply("İşlem tamamlandı ✓ ".encode() + b"\xff"))
    assert result.status == 200
    assert result.text == "İşlem tamamlandı ✓ \ufffd"


async def test_body_of_exactly_max_body_is_fine() -> None:
    assert (await request(reply(b"x" * 1024))).text == "x" * 1024


async def test_declared_length_over_the_bound_is_refused_unread() -> None:
    with capture_logs() as logs, pytest.raises(ProviderError, match="larger than 1024 bytes"):
        await request(reply(b"x" * 1025))
    assert logs == [
        {
            "event": "provider.body_too_large",
            "provider": "prov",
            "status": 200,
            "limit": 1024,
            "log_level": "warning",
        }
    ]


async def test_endless_body_is_cut_off() -> None:
    with pytest.raises(ProviderError, match="larger than 1024 bytes"):
        await request(endless_body())


@pytest.mark.parametrize(
    ("status", "headers", "seconds"),
    [
        (429, {"Retry-After": "30"}, 30.0),
        (429, {"Retry-After": DATE}, 120.0),
        (429, {}, None),
        (429, {"Retry-After": "tomorrow"}, None),
        (503, {"Retry-After": "7"}, 7.0),
        (503, {"Retry-After": DATE}, 120.0),
    ],
)
async def test_rate_limited(status: int, headers: dict[str, str], seconds: float | None) -> None:
    with capture_logs() as logs, pytest.raises(RateLimited) as caught:
        await request(reply("busy", status=status, headers=headers))
    assert caught.value.retry_after == seconds
    assert logs[0]["event"] == "provider.rate_limited"
    assert logs[0]["retry_after"] == seconds


async def test_503_without_retry_after_is_a_plain_error() -> None:
    with pytest.raises(ProviderError) as caught:
        await request(reply("down", status=503))
    assert type(caught.value) is ProviderError
    assert "HTTP 503" in str(caught.value)


@pytest.mark.parametrize("status", [401, 403])
async def test_auth_refused(status: int) -> None:
    with capture_logs() as logs, pytest.raises(ProviderAuthError):
        await request(reply(f"no {SECRET}", status=status))
    (event,) = logs
    assert (event["event"], event["log_level"], event["status"]) == (
        "provider.auth_failed",
        "error",
        status,
    )
    assert SECRET not in flatten(event)


@pytest.mark.parametrize("status", [500, 502, 404, 400])
async def test_other_statuses(status: int) -> None:
    handler = reply("", status=status)
    with capture_logs() as logs, pytest.raises(ProviderError) as caught:
        await request(handler)
    assert type(caught.value) is ProviderError
    assert f"prov: HTTP {status}" in str(caught.value)
    assert logs[0]["event"] == "provider.http_error"
    assert "sifre=***" in logs[0]["url"]


async def test_redirects_are_not_followed() -> None:
    async def handler(request: web.Request) -> web.Response:
        if request.path == "/x":
            raise web.HTTPFound("/landed")
        return web.Response(text="followed")

    with pytest.raises(ProviderError, match="HTTP 302"):
        await request(handler)


async def test_connection_refused() -> None:
    async with client() as session:
        with capture_logs() as logs, pytest.raises(ProviderError) as caught:
            await transport().request(
                session, "GET", f"http://127.0.0.1:{closed_port()}/x?sifre={SECRET}"
            )
    assert logs[0]["event"] == "provider.request_failed"
    assert SECRET not in str(caught.value)
    assert SECRET not in flatten(logs)


async def test_timeout_of_the_session_is_a_provider_error() -> None:
    async with stalled() as handler:
        with capture_logs() as logs, pytest.raises(ProviderError) as caught:
            await request(handler, total=0.2)
    assert type(caught.value) is ProviderError
    assert logs[0]["event"] == "provider.request_failed"
    assert "Timeout" in logs[0]["error"]
