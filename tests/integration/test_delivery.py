"""Delivery end to end, as deployed: provider → write function → outbox → relay → application.

The daemon runs as the least-privilege role against an install rendered for
the reference actions (approve for done, reject and refund for failed), the
application is :class:`ApplicationApi` on the same database, and each test
ends on what the shop sees: every order finished with the right word,
exactly one refund per rejected order and none for any other, nothing left
in the outbox but the dead letters the test caused. Faults come from the
application's knobs (5xx, Retry-After, a hanging request, a changed token,
per-id errors), from SIGKILL of a daemon process (between the write and the
delivery, during a request, the leader of two) and from a PostgreSQL restart.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field, replace
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from order_monitor import schema
from order_monitor.config import Layout, ProviderLimits, Settings
from order_monitor.daemon import Daemon
from order_monitor.delivery.relay import RelayTiming
from order_monitor.delivery.store import OutboxStore
from order_monitor.demo.application_api import (
    APPROVE_PATH,
    REJECT_PATH,
    WALLET,
    ApplicationApi,
    prepare_application_tables,
)
from order_monitor.embedded import EmbeddedServer
from order_monitor.providers.fake import FakeProvider, Script
from tests.conftest import as_daemon, deploy, deployed_shop
from tests.daemon_fixtures import eventually, running, settings_for
from tests.delivery.conftest import WRITES
from tests.delivery.test_relay import TOKEN, reference_actions
from tests.integration.test_restart import DaemonProcess

OUTBOX = schema.Names(Layout()).outbox
TENANTS = tuple(uuid.UUID(f"{n:08x}-0000-4000-8000-{n:012x}") for n in (0xA1, 0xB2, 0xC3))
USER = uuid.UUID("dddddddd-0000-4000-8000-00000000000d")
#: The relay's pace in-process: retries in tens of milliseconds, a refused
#: token tried again every half second.
FAST = RelayTiming(poll_interval=0.2, summary_interval=0.2, auth_retry=0.5, retry_scale=0.01)
#: A hanging request gives up after 2 s (connect + read).
LIMITS = ProviderLimits(concurrency=4, connect_timeout=1.0, read_timeout=1.0, breaker_failures=50)

Conn = psycopg.AsyncConnection[Any]


# --- the shop -------------------------------------------------------------------------


@dataclass
class Order:
    id: uuid.UUID
    ref: str
    tenant: uuid.UUID
    #: done or failed: what the provider will answer.
    outcome: str
    price: Decimal


@dataclass
class Shop:
    """The application's side of the database, and what the test expects of it."""

    conn: Conn
    orders: dict[uuid.UUID, Order] = field(default_factory=dict)

    async def dispatch(
        self, fake: FakeProvider, count: int, *, prefix: str = "o", failed_every: int = 3
    ) -> list[Order]:
        """*count* orders over the tenants; every *failed_every*-th fails at the provider."""
        made = []
        for n in range(count):
            ref = f"{prefix}-{n}-{uuid.uuid4().hex[:6]}"
            outcome = "failed" if n % failed_every == 0 else "done"
            fake.set_script(ref, Script.failed() if outcome == "failed" else Script.done())
            tenant = TENANTS[n % len(TENANTS)]
            price = Decimal(f"{n + 1}.25")
            cursor = await self.conn.execute(
                """INSERT INTO product_orders (provider_referans, "providerId", "externalStatus",
                       "sentAt", "tenantId", "userId", "sellPriceAmount")
                   VALUES (%s, 'fake', 'sent', now(), %s, %s, %s) RETURNING id""",
                (ref, tenant, USER, price),
            )
            row = await cursor.fetchone()
            assert row is not None
            order = Order(row[0], ref, tenant, outcome, price)
            self.orders[order.id] = order
            made.append(order)
        return made

    async def statuses(self) -> dict[uuid.UUID, str]:
        cursor = await self.conn.execute(
            "SELECT id, status FROM product_orders WHERE id = ANY(%s)", (list(self.orders),)
        )
        return {row[0]: row[1] for row in await cursor.fetchall()}

    async def outbox(self) -> list[dict[str, Any]]:
        cursor = await self.conn.execute(sql.SQL("SELECT * FROM {}").format(OUTBOX))
        names = [d.name for d in cursor.description or []]
        return [dict(zip(names, row, strict=True)) for row in await cursor.fetchall()]

    async def wallet(self) -> dict[uuid.UUID, Decimal]:
        cursor = await self.conn.execute(
            sql.SQL("SELECT order_id, amount FROM {}").format(sql.Identifier(WALLET))
        )
        return {row[0]: row[1] for row in await cursor.fetchall()}

    async def settled(self, dead: Sequence[uuid.UUID] = ()) -> bool:
        """Every order but *dead* finished in the application, and only *dead* left in the outbox."""
        statuses = await self.statuses()
        finished = all(
            statuses[o.id] == _word(o.outcome) for o in self.orders.values() if o.id not in dead
        )
        rows = await self.outbox()
        left = {r["order_id"] for r in rows}
        return finished and left == set(dead) and all(r["dead_at"] is not None for r in rows)

    async def check(self, api: ApplicationApi, dead: Sequence[uuid.UUID] = ()) -> None:
        """The end state every test must reach (see the module's docstring)."""
        statuses = await self.statuses()
        for order in self.orders.values():
            expected = "pending" if order.id in dead else _word(order.outcome)
            assert statuses[order.id] == expected, order
        # The money: exactly one refund per rejected order, of its price; none for another.
        rejected = {o.id: o.price for o in self.orders.values() if statuses[o.id] == "rejected"}
        assert await self.wallet() == rejected
        rows = await self.outbox()
        assert {r["order_id"] for r in rows} == set(dead)
        assert all(r["dead_at"] is not None for r in rows)
        for request in api.requests:
            ids = [uuid.UUID(i) for i in request.json["ids"]]
            assert len(ids) == len(set(ids)), "an id twice in one request"
            tenants = {self.orders[i].tenant for i in ids}
            assert tenants == {uuid.UUID(request.headers["X-Tenant-Id"])}, "tenants mixed"
            path = {_word("done"): APPROVE_PATH, _word("failed"): REJECT_PATH}
            assert {path[_word(self.orders[i].outcome)] for i in ids} == {request.path}
            assert request.headers["Authorization"] == f"Bearer {TOKEN}"


