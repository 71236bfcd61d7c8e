"""A shop with orders in every state the page distinguishes, for the page's tests.

In flight and waiting, finished done with a PIN, failed with a hostile
message, given up by the daemon and given up before it started, and in
flight with a provider id nobody serves.
"""

from __future__ import annotations

from typing import Any

from order_monitor.providers.fake import FakeProvider
from order_monitor.providers.fake.scripts import Script
from tests.daemon_fixtures import App

PIN = "PIN-7731-SECRET"
HOSTILE = "<script>document.title='pwned'</script> \u202eevil\u202c <b>bold</b> \"q\" & done"
HOSTILE_HUMAN = (
    "<script>document.title='pwned'</script><img src=x onerror=alert(1)> \u200bzero-width"
)
TOKEN = "p@ss:w0rd/with%escapes&more=="


async def shop(app: App, fake: FakeProvider) -> dict[str, Any]:
    """Orders in every state; returns the ids by reference."""
    fake.set_script("done-1", Script.done(PIN, message=f"Your code is {PIN}, enjoy"))
    fake.set_script("fail-1", Script.failed(HOSTILE))
    for ref in ("wait-1", "wait-2", "old-1"):
        fake.set_script(ref, Script.pending())
    ids: dict[str, Any] = {}
    for ref, oid in zip(
        ["done-1", "fail-1", "wait-1", "wait-2"],
        await app.dispatch(["done-1", "fail-1", "wait-1", "wait-2"]),
        strict=True,
    ):
        ids[ref] = oid
    # Dispatched two hours ago: past the policy's max_age, it gives up at its first check.
    (ids["old-1"],) = await app.dispatch(["old-1"], sent_ago=7200)
    (ids["nobody-1"],) = await app.dispatch(["nobody-1"], provider_id="nobody")
    # Given up an hour before the daemon started: only a read of the table finds it.
    cursor = await app.conn.execute(
        """INSERT INTO product_orders (provider_referans, "providerId", "externalStatus",
                                       "sentAt", "lastSyncAt", "lastMessage")
           VALUES ('earlier-1', 'fake', 'manual_required', now() - interval '3 hours',
                   now() - interval '1 hour', %s) RETURNING id""",
        (HOSTILE_HUMAN,),
    )
    row = await cursor.fetchone()
    assert row is not None
    ids["earlier-1"] = row[0]
    return ids


def settled(app: App) -> Any:
    async def check() -> bool:
        rows = await app.rows()
        return (
            rows["done-1"]["externalStatus"] == "done"
            and rows["fail-1"]["externalStatus"] == "failed"
            and rows["old-1"]["externalStatus"] == "manual_required"
        )

    return check


async def count_in_flight(app: App) -> int:
    """The table's own count, by the in-flight rule written out (not the daemon's code)."""
    cursor = await app.conn.execute(
        """SELECT count(*) FROM product_orders
           WHERE provider_referans IS NOT NULL
             AND lower("externalStatus") IN ('sent','processing','queued','pending','unknown')
             AND lower(status) NOT IN ('approved','rejected')"""
    )
    row = await cursor.fetchone()
    assert row is not None
    return int(row[0])
