"""Properties of the delivery logic over random actions, entries and answers.

The entries are what a row may hold: tenants of every JSON type (and hostile
strings), the same order more than once, NUL, lone surrogates and control
characters in messages. The secrets need escaping everywhere and carry a
character (🔑) no other generated text holds, so finding one outside its
header is a leak, never a coincidence.
"""

from __future__ import annotations

import json
import random
import re
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import unquote

from hypothesis import given
from hypothesis import strategies as st
from standardwebhooks.webhooks import Webhook

from order_monitor.config import ActionConfig
from order_monitor.config.settings import DELIVERABLE_OUTCOMES
from order_monitor.delivery.answers import interpret
from order_monitor.delivery.model import Entry, Verdict
from order_monitor.delivery.requests import Request, build_requests
from order_monitor.providers.limits import MAX_RETRY_AFTER, MIN_RETRY_AFTER
from tests.delivery.test_requests import SIGNING_KEY, make_action, make_webhook

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
KEY = "🔑"
#: What no header value may hold: C0/C1 controls, DEL, lone surrogates.
HEADER_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
#: What no stored or logged error may hold (whitespace is collapsed to spaces).
ERROR_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
MISSING = "<missing>"

#: Any character, lone surrogates, NUL and controls included, but the key.
any_char = st.characters(exclude_categories=(), exclude_characters=KEY)
hostile_text = st.text(any_char, max_size=30) | st.sampled_from(
    ["a/b?c", "a\r\nX-Evil: 1", "\x00", "\ud800", "\udfff\x1b[2J", "", " ", "null", "1", "x" * 5000]
)
tenants = st.one_of(
    st.just(MISSING),
    st.none(),
    st.booleans(),
    st.integers(-2, 2),
    st.floats(allow_nan=False, allow_infinity=False, width=16),
    hostile_text,
    st.sampled_from(["t1", "t2", "1"]),
    st.lists(st.integers(0, 1), max_size=2),
)
messages = st.none() | hostile_text
secrets = st.text(
    st.characters(exclude_categories=("Cc", "Cs"), exclude_characters=KEY), max_size=12
).map(lambda s: f'p@ss:w/rd?&%"{s}é{KEY}')


@st.composite
def entries(draw: st.DrawFn, max_size: int = 30) -> list[Entry]:
    orders = [uuid.uuid4() for _ in range(4)]
    count = draw(st.integers(0, max_size))
    made = []
    for _ in range(count):
        tenant = draw(tenants)
        made.append(
            Entry(
                delivery_id=uuid.UUID(int=draw(st.integers(0, 2**128 - 1))),
                order_id=draw(st.sampled_from(orders) | st.builds(uuid.uuid4)),
                outcome=draw(st.sampled_from(DELIVERABLE_OUTCOMES)),
                provider_message=draw(messages),
                last_message=draw(messages),
                columns={} if tenant == MISSING else {"tenantId": tenant, "other": draw(tenants)},
                recorded_at=T0 + timedelta(seconds=draw(st.integers(0, 5))),
            )
        )
    # Delivery ids are the outbox's primary key: unique.
    unique = {e.delivery_id: e for e in made}
    return list(unique.values())


@st.composite
def http_actions(draw: st.DrawFn) -> ActionConfig:
    url = draw(
        st.sampled_from(
            [
                "https://app.example/api/admin/orders/bulk/approve",
                "https://app.example/t/{column:tenantId}/finish",
                "https://app.example:8443/{outcome}?tenant={column:tenantId}&m={message}",
            ]
        )
    )
    headers = draw(
        st.fixed_dictionaries(
            {"Authorization": st.just("Bearer {secret:token}")},
            optional={
                "X-Tenant-Id": st.just("{column:tenantId}"),
                "X-Note": st.just("note: {message}"),
                "Idempotency-Key": st.just("{request_id}"),
                "X-Outcome": st.just("{outcome}"),
            },
        )
    )
    body = draw(
        st.fixed_dictionaries(
            {"ids": st.just("{ids}")},
            optional={
                "note": st.just("{message}"),
                "tenant": st.just("{column:tenantId}"),
                "outcome": st.just("{outcome}"),
                "text": st.just("t={column:tenantId} m={message} {{literal}}"),
                "deliveries": st.just("{delivery_ids}"),
                "key": st.just("{request_id}"),
            },
        )
    )
    return make_action(
        url=url,
        headers=headers,
        body=body,
        batch_size=draw(st.integers(1, 6)),
        outcomes=DELIVERABLE_OUTCOMES,
        secrets={"token": draw(secrets)},
    )


