"""Adapter tests against real HTTP servers on loopback; helpers shared by them."""

from __future__ import annotations

import asyncio
import html
import json
import re
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, quote_plus, urlencode

import aiohttp
import yarl
from aiohttp import web
from aiohttp.test_utils import TestServer
from hypothesis import strategies as st

from order_monitor.config import ProviderConfig, ProviderLimits
from order_monitor.providers.base import clean_str
from order_monitor.providers.breaker import BreakerState, CircuitBreaker
from order_monitor.providers.limits import LimitedProvider
from order_monitor.redaction import MIN_FREE_TEXT, Secret

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class Seen:
    """One request as the server received it."""

    method: str
    path: str
    raw_path: str
    query: Mapping[str, str]
    raw_query: str
    headers: Mapping[str, str]


@dataclass
class Served:
    base_url: str
    seen: list[Seen] = field(default_factory=list)


@asynccontextmanager
async def serve(handler: Handler) -> AsyncIterator[Served]:
    """Run *handler* for every path on 127.0.0.1, recording each request."""
    served = Served("")

    async def record(request: web.Request) -> web.StreamResponse:
        served.seen.append(
            Seen(
                request.method,
                request.path,
                request.raw_path,
                dict(request.query),
                request.query_string,
                dict(request.headers),
            )
        )
        return await handler(request)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", record)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    served.base_url = f"http://127.0.0.1:{server.port}"
    try:
        yield served
    finally:
        await server.close()


def reply(
    body: str | bytes,
    status: int = 200,
    content_type: str = "text/plain; charset=utf-8",
    headers: Mapping[str, str] | None = None,
) -> Handler:
    """A handler that always answers the same."""
    data = body.encode() if isinstance(body, str) else body

    async def handler(_request: web.Request) -> web.StreamResponse:
        return web.Response(
            body=data, status=status, headers={"Content-Type": content_type, **(headers or {})}
        )

    return handler


def json_reply(document: Any, status: int = 200) -> Handler:
    import json

    return reply(json.dumps(document, ensure_ascii=False), status, "application/json")


def endless_body() -> Handler:
    """Streams without end (chunked, no Content-Length) until the client hangs up."""

    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/plain"})
        await response.prepare(request)
        chunk = b"OK|2|" + b"x" * 65_536
        try:
            while True:
                await response.write(chunk)
        except ConnectionError:
            pass
        return response

    return handler


@asynccontextmanager
async def stalled() -> AsyncIterator[Handler]:
    """A handler that never answers until the test is over (no sleeping)."""
    release = asyncio.Event()

    async def handler(_request: web.Request) -> web.StreamResponse:
        await release.wait()
        return web.Response(text="too late")

    try:
        yield handler
    finally:
        release.set()


def closed_port() -> int:
    """A loopback port nothing listens on (connection refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@asynccontextmanager
async def client(total: float = 5.0) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=total)) as session:
        yield session


def provider_config(
    kind: str,
    base_url: str,
    *,
    options: Mapping[str, Any] | None = None,
    secrets: Mapping[str, str] | None = None,
    max_body: int = 1_048_576,
    name: str = "p1",
    read_timeout: float = 5.0,
    connect_timeout: float = 5.0,
) -> ProviderConfig:
    return ProviderConfig(
        name=name,
        kind=kind,
        base_url=base_url,
        provider_ids=(name,),
        limits=ProviderLimits(
            max_body=max_body, read_timeout=read_timeout, connect_timeout=connect_timeout
        ),
        secrets={k: Secret(v) for k, v in (secrets or {}).items()},
        options=dict(options or {}),
    )


def flatten(value: object) -> str:
    """Every string inside a captured log event, for 'no secret anywhere' checks."""
    if isinstance(value, Mapping):
        return " ".join(f"{k} {flatten(v)}" for k, v in value.items())
    if isinstance(value, list | tuple | set | frozenset):
        return " ".join(flatten(v) for v in value)
    return str(value)


# --- secrets in every form ---------------------------------------------------------


#: Every printable character, ASCII or not: what a credential is made of.
PRINTABLE = st.characters(blacklist_categories=("Cc", "Cs"))


def yarl_form(secret: str) -> str:
    """The secret as yarl re-encodes a query value on the wire."""
    return yarl.URL("http://h/p").with_query({"k": secret}).raw_query_string[len("k=") :]


def forms(secret: str, *, cleaned: bool = False) -> set[str]:
    """Every form a client, a library or an echoing provider may carry *secret* in.

    *cleaned*: also as provider text shows it after clean_str (the transport
    scrubs that form too; scrub alone knows nothing of cleaning).
    """
    found = {
        secret,
        quote(secret, safe=""),
        quote(secret, safe="/"),
        quote(secret, safe="/~!*'()"),
        quote(secret, safe="/:@!$'()*,;=~"),
        re.sub("%[0-9A-F]{2}", lambda m: m.group().lower(), quote(secret, safe="")),
        quote_plus(secret),
        quote_plus(secret, safe="*[],"),
        urlencode({"k": secret})[2:],
        yarl_form(secret),
        # raw_path, not str(): a URL with no host renders a path that starts
        # with "//" as "////", which is no form of the secret.
        yarl.URL.build(path="/" + secret).raw_path[1:],
        json.dumps(secret)[1:-1],
        json.dumps(secret, ensure_ascii=False)[1:-1],
        json.dumps(secret).replace("/", "\\/")[1:-1],
        repr(secret)[1:-1],
        html.escape(secret),
    }
    if cleaned:
        found.add(clean_str(secret))
    return {f for f in found if f}


_VALUE_END = r"(?=[&;,|#'\"<>)\]}\s]|$)"


def leaks(text: str, secret: str, *, cleaned: bool = False) -> list[str]:
    """The forms of *secret* that *text* shows (as a whole value only, for short ones)."""
    if len(secret) >= MIN_FREE_TEXT:
        return [form for form in forms(secret, cleaned=cleaned) if form in text]
    return [
        form
        for form in forms(secret, cleaned=cleaned)
        if re.search("=" + re.escape(form) + _VALUE_END, text)
        or re.search(r'":\s*"' + re.escape(form) + '"', text)
        or re.search("//[^/:@\\s]*:" + re.escape(form) + "@", text)
    ]


def state_of(breaker: CircuitBreaker | LimitedProvider) -> BreakerState:
    """The breaker's state; through a call, so mypy does not narrow it across a test's steps."""
    return breaker.state
