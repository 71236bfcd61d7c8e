"""The heap of pending checks: timing tested with plain numbers, no clock, no sleep."""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from order_monitor.engine.scheduler import Scheduler


def test_pops_only_what_is_due_earliest_first() -> None:
    s = Scheduler()
    s.offer(1, 30.0)
    s.offer(2, 10.0)
    s.offer(3, 20.0)
    assert s.pop_due(now=25.0, limit=10) == [2, 3]
    assert s.pop_due(now=25.0, limit=10) == []
    assert s.next_due() == 30.0


def test_limit_bounds_a_batch() -> None:
    s = Scheduler()
    for order in range(10):
        s.offer(order, 0.0)
    assert len(s.pop_due(now=1.0, limit=4)) == 4
    assert s.scheduled == 6
    assert s.in_flight == 4


def test_offering_twice_keeps_one_entry_at_the_earlier_time() -> None:
    s = Scheduler()
    s.offer(1, 50.0)
    s.offer(1, 20.0)
    s.offer(1, 80.0)
    assert len(s) == 1
    assert s.pop_due(now=100.0, limit=10) == [1]
    assert s.pop_due(now=100.0, limit=10) == []


def test_offer_reports_when_the_head_moved_earlier() -> None:
    s = Scheduler()
    assert s.offer(1, 50.0) is True
    assert s.offer(2, 60.0) is False
    assert s.offer(3, 40.0) is True
    assert s.offer(3, 45.0) is False


def test_an_order_in_flight_is_not_handed_out_twice() -> None:
    s = Scheduler()
    s.offer(1, 0.0)
    assert s.pop_due(now=1.0, limit=10) == [1]
    s.offer(1, 0.5)  # a sweep or notification sees it again meanwhile
    assert s.pop_due(now=1.0, limit=10) == []
    s.complete(1, next_due=100.0)
    # The offer made during the check is kept: it may be a new reference.
    assert s.due_in(1) == 0.5


def test_an_offer_that_read_the_reference_being_checked_brings_no_second_check() -> None:
    # The race that polled an order twice: a sweep schedules a new order, the
    # checker takes it, and its notification, confirmed from a read made just
    # before the check's own, offers it again while it is being checked.
    s = Scheduler()
    s.offer(1, 0.0, reference="R1")
    assert s.pop_due(now=0.0, limit=10) == [1]
    s.offer(1, 0.0, reference="R1")
    s.complete(1, next_due=60.0, checked="R1")
    assert s.due_in(1) == 60.0  # its next slot, not a second check now


def test_an_offer_naming_another_reference_is_checked_when_the_check_ends() -> None:
    # Dispatched again while a check of the old reference was under way.
    s = Scheduler()
    s.offer(1, 0.0, reference="R1")
    assert s.pop_due(now=0.0, limit=10) == [1]
    s.offer(1, 5.0, reference="R2")
    s.complete(1, next_due=60.0, checked="R1")
    assert s.due_in(1) == 5.0


def test_offers_that_disagree_while_in_flight_are_kept() -> None:
    s = Scheduler()
    s.offer(1, 0.0)
    assert s.pop_due(now=0.0, limit=10) == [1]
    s.offer(1, 7.0, reference="R2")
    s.offer(1, 9.0, reference="R1")
    s.complete(1, next_due=60.0, checked="R1")
    assert s.due_in(1) == 7.0  # R2 was news, whatever came after it


def test_complete_without_next_due_drops_the_order() -> None:
    s = Scheduler()
    s.offer(1, 0.0)
    s.pop_due(now=1.0, limit=10)
    s.complete(1, next_due=None)
    assert 1 not in s
    assert len(s) == 0


def test_forget_removes_scheduled_and_in_flight_orders() -> None:
    s = Scheduler()
    s.offer(1, 0.0)
    s.offer(2, 5.0)
    s.pop_due(now=1.0, limit=1)
    s.forget(1)
    s.forget(2)
    assert len(s) == 0
    assert s.pop_due(now=10.0, limit=10) == []


def test_lag_is_the_age_of_the_most_overdue_check() -> None:
    s = Scheduler()
    assert s.lag(now=100.0) == 0.0
    s.offer(1, 40.0)
    s.offer(2, 90.0)
    assert s.lag(now=100.0) == 60.0
    assert s.lag(now=10.0) == 0.0


def test_superseded_entries_do_not_grow_the_heap_without_bound() -> None:
    s = Scheduler()
    for round_ in range(200):
        for order in range(50):
            s.offer(order, 1_000_000.0 - round_)
    assert s.entries["heap"] <= 2 * len(s) + 1024


