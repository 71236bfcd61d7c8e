"""The systemd notification protocol (sd_notify), with the standard library only.

systemd passes the address of its notification socket in ``NOTIFY_SOCKET``: a
filesystem path, or an abstract socket name written with a leading ``@``
(a NUL byte on the wire). Each message is one datagram of ``KEY=value`` lines.
Outside systemd (a terminal, the tests, a container without it) the variable is
unset and every call is a no-op, so the daemon calls these unconditionally.

Sending never raises: a lost status line must not take the service down. The
first failure is logged as a warning (it usually means a wrong ``NotifyAccess=``
or a socket the sandbox hides), later ones at debug level so a broken socket
cannot flood the journal.

Usage in the daemon::

    notifier = Notifier.from_environ()
    notifier.ready("standby: waiting for the leader lock")
    interval = notifier.watchdog_interval()   # None: no watchdog configured
    ...
    notifier.watchdog()                       # only after real progress
    notifier.reloading(); reload(); notifier.ready()
    notifier.stopping()
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping
from typing import Final

from order_monitor.logs import get_logger

log = get_logger(component="sdnotify")

# A stalled PID 1 must not freeze the event loop for long; a datagram that
# cannot be queued within this time is dropped (and logged).
_SEND_TIMEOUT: Final = 1.0


def _socket_address(raw: str) -> str | bytes | None:
    if raw.startswith("@"):
        # Abstract namespace: the kernel wants a leading NUL, systemd writes '@'.
        return b"\0" + raw[1:].encode()
    if raw.startswith("/"):
        return raw
    return None


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in microseconds, the clock systemd compares RELOADING= with."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


class Notifier:
    """Sends sd_notify messages to one socket; a no-op when there is none."""

    def __init__(
        self,
        address: str | None,
        *,
        watchdog_usec: str | None = None,
        watchdog_pid: str | None = None,
    ) -> None:
        self._raw_address = address
        self._address = _socket_address(address) if address else None
        self._watchdog_usec = watchdog_usec
        self._watchdog_pid = watchdog_pid
        self._socket: socket.socket | None = None
        self._failed_once = False
        if address and self._address is None:
            # systemd 252 only hands out paths and abstract names; anything
            # else is a misconfiguration we can name, not guess at.
            log.warning(
                "sdnotify.unsupported_socket",
                notify_socket=address,
                hint="NOTIFY_SOCKET must be an absolute path or start with '@'",
            )

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        """Read NOTIFY_SOCKET, WATCHDOG_USEC and WATCHDOG_PID (default: os.environ)."""
        env = os.environ if environ is None else environ
        return cls(
            env.get("NOTIFY_SOCKET") or None,
            watchdog_usec=env.get("WATCHDOG_USEC"),
            watchdog_pid=env.get("WATCHDOG_PID"),
        )

    @property
    def enabled(self) -> bool:
        """True when there is a socket to send to (we run under systemd)."""
        return self._address is not None

    def notify(self, *assignments: str) -> bool:
        """Send ``KEY=value`` lines as one datagram. True if it was handed to the kernel."""
        if self._address is None or not assignments:
            return False
        message = "\n".join(assignments).encode()
        try:
            if self._socket is None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                sock.settimeout(_SEND_TIMEOUT)
                self._socket = sock
            self._socket.sendto(message, self._address)
        except OSError as exc:
            fields = {
                "notify_socket": self._raw_address,
                "error": exc.strerror or type(exc).__name__,
                "message": assignments[0],
            }
            if not self._failed_once:
                self._failed_once = True
                log.warning(
                    "sdnotify.send_failed",
                    **fields,
                    hint="systemd may not see readiness or watchdog pings; "
                    "check NotifyAccess= and that the socket is reachable in the sandbox",
                )
            else:
                log.debug("sdnotify.send_failed", **fields)
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """Start-up (or a reload) is complete."""
        return self.notify("READY=1", *([f"STATUS={_one_line(status)}"] if status else []))

    def status(self, text: str) -> bool:
        """The free-form line ``systemctl status`` shows."""
        return self.notify(f"STATUS={_one_line(text)}")

    def watchdog(self) -> bool:
        """Keep-alive ping; send it only after the loop made real progress."""
        return self.notify("WATCHDOG=1")

    def stopping(self, status: str | None = None) -> bool:
        """Shutdown has begun (systemd then expects the process to exit)."""
        return self.notify("STOPPING=1", *([f"STATUS={_one_line(status)}"] if status else []))

    def reloading(self, status: str | None = None) -> bool:
        """A reload has begun; follow it with :meth:`ready` when it is done.

        MONOTONIC_USEC lets systemd tell this reload from an older one; systemd
        253+ requires it with RELOADING=1 and 252 ignores it.
        """
        lines = ["RELOADING=1", f"MONOTONIC_USEC={monotonic_usec()}"]
        if status:
            lines.append(f"STATUS={_one_line(status)}")
        return self.notify(*lines)

    def watchdog_interval(self) -> float | None:
        """Seconds between WATCHDOG=1 pings (half of WatchdogSec=), or None.

        None when there is no socket, no watchdog, or the watchdog belongs to
        another process (WATCHDOG_PID names a different pid, e.g. a wrapper).
        """
        if self._address is None or not self._watchdog_usec:
            return None
        if self._watchdog_pid:
            try:
                pid = int(self._watchdog_pid)
            except ValueError:
                return None
            if pid != os.getpid():
                return None
        try:
            usec = int(self._watchdog_usec)
        except ValueError:
            return None
        if usec <= 0:
            return None
        return usec / 2 / 1_000_000

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def _one_line(text: str) -> str:
    # A newline would start a new KEY=value assignment inside the datagram.
    return " ".join(text.splitlines())
