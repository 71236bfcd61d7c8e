"""Building the requests: batching by tenant, chunking, ids, headers, webhooks.

Also the builders the other delivery tests use (:func:`make_action`,
:func:`make_entry`): plain settings and outbox values, no database.
"""

from __future__ import annotations

import json
import random
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from order_monitor.config import ActionConfig
from order_monitor.config.settings import WEBHOOK_SECRET, ProviderLimits
from order_monitor.delivery.model import Entry
from order_monitor.delivery.requests import Request, build_requests
from order_monitor.errors import ConfigError
from order_monitor.redaction import Secret

#: Needs escaping in a URL, a header and JSON; never shown.
TOKEN = 'p@ss:w/rd?&%"é🔑tok'
#: A Standard Webhooks key (whsec_ + base64 of 24 bytes).
SIGNING_KEY = "whsec_AAECAwQFBgcICQoLDA0ODxAREhMUFRYX"
APPROVE = "https://app.example:8443/api/admin/orders/bulk/approve"
T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
NOW = T0 + timedelta(minutes=5)
TENANT_A = "11111111-1111-4111-8111-111111111111"
TENANT_B = "22222222-2222-4222-8222-222222222222"

_MISSING: Any = object()


def make_action(
    *,
    secrets: Mapping[str, str] | None = None,
    **changes: Any,
) -> ActionConfig:
    """The reference application's approve call, with *changes*."""
    fields: dict[str, Any] = {
        "name": "approve",
        "kind": "http",
        "outcomes": ("done",),
        "url": APPROVE,
        "limits": ProviderLimits(),
        "headers": {
            "Authorization": "Bearer {secret:token}",
            "X-Tenant-Id": "{column:tenantId}",
        },
        "body": {"ids": "{ids}"},
    }
    fields.update(changes)
    secret_values = {"token": TOKEN} if secrets is None else secrets
    return ActionConfig(secrets={k: Secret(v) for k, v in secret_values.items()}, **fields)


def make_webhook(**changes: Any) -> ActionConfig:
    fields: dict[str, Any] = {
        "name": "events",
        "kind": "webhook",
        "outcomes": ("done", "failed", "gave_up"),
        "url": "https://hooks.example/order-monitor",
        "headers": {},
        "body": None,
        "columns": ("tenantId", "price"),
        "secrets": {WEBHOOK_SECRET: SIGNING_KEY},
    }
    fields.update(changes)
    return make_action(**fields)


def make_entry(
    n: int = 0,
    *,
    order: uuid.UUID | None = None,
    tenant: Any = TENANT_A,
    outcome: str = "done",
    message: str | None = "ok",
    recorded_at: datetime | None = None,
    columns: Mapping[str, Any] | None = None,
) -> Entry:
    """Entry number *n* (recorded n seconds after T0), tenant in ``tenantId`` unless missing."""
    if columns is None:
        columns = {} if tenant is _MISSING else {"tenantId": tenant}
    return Entry(
        delivery_id=uuid.uuid4(),
        order_id=order or uuid.uuid4(),
        outcome=outcome,
        provider_message=message,
        last_message=None,
        columns=dict(columns),
        recorded_at=recorded_at or T0 + timedelta(seconds=n),
    )


def body_of(request: Request) -> Any:
    return json.loads(request.body.decode("utf-8"))


def delivered(requests: list[Request]) -> list[list[uuid.UUID]]:
    return [[e.delivery_id for e in r.deliveries] for r in requests]


# --- http: the reference application ------------------------------------------------------


def test_one_request_per_tenant_with_the_reference_shape() -> None:
    a = [make_entry(i, tenant=TENANT_A) for i in range(3)]
    b = [make_entry(10 + i, tenant=TENANT_B) for i in range(2)]
    requests = build_requests(make_action(), [b[0], *a, b[1]], now=NOW)

    assert len(requests) == 2
    for request, group, tenant in zip(requests, (a, b), (TENANT_A, TENANT_B), strict=True):
        assert request.method == "POST"
        assert request.url == APPROVE
        assert request.action == "approve"
        assert request.headers["Authorization"] == f"Bearer {TOKEN}"
        assert request.headers["X-Tenant-Id"] == tenant
        assert request.headers["Content-Type"] == "application/json"
        assert body_of(request) == {"ids": [str(e.order_id) for e in group]}
        assert request.deliveries == tuple(group)


