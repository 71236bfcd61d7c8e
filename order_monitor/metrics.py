"""Prometheus metrics, on a registry of our own (not the process-global one).

Names are in base units with _total/_seconds suffixes. No order id is ever a
label: their number is unbounded.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

CIRCUIT_STATES = {"closed": 0, "half_open": 1, "open": 2}
#: order_monitor_deliveries_total's result label.
DELIVERY_RESULTS = ("delivered", "retried", "rejected", "dead", "auth")
#: order_monitor_delivery_errors_total's kind label.
DELIVERY_ERROR_KINDS = (
    "transport",
    "server_error",
    "rate_limited",
    "auth",
    "rejected",
    "unconfirmed",
    "bad_answer",
)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.checks = Counter(
            "order_monitor_checks",
            "Provider checks by provider and normalised outcome "
            "(pending, done, failed, unknown, error).",
            ["provider", "outcome"],
            registry=r,
        )
        self.check_seconds = Histogram(
            "order_monitor_check_seconds",
            "Time of one provider request (one batch of orders).",
            ["provider"],
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=r,
        )
        self.pulled_forward = Counter(
            "order_monitor_checks_pulled_forward",
            "Checks made a little before their slot, to share a request to a batched "
            "provider that went out anyway (at most policy.PULL_SHARE of the gap early).",
            ["provider"],
            registry=r,
        )
        self.finished = Counter(
            "order_monitor_orders_finished",
            "Orders written as finished, by outcome (done, failed, gave_up).",
            ["outcome"],
            registry=r,
        )
        self.stale_results = Counter(
            "order_monitor_stale_results",
            "Results not written because the row changed meanwhile "
            "(finished by someone else, or a new provider reference).",
            registry=r,
        )
        self.writes_deferred = Counter(
            "order_monitor_result_writes_deferred",
            "Results kept for another write instead of being written, by reason: locked"
            " (another transaction held the row) or database (the statement or its COMMIT"
            " failed). Counted per try; the provider is not asked again.",
            ["reason"],
            registry=r,
        )
        # Both series from the start: a rate() over a series that appears
        # only at the first deferral reads as "no data", not 0.
        for reason in ("locked", "database"):
            self.writes_deferred.labels(reason)
        self.unwritten_age = Gauge(
            "order_monitor_unwritten_result_age_seconds",
            "Age of the oldest result the writer has not written yet (queued or kept after a"
            " write that did not take it); 0 when none.",
            registry=r,
        )
        self.announcements_skipped = Counter(
            "order_monitor_result_announcements_skipped",
            "Finished results written without their NOTIFY on the result channel, because"
            " the cluster's notification queue was at least half full.",
            registry=r,
        )
        self.unconfigured = Counter(
            "order_monitor_unconfigured_provider_orders",
            "Checks skipped because the order's provider is not in the providers file.",
            registry=r,
        )
        self.notifications = Counter(
            "order_monitor_notifications",
            "Notifications received on the channel, by result: accepted (an order id), rejected"
            " (not an id), not_in_flight (no such order in flight), dropped (inbox full).",
            ["result"],
            registry=r,
        )
        self.inbox_taken = Counter(
            "order_monitor_inbox_taken",
            "Order ids taken from the inbox table of a version 2 to 4 install, where its"
            " trigger leaves them while the daemon is busy (instead of a NOTIFY each).",
            registry=r,
        )
        self.busy_reads = Histogram(
            "order_monitor_busy_read_seconds",
            "Reads of the orders in flight changed since the last one, made while the daemon"
            " is busy (the trigger does not NOTIFY), by how long each took.",
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
            registry=r,
        )
        self.busy_read_orders = Counter(
            "order_monitor_busy_read_orders",
            "Orders those reads returned, by result: taken (new to the daemon), known (already"
            " scheduled: a row updated since, or held back by a long transaction elsewhere).",
            ["result"],
            registry=r,
        )
        self.decoding_reads = Histogram(
            "order_monitor_decoding_read_seconds",
            "Reads of the logical replication slot (ORDER_MONITOR_CAPTURE=decoding), by how"
            " long each took (decoding in the server, parsing here).",
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
            registry=r,
        )
        self.decoding_orders = Counter(
            "order_monitor_decoding_orders",
            "Orders read from the slot, by result: taken (new to the daemon), known (already"
            " scheduled).",
            ["result"],
            registry=r,
        )
        self.decoding_slot_lag = Gauge(
            "order_monitor_decoding_slot_lag_bytes",
            "WAL the slot holds back on the server: the current WAL position minus what the"
            " daemon confirmed. A slot nobody reads grows this until max_slot_wal_keep_size"
            " invalidates it (or, without that setting, until the disk is full).",
            registry=r,
        )
        self.decoding_slot_recreated = Counter(
            "order_monitor_decoding_slot_recreated",
            "Slots recreated after they were invalidated or dropped (each followed by a sweep).",
            registry=r,
        )
        self.decoding_errors = Counter(
            "order_monitor_decoding_errors",
            "Slot reads that failed, by kind: unreadable (a message the parser refused: its"
            " transaction is skipped and a sweep finds its orders), slot (the slot lost or"
            " missing: recreated).",
            ["kind"],
            registry=r,
        )
        self.handoff_busy = Gauge(
            "order_monitor_handoff_busy",
            "1 while the daemon reads the orders that changed (the trigger does not NOTIFY),"
            " 0 while it holds the idle lock (the trigger NOTIFYs).",
            registry=r,
        )
        self.handoff_switches = Counter(
            "order_monitor_handoff_switches",
            "Switches between NOTIFY (to=idle) and reading what changed (to=busy).",
            ["to"],
            registry=r,
        )
        self.sweeps = Counter("order_monitor_sweeps", "Completed sweeps.", registry=r)
        self.sweep_seconds = Histogram(
            "order_monitor_sweep_seconds",
            "Duration of a full sweep.",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=r,
        )
        self.sweep_found = Gauge(
            "order_monitor_sweep_found_orders",
            "In-flight orders the last sweep found.",
            registry=r,
        )
        self.dispatch_time_unusable = Counter(
            "order_monitor_dispatch_time_unusable",
            "Orders whose dispatch time could not be used, counted once each when first seen,"
            " by reason: missing (both time columns NULL), infinite, future. They are"
            " scheduled from when the daemon first saw them (engine.anchors).",
            ["reason"],
            registry=r,
        )
        self.rows_unreadable = Counter(
            "order_monitor_rows_unreadable",
            "Reads of one row that failed on its values and were skipped, the rest of the"
            " page or batch going on, by where: sweep, confirm, reread.",
            ["where"],
            registry=r,
        )
        self.reconnects = Counter(
            "order_monitor_listener_reconnects",
            "Times the LISTEN connection was re-established.",
            registry=r,
        )
        self.listener_up = Gauge(
            "order_monitor_listener_connected",
            "1 while the LISTEN connection is up.",
            registry=r,
        )
        self.pending = Gauge(
            "order_monitor_pending_orders",
            "Orders in the schedule (waiting or being checked).",
            registry=r,
        )
        self.lag = Gauge(
            "order_monitor_queue_lag_seconds",
            "How far the most overdue check is behind its due time.",
            registry=r,
        )
        self.circuit = Gauge(
            "order_monitor_provider_circuit_state",
            "Circuit breaker per provider: 0 closed, 1 half-open, 2 open.",
            ["provider"],
            registry=r,
        )
        self.notification_queue = Gauge(
            "order_monitor_pg_notification_queue_usage_ratio",
            "pg_notification_queue_usage(): when full, the application's commits fail.",
            registry=r,
        )
        self.leader = Gauge(
            "order_monitor_leader",
            "1 while this instance holds the lock and works, 0 while on standby.",
            registry=r,
        )
        # --- delivery (order_monitor.delivery): finishing orders in the application ---
        self.deliveries = Counter(
            "order_monitor_deliveries",
            "Outbox entries by what an attempt to deliver them ended in, per action: delivered"
            " (the application took it), retried (sent again later), rejected (the application"
            " refused this order; counted toward the action's attempts), dead (a dead letter"
            " now), auth (credentials refused: waiting, not used up).",
            ["action", "result"],
            registry=r,
        )
        self.delivery_errors = Counter(
            "order_monitor_delivery_errors",
            "Failed delivery attempts per action, by kind: transport (no answer: refused,"
            " reset, timed out), server_error (5xx), rate_limited (429, or a Retry-After),"
            " auth (401/403), rejected (a 4xx, a failed success check or a per-id error),"
            " unconfirmed (a 2xx the row's status does not confirm), bad_answer (a 2xx that"
            " is not the expected JSON).",
            ["action", "kind"],
            registry=r,
        )
        self.undelivered = Gauge(
            "order_monitor_deliveries_undelivered",
            "Outbox entries not delivered yet and not dead letters (leader only; refreshed"
            " every few seconds).",
            registry=r,
        )
        self.undelivered_age = Gauge(
            "order_monitor_undelivered_age_seconds",
            "Age of the oldest outbox entry that is not delivered and not a dead letter, from"
            " when its result was written; 0 when none.",
            registry=r,
        )
        self.dead_letters = Gauge(
            "order_monitor_dead_letters",
            "Outbox entries given up on (dead letters), waiting for an operator:"
            " order-monitor deliveries.",
            registry=r,
        )
        self.delivery_auth_failing = Gauge(
            "order_monitor_delivery_auth_failing",
            "1 while the application refuses an action's credentials (401/403), until a"
            " request of that action is accepted again.",
            ["action"],
            registry=r,
        )
        self.delivery_latency = Histogram(
            "order_monitor_delivery_latency_seconds",
            "From when the result was written (and recorded in the outbox) to when the"
            " application took it.",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 21600, 86400),
            registry=r,
        )

        # --- the operator page (order_monitor.page) ---
        self.page_reads = Counter(
            "order_monitor_page_reads",
            "Readings of the database for the operator page, by result (ok, failed): one per"
            " refresh interval at most, however many viewers.",
            ["result"],
            registry=r,
        )
        for result in ("ok", "failed"):
            self.page_reads.labels(result)

    def action_series(self, action: str) -> None:
        """Every series of *action* from the start, at 0: a rate() over a series that
        appears only at the first failure reads as "no data", not 0."""
        for result in DELIVERY_RESULTS:
            self.deliveries.labels(action, result)
        for kind in DELIVERY_ERROR_KINDS:
            self.delivery_errors.labels(action, kind)
        self.delivery_auth_failing.labels(action).set(0)

    def track(self, gauge: Gauge, read: Callable[[], float]) -> None:
        """Compute *gauge* at scrape time from *read* (no timer to keep it fresh)."""
        gauge.set_function(read)


def counter_total(counter: Counter, **labels: str) -> float:
    """The sum of a labelled counter's children matching *labels*."""
    total = 0.0
    for metric in counter.collect():
        for sample in metric.samples:
            if sample.name.endswith("_total") and all(
                sample.labels.get(k) == v for k, v in labels.items()
            ):
                total += sample.value
    return total