def _word(outcome: str) -> str:
    return {"done": "approved", "failed": "rejected"}[outcome]


def sent_ids(api: ApplicationApi) -> list[uuid.UUID]:
    return [uuid.UUID(i) for r in api.requests for i in r.json["ids"]]


@pytest.fixture
def shop_db(db: str) -> str:
    """The test database installed for the reference actions, with the application's money tables."""
    deploy(db, WRITES)
    with psycopg.connect(db, autocommit=True) as conn:
        prepare_application_tables(conn)
    return db


@pytest.fixture
async def shop(shop_db: str) -> AsyncIterator[Shop]:
    async with await psycopg.AsyncConnection.connect(shop_db, autocommit=True) as conn:
        yield Shop(conn)


@pytest.fixture
async def api(shop_db: str) -> AsyncIterator[ApplicationApi]:
    application = ApplicationApi(shop_db, token=TOKEN)
    async with application.running():
        yield application


def delivering(db: str, fake: FakeProvider, api: ApplicationApi, **action: Any) -> Settings:
    """The daemon's settings: the reference actions, the install's writes, as the role."""
    return replace(
        settings_for(db, fake),
        actions=reference_actions(api.base_url, limits=LIMITS, **action),
        writes=WRITES,
    )


def daemon_for(settings: Settings) -> Daemon:
    return Daemon(settings, lock_poll=0.2, lock_check_interval=0.3, relay_timing=FAST)