def test_entries_go_in_recording_order_then_delivery_id() -> None:
    same_time = [make_entry(5) for _ in range(4)]
    earlier = make_entry(1)
    (request,) = build_requests(make_action(), [*same_time, earlier], now=NOW)
    ties = sorted(same_time, key=lambda e: e.delivery_id)
    assert request.deliveries == (earlier, *ties)


def test_values_of_different_json_types_never_share_a_request() -> None:
    # 1, "1" and true render alike in a header but are different tenants.
    values = [1, "1", True, 1.5, None, _MISSING, "", [1], {"a": 1}]
    entries = [make_entry(i, tenant=v) for i, v in enumerate(values)]
    requests = build_requests(make_action(), entries, now=NOW)
    groups = sorted(sorted(e.delivery_id for e in r.deliveries) for r in requests)
    # A missing column and null are the one value "nothing": one request.
    together = sorted([entries[4].delivery_id, entries[5].delivery_id])
    assert together in groups
    assert len(requests) == len(values) - 1


def test_a_placeholder_the_templates_do_not_use_does_not_split() -> None:
    action = make_action(headers={"Authorization": "Bearer {secret:token}"})
    entries = [make_entry(i, tenant=t, message=f"m{i}") for i, t in enumerate("abc")]
    assert len(build_requests(action, entries, now=NOW)) == 1


@pytest.mark.parametrize(
    ("body", "split_by"),
    [
        ({"ids": "{ids}", "note": "{message}"}, "message"),
        ({"ids": "{ids}", "status": "order {outcome}"}, "outcome"),
    ],
)
def test_message_and_outcome_in_a_template_split_like_a_column(body: object, split_by: str) -> None:
    action = make_action(body=body, headers={}, outcomes=("done", "failed"))
    if split_by == "message":
        entries = [make_entry(i, message=m) for i, m in enumerate(["a", "b", "a", None, ""])]
        expected = 3  # "a" twice; no message and an empty one are both null
    else:
        entries = [make_entry(i, outcome=o) for i, o in enumerate(["done", "failed", "done"])]
        expected = 2
    requests = build_requests(action, entries, now=NOW)
    assert len(requests) == expected
    for request in requests:
        values = {getattr(e, split_by) for e in request.deliveries}
        assert len(values) == 1


def test_each_group_is_cut_to_batch_size_in_order() -> None:
    entries = [make_entry(i) for i in range(5)]
    requests = build_requests(make_action(batch_size=2), entries, now=NOW)
    assert delivered(requests) == [
        [entries[0].delivery_id, entries[1].delivery_id],
        [entries[2].delivery_id, entries[3].delivery_id],
        [entries[4].delivery_id],
    ]


def test_an_order_is_never_twice_in_one_request() -> None:
    order = uuid.uuid4()
    first, second = make_entry(1, order=order), make_entry(2, order=order)
    others = [make_entry(3 + i) for i in range(2)]
    requests = build_requests(make_action(batch_size=10), [second, *others, first], now=NOW)
    assert len(requests) == 2
    # The second entry of the order waits for a later request of its group.
    assert first in requests[0].deliveries
    assert second in requests[1].deliveries
    assert {e.delivery_id for e in others} <= {e.delivery_id for e in requests[0].deliveries}


def test_the_request_id_names_the_set_of_deliveries() -> None:
    entries = [make_entry(i) for i in range(3)]
    action = make_action(headers={"Idempotency-Key": "{request_id}"})
    (request,) = build_requests(action, entries, now=NOW)
    shuffled = entries[:]
    random.Random(7).shuffle(shuffled)
    (again,) = build_requests(action, shuffled, now=NOW + timedelta(hours=1))
    (fewer,) = build_requests(action, entries[:2], now=NOW)

    assert request.request_id == again.request_id
    assert request.request_id != fewer.request_id
    assert uuid.UUID(request.request_id).version == 5
    assert request.headers["Idempotency-Key"] == request.request_id


def test_lists_and_ids_in_the_body() -> None:
    entries = [make_entry(i) for i in range(2)]
    body = {
        "ids": "{ids}",
        "deliveries": "{delivery_ids}",
        "key": "{request_id}",
        "tenant": "{column:tenantId}",
        "meta": {"text": "tenant {column:tenantId}, {{literal}}", "n": 3, "keep": [True, None]},
    }
    (request,) = build_requests(make_action(body=body), entries, now=NOW)
    assert body_of(request) == {
        "ids": [str(e.order_id) for e in entries],
        "deliveries": [str(e.delivery_id) for e in entries],
        "key": request.request_id,
        "tenant": TENANT_A,
        "meta": {"text": f"tenant {TENANT_A}, {{literal}}", "n": 3, "keep": [True, None]},
    }


