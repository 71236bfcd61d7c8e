"""/readyz's ``writes`` check: results checked but not written make the daemon unready."""

from __future__ import annotations

from dataclasses import dataclass

import aiohttp

from order_monitor.metrics import Metrics
from order_monitor.ops.http import MAX_UNWRITTEN_AGE, HttpServer


@dataclass
class Healthy:
    """A leader whose every other check passes."""

    role: str = "leader"
    listener_connected: bool = True
    database_unreachable: bool = False

    async def database_ok(self) -> bool:
        return True

    def last_sweep_age(self) -> float | None:
        return 1.0


async def _readyz(age: float) -> tuple[int, dict[str, object]]:
    async with (
        HttpServer(
            "127.0.0.1:0", metrics=Metrics(), readiness=Healthy(), unwritten_age=lambda: age
        ) as server,
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{server.port}/readyz") as response,
    ):
        return response.status, await response.json()


async def test_a_result_waiting_past_a_minute_makes_the_daemon_unready() -> None:
    # Before: the listener up, sweeps on time, /readyz 200 while no result
    # had been written for minutes.
    status, body = await _readyz(MAX_UNWRITTEN_AGE + 1.5)
    assert status == 503
    assert body["failed"] == ["writes"]
    writes = body["checks"]["writes"]  # type: ignore[index]
    assert writes["ok"] is False
    assert writes["age_s"] == MAX_UNWRITTEN_AGE + 1.5
    assert "writer.rows_locked" in writes["reason"]


async def test_a_result_waiting_a_little_is_shown_but_ready() -> None:
    status, body = await _readyz(3.25)
    assert status == 200
    assert body["checks"]["writes"] == {"ok": True, "age_s": 3.25}  # type: ignore[index]
    status, body = await _readyz(0.0)
    assert body["checks"]["writes"] == {"ok": True, "age_s": 0.0}  # type: ignore[index]
