"""The engine end to end: a real Postgres, the fake provider over loopback, the real daemon."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from typing import Any

import pytest
from structlog.testing import capture_logs

from order_monitor.daemon import Daemon
from order_monitor.engine import assembly as assembly_module
from order_monitor.engine import checker as checker_module
from order_monitor.engine.assembly import checker_limits
from order_monitor.engine.checker import CheckerLimits
from order_monitor.engine.decisions import Decision
from order_monitor.engine.policy import BackoffPolicy
from order_monitor.engine.scheduler import Scheduler
from order_monitor.providers.base import OrderRef, Outcome, Provider
from order_monitor.providers.fake import (
    MSG_DONE,
    Answer,
    Behaviour,
    FakeProvider,
    Script,
    default_pin,
)
from order_monitor.providers.registry import build_providers
from tests.daemon_fixtures import FAST_POLICY, App, eventually, running, settings_for


def scripted(reference: str) -> Script:
    """References say what they do: 'done:2:17' is done after 2 pending polls."""
    kind, polls, _ = reference.split(":")
    if kind == "done":
        return Script.done(after=int(polls))
    if kind == "failed":
        return Script.failed("Stok yok", after=int(polls))
    return Script.pending()


async def test_one_order_is_followed_to_done(db: str, app: App, fake: FakeProvider) -> None:
    fake.set_script("R1", Script.done("PIN-1", after=2))
    async with running(Daemon(settings_for(db, fake))):
        (order,) = await app.dispatch(["R1"])
        await eventually(lambda: _finished(app), what="the order to finish")
    row = (await app.rows())["R1"]
    assert row["id"] == order
    assert row["externalStatus"] == "done"
    assert row["pinCode"] == "PIN-1"
    assert row["providerMessage"] == MSG_DONE
    assert row["lastMessage"] == MSG_DONE
    assert row["status"] == "pending"  # the business status is left alone by default
    assert row["completedAt"] is not None
    assert row["durationMs"] >= 0
    assert fake.poll_count("R1") == 3


async def _finished(app: App) -> bool:
    return await app.in_flight() == 0


@pytest.mark.slow
async def test_ten_thousand_orders_each_end_right_and_are_polled_by_the_policy(
    db: str, app: App, fake: FakeProvider
) -> None:
    fake.behaviour = Behaviour(default=scripted)
    refs: list[str] = []
    for n in range(10_000):
        bucket = n % 10
        if bucket < 3:
            refs.append(f"done:0:{n}")
        elif bucket < 8:
            refs.append(f"done:{1 + n % 3}:{n}")
        else:
            refs.append(f"failed:{n % 2}:{n}")
    settings = settings_for(db, fake, batch_size=500, concurrency=32)
    async with running(Daemon(settings)):
        for start in range(0, len(refs), 1000):  # the application writes in bursts
            await app.dispatch(refs[start : start + 1000])
        await eventually(lambda: _finished(app), within=240, what="10,000 orders to finish")

    rows = await app.rows()
    assert len(rows) == 10_000
    earliest = [
        s.offset * (1 - FAST_POLICY.jitter) for s in replace(FAST_POLICY, jitter=0.0).slots(0)
    ]
    for ref in refs:
        kind, polls, _ = ref.split(":")
        row = rows[ref]
        if kind == "done":
            assert (row["externalStatus"], row["pinCode"]) == ("done", default_pin(ref)), ref
        else:
            assert (row["externalStatus"], row["pinCode"]) == ("failed", None), ref
            assert row["providerMessage"] == "Stok yok"
        assert row["completedAt"] is not None
        # Never polled more than its script needs: no duplicate chains.
        times = fake.polls(ref)
        assert len(times) == int(polls) + 1, ref
        # And never sooner than the policy allows: the k-th poll comes no
        # earlier than the k-th slot after dispatch (less the jitter).
        dispatched = row["sentAt"].timestamp()
        for k, polled_at in enumerate(times):
            assert polled_at - dispatched >= earliest[k] - 0.005, (ref, k, polled_at - dispatched)


async def test_an_order_finished_by_an_operator_meanwhile_is_not_overwritten(
    db: str, app: App, fake: FakeProvider
) -> None:
    fake.behaviour.latency = 1.0  # the provider is slow: the operator is faster
    fake.set_script("OP", Script.done("PROVIDER-PIN"))
    async with running(Daemon(settings_for(db, fake))) as daemon:
        (order,) = await app.dispatch(["OP"])
        await eventually(lambda: _polled(fake, "OP"), what="the provider to be asked")
        await app.conn.execute(
            """UPDATE product_orders SET status = 'rejected', "externalStatus" = 'failed',
               "lastMessage" = 'refunded by operator' WHERE id = %s""",
            (order,),
        )
        await eventually(lambda: _stale_counted(daemon), what="the stale result to be dropped")
    row = (await app.rows())["OP"]
    assert (row["status"], row["externalStatus"], row["pinCode"], row["lastMessage"]) == (
        "rejected",
        "failed",
        None,
        "refunded by operator",
    )


async def test_a_result_for_an_old_reference_is_dropped_and_the_new_one_followed(
    db: str, app: App, fake: FakeProvider
) -> None:
    fake.behaviour.latency = 0.5
    fake.set_script("OLD", Script.done("OLD-PIN"))
    fake.set_script("NEW", Script.done("NEW-PIN"))
    async with running(Daemon(settings_for(db, fake))):
        (order,) = await app.dispatch(["OLD"])
        await eventually(lambda: _polled(fake, "OLD"), what="the old reference to be asked")
        await app.conn.execute(
            "UPDATE product_orders SET provider_referans = 'NEW' WHERE id = %s", (order,)
        )
        await eventually(lambda: _finished(app), what="the order to finish")
    rows = await app.rows()
    assert rows["NEW"]["pinCode"] == "NEW-PIN"
    assert "OLD" not in rows


async def _polled(fake: FakeProvider, ref: str) -> bool:
    return fake.poll_count(ref) > 0


async def _stale_counted(daemon: Daemon) -> bool:
    return daemon.metrics.stale_results._value.get() >= 1


async def test_junk_notifications_change_nothing_and_crash_nothing(
    db: str, app: App, fake: FakeProvider
) -> None:
    junk = ["", " ", "not-a-uuid", "'; DROP TABLE product_orders; --", "x" * 7999, "1" * 36]
    with capture_logs() as logs:
        async with running(Daemon(settings_for(db, fake))) as daemon:
            for payload in junk:
                await app.conn.execute("SELECT pg_notify('order_monitor', %s)", (payload,))
            await app.dispatch(["after-junk"])
            await eventually(lambda: _finished(app), what="a real order to finish after the junk")
            rejected = daemon.metrics.notifications.labels("rejected")._value.get()
    assert rejected == len(junk)
    bad = [e for e in logs if e["event"] == "listener.bad_payload"]
    # One line per interval with a count, not a line each (tests/engine/test_bad_payloads.py).
    assert bad, "the first junk payload is reported at once"
    assert bad[0]["count"] == 1
    assert sum(e["count"] for e in bad) <= len(junk)
    assert all(len(e["example"]) <= 100 for e in bad)
    assert (await app.rows())["after-junk"]["externalStatus"] == "done"


async def test_a_flood_of_phantom_notifications_keeps_memory_bounded(
    db: str, app: App, fake: FakeProvider
) -> None:
    # First checks an hour away: a phantom that got onto the schedule would stay there.
    policy = replace(FAST_POLICY, initial_delay=3600.0, max_age=86400.0)
    phantoms = 50_000
    async with running(Daemon(settings_for(db, fake, policy=policy))) as daemon:
        assert daemon.confirmer is not None
        capacity = daemon.confirmer.inbox.capacity
        assert capacity < phantoms
        # Any login may NOTIFY: one statement, tens of thousands of made-up ids.
        await app.conn.execute(
            "SELECT pg_notify('order_monitor', gen_random_uuid()::text)"
            " FROM generate_series(1, %s)",
            (phantoms,),
        )
        (real,) = await app.dispatch(["real-after-the-flood"])
        counts = daemon.metrics.notifications

        def handled() -> float:
            return sum(counts.labels(r)._value.get() for r in ("not_in_flight", "dropped"))

        async def all_handled() -> bool:
            assert daemon.confirmer is not None
            # The real order came by NOTIFY or through the inbox table,
            # depending on the mode the flood left the daemon in. An empty
            # inbox is not enough: the last batch taken from it may still be
            # confirming, and the dropped ones are counted after it.
            return (
                counts.labels("accepted")._value.get() >= phantoms
                and len(daemon.confirmer.inbox) == 0
                and real.int in daemon.scheduler
                and handled() >= phantoms
            )

        await eventually(all_handled, what="every notification handled, the real order scheduled")
        # Every phantom was refused, and the real order too if the full inbox dropped
        # its notification (then the sweep found it).
        assert handled() in {phantoms, phantoms + 1}
        assert daemon.confirmer.inbox.high_water <= capacity
        assert len(daemon.scheduler) == 1  # the real order, and no phantom


async def test_transport_errors_reschedule_and_are_counted(
    db: str, app: App, fake: FakeProvider
) -> None:
    fake.behaviour = Behaviour(error_rate=0.3, garbage_rate=0.3)
    refs = [f"flaky-{n}" for n in range(200)]
    async with running(Daemon(settings_for(db, fake, batch_size=20))) as daemon:
        await app.dispatch(refs)
        await eventually(lambda: _finished(app), within=90, what="flaky orders to finish")
        errors = daemon.metrics.checks.labels("fake", "error")._value.get()
    assert errors > 0
    rows = await app.rows()
    assert {rows[r]["externalStatus"] for r in refs} == {"done"}
    assert all(rows[r]["pinCode"] == default_pin(r) for r in refs)


async def test_an_order_that_never_finishes_is_given_up_with_a_clear_message(
    db: str, app: App, fake: FakeProvider
) -> None:
    fake.set_script("STUCK", Script(Answer.PENDING))
    # Slots half a second apart: a check counts for the slot whose early window
    # (the last fifth of its gap) it falls in, so with slots 0.1 s apart a first
    # check 80 ms late (a daemon just started, a loaded CI machine) was slot
    # 2's, and the order was given up after 3 polls.
    policy = BackoffPolicy(
        initial_delay=0, base=0.5, cap=0.5, jitter=0, max_attempts=4, max_age=3600
    )
    async with running(Daemon(settings_for(db, fake, policy=policy))):
        await app.dispatch(["STUCK"])
        await eventually(lambda: _finished(app), what="the order to be given up")
    row = (await app.rows())["STUCK"]
    assert row["externalStatus"] == "manual_required"
    assert row["lastMessage"].startswith("order-monitor gave up")
    assert "max_attempts=4" in row["lastMessage"]
    assert fake.poll_count("STUCK") == 4


async def test_orders_dispatched_while_the_daemon_was_down_are_found_by_the_start_sweep(
    db: str, app: App, fake: FakeProvider
) -> None:
    await app.dispatch([f"early-{n}" for n in range(50)])
    async with running(Daemon(settings_for(db, fake))):
        await eventually(lambda: _finished(app), what="orders from before the start")


async def test_the_listen_connection_killed_repeatedly_misses_nothing(
    db: str, app: App, fake: FakeProvider
) -> None:
    # A sweep interval longer than the test: only notifications and the
    # reconnect sweeps can deliver the orders.
    settings = settings_for(db, fake, sweep_interval=3600.0)
    refs = []
    async with running(Daemon(settings)) as daemon:
        assert daemon.listener is not None
        for wave in range(8):
            wave_refs = [f"kill-{wave}-{n}" for n in range(25)]
            refs += wave_refs
            killed = await _kill(app, "listener")
            await app.dispatch(wave_refs)  # some land while the listener is away
            assert killed == 1
            await eventually(
                lambda w=wave: _reconnected(daemon, times=w + 1),  # type: ignore[misc]
                what=f"the listener to come back (wave {wave})",
            )
        await eventually(lambda: _finished(app), what="every order to finish")
        assert daemon.metrics.reconnects._value.get() >= 8
    rows = await app.rows()
    assert {rows[r]["externalStatus"] for r in refs} == {"done"}


async def _reconnected(daemon: Daemon, times: int) -> bool:
    """The listener noticed the kill, came back, and is listening again."""
    return (
        daemon.metrics.reconnects._value.get() >= times
        and daemon.listener is not None
        and daemon.listener.connected
    )


async def _kill(app: App, purpose: str) -> int:
    cursor = await app.conn.execute(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
        " WHERE datname = current_database() AND application_name LIKE %s",
        (f"%({purpose})",),
    )
    row = await cursor.fetchone()
    assert row is not None
    return int(row[0])


async def test_the_database_restarting_under_the_reader_and_writer_is_survived(
    db: str, app: App, fake: FakeProvider
) -> None:
    fake.behaviour.latency = 0.05
    async with running(Daemon(settings_for(db, fake))):
        await app.dispatch([f"blip-{n}" for n in range(100)])
        for _ in range(3):
            await _kill(app, "reader")
            await _kill(app, "writer")
            await asyncio.sleep(0.1)
        await eventually(lambda: _finished(app), what="orders to finish after connection kills")


async def test_a_hanging_provider_does_not_hold_up_another(
    db: str, app: App, fake: FakeProvider
) -> None:
    """The slow provider's requests hang for longer than the whole test; the fast
    provider's orders must all finish meanwhile."""
    base = settings_for(db, fake)
    (fast,) = base.providers
    slow = replace(
        fast,
        name="slow",
        provider_ids=("slow",),
        limits=replace(fast.limits, concurrency=4, read_timeout=120.0, connect_timeout=5.0),
    )
    # More hanging orders than one provider may have under way: the rest wait
    # for room, and must not take the fast provider's.
    hanging = [f"hang-{n}" for n in range(1000)]
    for ref in hanging:
        fake.set_script(ref, Script.hang())
    settings = replace(base, providers=(fast, slow), concurrency=12)
    assert checker_limits(settings).max_in_flight_per_provider < len(hanging)
    async with running(Daemon(settings)) as daemon:
        await app.dispatch(hanging, provider_id="slow")
        # Any of them: which go first is the jitter's choice.
        await eventually(
            lambda: _async(any(fake.poll_count(ref) for ref in hanging)),
            what="the slow provider to be asked",
        )
        await app.dispatch([f"quick-{n}" for n in range(1000)])
        await eventually(
            lambda: _finished_except(app, len(hanging)), within=60, what="the fast orders"
        )
        # Nothing of the slow provider's came back: its requests are still hanging.
        assert daemon.metrics.checks.labels("slow", "done")._value.get() == 0
        assert daemon.metrics.checks.labels("slow", "error")._value.get() == 0
    rows = await app.rows()
    assert all(rows[f"quick-{n}"]["externalStatus"] == "done" for n in range(1000))


