"""The fake provider in a process of its own, for the benchmark.

The daemon (or the bare HTTP loop) and the provider then do not share one
event loop and one GIL, as on a real deployment. What a reference answers is
written in the reference itself, so the driver needs no control call to set
up a scenario:

* ``d<N>.<anything>``: N pending answers, then done (``d0.x``: done at once);
* ``w.<anything>``: pending for ever.

Poll times are taken with ``time.time`` (the application process stamps its
COMMITs with the same clock), and served back as JSON:

* ``GET /_bench/polls?prefix=P``: ``{reference: [poll times]}`` for the
  references starting with P;
* ``GET /_bench/stats``: requests served, and the most under way at once;
* ``POST /_bench/reset``: forget every recorded poll (scripts stay).

Usage: ``python bench/fake_server.py --token T`` prints ``READY <base url>``
on stdout, then serves until SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
import time

from aiohttp import web

from order_monitor.providers.fake import Behaviour, FakeProvider, Script


def rule(reference: str) -> Script:
    kind = reference.split(".", 1)[0]
    if kind.startswith("d") and kind[1:].isdigit():
        return Script.done(after=int(kind[1:]))
    return Script.pending()


def add_control(fake: FakeProvider) -> None:
    async def polls(request: web.Request) -> web.Response:
        prefix = request.query.get("prefix", "")
        body = {ref: fake.polls(ref) for ref in fake.references if ref.startswith(prefix)}
        return web.json_response(body)

    async def stats(request: web.Request) -> web.Response:
        return web.json_response(
            {"requests": fake.requests_total, "peak_in_flight": fake.peak_in_flight}
        )

    async def reset(request: web.Request) -> web.Response:
        fake.reset_recording()
        return web.json_response({"ok": True})

    fake.app.router.add_get("/_bench/polls", polls)
    fake.app.router.add_get("/_bench/stats", stats)
    fake.app.router.add_post("/_bench/reset", reset)


async def serve(token: str, host: str, port: int, latency: float) -> None:
    fake = FakeProvider(Behaviour(default=rule, latency=latency), token=token, clock=time.time)
    add_control(fake)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with fake.running(host, port) as url:
        sys.stdout.write(f"READY {url}\n")
        sys.stdout.flush()
        await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--token", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--latency", type=float, default=0.0, help="seconds before each answer")
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.token, args.host, args.port, args.latency))


if __name__ == "__main__":
    main()
