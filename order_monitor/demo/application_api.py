"""The reference application's admin API, faked: bulk approve and bulk reject, on the real table.

What an order-monitor ``http`` action talks to, behaving as
``reference/application.md`` ("How the application finishes an order")
describes the real one. It is also the short answer to "what must my API
do?":

* ``POST /api/admin/orders/bulk/approve`` and ``.../bulk/reject`` with
  ``{"ids": [...], "note": "..."}``, ``Authorization: Bearer <token>`` (else
  401) and ``X-Tenant-Id`` (else 400 ``TENANT_ID_REQUIRED``); no ids: 400
  ``ids required``.
* Each id in its own transaction, the row locked (``SELECT ... FOR UPDATE``):
  an unknown id is skipped silently (not counted); an order of another
  tenant is refused (``TENANT_MISMATCH``); asking for the status the order
  already has changes nothing (the transition is idempotent per order: never
  a second refund); a final order asked for the other final word is refused
  (``STATUS_ERROR``).
* Approve sets ``status = 'approved'``. Reject sets ``status = 'rejected'``
  and refunds ``"sellPriceAmount"`` (else ``price``) into the user's balance
  with a wallet record whose primary key is the order: one refund per order,
  enforced by the database too. An order without a user cannot be refunded
  (``LEGACY_USER_MISSING``). Both set ``"externalStatus"``,
  ``"completedAt"``, ``"lastSyncAt"``, ``"durationMs"`` and, with a note,
  ``"manualNote"``, ``"providerMessage"`` and ``"lastMessage"``.
* The answer is 200 ``{"ok": true, "count": <orders changed>}``, plus
  ``"errors": [{"id", "error"}]`` when some ids failed.

Tests steer it with fault knobs (:meth:`ApplicationApi.fail_next`,
:meth:`~ApplicationApi.hang_next`, :meth:`~ApplicationApi.reject_id`, the
``token`` attribute) and read what it received in ``requests``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Final, NamedTuple

import psycopg
from aiohttp import web
from psycopg import sql

from order_monitor.config import ActionConfig, Layout, ProviderLimits
from order_monitor.redaction import Secret

APPROVE_PATH: Final = "/api/admin/orders/bulk/approve"
REJECT_PATH: Final = "/api/admin/orders/bulk/reject"


def reference_actions(
    base_url: str, token: str, *, limits: ProviderLimits | None = None, **changes: Any
) -> tuple[ActionConfig, ActionConfig]:
    """The README's reference configuration for this API: approve done orders, reject (and
    refund) failed ones; *changes* apply to both (a test's attempts, max_age...).

    The one definition the demo, the bench and the tests share; a test keeps it
    equal to what the README's TOML parses into.
    """

    def action(name: str, outcome: str, path: str, confirm: str) -> ActionConfig:
        fields: dict[str, Any] = {
            "kind": "http",
            "limits": limits or ProviderLimits(),
            "secrets": {"token": Secret(token)},
            "headers": {
                "Authorization": "Bearer {secret:token}",
                "X-Tenant-Id": "{column:tenantId}",
                "Idempotency-Key": "{request_id}",
            },
            "body": {"ids": "{ids}", "note": "{message}"},
            "success": {"ok": True},
            "errors_path": "errors",
            "confirm_status": confirm,
            **changes,
        }
        return ActionConfig(name=name, outcomes=(outcome,), url=base_url + path, **fields)

    return (
        action("approve", "done", APPROVE_PATH, "approved"),
        action("reject", "failed", REJECT_PATH, "rejected"),
    )


#: The application's own tables for money: a balance per user, and one
#: wallet record per refunded order (the primary key makes a second refund
#: of an order impossible, whatever the code above it does).
BALANCES: Final = "app_user_balances"
WALLET: Final = "app_wallet_transactions"

#: The reference table, where the application keeps it.
REFERENCE_LAYOUT: Final = Layout()

#: The lastMessage column is varchar(250).
LAST_MESSAGE_MAX: Final = 250


@dataclass(frozen=True, slots=True)
class _Transition:
    status: str  # the business status asked for
    external_status: str  # what the application writes beside it
    refund: bool


_TRANSITIONS: Final = {
    APPROVE_PATH: _Transition("approved", "done", refund=False),
    REJECT_PATH: _Transition("rejected", "failed", refund=True),
}
_FINAL: Final = frozenset(t.status for t in _TRANSITIONS.values())


class Recorded(NamedTuple):
    """One request as received (before any fault knob answered it)."""

    path: str
    headers: dict[str, str]
    #: The parsed JSON body; None when it was not JSON.
    json: Any


def prepare_application_tables(conn: psycopg.Connection[Any]) -> None:
    """Create the balance and wallet tables the transitions use (idempotent).

    Run on the application's connection (the table's owner or a superuser):
    the daemon's role never sees these tables.
    """
    conn.execute(
        sql.SQL(
            "CREATE TABLE IF NOT EXISTS {balances} ("
            " user_id uuid PRIMARY KEY,"
            " balance numeric(12,2) NOT NULL DEFAULT 0)"
        ).format(balances=sql.Identifier(BALANCES))
    )
    conn.execute(
        sql.SQL(
            "CREATE TABLE IF NOT EXISTS {wallet} ("
            " order_id uuid PRIMARY KEY,"  # one record per order: never two refunds
            " user_id uuid NOT NULL,"
            " kind text NOT NULL CHECK (kind = 'refund'),"
            " amount numeric(12,2) NOT NULL,"
            " created_at timestamptz NOT NULL DEFAULT pg_catalog.now())"
        ).format(wallet=sql.Identifier(WALLET))
    )


class _Refused(Exception):
    """This id is refused with an error word; its transaction is rolled back."""

    def __init__(self, error: str) -> None:
        super().__init__(error)
        self.error = error


class ApplicationApi:
    """A fake of the reference application's admin API that behaves like it, on the real table.

    ::

        api = ApplicationApi(dsn, token="t")
        await api.start()
        ...  # point an action at api.base_url + "/api/admin/orders/bulk/approve"
        await api.close()
    """

    def __init__(
        self, dsn: str, *, token: str, layout: Layout = REFERENCE_LAYOUT, connections: int = 4
    ) -> None:
        self._dsn = dsn
        self._layout = layout
        #: The bearer token it accepts; change it for a 401 phase.
        self.token = token
        #: Every request received, in order.
        self.requests: list[Recorded] = []
        self._failures: list[tuple[int, str | None]] = []
        self._hangs = 0
        self._rejections: dict[uuid.UUID, tuple[str, int | None]] = {}
        self._closing = asyncio.Event()
        self._limit = asyncio.Semaphore(connections)
        self._idle: list[psycopg.AsyncConnection[Any]] = []
        self._runner: web.AppRunner | None = None
        self._base_url: str | None = None
        self._app = web.Application()
        for path in _TRANSITIONS:
            self._app.router.add_post(path, self._handle)

    # --- fault knobs --------------------------------------------------------------

    def fail_next(self, status: int, count: int = 1, retry_after: str | None = None) -> None:
        """Answer the next *count* requests *status* (with ``Retry-After`` when given)."""
        self._failures.extend([(status, retry_after)] * count)

    def hang_next(self, count: int = 1) -> None:
        """Never answer the next *count* requests (until closed, or the client gives up)."""
        self._hangs += count

    def reject_id(
        self, order_id: uuid.UUID, error: str | None, *, times: int | None = None
    ) -> None:
        """Refuse *order_id* with *error* in the answer's errors (the order is not changed).

        *times*: for that many requests naming it, then it goes through;
        None: until told otherwise. ``error=None`` stops refusing it.
        """
        if error is None:
            self._rejections.pop(order_id, None)
        else:
            self._rejections[order_id] = (error, times)

    # --- running ------------------------------------------------------------------

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        """Listen on host:port (0: a free port); see :attr:`base_url`."""
        if self._runner is not None:
            raise RuntimeError("the application's API is already running")
        self._closing = asyncio.Event()
        runner = web.AppRunner(self._app, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        await web.TCPSite(runner, host, port).start()
        self._runner = runner
        bound = runner.addresses[0][1] if runner.addresses else port
        self._base_url = f"http://{host}:{bound}"

    async def close(self) -> None:
        self._closing.set()  # releases hanging requests
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()
        idle, self._idle = self._idle, []
        for conn in idle:
            await conn.close()

    @contextlib.asynccontextmanager
    async def running(self, host: str = "127.0.0.1", port: int = 0) -> AsyncIterator[str]:
        """Started for the block; yields :attr:`base_url`."""
        await self.start(host, port)
        try:
            yield self.base_url
        finally:
            await self.close()

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT``, once started."""
        if self._base_url is None:
            raise RuntimeError("the application's API is not started")
        return self._base_url

    # --- the API ------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        try:
            body: Any = json.loads(raw)
        except ValueError:
            body = None
        self.requests.append(Recorded(request.path, dict(request.headers), body))

        if self._hangs:
            self._hangs -= 1
            await self._closing.wait()
            return _answer({"ok": False, "message": "shutting down"}, 503)
        if self._failures:
            status, retry_after = self._failures.pop(0)
            headers = {"Retry-After": retry_after} if retry_after is not None else {}
            return _answer({"ok": False, "message": f"injected {status}"}, status, headers)

        given = request.headers.get("Authorization", "")
        expected = f"Bearer {self.token}"
        if not hmac.compare_digest(_bytes(given), _bytes(expected)):
            return _answer({"ok": False, "message": "Unauthorized"}, 401)
        tenant = request.headers.get("X-Tenant-Id", "").strip()
        if not tenant:
            return _answer({"ok": False, "message": "TENANT_ID_REQUIRED"}, 400)
        ids = body.get("ids") if isinstance(body, dict) else None
        if not isinstance(ids, list) or not ids:
            return _answer({"ok": False, "message": "ids required"}, 400)
        note = body.get("note")
        note = note if isinstance(note, str) and note else None

        transition = _TRANSITIONS[request.path]
        count, errors = 0, []
        for raw_id in ids:  # one by one, each in its own transaction, as the application does
            order_id = _as_uuid(raw_id)
            if order_id is None:
                continue  # no such order: skipped silently, like an unknown id
            try:
                changed = await self._finish(order_id, tenant, transition, note)
            except _Refused as refused:
                errors.append({"id": str(raw_id), "error": refused.error})
            except (psycopg.Error, UnicodeError):  # the application's 500 for this id
                errors.append({"id": str(raw_id), "error": "UNEXPECTED_ERROR"})
            else:
                count += changed
        answer: dict[str, Any] = {"ok": True, "count": count}
        if errors:
            answer["errors"] = errors
        return _answer(answer, 200)

    async def _finish(
        self, order_id: uuid.UUID, tenant: str, transition: _Transition, note: str | None
    ) -> bool:
        """One order's transition in its own transaction: True when the order changed."""
        table = sql.Identifier(self._layout.schema, self._layout.table)
        async with self._connection() as conn, conn.transaction():
            cursor = await conn.execute(
                sql.SQL(
                    'SELECT "tenantId"::text, status, "userId",'
                    ' coalesce(nullif("sellPriceAmount", 0), price)'
                    " FROM {} WHERE id = %s FOR UPDATE"
                ).format(table),
                (order_id,),
            )
            row = await cursor.fetchone()
            if row is None:
                return False  # unknown id: skipped silently, not counted
            order_tenant, status, user_id, amount = row
            if order_tenant is None or order_tenant.lower() != tenant.lower():
                raise _Refused("TENANT_MISMATCH")
            injected = self._injected_rejection(order_id)
            if injected is not None:
                raise _Refused(injected)
            current = (status or "").lower()
            if current == transition.status:
                return False  # already there: nothing changes, no second refund
            if current in _FINAL:
                raise _Refused("STATUS_ERROR")
            if transition.refund:
                await self._refund(conn, order_id, user_id, amount)
            await conn.execute(
                sql.SQL(
                    "UPDATE {} SET status = %(status)s,"
                    ' "externalStatus" = %(external)s,'
                    ' "completedAt" = pg_catalog.now(), "lastSyncAt" = pg_catalog.now(),'
                    ' "durationMs" ='
                    ' (extract(epoch FROM pg_catalog.now() - "sentAt") * 1000)::integer,'
                    ' "manualNote" = coalesce(%(note)s, "manualNote"),'
                    ' "providerMessage" = coalesce(%(note)s, "providerMessage"),'
                    ' "lastMessage" = coalesce(%(last)s, "lastMessage")'
                    " WHERE id = %(id)s"
                ).format(table),
                {
                    "status": transition.status,
                    "external": transition.external_status,
                    "note": note,
                    "last": None if note is None else note[:LAST_MESSAGE_MAX],
                    "id": order_id,
                },
            )
            return True

    @staticmethod
    async def _refund(
        conn: psycopg.AsyncConnection[Any],
        order_id: uuid.UUID,
        user_id: uuid.UUID | None,
        amount: Decimal,
    ) -> None:
        if user_id is None:
            raise _Refused("LEGACY_USER_MISSING")
        # The wallet record first: its primary key refuses a second refund of the order.
        await conn.execute(
            sql.SQL(
                "INSERT INTO {} (order_id, user_id, kind, amount) VALUES (%s, %s, 'refund', %s)"
            ).format(sql.Identifier(WALLET)),
            (order_id, user_id, amount),
        )
        await conn.execute(
            sql.SQL(
                "INSERT INTO {} AS b (user_id, balance) VALUES (%s, %s)"
                " ON CONFLICT (user_id) DO UPDATE SET balance = b.balance + excluded.balance"
            ).format(sql.Identifier(BALANCES)),
            (user_id, amount),
        )

    def _injected_rejection(self, order_id: uuid.UUID) -> str | None:
        found = self._rejections.get(order_id)
        if found is None:
            return None
        error, times = found
        if times is not None:
            if times <= 1:
                del self._rejections[order_id]
            else:
                self._rejections[order_id] = (error, times - 1)
        return error

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        """A connection of a small pool (the application's, not the daemon's role)."""
        async with self._limit:
            conn = (
                self._idle.pop()
                if self._idle
                else await psycopg.AsyncConnection.connect(self._dsn, autocommit=True)
            )
            try:
                yield conn
            finally:
                if conn.closed or conn.broken or self._closing.is_set():
                    await conn.close()
                else:
                    self._idle.append(conn)


def _bytes(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")


def _as_uuid(value: object) -> uuid.UUID | None:
    if not isinstance(value, str):
        return None
    try:
        return uuid.UUID(value)
    except ValueError:
        return None


def _answer(
    body: dict[str, Any], status: int, headers: dict[str, str] | None = None
) -> web.Response:
    return web.json_response(body, status=status, headers=headers)
