"""No form of a provider credential in any error path, against real loopback servers.

For credentials drawn from all of text (printable ASCII, controls, any
script), every way a request can go wrong is tried: connection refused, a
connect that times out (aiohttp's ConnectionTimeoutError carries the URL as
yarl re-encoded it), a read that times out, a body that is no answer, an HTTP
error, and answers that echo the credentials back. What the adapter raises,
what the limits wrapper returns (the Outcome that may become "lastMessage")
and every log event must hold no form of the credential.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any
from urllib.parse import urlencode
from uuid import uuid4

import pytest
from aiohttp import web
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from order_monitor.errors import ProviderError
from order_monitor.metrics import Metrics
from order_monitor.providers import json_http, znet
from order_monitor.providers.base import OrderRef, Outcome, Status
from order_monitor.providers.http import Transport
from order_monitor.providers.registry import build_provider
from order_monitor.redaction import REDACTED, Secret
from tests.providers import PRINTABLE, client, closed_port, leaks, provider_config, serve

# Credentials are printable text (a token, a password): all of it, ASCII or not.
credentials = st.text(PRINTABLE, min_size=1, max_size=16).filter(lambda s: s != REDACTED)
MODES = ("pending-echo", "failed-echo", "error-echo", "bad-body", "http-500", "read-timeout")
# Only the paths that must time out get short timeouts; the others keep the
# default 5 s, so that a loaded machine cannot turn an answer into an error.
FAST = {"read_timeout": 0.1, "connect_timeout": 0.1}
SLOW_PATHS = frozenset({"connect-timeout", "read-timeout"})


def echo(request: web.Request) -> str:
    """The credentials as the server received them: raw on the wire and decoded."""
    decoded = urlencode(list(request.query.items()))
    token = request.headers.get("api-token", "")
    return f"{request.query_string} | {decoded} | {dict(request.query)} | {token}"


def handler(mode: str, kind: str) -> Any:
    async def answer(request: web.Request) -> web.StreamResponse:
        said = echo(request)
        if kind == "json_http" and mode.endswith("-echo"):
            status = {"pending-echo": "pending", "failed-echo": "failed"}.get(mode, "error")
            document = {"status": status, "message": f"invalid request: {said}"}
            return web.json_response(document, status=200 if status != "error" else 400)
        if mode == "pending-echo":
            return web.Response(text=f"OK|1||waiting on {said}")
        if mode == "failed-echo":
            return web.Response(text=f"OK|3||invalid request: {said}")
        if mode == "error-echo":
            return web.Response(text=f"4|bad credentials: {said}")
        if mode == "bad-body":
            return web.Response(text=f"<html>{said}</html>")
        if mode == "http-500":
            return web.Response(text=f"proxy error for {said}", status=500)
        await asyncio.Event().wait()  # read-timeout: never answers
        raise AssertionError

    return answer


@asynccontextmanager
async def tls_stall() -> AsyncIterator[int]:
    """A port that accepts and then says nothing: a TLS handshake (connect) times out."""
    held: list[asyncio.StreamWriter] = []

    async def hold(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    port: int = server.sockets[0].getsockname()[1]
    try:
        yield port
    finally:
        for writer in held:
            writer.close()
        server.close()


def strings(value: object) -> Iterator[str]:
    """Every string in a log event or an outcome, except the event's stable names."""
    if isinstance(value, dict):
        for key, item in value.items():
            if key not in ("event", "log_level", "hint"):
                yield from strings(item)
    elif isinstance(value, list | tuple | set):
        for item in value:
            yield from strings(item)
    elif isinstance(value, str):
        yield value


def outcome_strings(outcome: Outcome) -> list[str]:
    return [s for s in (outcome.pin, outcome.message, outcome.raw_status, outcome.error) if s]


@contextmanager
def no_leak(*secrets: str) -> Iterator[list[str]]:
    """Collects texts; on exit, asserts none (nor any log event) shows a secret."""
    texts: list[str] = []
    with capture_logs() as events:
        yield texts
    texts += [s for event in events for s in strings(event)]
    for secret in secrets:
        for text in texts:
            assert not leaks(text, secret, cleaned=True), (secret, text)


async def run_everywhere(config_of: Any, *secrets: str) -> None:
    """Every error path, through the adapter and through the limits wrapper."""
    bases: list[tuple[str, str]] = [("refused", f"http://127.0.0.1:{closed_port()}")]
    async with tls_stall() as port:
        bases.append(("connect-timeout", f"https://127.0.0.1:{port}"))
        async with client() as session:
            for mode, base in bases:
                await one_path(config_of(base, mode in SLOW_PATHS), session, mode, *secrets)
            for mode in MODES:
                kind = config_of("http://x", False).kind
                async with serve(handler(mode, kind)) as srv:
                    config = config_of(srv.base_url, mode in SLOW_PATHS)
                    await one_path(config, session, mode, *secrets)


async def one_path(config: Any, session: Any, mode: str, *secrets: str) -> None:
    order = OrderRef(uuid4(), "REF-1")
    provider = build_provider(
        config, session=session, session_limit=asyncio.Semaphore(4), metrics=Metrics()
    )
    with no_leak(*secrets) as texts:
        try:
            answered = await provider.adapter.fetch(session, [order])
        except (ProviderError, TimeoutError) as exc:
            texts.append(str(exc))  # what doctor shows
        else:
            texts += [s for o in answered.values() for s in outcome_strings(o)]
        (outcome,) = (await provider.check([order])).values()
        texts += outcome_strings(outcome)
    if mode == "failed-echo":
        assert outcome.status is Status.FAILED
    elif mode == "pending-echo":
        assert outcome.status is Status.PENDING
    elif mode != "error-echo" or provider.adapter.max_batch == 1:
        assert outcome.status is Status.ERROR, (mode, outcome)


