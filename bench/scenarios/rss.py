"""rss: bytes per pending order in the Scheduler (bench/rss_probe.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

from common import (
    BENCH,
)


def scenario_rss(orders: int) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, str(BENCH / "rss_probe.py"), "--orders", str(orders)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    result: dict[str, Any] = json.loads(out)
    return result
