"""The orders table layout rendered as SQL.

Every identifier reaches SQL through :class:`psycopg.sql.Identifier` and every
configured value through :class:`psycopg.sql.Literal`; nothing is pasted into
SQL text with string formatting. The files in ``sql/`` are this module's
rendering of the default layout (a test keeps them equal), so what a DBA
reviews is exactly what ``order-monitor sql install`` runs.

Object names carry the version that last changed them: the index is still
``_v1``; the trigger, its function and the inbox are ``_v2`` (the handoff:
see :mod:`order_monitor.engine.handoff`); the write function is ``_v2``
(schema version 3: a new return shape; version 4 gave it a body that also
records deliveries, in place, same name and signature: a daemon of the
previous release keeps calling it through the upgrade). The outbox is
``_v1`` (version 4: see :mod:`order_monitor.schema.outbox`). The install
drops what older
versions left (``_v1`` triggers and trigger function, ``write_v1``), and
compares what exists with what it would create before it takes any lock:
a re-run with nothing to change locks nothing (see ``guards``).

``names`` (our objects' names, the lock keys, the in-flight predicate),
``write_function``, ``outbox``, ``install`` (install, uninstall, role), ``guards`` and
``role_guards`` (their DO blocks: catalog first, then the one lock needed)
and ``files`` (what ``sql print`` writes and ``sql/`` holds).
"""

from order_monitor.schema.files import describe_writes, render, statements_for
from order_monitor.schema.guards import DROP_UNDELIVERED
from order_monitor.schema.install import (
    LOCK_TIMEOUT,
    install_statements,
    notify_function_body,
    role_statements,
    uninstall_statements,
)
from order_monitor.schema.names import (
    VERSION,
    Names,
    Statement,
    advisory_key,
    advisory_key_parts,
    idle_lock_key,
    in_flight_predicate,
    object_name,
)
from order_monitor.schema.write_function import (
    LOCKED,
    NOTIFY_QUEUE_LIMIT,
    WRITE_KINDS,
    WRITE_PARAMETERS,
    write_function_body,
    write_function_statement,
    write_signature,
)

__all__ = [
    "DROP_UNDELIVERED",
    "LOCKED",
    "LOCK_TIMEOUT",
    "NOTIFY_QUEUE_LIMIT",
    "VERSION",
    "WRITE_KINDS",
    "WRITE_PARAMETERS",
    "Names",
    "Statement",
    "advisory_key",
    "advisory_key_parts",
    "describe_writes",
    "idle_lock_key",
    "in_flight_predicate",
    "install_statements",
    "notify_function_body",
    "object_name",
    "render",
    "role_statements",
    "statements_for",
    "uninstall_statements",
    "write_function_body",
    "write_function_statement",
    "write_signature",
]