def test_a_recorded_value_keeps_its_json_type_in_the_body() -> None:
    action = make_action(body={"ids": "{ids}", "price": "{column:price}"}, headers={})
    entry = make_entry(columns={"price": {"amount": 12.5, "currency": "TRY"}})
    (request,) = build_requests(action, [entry], now=NOW)
    assert body_of(request)["price"] == {"amount": 12.5, "currency": "TRY"}


def test_the_action_content_type_is_kept_not_doubled() -> None:
    action = make_action(headers={"content-type": "application/vnd.app+json"})
    (request,) = build_requests(action, [make_entry()], now=NOW)
    assert dict(request.headers) == {"content-type": "application/vnd.app+json"}


def test_an_action_without_a_body_sends_none() -> None:
    action = make_action(
        method="PUT", body=None, url="https://app.example/finish/{column:tenantId}"
    )
    (request,) = build_requests(action, [make_entry(tenant="a/b?c")], now=NOW)
    assert request.body == b""
    assert "Content-Type" not in request.headers
    assert request.method == "PUT"
    assert request.url == "https://app.example/finish/a%2Fb%3Fc"


def test_a_tenant_with_url_syntax_stays_one_path_segment() -> None:
    action = make_action(url="https://app.example/t/{column:tenantId}/orders?state={outcome}")
    (request,) = build_requests(action, [make_entry(tenant="a/b?c#d e&f")], now=NOW)
    parts = urlsplit(request.url)
    assert parts.path == "/t/a%2Fb%3Fc%23d%20e%26f/orders"
    assert unquote(parts.path.split("/")[2]) == "a/b?c#d e&f"
    assert parts.query == "state=done"


def test_hostile_text_cannot_add_a_header_or_break_the_body() -> None:
    hostile = "x\r\nX-Evil: 1\x00\x1b[31m\udc80\x85"
    action = make_action(
        headers={"X-Note": "{message}", "X-Tenant-Id": "{column:tenantId}"},
        body={"ids": "{ids}", "note": "{message}", "text": "m={message}"},
    )
    (request,) = build_requests(action, [make_entry(tenant=hostile, message=hostile)], now=NOW)
    for value in request.headers.values():
        assert not any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in value)
        assert "\r" not in value
        assert "\n" not in value
        value.encode("utf-8")  # no lone surrogate
    body = body_of(request)  # strict UTF-8, valid JSON
    assert "\x00" not in body["note"]
    assert "\udc80" not in body["note"]
    assert body["note"].startswith("x\r\nX-Evil: 1")  # JSON carries the line break safely


def test_describe_shows_where_and_how_many_but_no_secret() -> None:
    action = make_action(
        url="https://user:{column:tenantId}@app.example:8443/api/finish?token=abc&t={outcome}"
    )
    (request,) = build_requests(action, [make_entry(i) for i in range(3)], now=NOW)
    text = request.describe()
    assert text == (
        f"POST https://app.example:8443/api/finish (3 orders, request {request.request_id})"
    )
    assert TOKEN not in text
    assert "abc" not in text
    assert TENANT_A not in text


def test_describe_one_order_and_an_ipv6_host() -> None:
    action = make_action(url="http://[::1]:8080/finish")
    (request,) = build_requests(action, [make_entry()], now=NOW)
    assert request.describe().startswith("POST http://[::1]:8080/finish (1 order, request ")


def test_no_entries_no_requests() -> None:
    assert build_requests(make_action(), [], now=NOW) == []
    assert build_requests(make_webhook(), [], now=NOW) == []


# --- webhooks -----------------------------------------------------------------------------


