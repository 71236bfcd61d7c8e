"""One reading per interval, whatever the number of callers, by an injected clock."""

from __future__ import annotations

import asyncio

import pytest

from order_monitor.page.cache import Shared, SharedByKey


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def test_fifty_callers_at_once_share_one_computation() -> None:
    clock = Clock()
    shared: Shared[int] = Shared(5.0, clock=clock)
    release = asyncio.Event()
    calls = 0

    async def compute() -> int:
        nonlocal calls
        calls += 1
        await release.wait()
        return calls

    waiting = [asyncio.create_task(shared.get(compute)) for _ in range(50)]
    await asyncio.sleep(0)
    release.set()
    assert await asyncio.gather(*waiting) == [1] * 50
    assert calls == 1
    clock.now = 4.9
    assert await shared.get(compute) == 1
    clock.now = 5.0
    assert await shared.get(compute) == 2
    assert shared.computed == 2


async def test_a_failure_is_shared_too_and_retried_after_the_interval() -> None:
    clock = Clock()
    shared: Shared[int] = Shared(1.0, clock=clock)
    calls = 0

    async def failing() -> int:
        nonlocal calls
        calls += 1
        raise OSError("database down")

    for _ in range(3):
        with pytest.raises(OSError, match="database down"):
            await shared.get(failing)
    assert calls == 1
    clock.now = 1.0
    with pytest.raises(OSError, match="database down"):
        await shared.get(failing)
    assert calls == 2


async def test_a_caller_that_goes_away_does_not_cancel_the_others_reading() -> None:
    shared: Shared[str] = Shared(5.0, clock=Clock())
    release = asyncio.Event()

    async def compute() -> str:
        await release.wait()
        return "read"

    impatient = asyncio.create_task(shared.get(compute))
    patient = asyncio.create_task(shared.get(compute))
    await asyncio.sleep(0)
    impatient.cancel()
    release.set()
    assert await patient == "read"


async def test_per_key_readings_are_bounded() -> None:
    clock = Clock()
    by_key: SharedByKey[int, int] = SharedByKey(5.0, capacity=3, clock=clock)
    for key in range(10):
        assert await by_key.get(key, lambda key=key: asyncio.sleep(0, key)) == key
    assert by_key.computed == 3  # only the three newest keys are kept
