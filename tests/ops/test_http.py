"""The probe/metrics server: a real server on 127.0.0.1, a fake daemon state behind it."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from order_monitor.errors import ConfigError
from order_monitor.metrics import Metrics
from order_monitor.ops.http import (
    MAX_CONNECTIONS,
    ConnectionGate,
    HttpListenError,
    HttpServer,
    parse_listen,
    serve_http,
)


@dataclass
class FakeState:
    """A real implementation of the Readiness protocol, steered by the test."""

    role: str = "leader"
    listener_connected: bool = True
    database_unreachable: bool = False
    database: str = "ok"  # ok | down | hang | raise
    sweep_age: float | None = 1.0
    database_calls: int = 0
    released: asyncio.Event = field(default_factory=asyncio.Event)

    async def database_ok(self) -> bool:
        self.database_calls += 1
        if self.database == "hang":
            await self.released.wait()
        if self.database == "raise":
            raise OSError("connection to host=db password=hunter2 failed")
        return self.database == "ok"

    def last_sweep_age(self) -> float | None:
        return self.sweep_age


@dataclass
class Running:
    server: HttpServer
    state: FakeState
    metrics: Metrics
    session: aiohttp.ClientSession

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server.port}"

    async def get(self, path: str) -> tuple[int, Any, aiohttp.ClientResponse]:
        async with self.session.get(self.base + path) as response:
            if response.content_type == "application/json":
                return response.status, await response.json(), response
            return response.status, await response.text(), response


@pytest.fixture
async def running() -> AsyncIterator[Running]:
    state, metrics = FakeState(), Metrics()
    timeout = aiohttp.ClientTimeout(total=10)
    async with (
        HttpServer(
            "127.0.0.1:0",
            metrics=metrics,
            readiness=state,
            database_timeout=0.2,
            max_sweep_age=900,
        ) as server,
        aiohttp.ClientSession(timeout=timeout) as session,
    ):
        yield Running(server, state, metrics, session)
        state.released.set()


async def test_healthz_is_ok_without_asking_the_database(running: Running) -> None:
    running.state.database = "hang"
    running.state.listener_connected = False
    status, body, _ = await running.get("/healthz")
    assert status == 200
    assert body["status"] == "ok"
    assert running.state.database_calls == 0


async def test_readyz_is_ok_when_every_check_passes(running: Running) -> None:
    status, body, _ = await running.get("/readyz")
    assert status == 200
    assert body["status"] == "ready"
    assert body["role"] == "leader"
    assert body["failed"] == []
    assert set(body["checks"]) == {"role", "listener", "database", "sweep"}
    assert running.state.database_calls == 1


async def test_a_standby_is_not_ready_and_says_so(running: Running) -> None:
    running.state.role = "standby"
    running.state.listener_connected = False
    running.state.sweep_age = None
    status, body, _ = await running.get("/readyz")
    assert status == 503
    assert body["status"] == "not_ready"
    assert body["role"] == "standby"
    assert body["failed"] == ["role"]
    assert "another instance" in body["checks"]["role"]["reason"]
    assert running.state.database_calls == 0


async def test_an_instance_that_cannot_reach_the_database_does_not_claim_a_leader_elsewhere(
    running: Running,
) -> None:
    # Before, an instance that never reached the database answered "another
    # instance holds the lock" although nobody held it (seen in the compose trial).
    running.state.role = "standby"
    running.state.database_unreachable = True
    status, body, _ = await running.get("/readyz")
    assert status == 503
    reason = body["checks"]["role"]["reason"]
    assert "cannot reach the database" in reason
    assert "another instance" not in reason


@pytest.mark.parametrize(
    ("change", "failed", "reason"),
    [
        ({"listener_connected": False}, ["listener"], "LISTEN connection is down"),
        ({"database": "down"}, ["database"], "database check failed"),
        ({"database": "hang"}, ["database"], "no answer within 0.2s"),
        ({"database": "raise"}, ["database"], "check failed: OSError"),
        ({"sweep_age": None}, ["sweep"], "no sweep has finished yet"),
        ({"sweep_age": 901.0}, ["sweep"], "more than 900s ago"),
    ],
)
async def test_readyz_names_the_check_that_failed(
    running: Running, change: dict[str, Any], failed: list[str], reason: str
) -> None:
    for name, value in change.items():
        setattr(running.state, name, value)
    status, body, _ = await running.get("/readyz")
    assert status == 503
    assert body["role"] == "leader"
    assert body["failed"] == failed
    assert reason in body["checks"][failed[0]]["reason"]


async def test_readyz_lists_every_failure_at_once(running: Running) -> None:
    running.state.listener_connected = False
    running.state.database = "down"
    status, body, _ = await running.get("/readyz")
    assert status == 503
    assert body["failed"] == ["listener", "database"]


async def test_readyz_never_shows_the_database_error_text(running: Running) -> None:
    running.state.database = "raise"
    _, _, response = await running.get("/readyz")
    assert "hunter2" not in await response.text()


async def test_metrics_exposes_the_daemons_own_registry(running: Running) -> None:
    running.metrics.checks.labels(provider="znet", outcome="done").inc(3)
    running.metrics.leader.set(1)
    status, text, response = await running.get("/metrics")
    assert status == 200
    assert response.headers["Content-Type"] == CONTENT_TYPE_LATEST
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    assert samples[("order_monitor_checks_total", (("outcome", "done"), ("provider", "znet")))] == 3
    assert samples[("order_monitor_leader", ())] == 1
    # Our registry, not the process-global one (which carries python_gc_*).
    assert not any(name.startswith("python_gc") for name, _ in samples)


async def test_unknown_paths_are_404(running: Running) -> None:
    status, _, _ = await running.get("/")
    assert status == 404


async def test_the_port_is_closed_after_the_block() -> None:
    async with HttpServer("127.0.0.1:0", metrics=Metrics(), readiness=FakeState()) as server:
        port = server.port
    with pytest.raises(aiohttp.ClientConnectorError):
        async with aiohttp.ClientSession() as session:
            await session.get(f"http://127.0.0.1:{port}/healthz")


async def test_serve_http_does_nothing_when_off() -> None:
    async with serve_http(None, metrics=Metrics(), readiness=FakeState()) as server:
        assert server is None


async def test_serve_http_serves_when_configured() -> None:
    async with (
        serve_http("127.0.0.1:0", metrics=Metrics(), readiness=FakeState()) as server,
        aiohttp.ClientSession() as session,
    ):
        assert server is not None
        async with session.get(f"http://127.0.0.1:{server.port}/healthz") as response:
            assert response.status == 200


async def test_a_busy_port_is_an_error_naming_the_setting() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = HttpServer(f"127.0.0.1:{port}", metrics=Metrics(), readiness=FakeState())
        with pytest.raises(HttpListenError, match="ORDER_MONITOR_HTTP_LISTEN") as caught:
            await server.start()
    assert f"127.0.0.1:{port}" in str(caught.value)


@pytest.mark.parametrize(
    ("listen", "expected"),
    [
        ("127.0.0.1:9187", ("127.0.0.1", 9187)),
        ("[::1]:9187", ("::1", 9187)),
        (":9187", (None, 9187)),
        ("localhost:0", ("localhost", 0)),
    ],
)
def test_parse_listen(listen: str, expected: tuple[str | None, int]) -> None:
    assert parse_listen(listen) == expected


@pytest.mark.parametrize("listen", ["9187", "host:", "host:http", "host:70000"])
def test_parse_listen_refuses_what_it_cannot_bind(listen: str) -> None:
    with pytest.raises(HttpListenError, match="host:port"):
        parse_listen(listen)


def test_a_listen_failure_is_a_configuration_error() -> None:
    # Exit 78, which the unit does not restart on: the address stays wrong.
    assert issubclass(HttpListenError, ConfigError)
    assert HttpListenError("x").exit_code == 78


# --- slow and idle clients --------------------------------------------------------


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def wait_until(condition: Callable[[], bool], deadline: float, what: str) -> None:
    """Poll *condition* until it holds, failing after *deadline* seconds."""
    give_up = time.monotonic() + deadline
    while not condition():
        if time.monotonic() > give_up:
            pytest.fail(f"not within {deadline}s: {what}")
        await asyncio.sleep(0.01)


async def closed_by_server(sock: socket.socket) -> None:
    """Read until the server closes the connection (EOF or reset)."""
    loop = asyncio.get_running_loop()
    try:
        while await loop.sock_recv(sock, 4096):
            pass
    except ConnectionResetError:
        pass


async def test_idle_and_half_sent_clients_cannot_exhaust_descriptors_or_healthz() -> None:
    limit, timeout, clients = 32, 0.5, 200
    loop = asyncio.get_running_loop()
    server = HttpServer(
        "127.0.0.1:0",
        metrics=Metrics(),
        readiness=FakeState(),
        max_connections=limit,
        header_timeout=timeout,
    )
    socks: list[socket.socket] = []
    baseline = open_fds()
    try:
        with capture_logs() as logs:
            async with server, aiohttp.ClientSession() as session:
                for n in range(clients):
                    sock = socket.socket()
                    sock.setblocking(False)
                    socks.append(sock)
                    await loop.sock_connect(sock, ("127.0.0.1", server.port))
                    if n % 2:
                        # Half a request line, then nothing: a slowloris client.
                        await loop.sock_sendall(sock, b"GET /healthz HT")
                gate = server.gate
                await wait_until(
                    lambda: gate.open + gate.evicted_total >= clients,
                    2.0,
                    "the server accepted every connection",
                )
                # Our own client sockets plus the session's are in the count:
                # what the server holds on top of them is bounded by the cap.
                assert open_fds() - baseline - clients <= limit + 8
                assert gate.open == limit
                assert gate.refused_total == 0  # none was being answered: room was made

                async with session.get(f"http://127.0.0.1:{server.port}/healthz") as response:
                    assert response.status == 200

                async with asyncio.timeout(timeout + 1.0):
                    await asyncio.gather(*(closed_by_server(s) for s in socks))
                await wait_until(lambda: gate.open == 0, 1.0, "every connection was released")
    finally:
        for sock in socks:
            sock.close()
    closed = [e for e in logs if e["event"] == "http.idle_connections_closed"]
    assert len(closed) == 1, "a flood of connections is one log line, not one per connection"
    assert closed[0]["limit"] == limit


async def test_healthz_answers_at_once_while_slow_clients_hold_every_slot() -> None:
    # 64 clients that send half a request and wait: the cap is reached and,
    # before, /healthz answered 503 until a header timeout freed a slot, so a
    # liveness probe restarted a healthy daemon.
    loop = asyncio.get_running_loop()
    server = HttpServer("127.0.0.1:0", metrics=Metrics(), readiness=FakeState())
    socks: list[socket.socket] = []
    try:
        async with server, aiohttp.ClientSession() as session:
            for _ in range(MAX_CONNECTIONS):
                sock = socket.socket()
                sock.setblocking(False)
                socks.append(sock)
                await loop.sock_connect(sock, ("127.0.0.1", server.port))
                await loop.sock_sendall(sock, b"GET /metrics HTTP/1.1\r\nHost: x")
            await wait_until(
                lambda: server.gate.open == MAX_CONNECTIONS, 2.0, "every slow client is in"
            )
            async with asyncio.timeout(1.0):
                async with session.get(f"http://127.0.0.1:{server.port}/healthz") as response:
                    assert response.status == 200
                    assert (await response.json())["status"] == "ok"
            # The slot came from the client idle the longest, not a refusal.
            assert server.gate.refused_total == 0
            assert server.gate.evicted_total == 1
            async with asyncio.timeout(1.0):
                await closed_by_server(socks[0])
    finally:
        for sock in socks:
            sock.close()


async def test_a_connection_being_answered_is_never_the_one_closed() -> None:
    # A /readyz waiting on the database holds the only slot: the newcomer is
    # refused rather than the answer cut off.
    state = FakeState(database="hang")
    server = HttpServer(
        "127.0.0.1:0", metrics=Metrics(), readiness=state, max_connections=1, database_timeout=5
    )
    async with server, aiohttp.ClientSession() as first, aiohttp.ClientSession() as second:
        base = f"http://127.0.0.1:{server.port}"
        waiting = asyncio.create_task(first.get(base + "/readyz"))
        await wait_until(lambda: state.database_calls == 1, 2.0, "/readyz is being answered")
        async with second.get(base + "/healthz") as response:
            assert response.status == 503
        state.database = "ok"
        state.released.set()
        async with await waiting as response:
            assert response.status == 200
        assert server.gate.refused_total == 1
        assert server.gate.evicted_total == 0


@dataclass(eq=False)
class FakeConnection:
    aborted: bool = False

    def abort(self) -> None:
        self.aborted = True


def test_the_gate_closes_the_connection_idle_the_longest() -> None:
    gate = ConnectionGate(2)
    a, b, c, d = FakeConnection(), FakeConnection(), FakeConnection(), FakeConnection()
    assert gate.admit(a)
    assert gate.admit(b)
    gate.busy(a)
    gate.idle(a)  # answered just now: b has been idle longer
    assert gate.admit(c)
    assert (a.aborted, b.aborted) == (False, True)
    gate.release(b)  # the loop reports the aborted connection lost: no double count
    assert gate.open == 2
    gate.busy(a)
    gate.busy(c)
    assert not gate.admit(d)
    assert gate.open == 2


def test_refusals_and_evictions_are_logged_at_most_once_per_interval() -> None:
    now = [1000.0]
    gate = ConnectionGate(1, log_interval=60.0, clock=lambda: now[0])
    held = FakeConnection()
    with capture_logs() as logs:
        assert gate.admit(held)
        gate.busy(held)
        assert not any(gate.admit(FakeConnection()) for _ in range(100))
        now[0] += 59.0
        assert not gate.admit(FakeConnection())
        now[0] += 1.0
        assert not gate.admit(FakeConnection())
        gate.idle(held)
        for _ in range(3):
            assert gate.admit(FakeConnection())
    refused = [e for e in logs if e["event"] == "http.connections_refused"]
    assert [(e["count"], e["refused_total"]) for e in refused] == [(1, 1), (101, 102)]
    assert gate.refused_total == 102
    closed = [e for e in logs if e["event"] == "http.idle_connections_closed"]
    assert [(e["count"], e["closed_total"]) for e in closed] == [(1, 1)]
    assert gate.evicted_total == 3