def test_an_open_order_of_the_group_joins_a_request_early() -> None:
    s = Scheduler()
    s.offer(1, 0.0)
    assert s.pop_due(now=0.0, limit=10) == [1]
    s.complete(1, 100.0, group="barakat", opens=90.0)
    s.offer(2, 0.0)
    assert s.pop_due(now=0.0, limit=10) == [2]
    s.complete(2, 200.0, group="barakat", opens=180.0)
    assert s.pull_open("barakat", now=89.0, limit=10) == []  # not open yet
    assert s.pull_open("znet", now=95.0, limit=10) == []  # another provider's request
    assert s.pull_open("barakat", now=95.0, limit=10) == [(1, 100.0)]
    assert s.in_flight == 1
    assert s.pop_due(now=150.0, limit=10) == []  # taken already: not handed out twice
    assert s.next_due() == 200.0


def test_an_order_checked_or_moved_since_is_not_pulled() -> None:
    s = Scheduler()
    for order in (1, 2):
        s.offer(order, 0.0)
    s.pop_due(now=0.0, limit=10)
    s.complete(1, 100.0, group="g", opens=90.0)
    s.complete(2, 100.0, group="g", opens=90.0)
    assert s.pop_due(now=100.0, limit=1) == [1]  # due and checked the usual way
    s.offer(2, 50.0)  # a new reference: checked at 50 instead
    assert s.pull_open("g", now=95.0, limit=10) == []
    assert s.pop_due(now=50.0, limit=10) == [2]


def test_a_requeued_offer_wins_over_a_later_pull_entry() -> None:
    s = Scheduler()
    s.offer(1, 0.0)
    s.pop_due(now=0.0, limit=10)
    s.offer(1, 5.0)  # while in flight
    s.complete(1, 100.0, group="g", opens=90.0)
    assert s.due_in(1) == 5.0
    assert s.pull_open("g", now=95.0, limit=10) == []


def test_stale_pull_entries_do_not_grow_without_bound() -> None:
    s = Scheduler()
    for round_ in range(100):
        for order in range(50):
            if order in s and s.due_in(order) is not None:
                s.offer(order, -1.0)
                s.pop_due(now=0.0, limit=100)
            else:
                s.offer(order, 0.0)
                s.pop_due(now=0.0, limit=100)
            s.complete(order, 1e6 - round_, group="g", opens=1e6 - round_ - 1)
    assert s.entries["open"] <= 2 * len(s) + 1024


def test_checks_with_no_room_to_pull_leave_memory_bounded_by_the_orders() -> None:
    # The reproduction, smaller: a batched provider whose requests
    # are always full, so pull_open is never called, and every completed
    # check pushed an open entry that nothing removed (600,000 checks over
    # 20,000 orders held 620,000 of them).
    orders, rounds, slack = 2_000, 30, 64
    s = Scheduler(slack=slack)
    for order in range(orders):
        s.offer(order, 0.0)
    now = 0.0
    for _ in range(rounds):
        now += 10.0
        for order in s.pop_due(now, limit=orders):
            s.complete(order, now + 5.0, group="barakat", opens=now + 1.0)
    assert len(s) == orders
    for name, size in s.entries.items():
        assert size <= 2 * orders + slack, (name, size)


def test_forgotten_orders_do_not_stay_in_the_heaps() -> None:
    s = Scheduler(slack=16)
    for order in range(1_000):
        s.offer(order, 1e6, group="g", opens=1e6 - 1)  # far in the future: never popped
    for order in range(1_000):
        s.forget(order)
    assert len(s) == 0
    assert s.entries["heap"] <= 16
    assert s.entries["open"] <= 16


def test_an_order_rescheduled_at_the_same_due_time_in_another_group_is_not_pulled_by_the_old() -> (
    None
):
    # Liveness by value made the old group's entry live again: its provider
    # changed, yet a request to the old provider could take it.
    s = Scheduler()
    s.offer(1, 0.0)
    assert s.pop_due(now=0.0, limit=10) == [1]
    s.complete(1, 100.0, group="a", opens=90.0)
    assert s.pop_due(now=100.0, limit=10) == [1]
    s.complete(1, 100.0, group="b", opens=95.0)
    assert s.pull_open("a", now=99.0, limit=10) == []
    assert s.pull_open("b", now=99.0, limit=10) == [(1, 100.0)]


