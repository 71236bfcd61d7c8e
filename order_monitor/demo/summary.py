"""The summary at the end: the outcomes, the daemon's log events and the query to see the rows."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

import structlog

from order_monitor import logs
from order_monitor.demo.live import Snapshot
from order_monitor.demo.run import RunResult
from order_monitor.demo.setup import ROWS_QUERY


def print_summary(
    out: TextIO,
    result: RunResult,
    *,
    elapsed: float,
    log_path: Path | None,
    log_events: dict[str, int],
    kept_dsn: str | None,
    psql: Path,
) -> None:
    s = result.final
    w = out.write
    headline = {
        "finished": "every order ended",
        "unfinished": "stopped at the time limit with orders or deliveries still pending",
        "daemon_failed": "the daemon stopped with an error",
        "app_failed": "the application simulator failed",
        "interrupted": "interrupted",
    }[result.status]
    w(f"\nSummary ({headline}, {elapsed:.1f} s)\n\n")
    if s is not None:
        rows = [
            ("dispatched", s.dispatched, "orders the application sent to the provider"),
            ("done", s.done, "PIN and message written"),
            ("failed", s.failed, "the provider refused them; its reason written"),
            ("gave up", s.gave_up, "the provider never knew them; left for a human"),
            ("pending", s.pending, "still in flight"),
        ]
        for name, count, meaning in rows:
            share = f"{count / s.dispatched:6.1%}" if s.dispatched and name != "dispatched" else ""
            w(f"  {name:<11}{count:>7} {share:>7}   {meaning}\n")
        w("\n")
        checks = result.checks_by_outcome
        by = ", ".join(f"{k} {v:.0f}" for k, v in checks.items() if v)
        w(f"  provider checks   {s.checks:.0f} ({by}) in {s.requests} requests\n")
        if result.polls:
            avg = sum(result.polls) / len(result.polls)
            w(f"  checks per order  {avg:.1f} on average, {max(result.polls)} at most\n")
        p50, p99 = result.durations_ms
        if p50 is not None and p99 is not None:
            w(f"  sent -> ended     p50 {p50 / 1000:.1f} s, p99 {p99 / 1000:.1f} s\n")
    if result.error:
        w(f"  error             {result.error}\n")
    if log_events:
        top = sorted(log_events.items(), key=lambda item: (-item[1], item[0]))
        w(f"  daemon warnings   {', '.join(f'{event} {n}' for event, n in top)}\n")
    if log_path is not None:
        w(f"  daemon log        {log_path}\n")
    if s is not None:
        _delivery(out, result, s)
    w("\nThe rows, in SQL:\n\n")
    w("".join(f"  {line}\n" for line in ROWS_QUERY.splitlines()))
    if kept_dsn is not None:
        w(f"\nThe database is still running (--keep):\n  DSN   {kept_dsn}\n")
        w(f"  psql  {psql} '{kept_dsn}'\n")
    else:
        w("\n(run with --keep to leave the database running and query it)\n")
    out.flush()


def _delivery(out: TextIO, result: RunResult, s: Snapshot) -> None:
    """What the application did with the results: the actions' side, and whether it adds up."""
    w = out.write
    w("\nIn the application (its API, called by the daemon's actions):\n\n")
    rows = [
        ("approved", s.approved, "done orders the application approved"),
        ("rejected", s.rejected, "failed orders it rejected"),
        ("refunded", result.refunds, f"into the customers' balances, {result.refunded} in all"),
        ("stray refunds", result.stray_refunds, "refunds of orders not rejected (must be 0)"),
        ("undelivered", s.undelivered, "results not delivered yet"),
        ("dead letters", s.dead, "deliveries given up (order-monitor deliveries --dead)"),
    ]
    for name, count, meaning in rows:
        w(f"  {name:<14}{count:>6}   {meaning}\n")
    w(f"  {'API requests':<14}{result.api_requests:>6}   batched by tenant\n")
    adds_up = (
        s.done == s.approved
        and s.failed == s.rejected == result.refunds
        and result.stray_refunds == 0
        and s.undelivered == 0
    )
    if adds_up:
        w(
            f"  adds up: done {s.done} == approved {s.approved}, failed {s.failed} =="
            f" rejected {s.rejected} == refunds {result.refunds}; one refund per rejection\n"
        )
    else:
        why = "dead letters or undelivered results" if s.dead or s.undelivered else "a mismatch"
        w(
            f"  DOES NOT ADD UP ({why}): done {s.done} vs approved {s.approved},"
            f" failed {s.failed} vs rejected {s.rejected} vs refunds {result.refunds}\n"
        )


def log_events(path: Path) -> dict[str, int]:
    """How often each event name occurs in the daemon's log (warnings and errors)."""
    counts: dict[str, int] = {}
    with contextlib.suppress(OSError), path.open(encoding="utf-8") as lines:
        for line in lines:
            try:
                event = str(json.loads(line).get("event", "?"))
            except (ValueError, AttributeError):
                event = "?"
            counts[event] = counts.get(event, 0) + 1
    return counts


@contextlib.contextmanager
def daemon_log() -> Iterator[Path]:
    """Send the daemon's structlog output to a file, away from the live view.

    At warning level: the provider's bad moments and how they were ridden
    out, not a line per check. The previous configuration is restored after,
    so a caller in the same process (a test) keeps its own.
    """
    handle, name = tempfile.mkstemp(prefix="order-monitor-demo-", suffix=".log")
    path = Path(name)
    saved = structlog.get_config()
    with os.fdopen(handle, "w", encoding="utf-8", buffering=1) as stream:
        logs.configure("warning", "json", stream)
        try:
            yield path
        finally:
            structlog.configure(**saved)