def sample(daemon: Daemon, name: str, **labels: str) -> float:
    return daemon.metrics.registry.get_sample_value(name, labels) or 0.0


# --- in process -------------------------------------------------------------------------


async def test_every_result_is_finished_in_the_application_once_per_tenant(
    shop_db: str, shop: Shop, fake: FakeProvider, api: ApplicationApi
) -> None:
    async with running(daemon_for(delivering(shop_db, fake, api))):
        await shop.dispatch(fake, 30)
        await eventually(shop.settled, what="every order finished in the application")

    await shop.check(api)
    # No fault: every id went exactly once.
    sent = sent_ids(api)
    assert sorted(sent) == sorted(shop.orders)
    assert {o.outcome for o in shop.orders.values()} == {"done", "failed"}
    assert len({o.tenant for o in shop.orders.values()}) == 3


async def test_a_result_the_guard_refuses_is_never_delivered(
    shop_db: str, shop: Shop, fake: FakeProvider, api: ApplicationApi
) -> None:
    fake.behaviour.latency = 1.0  # time to change the rows while the provider is asked
    daemon = daemon_for(delivering(shop_db, fake, api))
    async with running(daemon):
        finished_by_hand, resent, control = await shop.dispatch(fake, 3, failed_every=99)
        await eventually(
            lambda: _polled(fake, finished_by_hand.ref, resent.ref),
            what="the provider to be asked",
        )
        # Under the daemon: an operator finishes one, the application re-sends the other.
        await shop.conn.execute(
            "UPDATE product_orders SET status = 'approved' WHERE id = %s", (finished_by_hand.id,)
        )
        fake.set_script("resent-ref", Script.pending())
        await shop.conn.execute(
            "UPDATE product_orders SET provider_referans = 'resent-ref' WHERE id = %s",
            (resent.id,),
        )
        await eventually(
            lambda: _stale(daemon, 2), what="both results refused by the write function's guard"
        )
        await eventually(lambda: _status(shop, control.id, "approved"), what="the control")

    assert {r["order_id"] for r in await shop.outbox()} == set()
    assert sent_ids(api) == [control.id]
    statuses = await shop.statuses()
    assert statuses[finished_by_hand.id] == "approved"  # the operator's, untouched
    assert statuses[resent.id] == "pending"
    assert await shop.wallet() == {}


async def test_5xx_bursts_a_retry_after_and_a_hanging_request_end_delivered(
    shop_db: str, shop: Shop, fake: FakeProvider, api: ApplicationApi
) -> None:
    api.hang_next(1)
    api.fail_next(500, count=4)
    api.fail_next(503, retry_after="1")
    api.fail_next(502, count=3)
    daemon = daemon_for(delivering(shop_db, fake, api))
    async with running(daemon):
        await shop.dispatch(fake, 24)
        await eventually(shop.settled, within=90, what="every order finished despite the faults")

    await shop.check(api)
    assert (
        sample(daemon, "order_monitor_delivery_errors_total", action="approve", kind="transport")
        + sample(daemon, "order_monitor_delivery_errors_total", action="reject", kind="transport")
        >= 1
    ), "the hanging request did not time out"
    errors = sum(
        sample(daemon, "order_monitor_delivery_errors_total", action=a, kind=k)
        for a in ("approve", "reject")
        for k in ("server_error", "rate_limited")
    )
    assert errors >= 1
    assert sample(daemon, "order_monitor_dead_letters") == 0


