"""The demo's database and knobs.

A fresh database with our install (rendered for the demo's actions) and
role applied, the application's money tables; the daemon's and the fake's
settings, with the two actions that finish orders in the application.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Final

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

import order_monitor
from order_monitor import install
from order_monitor.config import (
    ActionConfig,
    Layout,
    OutcomeWrites,
    ProviderConfig,
    ProviderLimits,
    Settings,
)
from order_monitor.demo.application_api import prepare_application_tables, reference_actions
from order_monitor.engine.policy import BackoffPolicy
from order_monitor.providers.fake import Behaviour, mixture
from order_monitor.redaction import Secret

DATABASE: Final = "demo"
PROVIDER_ID: Final = "barakat"
REFERENCE_DDL: Final = Path(order_monitor.__file__).with_name("product_orders.sql")

#: The query the summary offers, for a database kept with --keep.
ROWS_QUERY: Final = (
    'SELECT provider_referans, "externalStatus", "pinCode", "lastMessage", "durationMs"\n'
    '  FROM product_orders ORDER BY "sentAt" DESC LIMIT 20;'
)

# The production schedule's shape (first check, then doubling gaps up to a
# cap, a give-up) in seconds instead of minutes. Ten attempts span ~12.5 s:
# an order the provider never heard of is given up that long after dispatch,
# so the default run (300 orders at 20/s = 15 s of dispatching) ends in about
# half a minute.
DEMO_POLICY: Final = BackoffPolicy(
    initial_delay=0.5, base=0.5, cap=1.5, jitter=0.1, max_attempts=10, max_age=60.0
)

EXIT_OK: Final = 0
EXIT_UNFINISHED: Final = 1
EXIT_USAGE: Final = 2
EXIT_INTERRUPTED: Final = 130  # the shell's convention for "ended by SIGINT"


#: The demo's layout: the reference table, the daemon's role under its usual name.
DEMO_LAYOUT: Final = Layout()

#: What the daemon writes, and what the write function records for the two
#: actions to deliver: exactly what ``config.loading`` derives from them.
DEMO_WRITES: Final = OutcomeWrites(deliver=("done", "failed"), deliver_columns=("tenantId",))


@dataclass(frozen=True, slots=True)
class DemoDatabase:
    #: The application's connection (the server's superuser, owner of the table).
    admin_dsn: str
    #: The daemon's: the least-privilege role of role.sql.
    daemon_dsn: str


def prepare_database(admin_dsn: str) -> DemoDatabase:
    """Create the demo database: the reference table, our install and role, the money tables.

    install.sql is rendered for the demo's actions (the write function
    records done and failed results in the outbox, with the tenant), as
    ``order-monitor sql install`` renders it for a providers file with them;
    role.sql makes the daemon's login role, and the daemon runs as it.
    """
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(DATABASE)))
    dsn = make_conninfo(admin_dsn, dbname=DATABASE)
    with psycopg.connect(dsn, autocommit=True) as conn:
        # A file of several statements: sent as one simple query, as psql would.
        conn.execute(REFERENCE_DDL.read_text().encode())
        prepare_application_tables(conn)
    for kind in ("install", "role"):
        for _ in install.apply(dsn, kind, DEMO_LAYOUT, DEMO_WRITES):
            pass
    # The embedded server trusts its Unix socket: the role needs no password.
    return DemoDatabase(dsn, make_conninfo(dsn, user=DEMO_LAYOUT.role))


def demo_actions(api_url: str, api_token: str) -> tuple[ActionConfig, ...]:
    """The README's reference actions (approve done orders, reject and refund failed
    ones), with limits for a demo that must end in seconds."""
    limits = ProviderLimits(
        concurrency=4,
        connect_timeout=1.0,
        read_timeout=5.0,
        breaker_failures=10,
        breaker_cooldown=2.0,
    )
    return reference_actions(api_url, api_token, limits=limits)


def demo_settings(
    dsn: str, provider_url: str, token: str, api_url: str, api_token: str
) -> Settings:
    """The daemon's settings: the defaults, with seconds where production has minutes."""
    provider = ProviderConfig(
        name="fake-barakat",
        kind="barakat",
        base_url=provider_url,
        provider_ids=(PROVIDER_ID,),
        limits=ProviderLimits(
            concurrency=8,
            connect_timeout=1.0,
            read_timeout=2.0,
            # Errors are a few per cent: the breaker should stay closed, as it
            # would with a healthy provider that has bad moments.
            breaker_failures=10,
            breaker_cooldown=2.0,
        ),
        secrets={"token": Secret(token)},
        options={},
    )
    return Settings(
        dsn=Secret(dsn),
        layout=DEMO_LAYOUT,
        policy=DEMO_POLICY,
        writes=DEMO_WRITES,
        sweep_interval=5.0,
        batch_size=100,
        concurrency=16,
        drain_timeout=2.0,
        listener_health_interval=2.0,
        providers=(provider,),
        actions=demo_actions(api_url, api_token),
        log_level="warning",
        log_format="json",
        # The operator page (and /metrics) on a free loopback port: the run
        # prints where, so a newcomer can watch the page while it plays.
        http_listen="127.0.0.1:0",
    )


def demo_behaviour(seed: int) -> Behaviour:
    """A provider with bad moments: what the daemon exists for."""
    return Behaviour(
        # 85 % done, 10 % failed, 5 % never heard of (those are given up);
        # up to four "still waiting" answers before the final one.
        default=mixture(done=0.85, failed=0.10, unknown=0.05, pending_polls=(0, 4), seed=seed),
        latency=(0.02, 0.25),
        error_rate=0.03,
        garbage_rate=0.02,
    )
