"""The fake provider's HTTP server: barakat's and znet's protocols, every request recorded."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import random
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Final

from aiohttp import web

from order_monitor.providers.fake.scripts import (
    GARBAGE_BODIES,
    MSG_DONE,
    MSG_FAILED,
    MSG_PENDING,
    ZNET_AUTH_ERROR,
    ZNET_BAD_REQUEST,
    ZNET_NOT_FOUND,
    Answer,
    Behaviour,
    Script,
    default_pin,
)

BARAKAT_PATH: Final = "/client/api/check"
ZNET_PATH: Final = "/servis/pin_kontrol.php"

_dumps = functools.partial(json.dumps, ensure_ascii=False)


@dataclass(slots=True)
class _Throttle:
    remaining: int
    retry_after: str
    status: int


@dataclass(slots=True)
class _Recording:
    polls: defaultdict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    answered: defaultdict[str, int] = field(default_factory=lambda: defaultdict(int))


class FakeProvider:
    """A provider that does what the test says. See the module docstring.

    ::

        fake = FakeProvider(token="t")
        fake.set_script("R1", Script.done("PIN1", after=2))
        async with fake.running() as base_url:
            ...  # point an adapter at base_url
        assert fake.poll_count("R1") == 3
    """

    def __init__(
        self,
        behaviour: Behaviour | None = None,
        *,
        token: str = "t",  # noqa: S107 - the fake's own test token
        kod: str = "kod",
        sifre: str = "sifre",
        seed: int = 0,
        scripts: dict[str, Script] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.behaviour = behaviour or Behaviour()
        self.token = token
        self.kod = kod
        self.sifre = sifre
        self._rng = random.Random(seed)  # noqa: S311 - a simulation, not a secret
        self._scripts: dict[str, Script] = dict(scripts or {})
        self._clock = clock
        self._rec = _Recording()
        self._throttle: _Throttle | None = None
        self._stopping = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.base_url: str | None = None
        #: Requests received (every protocol, every answer).
        self.requests_total = 0
        #: Requests being answered now, and the most at once.
        self.in_flight = 0
        self.peak_in_flight = 0
        self.app = web.Application()
        self.app.router.add_get(BARAKAT_PATH, self._barakat)
        self.app.router.add_get(ZNET_PATH, self._znet)

    # --- scripting and recording ----------------------------------------------

    def set_script(self, reference: str, script: Script) -> None:
        self._scripts[reference] = script

    def script(self, reference: str) -> Script:
        found = self._scripts.get(reference)
        if found is None:
            found = self._scripts[reference] = self.behaviour.default(reference)
        return found

    def rate_limit(self, requests: int, retry_after: float | str = 1, *, status: int = 429) -> None:
        """Answer the next *requests* requests *status* with ``Retry-After: retry_after``.

        *retry_after* may be seconds or an HTTP-date string; ``""`` sends no header.
        """
        value = retry_after if isinstance(retry_after, str) else f"{retry_after:g}"
        self._throttle = _Throttle(requests, value, status)

    def polls(self, reference: str) -> list[float]:
        """Monotonic times of every request that named *reference*."""
        return list(self._rec.polls.get(reference, ()))

    def poll_count(self, reference: str) -> int:
        return len(self._rec.polls.get(reference, ()))

    def answered(self, reference: str) -> int:
        """Polls that got a real answer (they move the script forward)."""
        return self._rec.answered.get(reference, 0)

    @property
    def references(self) -> set[str]:
        """Every reference asked about so far."""
        return set(self._rec.polls)

    def reset_recording(self) -> None:
        """Forget polls and counters; scripts and their progress stay."""
        answered = self._rec.answered
        self._rec = _Recording(answered=answered)
        self.requests_total = 0
        self.peak_in_flight = self.in_flight

    # --- running ----------------------------------------------------------------

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Listen on host:port (0: a free port); return the base URL."""
        if self._runner is not None:
            raise RuntimeError("the fake provider is already running")
        self._stopping = asyncio.Event()
        runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        site = web.TCPSite(runner, host, port, backlog=1024)
        await site.start()
        self._runner = runner
        bound = runner.addresses[0][1] if runner.addresses else port
        self.base_url = f"http://{host}:{bound}"
        return self.base_url

    async def stop(self) -> None:
        self._stopping.set()  # releases hanging requests
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    @contextlib.asynccontextmanager
    async def running(self, host: str = "127.0.0.1", port: int = 0) -> AsyncIterator[str]:
        url = await self.start(host, port)
        try:
            yield url
        finally:
            await self.stop()

    # --- the protocols ------------------------------------------------------------

    async def _barakat(self, request: web.Request) -> web.StreamResponse:
        ids = parse_order_list(request.query.get("orders", ""))
        with self._serving(ids):
            early = await self._misbehave(ids)
            if early is not None:
                return early
            if request.headers.get("api-token") != self.token:
                return _json({"status": "ERROR", "message": "Yetkisiz: api-token geçersiz"}, 401)
            if not ids:
                return _json({"status": "ERROR", "message": "orders parametresi eksik"}, 400)
            by_uuid = request.query.get("uuid") == "1"
            data = []
            for ref in ids:
                entry = self._barakat_entry(ref, self._answer(ref))
                if entry is not None:
                    if by_uuid:
                        entry["uuid"] = ref
                    data.append(entry)
            return _json({"status": "OK", "data": data})

    async def _znet(self, request: web.Request) -> web.StreamResponse:
        ref = request.query.get("tahsilat_api_islem_id", "")
        ids = [ref] if ref else []
        with self._serving(ids):
            early = await self._misbehave(ids)
            if early is not None:
                return early
            if request.query.get("kod") != self.kod or request.query.get("sifre") != self.sifre:
                return _text(f"{ZNET_AUTH_ERROR}|Yetkisiz erişim: kod veya şifre hatalı")
            if not ref:
                return _text(f"{ZNET_BAD_REQUEST}|Eksik parametre: tahsilat_api_islem_id")
            script = self.script(ref)
            answer = self._answer(ref)
            if answer is Answer.UNKNOWN:
                return _text(f"{ZNET_NOT_FOUND}|İşlem bulunamadı")
            if answer is Answer.PENDING:
                return _text(f"OK|1| - |{MSG_PENDING}")
            if answer is Answer.DONE:
                pin = default_pin(ref) if script.pin is None else (script.pin or " - ")
                return _text(f"OK|2|{pin}|{script.message or MSG_DONE}")
            return _text(f"OK|3| - |{script.message or MSG_FAILED}")

    def _barakat_entry(self, ref: str, answer: Answer) -> dict[str, object] | None:
        script = self.script(ref)
        if answer is Answer.UNKNOWN:
            return None
        if answer is Answer.PENDING:
            return {"order_id": ref, "status": "wait", "replay_api": [MSG_PENDING]}
        if answer is Answer.DONE:
            pin = default_pin(ref) if script.pin is None else script.pin
            return {
                "order_id": ref,
                "status": script.word or "accept",
                "pin": pin,
                "replay_api": [script.message or MSG_DONE],
            }
        return {
            "order_id": ref,
            "status": script.word or "reject",
            "replay_api": [script.message or MSG_FAILED],
        }

    def _answer(self, ref: str) -> Answer:
        # Only a real answer moves a script on: a 5xx or 429 is not a poll the provider served.
        self._rec.answered[ref] += 1
        return self.script(ref).at(self._rec.answered[ref])

    @contextlib.contextmanager
    def _serving(self, ids: Iterable[str]) -> Iterator[None]:
        now = self._clock()
        self.requests_total += 1
        for ref in ids:
            self._rec.polls[ref].append(now)
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        try:
            yield
        finally:
            self.in_flight -= 1

    async def _misbehave(self, ids: list[str]) -> web.StreamResponse | None:
        """Latency, throttling, errors, garbage, hanging: whatever comes before an answer."""
        b = self.behaviour
        delay = b.latency if isinstance(b.latency, int | float) else self._rng.uniform(*b.latency)
        if delay > 0:
            await asyncio.sleep(delay)
        throttle = self._throttle
        if throttle is not None and throttle.remaining > 0:
            throttle.remaining -= 1
            headers = {"Retry-After": throttle.retry_after} if throttle.retry_after else {}
            return web.Response(status=throttle.status, text="Too Many Requests", headers=headers)
        if b.error_rate > 0 and self._rng.random() < b.error_rate:
            return web.Response(status=500, text="<html><body>500 Internal Server Error</body>")
        if b.garbage_rate > 0 and self._rng.random() < b.garbage_rate:
            body = self._rng.choice(GARBAGE_BODIES)
            return web.Response(status=200, text=body, content_type="text/html")
        if any(self.script(ref).answer is Answer.HANG for ref in ids):
            await self._stopping.wait()
            return web.Response(status=503, text="shutting down")
        return None


def parse_order_list(raw: str) -> list[str]:
    """The ids of ``orders=[A,B]`` (also ``["A","B"]`` and a bare ``A,B``), in order, once each."""
    text = raw.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    seen: dict[str, None] = {}
    for part in text.split(","):
        ref = part.strip().strip("\"'").strip()
        if ref:
            seen.setdefault(ref, None)
    return list(seen)


def _json(body: object, status: int = 200) -> web.Response:
    return web.json_response(body, status=status, dumps=_dumps)


def _text(body: str) -> web.Response:
    return web.Response(text=body, content_type="text/plain", charset="utf-8")
