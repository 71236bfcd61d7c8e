"""Reading the application's answers, with the reference application's real ones."""

from __future__ import annotations

import email.utils
import json
import uuid
from typing import Any

import pytest

from order_monitor.config import ActionConfig
from order_monitor.delivery.answers import MAX_EXCERPT, interpret
from order_monitor.delivery.model import Answer, Verdict
from order_monitor.delivery.requests import Request, build_requests
from order_monitor.providers.limits import MAX_RETRY_AFTER, MIN_RETRY_AFTER
from tests.delivery.test_requests import NOW, TOKEN, make_action, make_entry, make_webhook

WALL = 1_780_000_000.0

#: The reference application's action: per-id errors, success is "ok": true.
REFERENCE: dict[str, Any] = {"success": {"ok": True}, "errors_path": "errors"}


def request_for(action: ActionConfig, count: int = 3) -> Request:
    (request,) = build_requests(action, [make_entry(i) for i in range(count)], now=NOW)
    return request


def answer(
    action: ActionConfig,
    request: Request,
    status: int | None,
    body: bytes | None = b"",
    headers: dict[str, str] | None = None,
    failure: str | None = None,
) -> Answer:
    return interpret(action, request, status, body, headers or {}, failure=failure, now=WALL)


def ids(request: Request) -> list[uuid.UUID]:
    return [e.delivery_id for e in request.deliveries]


def assert_all(result: Answer, request: Request, verdict: Verdict, error: str | None) -> None:
    assert result.verdicts == dict.fromkeys(ids(request), verdict)
    if error is None:
        assert result.errors == {}
    else:
        assert result.errors == dict.fromkeys(ids(request), error)


# --- the reference application ------------------------------------------------------------


def test_200_with_a_tenant_mismatch_rejects_that_order_only() -> None:
    action = make_action(**REFERENCE)
    request = request_for(action)
    wrong = request.deliveries[1]
    body = json.dumps(
        {
            "ok": True,
            "count": 2,
            "errors": [{"id": str(wrong.order_id), "error": "TENANT_MISMATCH"}],
        }
    ).encode()
    result = answer(action, request, 200, body)
    assert result.status == 200
    assert result.verdicts == {
        request.deliveries[0].delivery_id: Verdict.DELIVERED,
        wrong.delivery_id: Verdict.REJECTED,
        request.deliveries[2].delivery_id: Verdict.DELIVERED,
    }
    assert result.errors == {wrong.delivery_id: "TENANT_MISMATCH"}
    assert result.retry_after is None


def test_a_confirm_status_makes_the_accepted_ones_taken_not_delivered() -> None:
    action = make_action(confirm_status="approved", **REFERENCE)
    request = request_for(action, 2)
    result = answer(action, request, 200, b'{"ok":true,"count":0}')
    assert_all(result, request, Verdict.TAKEN, None)


def test_401_and_403_are_our_credentials_not_the_orders() -> None:
    action = make_action(**REFERENCE)
    request = request_for(action)
    for status in (401, 403):
        result = answer(action, request, status, b'{"error":"UNAUTHORIZED"}')
        assert_all(
            result, request, Verdict.AUTH, f"HTTP {status}: the application refused our credentials"
        )


def test_400_ids_required_rejects_with_an_excerpt_of_the_body() -> None:
    action = make_action(**REFERENCE)
    request = request_for(action)
    result = answer(action, request, 400, b'{"error":"ids required"}')
    assert_all(result, request, Verdict.REJECTED, 'HTTP 400: {"error":"ids required"}')


def test_503_with_retry_after_waits_as_asked() -> None:
    action = make_action(**REFERENCE)
    request = request_for(action)
    result = answer(action, request, 503, b"maintenance", {"Retry-After": "120"})
    assert result.verdicts == dict.fromkeys(ids(request), Verdict.RETRY)
    assert result.retry_after == 120.0
    assert "HTTP 503" in result.errors[ids(request)[0]]


# --- statuses -----------------------------------------------------------------------------


def test_no_answer_is_a_retry_with_the_transport_failure() -> None:
    action = make_action()
    request = request_for(action)
    result = answer(action, request, None, None, None, failure="timed out after 20 s")
    assert_all(result, request, Verdict.RETRY, "timed out after 20 s")
    assert result.status is None


@pytest.mark.parametrize("status", [408, 425, 500, 502, 503, 504, 599])
def test_transient_statuses_are_retried(status: int) -> None:
    action = make_action(**REFERENCE)
    request = request_for(action)
    result = answer(action, request, status, b"<html>Bad Gateway</html>")
    assert_all(result, request, Verdict.RETRY, f"HTTP {status}: <html>Bad Gateway</html>")
    assert result.retry_after is None


@pytest.mark.parametrize("status", [301, 302, 304, 400, 404, 405, 409, 410, 413, 422, 451])
def test_other_non_2xx_reject(status: int) -> None:
    action = make_action()
    request = request_for(action)
    assert_all(
        answer(action, request, status), request, Verdict.REJECTED, f"HTTP {status}: (no body)"
    )


