"""What every scenario is given: the server, the fakes, the daemon's scheduler that records lags."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from common import (
    Fake,
    Server,
)

from order_monitor.engine.scheduler import Scheduler


class RecordingScheduler(Scheduler):
    """The daemon's own Scheduler, noting how late each order is taken off it.

    Measuring only: it records the live due time of every order it holds
    and, in pop_due, the difference between the dispatcher's clock and that
    due time.
    """

    def __init__(self) -> None:
        super().__init__()
        self.recording = False
        self.lags: list[float] = []
        self._live_due: dict[int, float] = {}

    def _push(self, order: int, due: float, *rest: Any) -> None:
        if self.recording:
            self._live_due[order] = due
        super()._push(order, due, *rest)

    def pop_due(self, now: float, limit: int) -> list[int]:
        taken = super().pop_due(now, limit)
        if self.recording:
            for order in taken:
                due = self._live_due.pop(order, None)
                if due is not None:
                    self.lags.append(now - due)
        return taken


@dataclass
class Context:
    server: Server
    fake: Fake
    #: The same fake, answering after a delay like a provider across the internet.
    slow_fake: Fake
    results: dict[str, Any] = field(default_factory=dict)
