"""Objects of the install that vanished under a running daemon, for /readyz and the log.

``uninstall.sql`` run while a daemon works (or a restore, or a DROP by hand)
takes away the write function or the inbox. Every write then fails, and
before this the daemon stayed ready (200) while logging a failure a batch.
The pieces that meet such an object report it here (:meth:`missing`, and
:meth:`present` once it works again); /readyz is 503 with check ``schema``
while anything is missing, and the log says once what is gone and what to do.
"""

from __future__ import annotations

from typing import Any, Final

import psycopg

from order_monitor.logs import get_logger

log = get_logger()

#: What a statement raises when an object it names does not exist (or lost
#: its grant, which uninstall's DROP ... CASCADE of the role's rights can do).
MISSING_ERRORS: Final = (
    psycopg.errors.UndefinedFunction,
    psycopg.errors.UndefinedTable,
    psycopg.errors.UndefinedColumn,
    psycopg.errors.InsufficientPrivilege,
)

_WHAT_TO_DO: Final = (
    "the install was removed or changed under a running daemon: run install.sql and role.sql "
    "again (as the table's owner), or, to retire order-monitor, stop every instance, standbys "
    "included, before running uninstall.sql"
)


def is_missing(exc: BaseException) -> bool:
    """True when *exc* says an object of the install is gone (or not ours to use any more)."""
    return isinstance(exc, MISSING_ERRORS)


class InstallHealth:
    """The objects found missing while running, by what they are ("write function", "handoff")."""

    def __init__(self) -> None:
        self._missing: dict[str, str] = {}

    def missing(self, what: str, error: str) -> None:
        """*what* failed because it is gone; logged once until it is back."""
        if what not in self._missing:
            log.error("daemon.object_missing", object=what, error=error, note=_WHAT_TO_DO)
        self._missing[what] = error

    def present(self, what: str) -> None:
        """*what* worked again (after a reinstall)."""
        if self._missing.pop(what, None) is not None:
            log.info("daemon.object_back", object=what)

    @property
    def problems(self) -> dict[str, str]:
        return dict(self._missing)

    def readiness(self) -> dict[str, Any]:
        """The ``schema`` check of /readyz."""
        if not self._missing:
            return {"ok": True}
        return {
            "ok": False,
            "missing": sorted(self._missing),
            "reason": f"{', '.join(sorted(self._missing))} missing: {_WHAT_TO_DO}",
        }