def used(action: ActionConfig) -> set[str]:
    """The per-request placeholders the action's templates use (read from the texts)."""
    joined = " ".join([action.url, *action.headers.values(), json.dumps(action.body)])
    return {p for p in ("{column:tenantId}", "{message}", "{outcome}") if p in joined}


def value_of(entry: Entry, placeholder: str) -> tuple[str, str]:
    """The value a placeholder stands for, told apart by type (1, "1", true differ)."""
    if placeholder == "{outcome}":
        value: Any = entry.outcome
    elif placeholder == "{message}":
        value = entry.message
    else:
        value = entry.columns.get("tenantId")
    return type(value).__name__, repr(value)


def strict_json(body: bytes) -> Any:
    def refuse(constant: str) -> Any:
        raise ValueError(f"{constant} is not JSON")

    return json.loads(body.decode("utf-8"), parse_constant=refuse)


def strings_of(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in [k, *strings_of(v)]]
    if isinstance(value, list):
        return [s for v in value for s in strings_of(v)]
    return []


def assert_no_secret_outside_its_header(request: Request, secret: str) -> None:
    assert secret not in request.describe()
    assert secret not in request.url
    assert secret not in unquote(request.url)
    assert secret.encode("utf-8") not in request.body
    assert KEY not in request.body.decode("utf-8")
    for name, value in request.headers.items():
        if name != "Authorization":
            assert KEY not in value


# --- building -----------------------------------------------------------------------------


@given(action=http_actions(), batch=entries(), seed=st.integers(0, 2**32))
def test_http_requests_keep_every_promise(
    action: ActionConfig, batch: list[Entry], seed: int
) -> None:
    requests = build_requests(action, batch, now=T0)
    secret = action.secrets["token"].reveal()
    placeholders = used(action)

    # Every entry in exactly one request.
    sent = sorted(e.delivery_id for r in requests for e in r.deliveries)
    assert sent == sorted(e.delivery_id for e in batch)

    where: dict[uuid.UUID, int] = {}
    for index, request in enumerate(requests):
        deliveries = request.deliveries
        assert 1 <= len(deliveries) <= action.batch_size
        # Never an order twice in one request.
        assert len({e.order_id for e in deliveries}) == len(deliveries)
        # Never two tenants (or messages, outcomes the templates use) in one request.
        for placeholder in placeholders:
            assert len({value_of(e, placeholder) for e in deliveries}) == 1
        for entry in deliveries:
            where[entry.delivery_id] = index

        body = strict_json(request.body)
        assert body["ids"] == [str(e.order_id) for e in deliveries]
        if "deliveries" in body:
            assert body["deliveries"] == [str(e.delivery_id) for e in deliveries]
        for value in request.headers.values():
            assert not HEADER_UNSAFE.search(value)
        assert request.headers["Authorization"] == f"Bearer {secret}"
        assert_no_secret_outside_its_header(request, secret)
        assert "?" not in request.describe().split(" (")[0]

    # A second entry of an order (same values) goes in a later request.
    ordered = sorted(batch, key=lambda e: (e.recorded_at, e.delivery_id))
    for i, first in enumerate(ordered):
        for second in ordered[i + 1 :]:
            same_group = all(value_of(first, p) == value_of(second, p) for p in placeholders)
            if first.order_id == second.order_id and same_group:
                assert where[first.delivery_id] < where[second.delivery_id]

    # The same entries in any order: the same requests, the same ids.
    shuffled = batch[:]
    random.Random(seed).shuffle(shuffled)
    again = build_requests(action, shuffled, now=T0 + timedelta(hours=1))
    assert [(r.request_id, r.url, r.body, dict(r.headers)) for r in again] == [
        (r.request_id, r.url, r.body, dict(r.headers)) for r in requests
    ]
    assert len({r.request_id for r in requests}) == len(requests)


@given(batch=entries(max_size=8), secret_header=st.booleans())
def test_webhook_events_always_verify_and_carry_only_clean_text(
    batch: list[Entry], secret_header: bool
) -> None:
    headers = {"X-Tenant-Id": "{column:tenantId}", "X-Note": "{message}"}
    if secret_header:
        headers["Authorization"] = "Bearer {secret:token}"
    action = make_webhook(
        headers=headers,
        columns=("tenantId", "absent"),
        secrets={"signing_secret": SIGNING_KEY, "token": f"tok{KEY}"},
    )
    now = datetime.now(UTC)  # the library verifies against its own clock
    requests = build_requests(action, batch, now=now)
    assert len(requests) == len(batch)
    for request in requests:
        (entry,) = request.deliveries
        event = Webhook(SIGNING_KEY).verify(request.body, dict(request.headers))
        assert event == strict_json(request.body)
        assert event["data"]["delivery_id"] == str(entry.delivery_id)
        assert event["data"]["order_id"] == str(entry.order_id)
        assert event["data"]["columns"]["absent"] is None
        assert not any(re.search("[\x00\ud800-\udfff]", s) for s in strings_of(event))
        for value in request.headers.values():
            assert not HEADER_UNSAFE.search(value)
        assert_no_secret_outside_its_header(request, f"tok{KEY}")


