"""Start-up checks of the table against the settings: clear errors, not failing batches."""

from __future__ import annotations

import psycopg
import pytest

from order_monitor.config import Columns, Layout, OutcomeWrites
from order_monitor.db import column_limits
from order_monitor.errors import SchemaError


async def limits(dsn: str, layout: Layout, writes: OutcomeWrites | None = None) -> object:
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        return await column_limits(conn, layout, writes)


async def test_the_reference_table_passes_and_lengths_are_read(db: str) -> None:
    found = await limits(db, Layout(), OutcomeWrites())
    assert (found.pin_code, found.provider_message, found.last_message) == (120, None, 250)  # type: ignore[attr-defined]


async def test_a_missing_table_is_named(db: str) -> None:
    with pytest.raises(SchemaError, match=r"table public\.orders does not exist"):
        await limits(db, Layout(table="orders"))


async def test_a_misspelt_column_is_named(db: str) -> None:
    with pytest.raises(SchemaError, match=r"no column pin_code .*ORDER_MONITOR_COLUMN_"):
        await limits(db, Layout(columns=Columns(pin_code="pin_code")))


async def test_a_table_without_our_column_says_to_install(bare_db: str) -> None:
    with pytest.raises(
        SchemaError, match=r"no column provider_referans \(sql/install.sql adds it\)"
    ):
        await limits(bare_db, Layout())


async def test_a_status_value_longer_than_its_column_is_refused(db: str) -> None:
    writes = OutcomeWrites(gave_up_external_status="needs_a_human_to_look_at_it_now_please")
    with pytest.raises(
        SchemaError, match=r"ORDER_MONITOR_GAVE_UP_EXTERNAL_STATUS=.*\(30 characters\)"
    ):
        await limits(db, Layout(), writes)
