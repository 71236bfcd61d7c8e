"""sd_notify: the exact datagrams systemd would receive, on a socket we bind ourselves."""

from __future__ import annotations

import os
import re
import socket
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from order_monitor.ops.sdnotify import Notifier


class Receiver:
    def __init__(self, sock: socket.socket, notify_socket: str) -> None:
        self.sock = sock
        self.notify_socket = notify_socket

    def next(self) -> bytes:
        # The datagram is queued before sendto() returns; the timeout only
        # turns a missing message into a failure instead of a hang.
        return self.sock.recv(4096)

    def assert_empty(self) -> None:
        self.sock.setblocking(False)
        try:
            with pytest.raises(BlockingIOError):
                self.sock.recv(4096)
        finally:
            self.sock.settimeout(2.0)


@pytest.fixture(params=["path", "abstract"])
def receiver(request: pytest.FixtureRequest) -> Iterator[Receiver]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.settimeout(2.0)
    # A short directory of our own: sun_path holds at most 107 bytes, and
    # pytest's tmp_path can be longer than that.
    with tempfile.TemporaryDirectory(prefix="om-sd-") as directory:
        if request.param == "path":
            path = str(Path(directory) / "notify")
            sock.bind(path)
            notify_socket = path
        else:
            name = f"order-monitor-test/{uuid.uuid4().hex}"
            sock.bind(b"\0" + name.encode())
            notify_socket = "@" + name
        try:
            yield Receiver(sock, notify_socket)
        finally:
            sock.close()


def test_each_call_sends_its_exact_datagram(receiver: Receiver) -> None:
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": receiver.notify_socket})
    assert notifier.enabled

    assert notifier.ready()
    assert receiver.next() == b"READY=1"
    assert notifier.ready("leader: watching 12 orders")
    assert receiver.next() == b"READY=1\nSTATUS=leader: watching 12 orders"
    assert notifier.status("standby")
    assert receiver.next() == b"STATUS=standby"
    assert notifier.watchdog()
    assert receiver.next() == b"WATCHDOG=1"
    assert notifier.stopping()
    assert receiver.next() == b"STOPPING=1"
    assert notifier.stopping("draining 3 checks")
    assert receiver.next() == b"STOPPING=1\nSTATUS=draining 3 checks"
    receiver.assert_empty()
    notifier.close()


def test_reloading_carries_the_monotonic_clock_in_microseconds(receiver: Receiver) -> None:
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": receiver.notify_socket})
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert notifier.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000

    match = re.fullmatch(rb"RELOADING=1\nMONOTONIC_USEC=(\d+)", receiver.next())
    assert match is not None
    assert before <= int(match.group(1)) <= after

    assert notifier.reloading("reloading settings")
    lines = receiver.next().split(b"\n")
    assert lines[0] == b"RELOADING=1"
    assert lines[1].startswith(b"MONOTONIC_USEC=")
    assert lines[2] == b"STATUS=reloading settings"
    notifier.close()


def test_a_newline_in_a_status_cannot_inject_an_assignment(receiver: Receiver) -> None:
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": receiver.notify_socket})
    notifier.status("provider down\nREADY=1")
    assert receiver.next() == b"STATUS=provider down READY=1"
    notifier.close()


def test_without_notify_socket_every_call_is_a_no_op() -> None:
    notifier = Notifier.from_environ({})
    assert not notifier.enabled
    with capture_logs() as logs:
        assert not notifier.ready()
        assert not notifier.status("x")
        assert not notifier.watchdog()
        assert not notifier.reloading()
        assert not notifier.stopping()
    assert logs == []
    assert notifier.watchdog_interval() is None


def test_a_send_failure_never_raises_and_is_logged_once() -> None:
    with tempfile.TemporaryDirectory(prefix="om-sd-") as directory:
        missing = str(Path(directory) / "nobody-listens")
        notifier = Notifier.from_environ({"NOTIFY_SOCKET": missing})
        with capture_logs() as logs:
            assert not notifier.ready()
            assert not notifier.watchdog()
            assert not notifier.watchdog()
        notifier.close()
    warnings = [e for e in logs if e["log_level"] == "warning"]
    assert len(warnings) == 1
    assert warnings[0]["event"] == "sdnotify.send_failed"
    assert warnings[0]["notify_socket"] == missing
    assert warnings[0]["message"] == "READY=1"
    assert [e["log_level"] for e in logs] == ["warning", "debug", "debug"]


def test_an_address_systemd_252_cannot_give_is_refused_with_a_reason() -> None:
    with capture_logs() as logs:
        notifier = Notifier.from_environ({"NOTIFY_SOCKET": "relative/path"})
        assert not notifier.enabled
        assert not notifier.ready()
    assert [e["event"] for e in logs] == ["sdnotify.unsupported_socket"]


@pytest.mark.parametrize(
    ("usec", "pid", "expected"),
    [
        ("30000000", None, 15.0),
        ("30000000", "self", 15.0),
        ("30000000", "other", None),
        ("1000000", None, 0.5),
        (None, None, None),
        ("0", None, None),
        ("garbage", None, None),
        ("30000000", "garbage", None),
    ],
)
def test_watchdog_interval_is_half_the_timeout_and_only_for_us(
    usec: str | None, pid: str | None, expected: float | None
) -> None:
    env = {"NOTIFY_SOCKET": "@order-monitor-test/unused"}
    if usec is not None:
        env["WATCHDOG_USEC"] = usec
    if pid == "self":
        env["WATCHDOG_PID"] = str(os.getpid())
    elif pid == "other":
        env["WATCHDOG_PID"] = str(os.getpid() + 1)
    elif pid is not None:
        env["WATCHDOG_PID"] = pid
    assert Notifier.from_environ(env).watchdog_interval() == expected


def test_no_watchdog_interval_without_a_socket_to_ping() -> None:
    assert Notifier.from_environ({"WATCHDOG_USEC": "30000000"}).watchdog_interval() is None


def test_from_environ_defaults_to_the_process_environment(
    receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", receiver.notify_socket)
    notifier = Notifier.from_environ()
    assert notifier.watchdog()
    assert receiver.next() == b"WATCHDOG=1"
    notifier.close()
