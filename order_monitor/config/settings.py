"""The settings as frozen objects: the table's layout, what outcomes write, the providers."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Final

from order_monitor.engine.policy import BackoffPolicy
from order_monitor.redaction import Secret, redact_dsn


@dataclass(frozen=True, slots=True)
class Columns:
    """Where each piece of order state lives in the orders table."""

    id: str = "id"
    status: str = "status"
    external_status: str = "externalStatus"
    provider_ref: str = "provider_referans"
    provider_id: str = "providerId"
    external_order_id: str = "externalOrderId"
    pin_code: str = "pinCode"
    provider_message: str = "providerMessage"
    last_message: str = "lastMessage"
    sent_at: str = "sentAt"
    last_sync_at: str = "lastSyncAt"
    completed_at: str = "completedAt"
    duration_ms: str = "durationMs"
    created_at: str = "createdAt"

    def configured(self) -> tuple[str, ...]:
        """Every column named here: each must exist in the table."""
        return tuple(getattr(self, f.name) for f in fields(self))

    def read(self) -> tuple[str, ...]:
        """Columns the daemon and its operator commands read (the role's SELECT grant).

        Not the PIN, the provider's message or the duration: the daemon writes
        those (through the write function) but never needs to see them.
        """
        return (
            self.id,
            self.status,
            self.external_status,
            self.provider_ref,
            self.provider_id,
            self.external_order_id,
            self.last_message,
            self.sent_at,
            self.last_sync_at,
            self.completed_at,
            self.created_at,
        )


@dataclass(frozen=True, slots=True)
class Layout:
    """The orders table as order-monitor sees it: names, channels, in-flight rule."""

    schema: str = "public"
    table: str = "product_orders"
    columns: Columns = field(default_factory=Columns)
    channel: str = "order_monitor"
    result_channel: str = "order_monitor_result"
    #: An order is in flight when its external status is one of these
    #: (compared case-insensitively), its status is not final, and it has a
    #: provider reference.
    in_flight_external_statuses: tuple[str, ...] = (
        "sent",
        "processing",
        "queued",
        "pending",
        "unknown",
    )
    final_statuses: tuple[str, ...] = ("approved", "rejected")
    role: str = "order_monitor"


@dataclass(frozen=True, slots=True)
class OutcomeWrites:
    """What each outcome writes into the row besides timestamps and messages."""

    done_external_status: str = "done"
    failed_external_status: str = "failed"
    #: Written when the policy's limits are reached; 'manual_required' is the
    #: application's own word for "a human must look", and is outside the
    #: in-flight set, so the order leaves the sweep.
    gave_up_external_status: str = "manual_required"
    #: Off by default: in the application a status change moves money.
    done_status: str | None = None
    failed_status: str | None = None
    #: The outcomes whose results the write function records in the outbox,
    #: in the same transaction as the row, for an action to deliver to the
    #: application: the outcomes the configured actions handle (never set
    #: by hand; see ``config.loading``). Empty: nothing is recorded.
    deliver: tuple[str, ...] = ()
    #: Row columns the actions' templates use ("tenantId"): the write
    #: function copies their values into the outbox entry, so delivering
    #: needs no read of the orders table beyond the status.
    deliver_columns: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ProviderLimits:
    concurrency: int = 8
    #: Requests per second; None for no rate limit.
    rate: float | None = None
    burst: int = 1
    connect_timeout: float = 5.0
    read_timeout: float = 15.0
    #: Consecutive failed requests that open the circuit breaker.
    breaker_failures: int = 5
    breaker_cooldown: float = 30.0
    #: Largest response body read, in bytes.
    max_body: int = 1_048_576


@dataclass(frozen=True, slots=True)
class ProviderConfig:
    """One entry of the providers file."""

    name: str
    kind: str
    base_url: str
    #: Values of the orders' provider-id column this entry serves.
    provider_ids: tuple[str, ...]
    limits: ProviderLimits
    secrets: Mapping[str, Secret]
    #: Adapter-specific keys, validated by the adapter itself.
    options: Mapping[str, Any]

    def __repr__(self) -> str:
        return (
            f"ProviderConfig(name={self.name!r}, kind={self.kind!r}, "
            f"base_url={self.base_url!r}, provider_ids={self.provider_ids!r}, "
            f"secrets={sorted(self.secrets)!r})"
        )


#: The outcomes an action may deliver.
DELIVERABLE_OUTCOMES: Final = ("done", "failed", "gave_up")
#: The secret of a webhook action that signs its events (Standard Webhooks'
#: ``whsec_...`` key, shared with the receiver).
WEBHOOK_SECRET: Final = "signing_secret"  # noqa: S105 (the secret's name, not its value)


@dataclass(frozen=True, slots=True)
class ActionConfig:
    """One entry of the providers file's ``[actions.NAME]``: how a finished
    order is delivered to the application (see ``order_monitor.delivery``).

    Templates (``url``, ``headers``' values, ``body``'s strings) hold
    placeholders: ``{ids}`` (a JSON string that is exactly it becomes the
    list of order ids), ``{delivery_ids}`` (likewise), ``{request_id}``,
    ``{outcome}``, ``{message}``, ``{column:NAME}`` (the row's value, as
    recorded at write time) and, in headers only, ``{secret:NAME}``. Every
    placeholder but the lists is per request: orders go in one request only
    when all of them have the same values (so a request never mixes tenants).
    """

    name: str
    #: "http" (batched requests to the application's API) or "webhook"
    #: (one Standard Webhooks event per order).
    kind: str
    #: The outcomes it delivers (done, failed, gave_up); one action per outcome.
    outcomes: tuple[str, ...]
    url: str
    limits: ProviderLimits
    secrets: Mapping[str, Secret]
    method: str = "POST"
    headers: Mapping[str, str] = field(default_factory=dict)
    #: The JSON body's template (http); the event's shape is fixed for webhooks.
    body: Any = None
    #: Orders per request at most (http; a webhook event carries one).
    batch_size: int = 100
    #: JSON path (dotted) -> the value a 2xx answer must hold there.
    success: Mapping[str, Any] = field(default_factory=dict)
    #: JSON path of the answer's per-id error list, and the keys of an entry.
    errors_path: str | None = None
    error_id_key: str = "id"
    error_key: str = "error"
    #: When set, a delivery counts only once the row's status reads this
    #: word (case-insensitively): the application may answer 2xx and skip an id.
    confirm_status: str | None = None
    #: How long a delivery is retried (transient failures) before it becomes
    #: a dead letter, counted from when the result was written.
    max_age: float = 3 * 86400.0
    #: Answers that refuse this order (a per-id error, a 4xx, a 2xx the row
    #: does not confirm) before it becomes a dead letter.
    attempts: int = 5
    #: Row columns a webhook event carries in ``data.columns`` (an http
    #: action names its columns in its templates instead).
    columns: tuple[str, ...] = ()

    def __repr__(self) -> str:
        return (
            f"ActionConfig(name={self.name!r}, kind={self.kind!r}, outcomes={self.outcomes!r}, "
            f"url={self.url!r}, secrets={sorted(self.secrets)!r})"
        )


@dataclass(frozen=True, slots=True)
class Settings:
    dsn: Secret
    layout: Layout = field(default_factory=Layout)
    policy: BackoffPolicy = field(default_factory=BackoffPolicy)
    writes: OutcomeWrites = field(default_factory=OutcomeWrites)
    sweep_interval: float = 300.0
    batch_size: int = 500
    #: Provider requests under way at once, all providers together.
    concurrency: int = 64
    #: How long a stopping daemon waits for checks under way.
    drain_timeout: float = 10.0
    #: How often the LISTEN connection is proven alive.
    listener_health_interval: float = 10.0
    #: ORDER_MONITOR_HANDOFF: 'auto' (NOTIFY while quiet, reads of what changed
    #: while busy) or 'scan' (never NOTIFY: for applications that dispatch
    #: inside a PREPARE TRANSACTION, which PostgreSQL refuses after a NOTIFY).
    handoff: str = "auto"
    #: ORDER_MONITOR_CAPTURE: 'trigger' (install.sql's trigger, NOTIFY and the
    #: busy reads) or 'decoding' (a logical replication slot: sql/decoding.sql).
    capture: str = "trigger"
    providers_file: Path | None = None
    providers: tuple[ProviderConfig, ...] = ()
    #: How finished orders are delivered to the application ([actions.NAME]).
    actions: tuple[ActionConfig, ...] = ()
    log_level: str = "info"
    log_format: str = "auto"
    #: host:port for /healthz, /readyz, /metrics and the operator page; None keeps it off.
    http_listen: str | None = None
    #: ORDER_MONITOR_PAGE_TOKEN: the password the operator page asks for (HTTP
    #: basic auth or a bearer token). Required to serve the page on an address
    #: that is not loopback; None: loopback only (or behind a proxy that checks).
    page_token: Secret | None = None
    #: Seconds between the page's refreshes, and how long one reading of the
    #: database is shared by every viewer.
    page_refresh: float = 5.0
    #: ORDER_MONITOR_* names in the environment that no setting reads (typos).
    #: Not part of the configuration: two loads differing only here are equal.
    unknown_variables: tuple[UnknownVariable, ...] = field(default=(), compare=False, repr=False)

    @property
    def safe_dsn(self) -> str:
        return redact_dsn(self.dsn.reveal())

    def action_for(self, outcome: str) -> ActionConfig | None:
        """The action that delivers *outcome*, or None."""
        for action in self.actions:
            if outcome in action.outcomes:
                return action
        return None

    def provider_for(self, provider_id: str) -> ProviderConfig | None:
        for provider in self.providers:
            if provider_id in provider.provider_ids:
                return provider
        return None


@dataclass(frozen=True, slots=True)
class UnknownVariable:
    """An ORDER_MONITOR_* name nothing reads: most often a misspelt setting."""

    name: str
    #: The closest known name, if one is close.
    suggestion: str | None

    def __str__(self) -> str:
        hint = f"; did you mean {self.suggestion}?" if self.suggestion else ""
        return f"{self.name} is not an order-monitor setting and is ignored{hint}"


#: Settings a reload cannot change (field, and how an operator knows it).
RESTART_ONLY: Final = (
    ("dsn", "ORDER_MONITOR_DSN"),
    ("layout", "table layout / channels"),
    ("writes", "ORDER_MONITOR_*_STATUS (outcome writes)"),
    ("actions", "[actions.*] in the providers file (delivery)"),
    ("concurrency", "ORDER_MONITOR_CONCURRENCY"),
    ("batch_size", "ORDER_MONITOR_BATCH_SIZE"),
    ("listener_health_interval", "ORDER_MONITOR_LISTENER_HEALTH_INTERVAL"),
    ("handoff", "ORDER_MONITOR_HANDOFF"),
    ("capture", "ORDER_MONITOR_CAPTURE"),
    ("http_listen", "ORDER_MONITOR_HTTP_LISTEN"),
    ("page_token", "ORDER_MONITOR_PAGE_TOKEN"),
    ("page_refresh", "ORDER_MONITOR_PAGE_REFRESH"),
)


def reloaded(old: Settings, new: Settings) -> tuple[Settings, list[str]]:
    """What a reload applies: *new*, with every restart-only setting kept from *old*.

    Also the restart-only settings that differ (they wait for a restart).
    Everything else is applied live: providers, the backoff policy, the
    sweep interval, the drain timeout (and, in the runner, the log level).
    """
    restart_needed = [
        label for name, label in RESTART_ONLY if getattr(new, name) != getattr(old, name)
    ]
    return replace(new, **{name: getattr(old, name) for name, _ in RESTART_ONLY}), restart_needed
