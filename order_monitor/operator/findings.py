"""What doctor's checks report: a verdict, the check's name, and a detail to act on."""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

INSTALL_HINT: Final = (
    "run `order-monitor sql install` (or psql -f sql/install.sql) as the table's owner"
)


class Verdict(enum.Enum):
    PASS = "PASS"  # noqa: S105 - a verdict, not a password
    WARN = "WARN"
    FAIL = "FAIL"


@dataclass(frozen=True, slots=True)
class Finding:
    verdict: Verdict
    check: str
    detail: str


#: How a check reports: emit(verdict, check, detail).
Emit = Callable[[Verdict, str, str], None]
