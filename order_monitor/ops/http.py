"""/healthz, /readyz and /metrics on a small aiohttp server (off unless configured).

* ``/healthz`` answers 200 whenever the event loop runs the handler. It never
  touches the database: a liveness probe that fails on a database blip turns
  the blip into a restart storm, and the daemon already recovers from a
  Postgres restart by itself.
* ``/readyz`` answers 200 only when this instance is the leader, its LISTEN
  connection is up, the database answers, a sweep finished recently and no
  checked result has waited more than a minute to be written. Else
  503, with a JSON body naming the checks that failed, so "not ready" says why.
  A standby instance is not ready (``"role": "standby"``): it does no work.
* ``/metrics`` is the Prometheus text exposition of the daemon's own registry.
* Other routes are added by whoever owns them (the operator page,
  ``order_monitor.page``), and are bounded like these.

The server is bounded, because it shares the process's file descriptors with
the database and provider connections: at most ``max_connections`` are open
at once, and a client has ``header_timeout`` seconds from connecting to send a
whole request (and from the end of a response to send the next one). Without
both, a few hundred clients that connect and send nothing use up the
descriptors and the daemon's own connections fail. When every slot is taken, a
new connection closes the one idle the longest (no request being answered: a
slow client still sending, a keep-alive between requests) and takes its slot,
so a liveness probe is answered at once however many slow clients hold the
rest; only when every open connection is being answered is it refused (503).
Both are counted in warnings logged at most once a minute.

Usage in the daemon::

    async with serve_http(settings.http_listen, metrics=metrics, readiness=state,
                          max_sweep_age=3 * settings.sweep_interval) as server:
        ...   # server is None when ORDER_MONITOR_HTTP_LISTEN is off
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable, Sequence
from contextlib import asynccontextmanager
from types import TracebackType
from typing import Any, Final, Protocol, Self, cast

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from order_monitor.errors import ConfigError
from order_monitor.logs import get_logger
from order_monitor.metrics import Metrics

log = get_logger(component="http")

LEADER: Final = "leader"
STANDBY: Final = "standby"
MAX_CONNECTIONS: Final = 64
HEADER_TIMEOUT: Final = 5.0
#: /readyz fails its ``writes`` check when a checked result has waited longer
#: than this to be written: a minute rides out a lock held by an ordinary
#: transaction and the writer's retries, not an idle-in-transaction session.
MAX_UNWRITTEN_AGE: Final = 60.0
REFUSAL_LOG_INTERVAL: Final = 60.0
_REFUSED: Final = (
    b"HTTP/1.1 503 Service Unavailable\r\n"
    b"Content-Type: text/plain\r\nContent-Length: 21\r\nConnection: close\r\n\r\n"
    b"too many connections\n"
)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class HttpListenError(ConfigError):
    """The probe/metrics server cannot listen where it was told to.

    A configuration error (exit 78): the address in ORDER_MONITOR_HTTP_LISTEN
    is wrong or taken, and restarting in a loop does not free it.
    """


class Closable(Hashable, Protocol):
    """An open connection, as the gate sees it (an asyncio transport)."""

    def abort(self) -> None: ...


class _Throttled:
    """A warning logged at most once per *interval*, with the count since the last one."""

    def __init__(self, event: str, interval: float, clock: Callable[[], float]) -> None:
        self._event = event
        self._interval = interval
        self._clock = clock
        self._unlogged = 0
        self._next_log_at = -math.inf

    def count(self, **fields: object) -> None:
        self._unlogged += 1
        now = self._clock()
        if now >= self._next_log_at:
            log.warning(
                self._event, count=self._unlogged, next_report_in_s=self._interval, **fields
            )
            self._unlogged = 0
            self._next_log_at = now + self._interval


class ConnectionGate:
    """Holds the open connections and says whether one more may open.

    When all *limit* slots are taken, the connection idle the longest (no
    request of it being answered) is closed to make room: slow clients cannot
    keep a probe out, and one that trickles a request in is the first to go.
    Only when every connection is being answered is a new one refused.
    Evictions and refusals are counted; the warning about each is logged at
    most once per *log_interval* (by *clock*): a flood must not become a flood
    of log lines.
    """

    def __init__(
        self,
        limit: int,
        *,
        log_interval: float = REFUSAL_LOG_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if limit < 1:
            raise ValueError("limit must be >= 1")
        self.limit = limit
        self.refused_total = 0
        self.evicted_total = 0
        #: Open connections, the one idle the longest first.
        self._open: OrderedDict[Closable, None] = OrderedDict()
        #: Connections with a request being answered: never evicted.
        self._busy: set[Closable] = set()
        self._refused_log = _Throttled("http.connections_refused", log_interval, clock)
        self._evicted_log = _Throttled("http.idle_connections_closed", log_interval, clock)

    @property
    def open(self) -> int:
        return len(self._open)

    def admit(self, connection: Closable) -> bool:
        if len(self._open) >= self.limit:
            idle = next((c for c in self._open if c not in self._busy), None)
            if idle is None:
                self.refused_total += 1
                self._refused_log.count(limit=self.limit, refused_total=self.refused_total)
                return False
            del self._open[idle]
            self.evicted_total += 1
            self._evicted_log.count(limit=self.limit, closed_total=self.evicted_total)
            idle.abort()  # frees the descriptor now, whatever the client does
        self._open[connection] = None
        return True

    def busy(self, connection: Closable) -> None:
        """A request of *connection* is being answered: keep it open."""
        if connection in self._open:
            self._busy.add(connection)

    def idle(self, connection: Closable) -> None:
        """*connection* was answered: the last to be evicted among the idle ones."""
        self._busy.discard(connection)
        if connection in self._open:
            self._open.move_to_end(connection)

    def release(self, connection: Closable) -> None:
        # An evicted connection is released twice: at eviction and when the
        # loop reports it lost.
        self._open.pop(connection, None)
        self._busy.discard(connection)


class _GatedProtocol(asyncio.Protocol):
    """aiohttp's protocol for an admitted connection; a 503 and close for the rest.

    Admission is decided in connection_made, which the loop runs one at a
    time, so the count is exact even when many connections are accepted in
    one pass of the loop.
    """

    def __init__(self, gate: ConnectionGate, factory: Callable[[], asyncio.Protocol]) -> None:
        self._gate = gate
        self._factory = factory
        self._inner: asyncio.Protocol | None = None
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        stream = cast(asyncio.Transport, transport)
        if not self._gate.admit(stream):
            stream.write(_REFUSED)
            stream.close()
            return
        self._transport = stream
        self._inner = self._factory()
        self._inner.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._inner is not None:
            inner, self._inner = self._inner, None
            if self._transport is not None:
                self._gate.release(self._transport)
            inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._inner is not None:
            self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received() if self._inner is not None else None

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()


class _GatedSite(web.BaseSite):
    """aiohttp's TCPSite, with every connection passing through a ConnectionGate."""

    def __init__(
        self, runner: web.BaseRunner, host: str | None, port: int, gate: ConnectionGate
    ) -> None:
        super().__init__(runner)
        self._host = host
        self._port = port
        self._gate = gate

    @property
    def name(self) -> str:
        return f"http://{self._host or '*'}:{self._port}"

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None
        self._server = await asyncio.get_running_loop().create_server(
            lambda: _GatedProtocol(self._gate, server),
            self._host,
            self._port,
            backlog=self._backlog,
        )