async def test_a_refused_token_makes_deliveries_wait_not_die_then_they_go(
    shop_db: str, shop: Shop, fake: FakeProvider, api: ApplicationApi
) -> None:
    api.token = "rotated-by-the-application"
    # One attempt and a minute's max_age: anything but AUTH would bury them.
    daemon = daemon_for(delivering(shop_db, fake, api, attempts=1, max_age=60.0))
    async with running(daemon):
        await shop.dispatch(fake, 12)
        await eventually(lambda: _outbox_size(shop, 12), what="every result written")
        await eventually(
            lambda: _auth_failing(daemon), what="the relay to say the credentials are refused"
        )
        refused = len(api.requests)
        await eventually(
            lambda: _requests_beyond(api, refused + 3), what="probes while the token is wrong"
        )
        rows = await shop.outbox()
        assert len(rows) == 12
        assert {(r["dead_at"], r["rejections"]) for r in rows} == {(None, 0)}
        assert set((await shop.statuses()).values()) == {"pending"}

        api.token = TOKEN  # changed back
        await eventually(shop.settled, what="the deliveries to go once the token works")
        assert not await _auth_failing(daemon)
    await shop.check(api)


async def test_a_refused_id_becomes_a_dead_letter_the_others_go_once_and_a_requeue_delivers_it(
    shop_db: str, shop: Shop, fake: FakeProvider, api: ApplicationApi
) -> None:
    daemon = daemon_for(delivering(shop_db, fake, api, attempts=3))
    async with running(daemon):
        fake.behaviour.latency = 0.3  # the refusal is set before the results come back
        orders = await shop.dispatch(fake, 9)
        refused = next(o for o in orders if o.outcome == "failed")
        api.reject_id(refused.id, "LEGACY_USER_MISSING")
        await eventually(lambda: shop.settled(dead=[refused.id]), what="one dead letter")
        await shop.check(api, dead=[refused.id])
        (row,) = await shop.outbox()
        assert (row["rejections"], row["last_verdict"]) == (3, "rejected")
        assert "LEGACY_USER_MISSING" in row["last_error"]
        sent = sent_ids(api)
        assert sent.count(refused.id) == 3
        assert all(sent.count(o.id) == 1 for o in orders if o is not refused)

        api.reject_id(refused.id, None)  # the shop fixed the user
        async with await psycopg.AsyncConnection.connect(
            as_daemon(shop_db), autocommit=True
        ) as operator:
            assert await OutboxStore(Layout()).requeue(operator, [row["delivery_id"]]) == 1
        await eventually(shop.settled, what="the requeued dead letter to be delivered")
    await shop.check(api)
    assert sent_ids(api).count(refused.id) == 4


async def _polled(fake: FakeProvider, *refs: str) -> bool:
    return all(fake.poll_count(ref) >= 1 for ref in refs)


async def _stale(daemon: Daemon, count: int) -> bool:
    return sample(daemon, "order_monitor_stale_results_total") >= count


async def _status(shop: Shop, order_id: uuid.UUID, word: str) -> bool:
    return (await shop.statuses())[order_id] == word


async def _outbox_size(shop: Shop, count: int) -> bool:
    return len(await shop.outbox()) == count


async def _auth_failing(daemon: Daemon) -> bool:
    return sample(daemon, "order_monitor_delivery_auth_failing", action="approve") == 1 or (
        sample(daemon, "order_monitor_delivery_auth_failing", action="reject") == 1
    )


async def _requests_beyond(api: ApplicationApi, count: int) -> bool:
    return len(api.requests) >= count


# --- a PostgreSQL restart -----------------------------------------------------------------


@pytest.fixture
def private_shop() -> Iterator[tuple[EmbeddedServer, str]]:
    """A server of its own (restarting the shared one would break the other tests)."""
    server = EmbeddedServer()
    admin = server.start()
    try:
        dsn = deployed_shop(admin)
        deploy(dsn, WRITES)
        with psycopg.connect(dsn, autocommit=True) as conn:
            prepare_application_tables(conn)
        yield server, dsn
    finally:
        server.stop_and_delete()


