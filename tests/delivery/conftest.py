"""The delivery tests' databases: installed for the reference actions, seen by both sides."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest

from order_monitor.config import OutcomeWrites
from tests.conftest import as_daemon, deploy

#: What the reference actions need recorded: done and failed, with the tenant.
WRITES = OutcomeWrites(deliver=("done", "failed"), deliver_columns=("tenantId",))

Conn = psycopg.AsyncConnection[Any]


@pytest.fixture
def outbox_db(db: str) -> str:
    """A database installed (as the table's owner) for settings that deliver done and failed."""
    deploy(db, WRITES)
    return db


@pytest.fixture
async def admin(outbox_db: str) -> AsyncIterator[Conn]:
    """The application's side (and the test's eye): the server's superuser."""
    async with await psycopg.AsyncConnection.connect(outbox_db, autocommit=True) as conn:
        yield conn


@pytest.fixture
async def daemon(outbox_db: str) -> AsyncIterator[Conn]:
    """The daemon's role, as the relay's autocommit connection is."""
    async with await psycopg.AsyncConnection.connect(as_daemon(outbox_db), autocommit=True) as conn:
        yield conn
