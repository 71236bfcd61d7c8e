"""The database: connections, the SQL the engine runs, and the checks made before it starts.

* ``connections`` — connecting (keepalives, our application_name, a pinned
  search_path), retrying forever, closing in time, and :class:`ManagedConnection`;
* ``queries`` — :class:`Queries` (the engine's statements, composed once from
  the layout) and the rows they read;
* ``inbox`` — the handoff's statements: reading the inbox from where the last
  read ended, the idle lock, the NOTIFY queue;
* ``sessions`` — who is connected: instances by version, holders of our locks,
  a replica;
* ``checks`` — the table's columns and the installed write function, checked
  at start.
"""

from order_monitor.db.checks import check_write_function, column_limits, write_function_problem
from order_monitor.db.connections import (
    CONNECTION_ERRORS,
    KEEPALIVES,
    AsyncConn,
    ManagedConnection,
    close_within,
    connect,
    connect_forever,
    conninfo,
    retry_forever,
)
from order_monitor.db.queries import (
    ColumnLimits,
    InFlightRow,
    Queries,
    SweepRow,
    WriteBatch,
    Written,
)

__all__ = [
    "CONNECTION_ERRORS",
    "KEEPALIVES",
    "AsyncConn",
    "ColumnLimits",
    "InFlightRow",
    "ManagedConnection",
    "Queries",
    "SweepRow",
    "WriteBatch",
    "Written",
    "check_write_function",
    "close_within",
    "column_limits",
    "connect",
    "connect_forever",
    "conninfo",
    "retry_forever",
    "write_function_problem",
]