def test_a_webhook_is_one_signed_event_per_order_that_the_receiver_verifies() -> None:
    now = datetime.now(UTC)  # the library checks the timestamp against its own clock
    entries = [
        make_entry(1, columns={"tenantId": TENANT_A, "price": 9.5}, message="done: PIN sent"),
        make_entry(2, outcome="failed", columns={"tenantId": TENANT_B}, message=None),
    ]
    requests = build_requests(make_webhook(), entries, now=now)
    assert len(requests) == 2
    for request, entry in zip(requests, entries, strict=True):
        event = Webhook(SIGNING_KEY).verify(request.body, dict(request.headers))
        assert event == {
            "type": f"order.{entry.outcome}",
            "timestamp": now.isoformat(),
            "data": {
                "order_id": str(entry.order_id),
                "delivery_id": str(entry.delivery_id),
                "outcome": entry.outcome,
                "message": entry.message,
                "recorded_at": entry.recorded_at.isoformat(),
                "columns": {
                    "tenantId": entry.columns["tenantId"],
                    "price": entry.columns.get("price"),
                },
            },
        }
        assert request.headers["webhook-id"] == str(entry.delivery_id)
        assert request.headers["webhook-timestamp"] == str(int(now.timestamp()))
        assert request.headers["Content-Type"] == "application/json"
        assert request.deliveries == (entry,)
        assert request.url == "https://hooks.example/order-monitor"
    # Compact JSON, as sent.
    compact = json.dumps(json.loads(requests[0].body), separators=(",", ":"), ensure_ascii=False)
    assert requests[0].body == compact.encode("utf-8")


def test_a_webhook_signature_fails_with_another_key_or_another_body() -> None:
    (request,) = build_requests(make_webhook(), [make_entry()], now=datetime.now(UTC))
    other_key = "whsec_" + "B" * 32
    with pytest.raises(WebhookVerificationError):
        Webhook(other_key).verify(request.body, dict(request.headers))
    with pytest.raises(WebhookVerificationError):
        Webhook(SIGNING_KEY).verify(request.body.replace(b"done", b"fail"), dict(request.headers))


def test_a_retried_webhook_keeps_its_id_and_is_signed_anew() -> None:
    entry = make_entry()
    (first,) = build_requests(make_webhook(), [entry], now=NOW)
    (retry,) = build_requests(make_webhook(), [entry], now=NOW + timedelta(minutes=10))
    assert first.headers["webhook-id"] == retry.headers["webhook-id"]
    assert first.request_id == retry.request_id
    assert first.headers["webhook-timestamp"] != retry.headers["webhook-timestamp"]
    assert first.headers["webhook-signature"] != retry.headers["webhook-signature"]


def test_a_webhook_keeps_the_action_headers_but_its_own_signature_headers_win() -> None:
    action = make_webhook(
        headers={"X-Tenant-Id": "{column:tenantId}", "Webhook-Id": "forged", "content-type": "x"},
    )
    entry = make_entry()
    (request,) = build_requests(action, [entry], now=datetime.now(UTC))
    assert request.headers["X-Tenant-Id"] == TENANT_A
    assert [k for k in request.headers if k.lower() == "webhook-id"] == ["webhook-id"]
    assert request.headers["webhook-id"] == str(entry.delivery_id)
    assert request.headers["Content-Type"] == "application/json"
    assert "content-type" not in request.headers
    Webhook(SIGNING_KEY).verify(request.body, dict(request.headers))


def test_a_webhook_event_with_hostile_text_is_still_valid_json() -> None:
    hostile = "\x00\udcff\u2028" + "x" * 100_000
    entry = make_entry(message=hostile, columns={"tenantId": hostile, "price": None})
    (request,) = build_requests(make_webhook(), [entry], now=datetime.now(UTC))
    event = Webhook(SIGNING_KEY).verify(request.body, dict(request.headers))
    assert event["data"]["message"] == "\ufffd\ufffd\u2028" + "x" * 100_000
    assert event["data"]["columns"]["tenantId"] == event["data"]["message"]


@pytest.mark.parametrize(
    "secrets",
    [{}, {WEBHOOK_SECRET: ""}, {WEBHOOK_SECRET: "whsec_!!!"}, {WEBHOOK_SECRET: "whsec_a"}],
    ids=["missing", "empty", "no-key-in-it", "not-base64"],
)
def test_a_webhook_action_without_a_usable_key_is_a_config_error(
    secrets: dict[str, str],
) -> None:
    with pytest.raises(ConfigError, match=r"\[actions\.events\].*signing_secret") as caught:
        build_requests(make_webhook(secrets=secrets), [make_entry()], now=NOW)
    for value in secrets.values():
        if value:
            assert value not in str(caught.value)
