"""Issue #19, two-phase commit: while nobody holds the idle lock (the daemon busy, or run with
ORDER_MONITOR_HANDOFF=inbox), the trigger announces through the inbox and NOTIFYs nothing,
so an application that dispatches with PREPARE TRANSACTION can commit."""

from __future__ import annotations

import uuid

import psycopg
import pytest

from order_monitor import schema
from order_monitor.config import Layout
from tests.schema.scripts import scalar

DISPATCH = """INSERT INTO product_orders (provider_referans, "externalStatus")
              VALUES ('2pc', 'sent') RETURNING id"""


def test_a_dispatch_can_be_prepared_while_the_trigger_uses_the_inbox(db: str) -> None:
    with psycopg.connect(db, autocommit=True) as admin:
        if scalar(admin, "SELECT current_setting('max_prepared_transactions')::int") == 0:
            pytest.skip("this server has max_prepared_transactions = 0")
        gid = f"om-{uuid.uuid4().hex[:8]}"
        with psycopg.connect(db) as app:
            order = scalar(app, DISPATCH)
            app.execute(f"PREPARE TRANSACTION '{gid}'")  # refused after a NOTIFY
        admin.execute(f"COMMIT PREPARED '{gid}'")
        inbox = schema.Names(Layout()).inbox.as_string(None)
        assert scalar(admin, f"SELECT count(*) FROM {inbox} WHERE order_id = %s", (order,)) == 1