async def _finished_except(app: App, left: int) -> bool:
    return await app.in_flight() == left


async def _answered_with_a_pin_the_table_refuses(
    app: App, fake: FakeProvider, reference: str
) -> None:
    """*reference* is done at once, with a PIN another application's CHECK refuses."""
    await app.conn.execute(
        """ALTER TABLE product_orders ADD CONSTRAINT no_bad_pin CHECK ("pinCode" <> 'BAD-PIN')"""
    )
    fake.set_script(reference, Script.done("BAD-PIN"))


async def test_a_row_the_database_refuses_does_not_block_the_batch(
    db: str, app: App, fake: FakeProvider
) -> None:
    await _answered_with_a_pin_the_table_refuses(app, fake, "refused")
    refs = [f"fine-{n}" for n in range(30)]
    with capture_logs() as logs:
        async with running(Daemon(settings_for(db, fake))):
            await app.dispatch([*refs, "refused"])
            await eventually(lambda: _finished_except(app, 1), what="the fine orders")
            await eventually(lambda: _logged(logs, "writer.row_rejected"), what="the rejection")
    rejected = [e for e in logs if e["event"] == "writer.row_rejected"]
    assert {e["order_id"] for e in rejected} == {str((await app.rows())["refused"]["id"])}
    assert "no_bad_pin" in rejected[0]["error"]
    # The error names the rule, but not the refused row's values (its PIN).
    assert "BAD-PIN" not in repr(rejected)
    rows = await app.rows()
    assert all(rows[r]["externalStatus"] == "done" for r in refs)