@pytest.mark.slow
async def test_a_postgres_restart_while_delivering_loses_and_doubles_nothing(
    private_shop: tuple[EmbeddedServer, str], fake: FakeProvider
) -> None:
    server, dsn = private_shop
    api = ApplicationApi(dsn, token=TOKEN)
    async with api.running():
        port = int(api.base_url.rsplit(":", 1)[1])
        shop = Shop(await psycopg.AsyncConnection.connect(dsn, autocommit=True))
        daemon = daemon_for(delivering(dsn, fake, api))
        async with running(daemon):
            await api.close()  # the application is down: the deliveries retry
            await shop.dispatch(fake, 30)
            await eventually(
                lambda: _retried(shop, 30), what="every delivery to have failed at least once"
            )
            await shop.conn.close()
            await asyncio.to_thread(server.restart)
            await api.start(port=port)  # back, with the database
            shop.conn = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
            await shop.dispatch(fake, 15, prefix="after")
            await eventually(shop.settled, within=90, what="every order after the restart")
        await shop.check(api)
        await shop.conn.close()


async def _retried(shop: Shop, count: int) -> bool:
    rows = await shop.outbox()
    return len(rows) == count and all(r["tries"] >= 1 for r in rows)


# --- as a process: SIGKILL ----------------------------------------------------------------


def providers_toml(fake: FakeProvider, api: ApplicationApi) -> str:
    """The reference configuration as an operator writes it (the token from the environment)."""
    action = """
kind = "http"
url = "{url}"
outcomes = ["{outcome}"]
confirm_status = "{word}"
headers = {{ Authorization = "Bearer {{secret:token}}", X-Tenant-Id = "{{column:tenantId}}", Idempotency-Key = "{{request_id}}" }}
body = {{ ids = "{{ids}}", note = "{{message}}" }}
success = {{ ok = true }}
errors_path = "errors"
secrets = {{ token = {{ env = "APP_TOKEN" }} }}
limits = {{ read_timeout = 20, breaker_failures = 50 }}
"""
    return f"""
[providers.fake]
kind = "barakat"
base_url = "{fake.base_url}"
secrets = {{ token = {{ env = "FAKE_TOKEN" }} }}
limits = {{ concurrency = 8, read_timeout = 2, breaker_failures = 50 }}

[actions.approve]
{action.format(url=api.base_url + APPROVE_PATH, outcome="done", word="approved")}
[actions.reject]
{action.format(url=api.base_url + REJECT_PATH, outcome="failed", word="rejected")}
"""


@pytest.fixture
def process_env(
    shop_db: str, fake: FakeProvider, api: ApplicationApi, tmp_path: Path
) -> dict[str, str]:
    providers = tmp_path / "providers.toml"
    providers.write_text(providers_toml(fake, api))
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("ORDER_MONITOR_") and not key.startswith("PG")
    }
    env.update(
        {
            "ORDER_MONITOR_DSN": as_daemon(shop_db),
            "ORDER_MONITOR_PROVIDERS_FILE": str(providers),
            "ORDER_MONITOR_LOG_FORMAT": "json",
            "ORDER_MONITOR_LOG_LEVEL": "info",
            "ORDER_MONITOR_INITIAL_DELAY": "0",
            "ORDER_MONITOR_BACKOFF_BASE": "0.2",
            "ORDER_MONITOR_BACKOFF_CAP": "1",
            "ORDER_MONITOR_MAX_ATTEMPTS": "200",
            "ORDER_MONITOR_SWEEP_INTERVAL": "60",
            "ORDER_MONITOR_DRAIN_TIMEOUT": "3",
            "FAKE_TOKEN": "test-token",
            "APP_TOKEN": TOKEN,
        }
    )
    return env


class Standby(DaemonProcess):
    """A second instance: it waits for the lock instead of listening."""

    ready_event = "leader.standby"
    ready_state = "stand by"
    name = "the second instance"


