"""The relay: delivers the outbox's entries to the application, on the leader only.

Runs in the engine's task group beside the writer, so only the instance
holding the leader lock delivers; a standby that takes over starts where the
outbox stands (the entries are rows, not memory). It works in rounds: wait
for a wake-up (the writer wrote a result whose outcome an action delivers)
or the next entry falling due (polled at least every ``poll_interval``, for
a takeover and the retries); take the due entries; per action build the
requests (``delivery.requests``), send them through the action's sender
(``delivery.sender``: its concurrency, rate, breaker, Retry-After), read
each answer (``delivery.answers``) and settle every entry it carried, as
soon as that answer is in (a request held for its whole timeout holds back
nothing but its own entries):

* DELIVERED: deleted (the latency histogram observes recorded → taken);
* TAKEN: the row's status is read back; it confirms (the action's
  ``confirm_status``) → deleted, else REJECTED;
* RETRY: again after ``retry_delay(tries)`` (or the Retry-After), until the
  action's ``max_age`` from when the result was written, then a dead letter;
* AUTH: again after ``AUTH_RETRY``, not counted, never a dead letter; one
  request of the action at a time (a probe) until one is accepted again;
  said once per phase (error log, ``order_monitor_delivery_auth_failing``);
* REJECTED: counted; a dead letter at the action's ``attempts``.

At least once: an entry is deleted only after its answer, so a request cut
off by a kill, a stop or a lost lock is sent again by whoever leads next,
with the same delivery id (the idempotency key). That is why abandoning
requests under way is always safe.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
import uuid
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Final

import psycopg

from order_monitor.config import ActionConfig
from order_monitor.db import CONNECTION_ERRORS, AsyncConn, ManagedConnection
from order_monitor.delivery.answers import interpret
from order_monitor.delivery.backoff import AUTH_RETRY, expired, retry_delay
from order_monitor.delivery.model import Answer, Entry, Verdict
from order_monitor.delivery.requests import Request, build_requests
from order_monitor.delivery.sender import ActionSender, Deferred, Sent
from order_monitor.delivery.store import OutboxStore, Reschedule
from order_monitor.logs import get_logger
from order_monitor.metrics import Metrics
from order_monitor.ops.installed import MISSING_ERRORS, InstallHealth
from order_monitor.providers.base import bounded, clean_str
from order_monitor.redaction import prepare_secrets, scrub_prepared

log = get_logger()

#: Ids named in one log line at most.
_LOGGED_IDS: Final = 20
#: The relay's lock_timeout (a round that meets a lock waits at most this long).
LOCK_TIMEOUT: Final = "2s"
#: Longest error text kept in the outbox and the log.
_MAX_ERROR: Final = 500


@dataclass(frozen=True, slots=True)
class RelayTiming:
    """The relay's pace; the defaults are production's, tests shorten them."""

    #: The outbox is looked at least this often (a takeover, retries falling due).
    poll_interval: float = 5.0
    #: The gauges (undelivered, their age, dead letters) are read this often at most.
    summary_interval: float = 5.0
    #: A delivery refused for its credentials waits this long.
    auth_retry: float = AUTH_RETRY
    #: Multiplies every backoff delay (tests: a run of seconds).
    retry_scale: float = 1.0
    #: Entries taken per round at most.
    batch: int = 1000
    #: Longest wait after the database failed (the first is shorter).
    max_database_wait: float = 30.0


@dataclass(slots=True)
class _Settled:
    """What one answer (or a deferral, or the waiting behind a probe) decided for its entries."""

    delivered: list[Entry] = field(default_factory=list)
    #: TAKEN by the answer, waiting for the row's status to confirm it.
    to_confirm: list[tuple[Entry, ActionConfig]] = field(default_factory=list)
    reschedule: list[Reschedule] = field(default_factory=list)
    bury: list[tuple[uuid.UUID, str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.delivered) + len(self.to_confirm) + len(self.reschedule) + len(self.bury)


def utc_now() -> datetime:
    return datetime.now(UTC)


class Relay:
    """Delivers the outbox (see the module's docstring); one per leadership term."""

    def __init__(
        self,
        conn: ManagedConnection,
        store: OutboxStore,
        actions: Sequence[ActionConfig],
        senders: Mapping[str, ActionSender],
        *,
        metrics: Metrics,
        timing: RelayTiming | None = None,
        health: InstallHealth | None = None,
        now: Callable[[], datetime] = utc_now,
        wall: Callable[[], float] = time.time,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._conn = conn
        self._store = store
        self._actions = tuple(actions)
        # One action per outcome (the settings refuse two): looked up per entry.
        self._by_outcome = {o: action for action in self._actions for o in action.outcomes}
        self._senders = senders
        self._metrics = metrics
        self.timing = timing or RelayTiming()
        self._health = health or InstallHealth()
        self._now = now
        self._wall = wall
        self._clock = clock
        self._wake = asyncio.Event()
        self._stopping = False
        #: Actions whose credentials the application refuses, until one request passes.
        self._auth_failing: set[str] = set()
        #: Outcomes met without an action, already logged.
        self._orphans_logged: set[str] = set()
        self._next_summary = -math.inf
        self._database_failures = 0
        self._configured: AsyncConn | None = None
        #: Rounds completed (tests and the operator's status read it).
        self.rounds = 0
        #: Each action's secret values, for scrubbing what the application answers.
        self._hidden = {
            action.name: prepare_secrets(s.reveal() for s in action.secrets.values())
            for action in self._actions
        }
        for action in self._actions:
            metrics.action_series(action.name)

    # --- control ------------------------------------------------------------------

    def wake(self) -> None:
        """Look at the outbox now: the writer recorded a delivery."""
        self._wake.set()

    def stop(self) -> None:
        """Finish the round under way, then make :meth:`run` return."""
        self._stopping = True
        self._wake.set()

    @property
    def auth_failing(self) -> frozenset[str]:
        """Names of the actions whose credentials are refused right now."""
        return frozenset(self._auth_failing)

    async def _connection(self) -> AsyncConn:
        """The relay's connection, with its lock_timeout (set again on a new one).

        A lock on an outbox row (an operator's requeue under way) or on the
        outbox itself must not hold the relay forever: past the timeout the
        round fails like any database error, and is tried again.
        """
        conn = await self._conn.get()
        if conn is not self._configured:
            await conn.execute(
                "SELECT pg_catalog.set_config('lock_timeout', %s, false)", (LOCK_TIMEOUT,)
            )
            self._configured = conn
        return conn

    # --- the loop -----------------------------------------------------------------

    async def run(self) -> None:
        try:
            while not self._stopping:
                self._wake.clear()
                wait = await self._turn()
                if self._stopping:
                    return
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), wait)
        finally:
            # Not leading any more: what the next leader reads is the truth.
            for action in self._actions:
                self._metrics.delivery_auth_failing.labels(action.name).set(0)

    async def _turn(self) -> float:
        """One round and the gauges; the seconds to wait before the next round."""
        try:
            settled, taken = await self.deliver_due()
            await self._refresh_summary()
            wait = await self._next_wait(settled, taken)
        except psycopg.OperationalError as exc:
            return await self._database_failed(exc)
        except CONNECTION_ERRORS as exc:
            if isinstance(exc, MISSING_ERRORS):
                # The outbox (or our grant on it) is gone: an uninstall under
                # a running daemon. Said once, on /readyz too; looked at again.
                self._health.missing("outbox", _database_error(exc))
                return self.timing.poll_interval
            return await self._database_failed(exc)
        except Exception:
            # A bug (or an entry nothing can make sense of) must not take the
            # daemon down and again at every restart: say so loudly, go on.
            log.exception("delivery.unexpected_error", retry_in_s=self.timing.poll_interval)
            return self.timing.poll_interval
        self._database_failures = 0
        self._health.present("outbox")
        return wait

    async def _database_failed(self, exc: BaseException) -> float:
        await self._conn.reset()
        self._database_failures += 1
        wait = min(0.5 * 2.0 ** (self._database_failures - 1), self.timing.max_database_wait)
        log.error(
            "delivery.database_failed",
            error=_database_error(exc),
            retry_in_s=wait,
            note="the entries stay in the outbox; a request already sent is sent again",
        )
        return wait

    async def _next_wait(self, settled: int, taken: int) -> float:
        poll = self.timing.poll_interval
        if taken and not settled:
            # Every due entry was left where it is (no action for it): wait
            # for a wake-up or the poll, not a hot loop over the same rows.
            return poll
        due_in = await self._store.next_due_in(await self._connection())
        return poll if due_in is None else min(poll, max(0.0, due_in))

    async def _refresh_summary(self) -> None:
        now = self._clock()
        if now < self._next_summary:
            return
        self._next_summary = now + self.timing.summary_interval
        summary = await self._store.summary(await self._connection())
        self._metrics.undelivered.set(summary.undelivered)
        self._metrics.undelivered_age.set(summary.oldest_undelivered_age or 0.0)
        self._metrics.dead_letters.set(summary.dead)

    # --- one round ----------------------------------------------------------------

    async def deliver_due(self) -> tuple[int, int]:
        """Deliver what is due now; (entries settled, entries taken from the outbox)."""
        conn = await self._connection()
        entries = await self._store.due(conn, self.timing.batch)
        self.rounds += 1
        if not entries:
            return 0, 0
        groups: dict[str, tuple[ActionConfig, list[Entry]]] = {}
        for entry in entries:
            action = self.action_for(entry.outcome)
            if action is None:
                self._orphan(entry)
                continue
            groups.setdefault(action.name, (action, []))[1].append(entry)
        settled: list[int] = []
        try:
            async with asyncio.TaskGroup() as group:
                for action, batch in groups.values():
                    group.create_task(self._deliver(action, batch, settled))
        except BaseExceptionGroup as failed:
            # The round's caller tells a database error from a bug by its
            # class: hand it the first one, not the group.
            raise _first(failed) from None
        return sum(settled), len(entries)

    def action_for(self, outcome: str) -> ActionConfig | None:
        return self._by_outcome.get(outcome)

    def _orphan(self, entry: Entry) -> None:
        # The start-up check refuses an install rendered for other actions,
        # so this should not happen; if it does, the entry stays (never a
        # delivery dropped in silence) and an operator is told once.
        if entry.outcome not in self._orphans_logged:
            self._orphans_logged.add(entry.outcome)
            log.error(
                "delivery.no_action",
                outcome=entry.outcome,
                delivery_id=str(entry.delivery_id),
                order_id=str(entry.order_id),
                hint="the outbox records this outcome but no [actions.*] delivers it: add the "
                "action, or re-render and apply install.sql for these settings; the entries wait",
            )

    async def _deliver(
        self, action: ActionConfig, entries: list[Entry], settled: list[int]
    ) -> None:
        sender = self._senders[action.name]
        requests = build_requests(action, entries, now=self._now())
        if action.name in self._auth_failing and requests:
            # One probe at a time while the credentials are refused: the rest
            # wait (not used up) instead of hammering with a known-bad token.
            out = _Settled()
            probe, waiting = requests[0], requests[1:]
            for request in waiting:
                for entry in request.deliveries:
                    out.reschedule.append(
                        Reschedule(
                            entry.delivery_id,
                            self.timing.auth_retry,
                            Verdict.AUTH.value,
                            entry.last_error or "waiting: the application refuses the credentials",
                            False,
                            attempted=False,
                        )
                    )
            requests = [probe]
            await self._record(out, settled)
        async with asyncio.TaskGroup() as group:
            for request in requests:
                group.create_task(self._send(action, sender, request, settled))

    async def _send(
        self, action: ActionConfig, sender: ActionSender, request: Request, settled: list[int]
    ) -> None:
        """One request, and what its answer decides, recorded as soon as it is known.

        Not at the end of the round: a request the application holds for its
        whole timeout must not hold back what the others' answers settled (a
        kill meanwhile would send them again), nor another action's deliveries.
        """
        out = _Settled()
        result = await sender.send(request)
        if isinstance(result, Deferred):
            self._deferred(action, request, result, out)
        else:
            self._answered(action, request, result, out)
        await self._record(out, settled)

    async def _record(self, out: _Settled, settled: list[int]) -> None:
        settled.append(len(out))
        await self._confirm(out)
        await self._apply(out)

    def _answered(
        self, action: ActionConfig, request: Request, result: Sent, out: _Settled
    ) -> None:
        answer = interpret(
            action,
            request,
            result.status,
            result.body,
            result.headers,
            failure=result.failure,
            now=self._wall(),
        )
        self._auth_state(action, result, answer)
        self._settle(action, request, result, answer, out)

    def _deferred(
        self, action: ActionConfig, request: Request, deferred: Deferred, out: _Settled
    ) -> None:
        """No request went out (circuit open, Retry-After): not an attempt at the application."""
        now = self._now()
        for entry in request.deliveries:
            if expired(entry, action, now):
                self._dead(action, entry, Verdict.RETRY, entry.last_error or deferred.reason, out)
            else:
                out.reschedule.append(
                    Reschedule(
                        entry.delivery_id,
                        max(deferred.retry_after, 0.0),
                        entry.last_verdict or Verdict.RETRY.value,
                        entry.last_error or deferred.reason,
                        False,
                        attempted=False,
                    )
                )

    def _auth_state(self, action: ActionConfig, sent: Sent, answer: Answer) -> None:
        refused = sent.status in (401, 403) or any(
            v is Verdict.AUTH for v in answer.verdicts.values()
        )
        gauge = self._metrics.delivery_auth_failing.labels(action.name)
        if refused:
            if action.name not in self._auth_failing:
                self._auth_failing.add(action.name)
                gauge.set(1)
                log.error(
                    "delivery.auth_failed",
                    action=action.name,
                    status=sent.status,
                    deliveries_waiting=len(answer.verdicts),
                    retry_every_s=self.timing.auth_retry,
                    hint="the application refuses this action's credentials: fix the secret "
                    "in the providers file, then restart order-monitor; the deliveries wait and "
                    "are not used up",
                )
        elif action.name in self._auth_failing and _past_credentials(sent.status):
            self._auth_failing.discard(action.name)
            gauge.set(0)
            log.info("delivery.auth_recovered", action=action.name, status=sent.status)

    def _settle(
        self,
        action: ActionConfig,
        request: Request,
        sent: Sent,
        answer: Answer,
        out: _Settled,
    ) -> None:
        now = self._now()
        results: Counter[str] = Counter()
        errors: Counter[str] = Counter()
        retry_in: list[float] = []
        failed: list[tuple[Entry, str]] = []
        for entry in request.deliveries:
            verdict = answer.verdicts.get(entry.delivery_id, Verdict.RETRY)
            error = _clean_error(
                answer.errors.get(entry.delivery_id) or f"no verdict ({_status(sent)})",
                self._hidden.get(action.name, ()),
            )
            if verdict is Verdict.DELIVERED:
                out.delivered.append(entry)
            elif verdict is Verdict.TAKEN:
                if action.confirm_status is None:
                    out.delivered.append(entry)
                else:
                    out.to_confirm.append((entry, action))
            elif verdict is Verdict.AUTH:
                results["auth"] += 1
                errors["auth"] += 1
                # Not a try: the entry is not at fault, and a long credentials
                # phase must not leave it at the longest backoff afterwards.
                out.reschedule.append(
                    Reschedule(
                        entry.delivery_id,
                        self.timing.auth_retry,
                        verdict.value,
                        error,
                        False,
                        attempted=False,
                    )
                )
            elif verdict is Verdict.REJECTED:
                errors["rejected"] += 1
                failed.append((entry, error))
                results[self._rejected(action, entry, verdict, error, out)] += 1
            else:
                errors[_retry_kind(sent, answer)] += 1
                failed.append((entry, error))
                if expired(entry, action, now):
                    self._dead(action, entry, verdict, error, out)
                    results["dead"] += 1
                else:
                    # Asked to wait (429, a Retry-After): the application's
                    # pace, not the order's failure, so no try is used up,
                    # as for a provider; the sender holds the action back.
                    paused = sent.status == 429 or answer.retry_after is not None
                    delay = answer.retry_after or self._backoff(entry)
                    retry_in.append(delay)
                    out.reschedule.append(
                        Reschedule(
                            entry.delivery_id,
                            delay,
                            verdict.value,
                            error,
                            False,
                            attempted=not paused,
                        )
                    )
                    results["retried"] += 1
        for result, count in results.items():
            self._metrics.deliveries.labels(action.name, result).inc(count)
        for kind, count in errors.items():
            self._metrics.delivery_errors.labels(action.name, kind).inc(count)
        if failed and not results.get("auth"):
            log.warning(
                "delivery.failed",
                action=action.name,
                request=request.describe(),
                status=sent.status,
                deliveries=len(failed),
                order_ids=[str(e.order_id) for e, _ in failed[:_LOGGED_IDS]],
                error=failed[0][1],
                retry_in_s=round(min(retry_in), 3) if retry_in else None,
            )

    def _rejected(
        self, action: ActionConfig, entry: Entry, verdict: Verdict, error: str, out: _Settled
    ) -> str:
        """Count a refusal of this order; a dead letter at the action's attempts."""
        if entry.rejections + 1 >= action.attempts:
            self._dead(action, entry, verdict, error, out)
            return "dead"
        out.reschedule.append(
            Reschedule(entry.delivery_id, self._backoff(entry), verdict.value, error, True)
        )
        return "rejected"

    def _dead(
        self, action: ActionConfig, entry: Entry, verdict: Verdict, error: str, out: _Settled
    ) -> None:
        out.bury.append((entry.delivery_id, verdict.value, error))
        log.error(
            "delivery.dead_letter",
            action=action.name,
            order_id=str(entry.order_id),
            delivery_id=str(entry.delivery_id),
            outcome=entry.outcome,
            verdict=verdict.value,
            tries=entry.tries + 1,
            rejections=entry.rejections + (verdict is Verdict.REJECTED),
            error=error,
            hint="the order is written but not finished in the application: see "
            "'order-monitor deliveries', fix the cause, then requeue it",
        )

    def _backoff(self, entry: Entry) -> float:
        return retry_delay(entry.tries + 1) * self.timing.retry_scale

    async def _confirm(self, out: _Settled) -> None:
        """TAKEN entries count once the row's status reads the action's word."""
        if not out.to_confirm:
            return
        statuses = await self._store.statuses(
            await self._connection(), [entry.order_id for entry, _ in out.to_confirm]
        )
        unconfirmed: Counter[str] = Counter()
        results: Counter[tuple[str, str]] = Counter()
        for entry, action in out.to_confirm:
            expected = action.confirm_status or ""
            status = statuses.get(entry.order_id)
            if status is not None and status.casefold() == expected.casefold():
                out.delivered.append(entry)
                continue
            shown = "gone (no such row)" if status is None else repr(clean_str(status))
            error = _clean_error(f"answered 2xx but the row's status is still {shown}")
            unconfirmed[action.name] += 1
            results[action.name, self._rejected(action, entry, Verdict.REJECTED, error, out)] += 1
            log.warning(
                "delivery.unconfirmed",
                action=action.name,
                order_id=str(entry.order_id),
                expected=expected,
                error=error,
            )
        out.to_confirm.clear()
        for name, count in unconfirmed.items():
            self._metrics.delivery_errors.labels(name, "unconfirmed").inc(count)
        for (name, result), count in results.items():
            self._metrics.deliveries.labels(name, result).inc(count)

    async def _apply(self, out: _Settled) -> None:
        conn = await self._connection()
        if out.delivered:
            await self._store.delivered(conn, [e.delivery_id for e in out.delivered])
            now = self._now()
            by_action: Counter[str] = Counter()
            for entry in out.delivered:
                self._metrics.delivery_latency.observe(
                    max(0.0, (now - entry.recorded_at).total_seconds())
                )
                action = self.action_for(entry.outcome)
                by_action[action.name if action else entry.outcome] += 1
            for name, count in by_action.items():
                self._metrics.deliveries.labels(name, "delivered").inc(count)
            log.info(
                "delivery.delivered",
                deliveries=len(out.delivered),
                actions=dict(by_action),
                order_ids=[str(e.order_id) for e in out.delivered[:_LOGGED_IDS]],
            )
        if out.reschedule:
            await self._store.reschedule(conn, out.reschedule)
        if out.bury:
            await self._store.bury(conn, out.bury)