async def test_orders_dispatched_apart_share_a_batched_providers_requests(
    db: str, app: App, fake: FakeProvider
) -> None:
    # Ten orders dispatched 20 ms apart (by "sentAt": the schedule's clock,
    # so the spacing does not depend on how fast this machine inserts), each
    # pending for two more slots. Without coalescing each of those slots is
    # ten requests; with it, the first order due takes the others along,
    # since their slots are open (a tenth of the 2 s gap before them). No
    # jitter, so which slot is open when does not depend on the ids drawn.
    refs = [f"apart-{i}" for i in range(10)]
    for ref in refs:
        fake.set_script(ref, Script.done("PIN", after=2))
    policy = BackoffPolicy(
        initial_delay=0.0, base=2.0, cap=2.0, jitter=0.0, max_attempts=10, max_age=3600
    )
    daemon = Daemon(settings_for(db, fake, policy=policy))
    async with running(daemon):
        await app.conn.execute(
            """INSERT INTO product_orders (provider_referans, "providerId", "externalStatus", "sentAt")
               SELECT ref, 'fake', 'sent', now() - make_interval(secs => 0.02 * (10 - n))
               FROM unnest(%s::text[]) WITH ORDINALITY AS r(ref, n)""",
            (refs,),
        )
        await eventually(lambda: _finished(app), what="the ten orders to finish")
    # Still one check per slot for each order, never an extra one.
    assert {ref: fake.poll_count(ref) for ref in refs} == dict.fromkeys(refs, 3)
    # The first checks in one request (one commit), then about one a slot
    # (two when a slot's orders straddle a request that had just gone out).
    assert fake.requests_total <= 1 + 2 * 2
    pulled = daemon.metrics.registry.get_sample_value(
        "order_monitor_checks_pulled_forward_total", {"provider": "fake"}
    )
    assert pulled is not None
    assert pulled >= 2 * (len(refs) - 2)


