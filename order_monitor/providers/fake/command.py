"""The fake's standalone command (``python -m order_monitor.providers.fake``)."""

from __future__ import annotations

import asyncio
import contextlib

import click

from order_monitor.providers.fake.scripts import Behaviour, mixture
from order_monitor.providers.fake.server import BARAKAT_PATH, ZNET_PATH, FakeProvider


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8099, show_default=True, type=int)
@click.option("--token", default="t", show_default=True, help="barakat api-token")
@click.option("--kod", default="kod", show_default=True)
@click.option("--sifre", default="sifre", show_default=True)
@click.option("--latency", default=0.0, show_default=True, type=float, help="seconds per answer")
@click.option("--error-rate", default=0.0, show_default=True, type=float)
@click.option("--garbage-rate", default=0.0, show_default=True, type=float)
@click.option(
    "--max-pending-polls", default=2, show_default=True, type=int, help="pending answers at most"
)
@click.option("--seed", default=0, show_default=True, type=int)
def main(
    host: str,
    port: int,
    token: str,
    kod: str,
    sifre: str,
    latency: float,
    error_rate: float,
    garbage_rate: float,
    max_pending_polls: int,
    seed: int,
) -> None:
    """Serve the fake provider (barakat and znet protocols) until Ctrl-C."""
    behaviour = Behaviour(
        default=mixture(pending_polls=(0, max_pending_polls), seed=seed),
        latency=latency,
        error_rate=error_rate,
        garbage_rate=garbage_rate,
    )
    fake = FakeProvider(behaviour, token=token, kod=kod, sifre=sifre, seed=seed)

    async def serve() -> None:
        async with fake.running(host, port) as url:
            click.echo(f"fake provider on {url} (barakat {BARAKAT_PATH}, znet {ZNET_PATH})")
            await asyncio.Event().wait()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve())