class Readiness(Protocol):
    """What /readyz asks the daemon. The daemon's state object implements it.

    ``role`` is "leader" for the instance doing the work ("standby" while it
    waits for the leader lock, anything else while starting or stopping).
    ``database_ok`` may run a query or return a flag the daemon keeps fresh;
    /readyz gives it ``database_timeout`` seconds. ``last_sweep_age`` is the
    seconds since the last completed sweep, None before the first one.
    ``database_unreachable`` is True while the leader lock's session cannot
    reach the database (an instance that never reached it is no standby).
    """

    @property
    def role(self) -> str: ...

    @property
    def database_unreachable(self) -> bool: ...

    @property
    def listener_connected(self) -> bool: ...

    def database_ok(self) -> Awaitable[bool]: ...

    def last_sweep_age(self) -> float | None: ...


def _not_leader_reason(role: str, unreachable: bool) -> str:
    """Why this instance does no work, in words that send the operator the right way."""
    if unreachable:
        # Not the error's text: the body is unauthenticated, the log has it.
        return "cannot reach the database (retrying; leader.connection_failed in the log says why)"
    if role == STANDBY:
        return "not the leader: another instance holds the lock"
    return f"not the leader: {role}"


def parse_listen(listen: str) -> tuple[str | None, int]:
    """``host:port`` (``[::1]:9187``, ``:9187`` for every interface) -> (host, port)."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise HttpListenError(
            f"ORDER_MONITOR_HTTP_LISTEN={listen!r} is invalid: expected host:port, "
            "e.g. 127.0.0.1:9187"
        )
    host = host.removeprefix("[").removesuffix("]")
    return (host or None), int(port)


class HttpServer:
    """The server; ``async with`` starts it and stops it."""

    def __init__(
        self,
        listen: str,
        *,
        metrics: Metrics,
        readiness: Readiness,
        database_timeout: float = 2.0,
        max_sweep_age: float | None = None,
        unwritten_age: Callable[[], float] | None = None,
        max_unwritten_age: float = MAX_UNWRITTEN_AGE,
        install_check: Callable[[], dict[str, Any]] | None = None,
        max_connections: int = MAX_CONNECTIONS,
        header_timeout: float = HEADER_TIMEOUT,
        refusal_log_interval: float = REFUSAL_LOG_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
        routes: Sequence[web.RouteDef] = (),
    ) -> None:
        self._listen = listen
        self._host, self._port = parse_listen(listen)
        self._metrics = metrics
        self._readiness = readiness
        self._database_timeout = database_timeout
        self._max_sweep_age = max_sweep_age
        self._unwritten_age = unwritten_age
        self._max_unwritten_age = max_unwritten_age
        #: The "schema" check: objects of the install that vanished while running
        #: (ops.installed.InstallHealth.readiness).
        self._install_check = install_check
        self._started = time.monotonic()
        self._runner: web.AppRunner | None = None
        self._header_timeout = header_timeout
        self.gate = ConnectionGate(max_connections, log_interval=refusal_log_interval, clock=clock)
        self.addresses: list[tuple[str, int]] = []

        app = web.Application(middlewares=[self._answering])
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics_handler)
        app.router.add_routes(routes)
        self._app = app

    @property
    def port(self) -> int:
        """The bound port (useful with port 0)."""
        if not self.addresses:
            raise RuntimeError("the HTTP server is not started")
        return self.addresses[0][1]

    async def start(self) -> None:
        # Probes come every few seconds; an access log line each would bury
        # the daemon's own events in the journal.
        runner = web.AppRunner(
            self._app,
            access_log=None,
            shutdown_timeout=1.0,
            # aiohttp arms this timer when a connection opens and again after
            # each response, and does not move it as bytes trickle in: it is the
            # time allowed for a whole request, so a client that sends half a
            # request line and stops is dropped. Probes and scrapes take
            # milliseconds and reconnect freely.
            keepalive_timeout=self._header_timeout,
            # How long an unread request body may keep the connection after the
            # response: no longer than a request may take to arrive.
            lingering_time=self._header_timeout,
        )
        await runner.setup()
        site = _GatedSite(runner, self._host, self._port, self.gate)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise HttpListenError(
                f"cannot listen on {self._listen} for /healthz, /readyz, /metrics and the page: "
                f"{exc.strerror or exc}; choose a free address in ORDER_MONITOR_HTTP_LISTEN "
                "or set it to off"
            ) from None
        self._runner = runner
        self.addresses = [(str(a[0]), int(a[1])) for a in runner.addresses]
        log.info("http.listening", listen=self._listen, addresses=self.addresses)

    async def stop(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # --- handlers -----------------------------------------------------------

    @web.middleware
    async def _answering(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        # A connection whose request is being answered (a /readyz waiting on
        # the database) is never the one closed to make room.
        connection = request.transport
        if connection is None:
            return await handler(request)
        self.gate.busy(connection)
        try:
            return await handler(request)
        finally:
            self.gate.idle(connection)

    async def _healthz(self, _: web.Request) -> web.Response:
        # Being here proves the loop is turning; that is all liveness means.
        return web.json_response(
            {"status": "ok", "uptime_s": round(time.monotonic() - self._started, 3)}
        )

    async def _readyz(self, _: web.Request) -> web.Response:
        checks, failed = await self.readiness_checks()
        body: dict[str, Any] = {
            "status": "not_ready" if failed else "ready",
            "role": self._readiness.role,
            "failed": failed,
            "checks": checks,
        }
        return web.json_response(body, status=503 if failed else 200)

    async def readiness_checks(self) -> tuple[dict[str, dict[str, Any]], list[str]]:
        """Every check with its detail, and the names of those that failed."""
        state = self._readiness
        role = state.role
        checks: dict[str, dict[str, Any]] = {"role": {"ok": role == LEADER, "role": role}}
        if role != LEADER:
            # A standby has no listener and sweeps nothing by design; listing
            # those as failures would send the operator on a false trail.
            checks["role"]["reason"] = _not_leader_reason(role, state.database_unreachable)
            return checks, ["role"]

        checks["listener"] = {"ok": state.listener_connected}
        if not state.listener_connected:
            checks["listener"]["reason"] = "the LISTEN connection is down (reconnecting)"

        checks["database"] = await self._database_check()

        age = state.last_sweep_age()
        sweep: dict[str, Any] = {"ok": True, "age_s": None if age is None else round(age, 3)}
        if age is None:
            sweep.update(ok=False, reason="no sweep has finished yet")
        elif self._max_sweep_age is not None and age > self._max_sweep_age:
            sweep.update(
                ok=False,
                reason=f"the last sweep finished more than {self._max_sweep_age:g}s ago",
            )
        checks["sweep"] = sweep

        if self._unwritten_age is not None:
            checks["writes"] = self._writes_check(self._unwritten_age())

        if self._install_check is not None:
            checks["schema"] = self._install_check()

        return checks, [name for name, check in checks.items() if not check["ok"]]

    def _writes_check(self, age: float) -> dict[str, Any]:
        # Results checked but not written (rows held by another transaction, a
        # database that fails the writes): the listener and the sweep look
        # fine meanwhile, and no customer gets a PIN.
        writes: dict[str, Any] = {"ok": age <= self._max_unwritten_age, "age_s": round(age, 3)}
        if not writes["ok"]:
            writes["reason"] = (
                f"a result has waited {age:.0f}s to be written "
                f"(more than {self._max_unwritten_age:g}s): see writer.rows_locked or "
                "writer.failed in the log"
            )
        return writes

    async def _database_check(self) -> dict[str, Any]:
        try:
            ok = await asyncio.wait_for(self._readiness.database_ok(), self._database_timeout)
        except TimeoutError:
            return {
                "ok": False,
                "reason": f"no answer within {self._database_timeout:g}s",
            }
        except Exception as exc:
            # The body may reach a load balancer's logs: the exception type is
            # enough there, the full text goes to our own log.
            log.warning("http.readyz_database_error", error=str(exc))
            return {"ok": False, "reason": f"check failed: {type(exc).__name__}"}
        return {"ok": True} if ok else {"ok": False, "reason": "the database check failed"}

    async def _metrics_handler(self, _: web.Request) -> web.Response:
        body = generate_latest(self._metrics.registry)
        # aiohttp's content_type= refuses parameters; the header carries the
        # exposition format version Prometheus negotiates on.
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


@asynccontextmanager
async def serve_http(
    listen: str | None,
    *,
    metrics: Metrics,
    readiness: Readiness,
    database_timeout: float = 2.0,
    max_sweep_age: float | None = None,
    unwritten_age: Callable[[], float] | None = None,
    install_check: Callable[[], dict[str, Any]] | None = None,
    routes: Sequence[web.RouteDef] = (),
) -> AsyncIterator[HttpServer | None]:
    """Run the server for the duration of the block, or nothing when *listen* is None."""
    if listen is None:
        yield None
        return
    async with HttpServer(
        listen,
        metrics=metrics,
        readiness=readiness,
        database_timeout=database_timeout,
        max_sweep_age=max_sweep_age,
        unwritten_age=unwritten_age,
        install_check=install_check,
        routes=routes,
    ) as server:
        yield server
