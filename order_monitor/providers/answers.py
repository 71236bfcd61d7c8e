"""Reading JSON answers: scalars as clean text, and each answered item matched to an order."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

import structlog

from order_monitor.providers.base import Outcome, clean_text
from order_monitor.providers.http import Transport

log = structlog.get_logger()

#: Longest piece of a provider's body that goes into a log line or an error.


def scalar_text(value: object) -> str | None:
    """A JSON scalar as clean text (numbers included), or None for anything else."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        # Ids sent as 123 may come back as 123.0 from some serialisers.
        return str(int(value))
    if isinstance(value, str | int | float):
        return clean_text(value)
    return None


def first_text(values: object) -> str | None:
    """The first non-empty string among *values* (a list) or *values* itself, cleaned."""
    for value in values if isinstance(values, list) else [values]:
        if isinstance(value, str):
            text = clean_text(value)
            if text is not None:
                return text
    return None


@dataclass(slots=True)
class Matched:
    """Answers matched back to the orders asked about, and what did not fit."""

    outcomes: dict[UUID, Outcome] = field(default_factory=dict)
    duplicates: list[str] = field(default_factory=list)
    unrequested: list[str] = field(default_factory=list)
    unusable: int = 0

    def report(self, http: Transport) -> None:
        provider = http.provider
        for order_key in self.duplicates:
            http.log("warning", "provider.duplicate_order", provider=provider, order_key=order_key)
        if self.unrequested:
            http.log(
                "info",
                "provider.unrequested_orders",
                provider=provider,
                order_keys=self.unrequested,
            )
        if self.unusable:
            http.log("warning", "provider.bad_item", provider=provider, count=self.unusable)


def match_items(
    items: Sequence[Any],
    asked: Mapping[str, Sequence[UUID]],
    *,
    fold: bool,
    id_of: Callable[[Any], object],
    outcome_of: Callable[[Any], Outcome | None],
) -> Matched:
    """Pair a batched answer's items with the orders asked about, by id.

    *asked* maps each id sent to the orders that carry it; ids compare as
    text (a provider may send them back as numbers), case-insensitively with
    *fold* (UUIDs may come back upper-cased). Items about orders not asked
    about are ignored; for an order answered twice the first answer wins.
    """
    result = Matched()
    seen: set[str] = set()
    for item in items:
        order_key = scalar_text(id_of(item))
        outcome = outcome_of(item) if order_key is not None else None
        if order_key is None or outcome is None:
            result.unusable += 1
            continue
        if fold:
            order_key = order_key.lower()
        if order_key not in asked:
            result.unrequested.append(order_key)
        elif order_key in seen:
            # Two answers about one order may disagree; the first is as good a
            # truth as any, and a later round asks again anyway.
            result.duplicates.append(order_key)
        else:
            seen.add(order_key)
            for order_id in asked[order_key]:
                result.outcomes[order_id] = outcome
    return result