# --- answers ------------------------------------------------------------------------------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(any_char, max_size=20),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.text(any_char, max_size=5), children, max_size=4)
    ),
    max_leaves=12,
)


@st.composite
def answer_bodies(draw: st.DrawFn, order_ids: list[str], secret: str) -> bytes | None:
    error_ids = st.sampled_from([*order_ids, *(i.upper() for i in order_ids)]) | json_values
    error_entry = st.fixed_dictionaries(
        {}, optional={"id": error_ids, "error": json_values | st.just(secret)}
    )
    document = st.fixed_dictionaries(
        {},
        optional={
            "ok": st.just(True) | json_values,
            "count": json_values,
            "errors": st.lists(error_entry | json_values, max_size=5) | json_values,
        },
    )
    body = draw(
        st.none()
        | st.binary(max_size=300)
        | document.map(lambda d: json.dumps(d).encode())
        | json_values.map(
            lambda d: json.dumps(d, ensure_ascii=False).encode("utf-8", "surrogatepass")
        )
    )
    if draw(st.booleans()):
        # An application that echoes our credentials back, in any of its forms.
        echoed = draw(st.sampled_from([secret, json.dumps(secret), f"Bearer {secret}"]))
        body = (body or b"")[:100] + echoed.encode("utf-8") + draw(st.binary(max_size=20))
    return body


@given(data=st.data())
def test_interpret_gives_one_verdict_per_delivery_whatever_the_answer(data: st.DataObject) -> None:
    secret = data.draw(secrets)
    action = make_action(
        kind=data.draw(st.sampled_from(["http", "http", "webhook"])),
        success=data.draw(st.just({}) | st.just({"ok": True})),
        errors_path=data.draw(st.none() | st.sampled_from(["errors", "errors.0", "a.b"])),
        confirm_status=data.draw(st.none() | st.just("approved")),
        secrets={"token": secret},
        headers={"Authorization": "Bearer {secret:token}"},
    )
    batch = data.draw(entries(max_size=5).filter(bool))
    requests = build_requests(make_action(headers={}, batch_size=100), batch, now=T0)
    request = data.draw(st.sampled_from(requests))
    order_ids = [str(e.order_id) for e in request.deliveries]
    status = data.draw(
        st.none()
        | st.sampled_from([200, 201, 204, 301, 400, 401, 403, 404, 408, 409, 425, 429, 500, 503])
        | st.integers(-10, 1200)
    )
    body = data.draw(answer_bodies(order_ids, secret))
    headers = data.draw(
        st.none()
        | st.dictionaries(
            st.sampled_from(["Retry-After", "retry-after", "Content-Type"]) | st.text(max_size=5),
            st.text(any_char, max_size=40)
            | st.sampled_from(["0", "120", "9" * 500, "Wed, 21 Oct 2015 07:28:00 GMT"]),
            max_size=3,
        )
    )
    failure = data.draw(st.none() | st.text(any_char, max_size=50))

    answer = interpret(action, request, status, body, headers, failure=failure, now=1_780_000_000.0)

    ids = {e.delivery_id for e in request.deliveries}
    assert set(answer.verdicts) == ids
    accepted = {Verdict.DELIVERED, Verdict.TAKEN}
    failed = {i for i, v in answer.verdicts.items() if v not in accepted}
    assert set(answer.errors) == failed
    for error in answer.errors.values():
        assert error
        assert len(error) <= 500
        assert not ERROR_UNSAFE.search(error)
        assert secret not in error
    assert answer.status == status
    if answer.retry_after is not None:
        assert MIN_RETRY_AFTER <= answer.retry_after <= MAX_RETRY_AFTER
    if status is None or not 200 <= status <= 299:
        assert not failed.symmetric_difference(ids)
    if action.confirm_status is None:
        assert Verdict.TAKEN not in answer.verdicts.values()
    else:
        assert Verdict.DELIVERED not in answer.verdicts.values()
