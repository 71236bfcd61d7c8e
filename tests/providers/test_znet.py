"""znet: the pipe-separated text protocol, against a loopback server."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import parse_qs, urlsplit
from uuid import uuid4

import pytest
from hypothesis import given
from hypothesis import strategies as st
from structlog.testing import capture_logs

from order_monitor.errors import ConfigError, ProviderAuthError, ProviderError
from order_monitor.providers import znet
from order_monitor.providers.base import OrderRef, RateLimited, Status
from order_monitor.providers.http import BadAnswer
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

KOD = "54421999998"
# Characters that need URL-encoding, so a leak in encoded form would show too.
SIFRE = "s3cr&t+pä/ss"
TURKISH_DONE = "İşlem tamamlandı"
TURKISH_WAIT = "İşlem bekleniyor"
ARABIC = "تم الإنجاز بنجاح"


def adapter(
    base_url: str,
    max_body: int = 1_048_576,
    *,
    read_timeout: float = 5.0,
    connect_timeout: float = 5.0,
    **options: Any,
) -> znet.ZnetAdapter:
    config = provider_config(
        "znet",
        base_url,
        options=options,
        secrets={"kod": KOD, "sifre": SIFRE},
        max_body=max_body,
        read_timeout=read_timeout,
        connect_timeout=connect_timeout,
    )
    built = znet.build(config)
    assert isinstance(built, znet.ZnetAdapter)
    return built


def order(reference: str = "1699123456789123") -> OrderRef:
    return OrderRef(order_id=uuid4(), reference=reference)


# --- pure parsing --------------------------------------------------------------------


def test_processing() -> None:
    outcome = znet.parse_answer(f"OK|1| - |{TURKISH_WAIT}")
    assert outcome.status is Status.PENDING
    assert outcome.pin is None
    assert outcome.message == TURKISH_WAIT
    assert outcome.raw_status == "1"


def test_completed_with_pin() -> None:
    outcome = znet.parse_answer(f"OK|2|ABC123XYZ789|{TURKISH_DONE}\n")
    assert outcome.status is Status.DONE
    assert outcome.pin == "ABC123XYZ789"
    assert outcome.message == TURKISH_DONE


@pytest.mark.parametrize("pin", [" - ", "-", "", " "])
def test_completed_without_a_real_pin(pin: str) -> None:
    outcome = znet.parse_answer(f"OK|2|{pin}|{ARABIC}")
    assert outcome.status is Status.DONE
    assert outcome.pin is None
    assert outcome.message == ARABIC


def test_failed_keeps_the_reason() -> None:
    outcome = znet.parse_answer("OK|3| - |İşlem iptal edildi")
    assert outcome.status is Status.FAILED
    assert outcome.message == "İşlem iptal edildi"


def test_description_may_contain_pipes() -> None:
    outcome = znet.parse_answer("OK|3| - |Stok yok | tekrar deneyin|2")
    assert outcome.message == "Stok yok | tekrar deneyin|2"


def test_short_answers_are_read() -> None:
    assert znet.parse_answer("OK|1").status is Status.PENDING
    assert znet.parse_answer("ok|2|PIN-9").pin == "PIN-9"


@pytest.mark.parametrize(
    "wrapped",
    [
        json.dumps("OK|2|PIN-1|Tamam"),
        json.dumps({"result": "OK|2|PIN-1|Tamam"}),
        json.dumps({"success": True, "data": "OK|2|PIN-1|Tamam"}),
        json.dumps({"response": "OK|2|PIN-1|Tamam"}),
    ],
)
def test_text_wrapped_in_json_by_a_proxy(wrapped: str) -> None:
    outcome = znet.parse_answer(wrapped)
    assert (outcome.status, outcome.pin, outcome.message) == (Status.DONE, "PIN-1", "Tamam")


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ("", "empty body"),
        ("  \r\n", "empty body"),
        ("<!DOCTYPE html><html><body>Bakım|2</body></html>", "HTML page"),
        ("OK|4| - |?", "unknown DURUM '4'"),
        ("OK|| - |", "unknown DURUM ''"),
        ("OK", "not a znet answer"),
        ("Fatal error: Uncaught PDOException", "not a znet answer"),
        ('{"success": false, "error": null}', "without znet text"),
        ('{"result": "OK|2|', "not JSON"),
        ("[1, 2]", "not a znet answer"),
    ],
)
def test_garbage_is_a_bad_answer(body: str, reason: str) -> None:
    with pytest.raises(BadAnswer, match=reason):
        znet.parse_answer(body)


def test_error_answer_carries_code_and_message() -> None:
    with pytest.raises(znet.ZnetError) as caught:
        znet.parse_answer("8|Bu işlem bulunamadı | kontrol edin")
    assert caught.value.code == "8"
    assert caught.value.message == "Bu işlem bulunamadı | kontrol edin"


@given(reference=st.text(st.characters(exclude_categories=["Cs"]), min_size=1))
def test_url_carries_any_reference_and_the_credentials_exactly(reference: str) -> None:
    # The credentials' part of the query is encoded once, when the adapter is
    # built: every reference must still come out whole beside them.
    url = urlsplit(str(adapter("http://127.0.0.1:9").url(reference)))
    assert parse_qs(url.query, keep_blank_values=True, strict_parsing=True) == {
        "kod": [KOD],
        "sifre": [SIFRE],
        "tahsilat_api_islem_id": [reference],
    }


# --- against a server ----------------------------------------------------------------


async def test_request_shape_and_answer() -> None:
    async with serve(reply(f"OK|2|ABC123XYZ789|{TURKISH_DONE}")) as srv, client() as session:
        o = order()
        result = await adapter(srv.base_url).fetch(session, [o])
    (seen,) = srv.seen
    assert seen.method == "GET"
    assert seen.path == "/servis/pin_kontrol.php"
    assert seen.query == {"kod": KOD, "sifre": SIFRE, "tahsilat_api_islem_id": o.reference}
    assert result == {o.order_id: result[o.order_id]}
    assert result[o.order_id].pin == "ABC123XYZ789"
    assert result[o.order_id].message == TURKISH_DONE


@pytest.mark.parametrize("reference", ["a b+c&d=e%20f#g/h?i", "İşlem-ü ğ", "%%41"])
async def test_the_url_goes_out_as_encoded_once(reference: str) -> None:
    # The adapter encodes the URL itself and aiohttp sends it untouched: the
    # server reads back every character of the reference, and nothing was
    # quoted a second time on the way.
    async with serve(reply("OK|1| - |")) as srv, client() as session:
        znet_adapter = adapter(srv.base_url)
        o = order(reference)
        await znet_adapter.fetch(session, [o])
    (seen,) = srv.seen
    assert seen.query["tahsilat_api_islem_id"] == reference
    assert seen.raw_path == znet_adapter.url(reference).raw_path_qs


def test_the_base_url_is_encoded_once_at_start() -> None:
    url = adapter("http://bücher.example/ä b").url("R")
    assert str(url).startswith("http://xn--bcher-kva.example/%C3%A4%20b/servis/pin_kontrol.php?")


async def test_path_is_configurable() -> None:
    async with serve(reply("OK|1| - |")) as srv, client() as session:
        await adapter(srv.base_url, path="api/v2/pin_kontrol.php").fetch(session, [order()])
    assert srv.seen[0].path == "/api/v2/pin_kontrol.php"


@pytest.mark.parametrize(
    "content_type", ["text/html; charset=utf-8", "application/json", "application/octet-stream"]
)
async def test_content_type_does_not_matter(content_type: str) -> None:
    handler = reply(f"OK|2|P-1|{TURKISH_DONE}".encode(), content_type=content_type)
    async with serve(handler) as srv, client() as session:
        o = order()
        result = await adapter(srv.base_url).fetch(session, [o])
    assert result[o.order_id].message == TURKISH_DONE


async def test_invalid_utf8_is_replaced_not_fatal() -> None:
    async with serve(reply(b"OK|3| - |\xff\xfe bozuk")) as srv, client() as session:
        o = order()
        result = await adapter(srv.base_url).fetch(session, [o])
    assert result[o.order_id].status is Status.FAILED
    assert result[o.order_id].message == "\ufffd\ufffd bozuk"


@pytest.mark.parametrize(
    "body",
    ["", "<html><body>502 Bad Gateway</body></html>", "OK|9| - |?", '{"result": 1}'],
)
async def test_garbage_raises_and_logs_bad_body(body: str) -> None:
    async with serve(reply(body)) as srv, client() as session:
        with capture_logs() as logs, pytest.raises(ProviderError) as caught:
            await adapter(srv.base_url).fetch(session, [order()])
    assert type(caught.value) is ProviderError
    (event,) = logs
    assert event["event"] == "provider.bad_body"
    assert event["provider"] == "p1"
    assert event["status"] == 200
    assert len(event["body"]) <= 201


async def test_error_answer_is_a_provider_error_with_code_and_message() -> None:
    async with serve(reply("3|Kayıt bulunamadı")) as srv, client() as session:
        with capture_logs() as logs, pytest.raises(ProviderError) as caught:
            await adapter(srv.base_url).fetch(session, [order()])
    assert type(caught.value) is ProviderError
    assert "znet error 3" in str(caught.value)
    assert "Kayıt bulunamadı" in str(caught.value)
    assert [e["event"] for e in logs] == ["provider.error_answer"]


async def test_declared_auth_codes_raise_auth_error() -> None:
    async with serve(reply("7|IP adresiniz tanımlı değil")) as srv, client() as session:
        with capture_logs() as logs, pytest.raises(ProviderAuthError):
            await adapter(srv.base_url, auth_codes=["7", 9]).fetch(session, [order()])
    assert [e["event"] for e in logs] == ["provider.error_answer", "provider.auth_failed"]
    assert logs[1]["log_level"] == "error"


@pytest.mark.parametrize("status", [401, 403])
async def test_refused_by_http_status(status: int) -> None:
    async with serve(reply("Forbidden", status=status)) as srv, client() as session:
        with pytest.raises(ProviderAuthError):
            await adapter(srv.base_url).fetch(session, [order()])


async def test_rate_limited_with_date() -> None:
    handler = reply("busy", status=503, headers={"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"})
    async with serve(handler) as srv, client() as session:
        with pytest.raises(RateLimited) as caught:
            await adapter(srv.base_url).fetch(session, [order()])
    assert caught.value.retry_after == 0.0  # a date in the past: ask again now


async def test_endless_body_is_cut_off() -> None:
    async with serve(endless_body()) as srv, client() as session:
        with pytest.raises(ProviderError, match="larger than 1000 bytes"):
            await adapter(srv.base_url, max_body=1000).fetch(session, [order()])


async def test_connection_refused() -> None:
    async with client() as session:
        with capture_logs() as logs, pytest.raises(ProviderError) as caught:
            await adapter(f"http://127.0.0.1:{closed_port()}").fetch(session, [order()])
    assert logs[0]["event"] == "provider.request_failed"
    assert "kod=***" in logs[0]["url"]
    assert KOD not in str(caught.value)


async def test_slow_answer_times_out() -> None:
    # The provider's own read timeout, not the shared session's.
    async with stalled() as handler, serve(handler) as srv, client() as session:
        with pytest.raises(ProviderError):
            await adapter(srv.base_url, read_timeout=0.2, connect_timeout=0.1).fetch(
                session, [order()]
            )


async def test_credentials_never_in_logs_or_errors() -> None:
    secrets = [KOD, SIFRE, "s3cr%26t%2Bp%C3%A4%2Fss"]
    scenarios = [
        reply(f"<html>kod={KOD}&sifre={SIFRE}</html>", status=500),
        reply(f"<html>{SIFRE}</html>"),
        reply(f"8|Hatalı şifre {SIFRE}"),
        reply("no", status=403),
        reply("", status=429),
    ]
    texts: list[str] = []
    with capture_logs() as logs:
        for handler in scenarios:
            async with serve(handler) as srv, client() as session:
                with pytest.raises(ProviderError) as caught:
                    await adapter(srv.base_url).fetch(session, [order()])
            texts.append(str(caught.value))
        async with client() as session:
            with pytest.raises(ProviderError) as caught:
                await adapter(f"http://127.0.0.1:{closed_port()}").fetch(session, [order()])
            texts.append(str(caught.value))
    assert {e["event"] for e in logs} >= {
        "provider.http_error",
        "provider.bad_body",
        "provider.error_answer",
        "provider.auth_failed",
        "provider.rate_limited",
        "provider.request_failed",
    }
    for secret in secrets:
        assert all(secret not in text for text in texts)
        assert all(secret not in flatten(event) for event in logs)


async def test_one_order_per_request() -> None:
    async with client() as session:
        assert await adapter("http://127.0.0.1:1").fetch(session, []) == {}
        with pytest.raises(ValueError, match="one per request"):
            await adapter("http://127.0.0.1:1").fetch(session, [order(), order()])


# --- building ------------------------------------------------------------------------


def test_build_defaults() -> None:
    built = adapter("https://panel.example/")
    assert built.max_batch == 1
    assert built.path == "/servis/pin_kontrol.php"
    assert built.auth_codes == frozenset()


@pytest.mark.parametrize(
    ("options", "secrets", "message"),
    [
        ({}, {"kod": KOD}, r"\[providers.p1\].secrets.sifre is required"),
        ({}, {"sifre": SIFRE}, r"\[providers.p1\].secrets.kod is required"),
        ({"path": ""}, {"kod": KOD, "sifre": SIFRE}, r"\[providers.p1\].options.path"),
        ({"path": 5}, {"kod": KOD, "sifre": SIFRE}, r"options.path"),
        ({"auth_codes": "7"}, {"kod": KOD, "sifre": SIFRE}, r"options.auth_codes"),
        ({"auth_codes": ["x"]}, {"kod": KOD, "sifre": SIFRE}, r"options.auth_codes"),
        ({"status_path": "x"}, {"kod": KOD, "sifre": SIFRE}, r"unknown keys \['status_path'\]"),
        ({}, {"kod": KOD, "sifre": SIFRE, "token": "t"}, r"secrets: unknown keys \['token'\]"),
    ],
)
def test_build_refuses_bad_config(
    options: dict[str, Any], secrets: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        znet.build(provider_config("znet", "https://p", options=options, secrets=secrets))
    assert SIFRE not in str(caught.value)