async def test_a_refused_row_counts_against_the_policy_and_is_given_up(
    db: str, app: App, fake: FakeProvider
) -> None:
    await _answered_with_a_pin_the_table_refuses(app, fake, "refused")
    # Gaps of 0.2 s and more: a slot's early window (a tenth of its gap) then
    # dwarfs a loaded machine's query jitter, which this exact count would
    # otherwise also measure.
    policy = replace(FAST_POLICY, base=0.2, max_attempts=4)
    with capture_logs() as logs:
        async with running(Daemon(settings_for(db, fake, policy=policy))):
            await app.dispatch(["refused"])
            await eventually(lambda: _finished(app), what="the refused order to be given up")
    row = (await app.rows())["refused"]
    assert row["externalStatus"] == "manual_required"
    assert row["pinCode"] is None
    assert "database refused to store the provider's done answer" in row["lastMessage"]
    assert "no_bad_pin" in row["lastMessage"]
    # Checked once per slot of the policy, never more: refusals are not retried in a loop.
    assert fake.poll_count("refused") == policy.max_attempts
    assert sum(e["event"] == "writer.row_rejected" for e in logs) == policy.max_attempts


async def test_a_notification_during_a_refused_check_brings_no_extra_check(
    db: str, app: App, fake: FakeProvider
) -> None:
    # The race CI once met by chance, made certain: while each refused check
    # is out, the row is offered again with the reference the check used, as
    # the confirmer does when the order's notification lands after a sweep
    # already scheduled it. A refusal writes nothing, so the row still reads
    # as due at once; that offer is news of nothing and must not add a check
    # right after the refusal.
    await _answered_with_a_pin_the_table_refuses(app, fake, "refused")
    policy = replace(FAST_POLICY, base=0.2, max_attempts=3)
    daemon = Daemon(settings_for(db, fake, policy=policy))
    offered_in_flight: list[bool] = []
    async with running(daemon):
        writer = daemon.writer
        assert writer is not None
        flush = writer.flush

        async def offered_again_first(batch: list[Decision]) -> None:
            for decision in batch:
                if decision.kind == "done":
                    order = decision.row.id.int
                    daemon.scheduler.offer(
                        order, time.monotonic(), reference=decision.row.reference
                    )
                    offered_in_flight.append(daemon.scheduler.due_in(order) is None)
            await flush(batch)

        writer.flush = offered_again_first  # type: ignore[method-assign]
        await app.dispatch(["refused"])
        await eventually(lambda: _finished(app), what="the refused order to be given up")
    assert offered_in_flight == [True] * policy.max_attempts
    assert fake.poll_count("refused") == policy.max_attempts