def _first(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The first exception of *group* that is not a cancellation, looking into nested groups."""
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            return _first(exc)
        if not isinstance(exc, asyncio.CancelledError):
            return exc
    return group.exceptions[0]


def _status(sent: Sent) -> str:
    return f"HTTP {sent.status}" if sent.status is not None else sent.failure or "no answer"


def _past_credentials(status: int | None) -> bool:
    """The application answered past its credentials check: a 2xx, or a 4xx about the request.

    Not a 5xx, a 408 or a 429 (a proxy or a gateway may answer those before
    the application sees the token), nor a 3xx: ending the phase on one of
    them would send every waiting request at the refused token again.
    """
    if status is None:
        return False
    return 200 <= status <= 299 or (
        400 <= status <= 499 and status not in (401, 403, 407, 408, 429)
    )


def _retry_kind(sent: Sent, answer: Answer) -> str:
    """The delivery_errors kind of a RETRY verdict."""
    status = sent.status
    if status is None:
        return "transport"
    if status == 429 or answer.retry_after is not None:
        return "rate_limited"
    if status >= 500:
        return "server_error"
    return "bad_answer"


def _clean_error(text: str, hidden: tuple[str, ...] = ()) -> str:
    """Storable (no NUL, no lone surrogate), bounded and without the action's secrets.

    It goes into the log and the outbox's last_error, and the application's
    answer is text nobody shaped for us: one that echoes our request's
    headers back would otherwise put the token there.
    """
    return bounded(clean_str(scrub_prepared(text, hidden)), _MAX_ERROR)


def _database_error(exc: BaseException) -> str:
    if isinstance(exc, psycopg.Error) and exc.sqlstate:
        return f"{type(exc).__name__} {exc.sqlstate}: {exc.diag.message_primary or 'no message'}"
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first or 'no message'}"