class SchedulerMachine(RuleBasedStateMachine):
    """Random offers, pops and completions against a plain model of the schedule."""

    #: Small, so that the machine's short runs go through compactions.
    SLACK = 4

    def __init__(self) -> None:
        super().__init__()
        self.s = Scheduler(slack=self.SLACK)
        self.model: dict[int, float] = {}
        self.flying: set[int] = set()
        #: Offers made while in flight: the earliest due, and the reference
        #: they agree on (None when none was given or they disagree).
        self.requeued: dict[int, tuple[float, str | None]] = {}
        #: The (group, opens) of orders pull_open may take.
        self.pullable: dict[int, tuple[str, float]] = {}
        self.now = 0.0

    @rule(
        order=st.integers(0, 20),
        # A few fixed values too: orders rescheduled at the very same time.
        due=st.floats(0, 100, allow_nan=False) | st.sampled_from([10.0, 50.0]),
        reference=st.none() | st.sampled_from(["R1", "R2"]),
    )
    def offer(self, order: int, due: float, reference: str | None) -> None:
        self.s.offer(order, due, reference=reference)
        if order in self.flying:
            previous = self.requeued.get(order)
            if previous is None:
                self.requeued[order] = (due, reference)
            else:
                agreed = reference if reference == previous[1] else None
                self.requeued[order] = (min(due, previous[0]), agreed)
        elif order not in self.model or due < self.model[order]:
            self.model[order] = due
            self.pullable.pop(order, None)

    @rule(step=st.floats(0, 30, allow_nan=False), limit=st.integers(1, 5))
    def pop(self, step: float, limit: int) -> None:
        self.now += step
        taken = self.s.pop_due(self.now, limit)
        assert len(taken) <= limit
        assert len(set(taken)) == len(taken)
        dues = [self.model[o] for o in taken]
        assert dues == sorted(dues)
        for order in taken:
            assert self.model[order] <= self.now
            del self.model[order]
            self.pullable.pop(order, None)
            self.flying.add(order)
        remaining_due = [d for d in self.model.values() if d <= self.now]
        assert len(taken) == limit or not remaining_due

    @precondition(lambda self: self.flying)
    @rule(
        data=st.data(),
        next_due=st.none() | st.floats(0, 200, allow_nan=False) | st.sampled_from([10.0, 50.0]),
        group=st.none() | st.sampled_from(["a", "b"]),
        early=st.floats(0, 20, allow_nan=False),
        checked=st.none() | st.sampled_from(["R1", "R2"]),
    )
    def complete(
        self,
        data: st.DataObject,
        next_due: float | None,
        group: str | None,
        early: float,
        checked: str | None,
    ) -> None:
        order = data.draw(st.sampled_from(sorted(self.flying)))
        opens = None if next_due is None else next_due - early
        self.s.complete(order, next_due, group=group, opens=opens, checked=checked)
        self.flying.discard(order)
        offered = self.requeued.pop(order, None)
        # An offer that read the reference the check was made with is no news.
        news = offered is not None and (offered[1] is None or offered[1] != checked)
        requeued = offered[0] if offered is not None and news else None
        if requeued is not None and (next_due is None or requeued < next_due):
            self.model[order] = requeued
        elif next_due is not None:
            self.model[order] = next_due
            if group is not None and opens is not None:
                self.pullable[order] = (group, opens)

    @rule(group=st.sampled_from(["a", "b"]), limit=st.integers(1, 5))
    def pull(self, group: str, limit: int) -> None:
        taken = self.s.pull_open(group, self.now, limit)
        assert len(taken) <= limit
        opened = [self.pullable[order][1] for order, _ in taken]
        assert opened == sorted(opened)
        for order, due in taken:
            assert self.pullable.pop(order) == (group, opened.pop(0))
            assert self.model.pop(order) == due
            self.flying.add(order)
        still_open = [o for o, (g, at) in self.pullable.items() if g == group and at <= self.now]
        assert len(taken) == limit or not still_open

    @rule(order=st.integers(0, 20))
    def forget(self, order: int) -> None:
        self.s.forget(order)
        self.model.pop(order, None)
        self.flying.discard(order)
        self.requeued.pop(order, None)
        self.pullable.pop(order, None)

    @invariant()
    def agrees_with_the_model(self) -> None:
        assert len(self.s) == len(self.model) + len(self.flying)
        assert self.s.scheduled == len(self.model)
        assert self.s.in_flight == len(self.flying)
        assert self.s.next_due() == (min(self.model.values()) if self.model else None)
        for order, due in self.model.items():
            assert self.s.due_in(order) == due

    @invariant()
    def memory_follows_the_live_orders(self) -> None:
        # Every structure, dead entries included, stays within twice the
        # orders held plus a constant, whatever the sequence of operations.
        live = len(self.model) + len(self.flying)
        for name, size in self.s.entries.items():
            assert size <= 2 * live + self.SLACK, (name, size, live)


SchedulerMachine.TestCase.settings = settings(max_examples=200, stateful_step_count=100)
TestSchedulerMachine = SchedulerMachine.TestCase