@pytest.mark.parametrize("status", [0, 99, 101, 600, 999, -1])
def test_a_status_http_does_not_define_is_retried(status: int) -> None:
    action = make_action()
    request = request_for(action)
    result = answer(action, request, status)
    assert result.verdicts == dict.fromkeys(ids(request), Verdict.RETRY)


def test_429_waits_for_the_retry_after_whatever_the_header_case() -> None:
    action = make_action()
    request = request_for(action)
    assert answer(action, request, 429, headers={"retry-after": "7"}).retry_after == 7.0
    assert answer(action, request, 429, headers={"RETRY-AFTER": " 9 "}).retry_after == 9.0


def test_retry_after_as_an_http_date() -> None:
    action = make_action()
    request = request_for(action)
    date = email.utils.formatdate(WALL + 90, usegmt=True)
    result = answer(action, request, 503, headers={"Retry-After": date})
    assert result.retry_after == pytest.approx(90.0, abs=1.0)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("0", MIN_RETRY_AFTER),
        ("999999999", MAX_RETRY_AFTER),
        ("9" * 400, MAX_RETRY_AFTER),
        ("soon", None),
        ("", None),
        ("-5", None),
        ("Thu, 01 Jan 1970 00:00:00 GMT", MIN_RETRY_AFTER),
        ("Fri, 31 Dec 99999 23:59:59 GMT", None),
    ],
)
def test_retry_after_is_bounded_like_a_providers(value: str, expected: float | None) -> None:
    action = make_action()
    request = request_for(action)
    result = answer(action, request, 429, headers={"Retry-After": value})
    assert result.retry_after == expected
    assert result.verdicts == dict.fromkeys(ids(request), Verdict.RETRY)


def test_429_without_retry_after_retries_without_advice() -> None:
    action = make_action()
    request = request_for(action)
    result = answer(action, request, 429)
    assert result.retry_after is None
    assert set(result.verdicts.values()) == {Verdict.RETRY}


# --- the body of an error -----------------------------------------------------------------


def test_an_error_excerpt_is_cleaned_on_one_line_and_bounded() -> None:
    action = make_action()
    request = request_for(action)
    body = b"line one\r\n\tline\x00two \x1b[31m\xff\xfe" + b"x" * 1_000_000
    error = answer(action, request, 422, body).errors[ids(request)[0]]
    assert error.startswith("HTTP 422: line one line\ufffdtwo \ufffd[31m\ufffd\ufffdxxx")
    assert len(error) <= len("HTTP 422: ") + MAX_EXCERPT
    assert not any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in error)


def test_a_secret_the_application_echoes_is_not_kept() -> None:
    action = make_action()
    request = request_for(action)
    body = json.dumps({"error": "bad token", "got": f"Bearer {TOKEN}"}).encode()
    error = answer(action, request, 400, body).errors[ids(request)[0]]
    assert "bad token" in error
    assert TOKEN not in error
    assert json.dumps(TOKEN)[1:-1] not in error  # nor its JSON-escaped form


# --- 2xx: success checks and per-id errors ------------------------------------------------


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (b'{"ok":false,"count":0}', "HTTP 200 but ok is false (expected true)"),
        (b'{"ok":1}', "HTTP 200 but ok is 1 (expected true)"),
        (b'{"ok":"true"}', 'HTTP 200 but ok is "true" (expected true)'),
        (b'{"count":1}', "HTTP 200 but ok is missing"),
    ],
)
def test_a_failed_success_check_rejects_all(body: bytes, error: str) -> None:
    action = make_action(**REFERENCE)
    request = request_for(action)
    assert_all(answer(action, request, 200, body), request, Verdict.REJECTED, error)


def test_success_paths_are_dotted_and_compare_as_json() -> None:
    action = make_action(success={"result.state": "done", "result.items.0.n": 2})
    request = request_for(action, 1)
    good = b'{"result":{"state":"done","items":[{"n":2.0}]}}'
    assert_all(answer(action, request, 200, good), request, Verdict.DELIVERED, None)
    bad = b'{"result":{"state":"done","items":[{"n":3}]}}'
    assert set(answer(action, request, 200, bad).verdicts.values()) == {Verdict.REJECTED}
    missing = b'{"result":{"state":"done","items":[]}}'
    assert set(answer(action, request, 200, missing).verdicts.values()) == {Verdict.REJECTED}


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"OK",
        b"[1,2]",
        b'"ok"',
        b"null",
        b'{"ok":true',
        b'{"ok":true,"x":"\xff"}',
        b'{"ok":true,"x":"\\ud800"}',
        b"[" * 100_000 + b"]" * 100_000,
        b'{"ok":true,"n":' + b"9" * 5000 + b"}",
        b'{"ok":true,"n":NaN}',
    ],
    ids=[
        "empty",
        "text",
        "array",
        "string",
        "null",
        "cut",
        "not-utf8",
        "lone-surrogate",
        "deep",
        "huge-int",
        "nan",
    ],
)
def test_a_2xx_that_is_not_the_expected_json_is_retried(body: bytes) -> None:
    action = make_action(**REFERENCE)
    request = request_for(action)
    result = answer(action, request, 200, body)
    assert_all(
        result, request, Verdict.RETRY, "HTTP 200 but the body is not the JSON the action expects"
    )