async def test_a_value_that_cannot_even_be_sent_is_that_rows_rejection_only(
    db: str, app: App, fake: FakeProvider
) -> None:
    refs = [f"fine-{n}" for n in range(20)]
    for ref in [*refs, "hostile"]:
        fake.set_script(ref, Script.done())
    policy = replace(FAST_POLICY, max_attempts=2)
    with capture_logs() as logs:
        async with running(Daemon(settings_for(db, fake, policy=policy))) as daemon:
            writer = daemon.writer
            assert writer is not None
            submit = writer.submit

            def past_every_parser(decision: Decision) -> None:
                # The adapters' sanitising never lets such a value through; the
                # writer must still survive one (a future adapter's bug).
                if decision.row.reference == "hostile" and decision.kind == "done":
                    decision = replace(decision, pin="AB\ud800CD")
                submit(decision)

            writer.submit = past_every_parser  # type: ignore[method-assign]
            await app.dispatch([*refs, "hostile"])
            await eventually(lambda: _finished(app), what="every order to end")
    rows = await app.rows()
    assert all(rows[r]["externalStatus"] == "done" for r in refs)
    assert rows["hostile"]["externalStatus"] == "manual_required"
    rejected = [e for e in logs if e["event"] == "writer.row_rejected"]
    assert {e["order_id"] for e in rejected} == {str(rows["hostile"]["id"])}
    assert rejected[0]["error"] == "UnicodeEncodeError"