@given(kod=credentials, sifre=credentials)
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@example(kod="54421999998", sifre="Zs+9/Qw=x&k7~Q!")
@example(kod="k", sifre="&")
def test_znet_credentials_never_leak(kod: str, sifre: str) -> None:
    def config_of(base: str, fast: bool) -> Any:
        timeouts = FAST if fast else {}
        return provider_config("znet", base, secrets={"kod": kod, "sifre": sifre}, **timeouts)

    asyncio.run(run_everywhere(config_of, kod, sifre))


@given(token=credentials)
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@example(token="Zs+9/Qw=x&k7~Q!")
def test_json_http_query_token_never_leaks(token: str) -> None:
    options = {
        "url": "/check?ref={ref}",
        "auth": {"query": "token"},
        "status_path": "status",
        "message_path": "message",
        "status_map": {"done": ["done"], "failed": ["failed"], "pending": ["pending"]},
    }

    def config_of(base: str, fast: bool) -> Any:
        timeouts = FAST if fast else {}
        return provider_config(
            "json_http", base, options=options, secrets={"token": token}, **timeouts
        )

    asyncio.run(run_everywhere(config_of, token))


# --- the one that leaked, by name -----------------------------------------------------


async def test_connect_timeout_text_with_yarls_encoding_is_not_rendered() -> None:
    sifre = "Zs+9/Qw=x&k7~Q!"
    async with tls_stall() as port, client() as session:
        adapter = znet.build(
            provider_config(
                "znet",
                f"https://127.0.0.1:{port}",
                secrets={"kod": "54421999998", "sifre": sifre},
                **FAST,
            )
        )
        with capture_logs() as events, pytest.raises(ProviderError) as caught:
            await adapter.fetch(session, [OrderRef(uuid4(), "R")])
    (event,) = events
    assert event["event"] == "provider.request_failed"
    assert event["error"] == "ConnectionTimeoutError"
    assert (event["host"], event["port"]) == ("127.0.0.1", port)
    assert "Zs%2B9/Qw%3Dx%26k7~Q!" not in str(caught.value)
    assert not leaks(str(caught.value), sifre)


async def test_refused_connection_names_host_port_and_os_error() -> None:
    port = closed_port()
    transport = Transport("p", 1024, secrets=(Secret("tok-123"),))
    async with client() as session:
        with capture_logs() as events, pytest.raises(ProviderError) as caught:
            await transport.request(session, "GET", f"http://127.0.0.1:{port}/x?t=tok-123")
    (event,) = events
    assert (event["host"], event["port"]) == ("127.0.0.1", port)
    assert "ECONNREFUSED" in event["os_error"]
    assert f"127.0.0.1:{port}: [ECONNREFUSED]" in str(caught.value)
    assert "tok-123" not in str(caught.value)


def test_json_http_builds_the_token_into_the_url_we_then_hide() -> None:
    adapter = json_http.build(
        provider_config(
            "json_http",
            "http://h",
            options={
                "url": "/c?ref={ref}",
                "auth": {"query": "token"},
                "status_path": "s",
                "status_map": {"done": ["d"]},
            },
            secrets={"token": "t"},
        )
    )
    assert isinstance(adapter, json_http.JsonHttpAdapter)
    assert adapter.http.safe_url(adapter.url(["R"])) == "http://h/c?ref=R&token=***"


async def test_an_answer_echoing_the_credentials_is_scrubbed_before_it_leaves() -> None:
    sifre = "Zs+9/Qw=x&k7~Q!"
    async with serve(handler("failed-echo", "znet")) as srv, client() as session:
        adapter = znet.build(
            provider_config("znet", srv.base_url, secrets={"kod": "54421999998", "sifre": sifre})
        )
        (outcome,) = (await adapter.fetch(session, [OrderRef(uuid4(), "R")])).values()
    assert outcome.status is Status.FAILED
    assert outcome.message is not None
    assert outcome.message.startswith("invalid request: kod=***&sifre=***&tahsilat_api_islem_id=R")
    assert not leaks(outcome.message, sifre)
    assert not leaks(outcome.message, "54421999998")


def test_a_pin_holding_a_credential_is_neither_written_nor_cut() -> None:
    transport = Transport("p", 1024, secrets=(Secret("tok-123"),))
    outcome = transport.safe_outcome(Outcome.done(pin="AAtok-123", message="tok-123 ok"))
    assert outcome.status is Status.ERROR
    assert outcome.pin is None
    assert outcome.message == "*** ok"
    assert outcome.error is not None
    assert "credentials" in outcome.error


def test_a_credential_with_a_control_character_is_found_after_cleaning() -> None:
    # Provider text goes through clean_str before it is scrubbed.
    transport = Transport("p", 1024, secrets=(Secret("ab\x01cd"),))
    outcome = transport.safe_outcome(Outcome.failed(message="echo ab\x01cd"))
    assert outcome.message == "echo ***"
