"""One reading shared by every viewer: computed at most once per interval, by one caller.

Fifty viewers refreshing every five seconds must cost the database what one
does. :class:`Shared` keeps the latest result (or failure) for *ttl* seconds
by the injected clock, and callers arriving while it is being computed wait
for that same computation. A viewer that goes away mid-way does not cancel
it: the others still want it.

:class:`SharedByKey` does the same per key (one order looked up by many
viewers), for at most *capacity* keys.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable
from typing import Any, Generic, TypeVar

T = TypeVar("T")
K = TypeVar("K", bound=Hashable)


class Shared(Generic[T]):
    def __init__(self, ttl: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self._clock = clock
        self._expires = float("-inf")
        self._result: asyncio.Future[T] | None = None
        #: How many times the value was computed (what the database paid).
        self.computed = 0

    async def get(self, compute: Callable[[], Awaitable[T]]) -> T:
        result = self._result
        if result is None or (result.done() and self._clock() >= self._expires):
            # From when it started: one computation per ttl, however long each takes.
            self._expires = self._clock() + self.ttl
            self.computed += 1
            result = self._result = asyncio.ensure_future(compute())
            # A failure nobody awaits (every viewer gone) is still retrieved.
            result.add_done_callback(_retrieve)
        return await asyncio.shield(result)


class SharedByKey(Generic[K, T]):
    def __init__(
        self, ttl: float, *, capacity: int = 256, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.ttl = ttl
        self.capacity = capacity
        self._clock = clock
        self._entries: OrderedDict[K, Shared[T]] = OrderedDict()

    @property
    def computed(self) -> int:
        return sum(entry.computed for entry in self._entries.values())

    async def get(self, key: K, compute: Callable[[], Awaitable[T]]) -> T:
        entry = self._entries.get(key)
        if entry is None:
            entry = self._entries[key] = Shared(self.ttl, clock=self._clock)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)
        else:
            self._entries.move_to_end(key)
        return await entry.get(compute)


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()