class BrokenOnce:
    """A provider with a bug that bites once: the engine must not strand its orders."""

    name = "fake"
    batch_size = 50

    def __init__(self, inner: Provider) -> None:
        self.inner = inner
        self.calls = 0

    async def check(self, orders: Sequence[OrderRef]) -> dict[uuid.UUID, Outcome]:
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError("a bug in an adapter")
        return await self.inner.check(orders)


def _swept_once(daemon: Daemon) -> Callable[[], Awaitable[bool]]:
    async def swept() -> bool:
        sweeper = daemon.sweeper
        return sweeper is not None and sweeper.last_completed is not None

    return swept


class FailsOnceScheduler(Scheduler):
    """A schedule with a bug that bites the first order offered to it."""

    def __init__(self) -> None:
        super().__init__()
        self.failed = False

    def offer(self, order: int, due: float, **options: Any) -> bool:
        if not self.failed:
            self.failed = True
            raise RuntimeError("a bug in the schedule")
        return super().offer(order, due, **options)


async def test_an_unexpected_error_confirming_a_notification_loses_no_order(
    db: str, app: App, fake: FakeProvider
) -> None:
    fake.set_script("R-confirm", Script.done("PIN-1"))
    daemon = Daemon(settings_for(db, fake))
    daemon.scheduler = FailsOnceScheduler()
    with capture_logs() as logs:
        async with running(daemon):
            # The sweep the listener's connection asks for must be over first:
            # were the order committed before it reads, the sweep's offer would
            # be the first, and the bug would bite the sweep, not the confirmer.
            await eventually(_swept_once(daemon), what="the first sweep")
            await app.dispatch(["R-confirm"])
            await eventually(lambda: _finished(app), what="the order to be found by a sweep")
    assert daemon.scheduler.failed
    # Notified while idle, or read while busy (the daemon starts busy).
    assert any(
        e["event"] in {"listener.confirm_unexpected_error", "handoff.schedule_unexpected_error"}
        for e in logs
    )
    assert (await app.rows())["R-confirm"]["externalStatus"] == "done"