@pytest.mark.slow
async def test_killed_between_the_write_and_the_delivery_the_next_leader_delivers(
    process_env: dict[str, str], shop: Shop, fake: FakeProvider, api: ApplicationApi
) -> None:
    port = int(api.base_url.rsplit(":", 1)[1])
    await api.close()  # the application is down: results are written, not delivered
    daemon = DaemonProcess(process_env)
    await daemon.start()
    try:
        await shop.dispatch(fake, 12)
        await eventually(lambda: _retried(shop, 12), what="results written and not delivered")
        assert await daemon.signal(signal.SIGKILL) == -signal.SIGKILL

        await api.start(port=port)
        await daemon.start()
        await eventually(shop.settled, within=60, what="the next leader to deliver")
    finally:
        if daemon.process is not None and daemon.process.returncode is None:
            await daemon.signal(signal.SIGTERM)
    await shop.check(api)


@pytest.mark.slow
async def test_killed_during_a_request_it_is_sent_again_with_the_same_key(
    process_env: dict[str, str], shop: Shop, fake: FakeProvider, api: ApplicationApi
) -> None:
    api.hang_next(1)
    daemon = DaemonProcess(process_env)
    await daemon.start()
    try:
        # One tenant, one outcome: one request, and it hangs.
        (order,) = await shop.dispatch(fake, 1, failed_every=99)
        await eventually(lambda: _requests_beyond(api, 1), what="the request under way")
        assert await daemon.signal(signal.SIGKILL) == -signal.SIGKILL
        await daemon.start()
        await eventually(shop.settled, within=60, what="the next leader to deliver")
    finally:
        if daemon.process is not None and daemon.process.returncode is None:
            await daemon.signal(signal.SIGTERM)
    await shop.check(api)
    cut, again = api.requests
    assert again.json == cut.json == {"ids": [str(order.id)], "note": again.json["note"]}
    assert again.headers["Idempotency-Key"] == cut.headers["Idempotency-Key"]


@pytest.mark.slow
async def test_a_standby_delivers_what_the_killed_leader_left(
    process_env: dict[str, str], shop: Shop, fake: FakeProvider, api: ApplicationApi
) -> None:
    port = int(api.base_url.rsplit(":", 1)[1])
    await api.close()
    leader, standby = DaemonProcess(process_env), Standby(process_env)
    await leader.start()
    await standby.start()
    try:
        await shop.dispatch(fake, 15)
        await eventually(lambda: _retried(shop, 15), what="the leader's undelivered results")
        await api.start(port=port)
        assert await leader.signal(signal.SIGKILL) == -signal.SIGKILL
        await eventually(shop.settled, within=60, what="the standby to take over and deliver")
        assert standby.named("leader.acquired")
        assert not leader.named("delivery.delivered")
        assert standby.named("delivery.delivered")
    finally:
        if standby.process is not None and standby.process.returncode is None:
            await standby.signal(signal.SIGTERM)
    await shop.check(api)


def one_attempt(providers: Path) -> None:
    """Every action buries an order at its first refusal."""
    text = providers.read_text()
    providers.write_text(
        text.replace('errors_path = "errors"', 'errors_path = "errors"\nattempts = 1')
    )


@pytest.mark.slow
async def test_a_dead_letter_requeued_with_the_command_is_delivered(
    process_env: dict[str, str], shop: Shop, fake: FakeProvider, api: ApplicationApi
) -> None:
    one_attempt(Path(process_env["ORDER_MONITOR_PROVIDERS_FILE"]))
    fake.behaviour.latency = 0.3
    daemon = DaemonProcess(process_env)
    await daemon.start()
    try:
        orders = await shop.dispatch(fake, 3, failed_every=99)
        api.reject_id(orders[0].id, "TENANT_MISMATCH")
        await eventually(lambda: shop.settled(dead=[orders[0].id]), what="the dead letter")
        api.reject_id(orders[0].id, None)

        command = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "order_monitor", "deliveries", "requeue", str(orders[0].id),
            env=process_env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await command.communicate()
        assert command.returncode == 0, (out, err)
        await eventually(shop.settled, within=60, what="the requeued entry to be delivered")
    finally:
        await daemon.signal(signal.SIGTERM)
    await shop.check(api)
