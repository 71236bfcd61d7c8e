"""The application: pgbench at full speed or at a fixed rate, and what its output and logs say."""

from __future__ import annotations

import asyncio
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# bench/common: bench/ is on sys.path, bench/trigger.py being run as a script.
from common import (
    percentile,
)


@dataclass(frozen=True)
class Load:
    """One pgbench invocation's shape."""

    clients: int
    threads: int
    seconds: float
    rate: float | None = None  # -R: a fixed arrival rate (tps), else full speed


def pgbench_command(
    pgbench: str, dsn: str, script: Path, load: Load, log_prefix: Path | None
) -> list[str]:
    command = [
        pgbench,
        "--no-vacuum",
        "--protocol=prepared",
        f"--client={load.clients}",
        f"--jobs={load.threads}",
        f"--time={max(1, round(load.seconds))}",
        f"--file={script}",
    ]
    if load.rate is not None:
        command.append(f"--rate={load.rate:g}")
    if log_prefix is not None:
        command += ["--log", f"--log-prefix={log_prefix}"]
    return [*command, dsn]


def summary_value(output: str, starts: str) -> str:
    for line in output.splitlines():
        if line.startswith(starts):
            return line[len(starts) :].strip()
    raise RuntimeError(f"pgbench printed no {starts!r} line:\n{output}")


async def pgbench_run(
    pgbench: str, dsn: str, script: Path, load: Load, log_dir: Path | None = None
) -> dict[str, Any]:
    """Run pgbench without blocking the event loop (the daemon runs in it)."""
    prefix = log_dir / "txn" if log_dir is not None else None
    process = await asyncio.create_subprocess_exec(
        *pgbench_command(pgbench, dsn, script, load, prefix),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await process.communicate()
    output = out.decode()
    if process.returncode != 0:
        raise RuntimeError(f"pgbench failed ({process.returncode}): {err.decode()}{output}")
    result: dict[str, Any] = {
        "tps": float(summary_value(output, "tps = ").split()[0]),
        "transactions": int(summary_value(output, "number of transactions actually processed:")),
        "failed": int(summary_value(output, "number of failed transactions:").split()[0]),
        "pgbench_latency_avg_ms": float(summary_value(output, "latency average = ").split()[0]),
    }
    if prefix is not None:
        result.update(transaction_log(sorted(prefix.parent.glob(prefix.name + ".*"))))
    return result


def transaction_log(files: list[Path]) -> dict[str, Any]:
    """Average and percentiles from pgbench's per-transaction logs (``-l``).

    A line is ``client transaction time_us script epoch_s epoch_us
    [schedule_lag_us]``. With ``-R`` pgbench measures ``time`` from the
    transaction's *scheduled* start, so it includes the wait for a busy
    connection (what an application with a fixed arrival rate sees);
    ``service`` is ``time`` less that lag: the transaction alone.
    """
    latency: list[float] = []
    service: list[float] = []
    for path in files:
        for line in path.read_text().splitlines():
            fields = line.split()
            if len(fields) < 6 or fields[2] == "skipped":
                continue
            total = int(fields[2]) / 1000
            lag = int(fields[6]) / 1000 if len(fields) > 6 else 0.0
            latency.append(total)
            service.append(total - lag)
    if not latency:
        raise RuntimeError("pgbench wrote no per-transaction log")
    return {
        "logged": len(latency),
        "latency_avg_ms": statistics.fmean(latency),
        "latency_p50_ms": percentile(latency, 0.5),
        "latency_p99_ms": percentile(latency, 0.99),
        "latency_max_ms": max(latency),
        "service_avg_ms": statistics.fmean(service),
        "service_p99_ms": percentile(service, 0.99),
    }