async def test_an_unexpected_error_in_a_check_strands_no_order(
    db: str, app: App, fake: FakeProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    def factory(*args: Any) -> dict[str, Provider]:
        return {pid: BrokenOnce(p) for pid, p in build_providers(*args).items()}

    monkeypatch.setattr(checker_module, "RETRY_AFTER_BUG", 0.1)
    with capture_logs() as logs:
        async with running(Daemon(settings_for(db, fake), provider_factory=factory)):
            await app.dispatch(["survivor"])
            await eventually(lambda: _finished(app), what="the order after the bug")
    assert any(e["event"] == "checker.unexpected_error" for e in logs)
    assert (await app.rows())["survivor"]["externalStatus"] == "done"


async def _logged(logs: list[dict[str, Any]], event: str) -> bool:
    return any(e["event"] == event for e in logs)


async def test_orders_waiting_for_room_at_a_busy_provider_are_polled_once(
    db: str, app: App, fake: FakeProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A provider at its cap makes the rest wait; when room frees up they go,
    once each, and none is pulled forward again for a second poll."""
    monkeypatch.setattr(
        assembly_module,
        "checker_limits",
        lambda settings: CheckerLimits(
            batch_size=10, max_in_flight=50, max_in_flight_per_provider=2
        ),
    )
    # The fallback comes round before a check finishes: the case where an
    # order could go ahead by the fallback and then be pulled forward again.
    monkeypatch.setattr(checker_module, "DEFER_BUSY", 0.2)
    fake.behaviour.latency = 0.7
    refs = [f"slowpoke-{n}" for n in range(10)]
    for ref in refs:
        fake.set_script(ref, Script.pending())
    # After the first check the next slot is a minute away: any second poll
    # during the test is a duplicate.
    policy = BackoffPolicy(initial_delay=0, base=60, cap=60, jitter=0, max_attempts=5, max_age=3600)
    async with running(Daemon(settings_for(db, fake, policy=policy))) as daemon:
        await app.dispatch(refs)
        await eventually(
            lambda: _all_polled_and_settled(daemon, fake, refs), what="every order checked once"
        )
    assert {ref: fake.poll_count(ref) for ref in refs} == dict.fromkeys(refs, 1)


async def _all_polled_and_settled(daemon: Daemon, fake: FakeProvider, refs: list[str]) -> bool:
    return all(fake.poll_count(r) >= 1 for r in refs) and daemon.scheduler.in_flight == 0


async def _async(value: bool) -> bool:
    return value