def test_a_byte_order_mark_before_the_json_is_no_reason_to_retry() -> None:
    action = make_action(**REFERENCE)
    request = request_for(action)
    result = answer(action, request, 200, b'\xef\xbb\xbf{"ok":true,"count":3}')
    assert_all(result, request, Verdict.DELIVERED, None)


def test_a_2xx_is_enough_when_the_action_checks_nothing() -> None:
    action = make_action()
    request = request_for(action)
    for body in (b"", b"\xff\x00garbage", b'{"ok":false}'):
        assert_all(answer(action, request, 204, body), request, Verdict.DELIVERED, None)


def test_a_webhook_needs_only_the_2xx() -> None:
    action = make_webhook(**REFERENCE)
    (request,) = build_requests(action, [make_entry()], now=NOW)
    assert_all(answer(action, request, 202, b""), request, Verdict.DELIVERED, None)
    confirming = make_webhook(confirm_status="approved")
    assert_all(answer(confirming, request, 200, None), request, Verdict.TAKEN, None)
    assert_all(answer(action, request, 410), request, Verdict.REJECTED, "HTTP 410: (no body)")


def test_per_id_errors_ignore_what_names_no_order_of_the_request() -> None:
    action = make_action(errors_path="result.failed", error_id_key="orderId", error_key="code")
    request = request_for(action, 3)
    first, second, third = request.deliveries
    listed: list[Any] = [
        {"orderId": str(uuid.uuid4()), "code": "NOT_OURS"},
        "TENANT_MISMATCH",
        17,
        None,
        ["x"],
        {"code": "NO_ID"},
        {"orderId": None, "code": "NULL_ID"},
        {"orderId": True, "code": "BOOL_ID"},
        {"orderId": str(first.order_id).upper(), "code": "OVERDRAFT_EXCEEDED"},
        {"orderId": str(first.order_id), "code": "SECOND_MENTION"},
        {"orderId": f" {second.order_id} ", "code": {"kind": "STATUS_ERROR", "n": 1}},
    ]
    body = json.dumps({"result": {"failed": listed}}).encode()
    result = answer(action, request, 200, body)
    assert result.verdicts == {
        first.delivery_id: Verdict.REJECTED,
        second.delivery_id: Verdict.REJECTED,
        third.delivery_id: Verdict.DELIVERED,
    }
    assert result.errors == {
        first.delivery_id: "OVERDRAFT_EXCEEDED",
        second.delivery_id: '{"kind": "STATUS_ERROR", "n": 1}',
    }


def test_a_per_id_error_without_its_text_still_says_something() -> None:
    action = make_action(errors_path="errors")
    request = request_for(action, 1)
    (entry,) = request.deliveries
    body = json.dumps({"errors": [{"id": str(entry.order_id), "error": None}]}).encode()
    assert answer(action, request, 200, body).errors == {
        entry.delivery_id: "refused by the application (no reason)"
    }


def test_a_per_id_error_text_is_cleaned_and_bounded() -> None:
    action = make_action(errors_path="errors")
    request = request_for(action, 1)
    (entry,) = request.deliveries
    reason = "BAD\r\nX\x00\x1b" + "y" * 10_000
    body = json.dumps({"errors": [{"id": str(entry.order_id), "error": reason}]}).encode()
    error = answer(action, request, 200, body).errors[entry.delivery_id]
    assert error.startswith("BAD X\ufffd\ufffdyyy")
    assert len(error) <= MAX_EXCERPT


@pytest.mark.parametrize("listed", [None, "absent"])
def test_no_error_list_means_no_errors(listed: object) -> None:
    action = make_action(**REFERENCE)
    request = request_for(action)
    document: dict[str, Any] = {"ok": True, "count": 3}
    if listed != "absent":
        document["errors"] = listed
    result = answer(action, request, 200, json.dumps(document).encode())
    assert_all(result, request, Verdict.DELIVERED, None)


@pytest.mark.parametrize("listed", ["TENANT_MISMATCH", {"id": "x"}, 3, True])
def test_an_error_list_that_is_not_a_list_is_a_bad_answer(listed: object) -> None:
    action = make_action(**REFERENCE)
    request = request_for(action)
    result = answer(action, request, 200, json.dumps({"ok": True, "errors": listed}).encode())
    assert_all(result, request, Verdict.RETRY, "HTTP 200 but errors is not a list")
