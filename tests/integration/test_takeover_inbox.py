"""Across a takeover under load, no order's first check waits for the next sweep.

Two daemons; orders arrive at about 60 a second (so the leader is busy and
they come through the inbox); the leader's lock session is terminated half
way. Both run with the production lock check (every 5 s): before the inbox
was read on the lock's own session, the old leader kept emptying the inbox
until that check, and every id it took died with its engine: about a tenth of
the orders waited for the next sweep (here a minute, in production five).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import replace

from order_monitor.daemon import Daemon
from order_monitor.ops.leader import LEADER
from order_monitor.providers.fake import FakeProvider
from tests.daemon_fixtures import App, eventually, running, settings_for

#: The first check is due this long after dispatch (production: 60 s), so an
#: order the old leader took but had not checked yet when it stopped is lost
#: to it: only the sweep, or the new leader, can still find it.
INITIAL_DELAY = 3.0
#: The most an order may wait beyond that: the standby's poll, its start-up
#: sweep, a loaded test machine.
FIRST_CHECK_WITHIN = INITIAL_DELAY + 5.0


async def test_no_order_waits_for_the_sweep_across_a_takeover(
    db: str, app: App, fake: FakeProvider
) -> None:
    # sweep_interval 60 s: an order left to the sweep shows.
    settings = settings_for(db, fake)
    settings = replace(settings, policy=replace(settings.policy, initial_delay=INITIAL_DELAY))
    dispatched: dict[str, float] = {}
    async with (
        running(Daemon(settings, lock_poll=0.2)) as first,
        running(Daemon(settings, lock_poll=0.2)) as second,
    ):
        assert first.role == LEADER

        async def dispatch(batches: int) -> None:
            for _ in range(batches):
                refs = [f"o-{uuid.uuid4().hex[:12]}" for _ in range(5)]
                await app.dispatch(refs)
                now = time.time()
                dispatched.update(dict.fromkeys(refs, now))
                await asyncio.sleep(0.08)

        await dispatch(30)
        assert first._lock.backend_pid is not None
        await app.conn.execute("SELECT pg_terminate_backend(%s)", (first._lock.backend_pid,))
        # Past the old leader's lock check (5 s): it stops by then at the latest.
        await dispatch(70)
        await eventually(lambda: _someone_leads(first, second), what="a leader")
        await eventually(
            lambda: _all_checked(fake, dispatched), within=75, what="every order checked"
        )

    late = {
        ref: round(fake.polls(ref)[0] - at, 1)
        for ref, at in dispatched.items()
        if fake.polls(ref)[0] - at > FIRST_CHECK_WITHIN
    }
    assert late == {}, f"{len(late)} of {len(dispatched)} orders checked late: {late}"


async def _someone_leads(*daemons: Daemon) -> bool:
    return any(d.role == LEADER for d in daemons)


async def _all_checked(fake: FakeProvider, dispatched: dict[str, float]) -> bool:
    return all(fake.poll_count(ref) > 0 for ref in dispatched)
