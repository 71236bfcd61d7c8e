"""barakat / apstore: the JSON batch protocol, against a loopback server."""

from __future__ import annotations

import json
from typing import Any
from uuid import UUID, uuid4

import pytest
from structlog.testing import capture_logs

from order_monitor.errors import ConfigError, ProviderAuthError, ProviderError
from order_monitor.providers import barakat
from order_monitor.providers.base import OrderRef, RateLimited, Status
from order_monitor.providers.http import BadAnswer, ErrorAnswer
from tests.providers import (
    client,
    closed_port,
    endless_body,
    flatten,
    json_reply,
    provider_config,
    reply,
    serve,
    stalled,
)

TOKEN = "tok-SECRET-4711"
TURKISH = "İşlem tamamlandı"
ARABIC = "تم تنفيذ الطلب بنجاح"


def adapter(
    base_url: str, *, read_timeout: float = 5.0, connect_timeout: float = 5.0, **options: Any
) -> barakat.BarakatAdapter:
    built = barakat.build(
        provider_config(
            "barakat",
            base_url,
            options=options,
            secrets={"token": TOKEN},
            read_timeout=read_timeout,
            connect_timeout=connect_timeout,
        )
    )
    assert isinstance(built, barakat.BarakatAdapter)
    return built


def order(reference: str) -> OrderRef:
    return OrderRef(order_id=uuid4(), reference=reference)


def answer(*items: dict[str, Any]) -> str:
    return json.dumps({"status": "OK", "data": list(items)}, ensure_ascii=False)


# --- pure parsing --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("word", "status"),
    [
        *((w, Status.DONE) for w in ["success", "ok", "done", "complete", "completed", "accept"]),
        *(
            (w, Status.FAILED)
            for w in ["reject", "rejected", "failed", "fail", "error", "cancelled", "canceled"]
        ),
        *(
            (w, Status.PENDING)
            for w in ["wait", "pending", "processing", "inprogress", "queued", "queue"]
        ),
        ("Completed", Status.DONE),
        ("REJECTED", Status.FAILED),
        ("  Done ", Status.DONE),
        ("shipped", Status.PENDING),  # unknown words keep the order pending
        ("", Status.PENDING),
    ],
)
def test_every_status_word(word: str, status: Status) -> None:
    outcome = barakat.outcome_of({"order_id": "1", "status": word})
    assert outcome.status is status
    assert outcome.raw_status == (word.strip() or None)


def test_missing_status_is_pending_not_an_end() -> None:
    assert barakat.outcome_of({"order_id": "1"}).status is Status.PENDING


@pytest.mark.parametrize(
    ("item", "pin"),
    [
        ({"pin": "P-1", "code": "C-1"}, "P-1"),
        ({"pin": " - ", "code": "C-1"}, "C-1"),
        ({"pin": "-", "code": "", "voucher": None, "serial": "S-9"}, "S-9"),
        ({"voucher": 123456789}, "123456789"),
        ({"pin": " - "}, None),
        ({"pin": ""}, None),
        ({}, None),
    ],
)
def test_pin_is_the_first_real_one(item: dict[str, Any], pin: str | None) -> None:
    outcome = barakat.outcome_of({"status": "done", **item})
    assert outcome.pin == pin


def test_pending_and_failed_carry_no_pin() -> None:
    assert barakat.outcome_of({"status": "wait", "pin": "X"}).pin is None
    assert barakat.outcome_of({"status": "reject", "pin": "X"}).pin is None


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ({"replay_api": ["", ARABIC], "note": "n"}, ARABIC),
        ({"replay_api": [], "note": TURKISH}, TURKISH),
        ({"replay_api": [None, 3], "note": " ", "message": "m"}, "m"),
        ({"desc": "d", "text": "t"}, "d"),
        ({"error": "Stok yok"}, "Stok yok"),
        ({"note": ""}, None),
    ],
)
def test_message_prefers_replay_api(item: dict[str, Any], message: str | None) -> None:
    assert barakat.outcome_of({"status": "rejected", **item}).message == message


@pytest.mark.parametrize(
    ("body", "error"),
    [
        ("", BadAnswer),
        ("   \n", BadAnswer),
        ("<html><body>502 Bad Gateway</body></html>", BadAnswer),
        ('{"status": "OK", "data": [{"order_id": 1', BadAnswer),
        ('["OK"]', BadAnswer),
        ('{"status": "OK"}', BadAnswer),
        ('{"status": "OK", "data": {"order_id": 1}}', BadAnswer),
        ('{"status": "ERROR", "message": "invalid token"}', ErrorAnswer),
        ('{"data": []}', ErrorAnswer),
    ],
)
def test_bodies_that_are_no_answer(body: str, error: type[Exception]) -> None:
    with pytest.raises(error):
        barakat.parse_answer(body)


def test_top_level_ok_is_case_insensitive() -> None:
    assert barakat.parse_answer('{"status": "ok", "data": []}') == []


def test_match_handles_missing_extra_duplicate_and_numeric_ids() -> None:
    a, b, c = uuid4(), uuid4(), uuid4()
    data = [
        {"order_id": 101, "status": "done", "pin": "FIRST"},
        {"order_id": "101", "status": "done", "pin": "SECOND"},
        {"order_id": "999", "status": "done"},
        {"order_id": 102.0, "status": "rejected"},
        {"status": "done"},
        "not an object",
    ]
    matched = barakat.match(data, {"101": [a], "102": [b], "103": [c]}, fold=False)
    assert matched.outcomes[a].pin == "FIRST"
    assert matched.outcomes[b].status is Status.FAILED
    assert c not in matched.outcomes
    assert set(matched.outcomes) == {a, b}
    assert matched.duplicates == ["101"]
    assert matched.unrequested == ["999"]
    assert matched.unusable == 2


# --- against a server ----------------------------------------------------------------


async def test_batch_request_and_answer() -> None:
    o1, o2, o3 = order("5001"), order("5002"), order("5003")
    body = answer(
        {"order_id": 5001, "status": "completed", "pin": "ABC-123", "note": TURKISH},
        {"order_id": "5002", "status": "Rejected", "replay_api": [ARABIC]},
        {"order_id": "7777", "status": "done", "pin": "NOT-OURS"},
    )
    async with serve(json_reply(json.loads(body))) as srv, client() as session:
        result = await adapter(srv.base_url).fetch(session, [o1, o2, o3])
    (seen,) = srv.seen
    assert seen.path == "/client/api/check"
    assert seen.query == {"orders": "[5001,5002,5003]"}
    assert seen.headers["api-token"] == TOKEN
    assert result[o1.order_id].status is Status.DONE
    assert result[o1.order_id].pin == "ABC-123"
    assert result[o1.order_id].message == TURKISH
    assert result[o2.order_id].status is Status.FAILED
    assert result[o2.order_id].message == ARABIC
    assert o3.order_id not in result  # the caller fills in UNKNOWN
    assert len(result) == 2


async def test_uuid_mode_sends_the_orders_own_ids() -> None:
    o1 = OrderRef(order_id=UUID("6f1c1f3e-2b7a-4c1e-9a53-0d6f1e2a3b4c"), reference="5001")
    handler = json_reply(
        {"status": "OK", "data": [{"order_id": str(o1.order_id).upper(), "status": "wait"}]}
    )
    async with serve(handler) as srv, client() as session:
        result = await adapter(srv.base_url, use_order_uuid=True).fetch(session, [o1])
    assert srv.seen[0].query == {"orders": f"[{o1.order_id}]", "uuid": "1"}
    assert result[o1.order_id].status is Status.PENDING


async def test_duplicated_answer_keeps_the_first_and_logs() -> None:
    o1 = order("1")
    handler = reply(
        answer({"order_id": "1", "status": "done"}, {"order_id": "1", "status": "failed"})
    )
    async with serve(handler) as srv, client() as session:
        with capture_logs() as logs:
            result = await adapter(srv.base_url).fetch(session, [o1])
    assert result[o1.order_id].status is Status.DONE
    assert [e["event"] for e in logs] == ["provider.duplicate_order"]
    assert logs[0]["provider"] == "p1"


async def test_two_orders_with_one_reference_both_get_the_answer() -> None:
    o1, o2 = order("42"), order("42")
    async with (
        serve(reply(answer({"order_id": 42, "status": "ok"}))) as srv,
        client() as session,
    ):
        result = await adapter(srv.base_url).fetch(session, [o1, o2])
    assert srv.seen[0].query == {"orders": "[42]"}
    assert {result[o1.order_id].status, result[o2.order_id].status} == {Status.DONE}


async def test_json_served_as_html_is_still_read() -> None:
    # PHP panels often answer JSON with text/html; the body decides, not the header.
    o1 = order("1")
    handler = reply(answer({"order_id": "1", "status": "done"}), content_type="text/html")
    async with serve(handler) as srv, client() as session:
        result = await adapter(srv.base_url).fetch(session, [o1])
    assert result[o1.order_id].status is Status.DONE


@pytest.mark.parametrize(
    "handler",
    [
        reply("<html><title>Maintenance</title></html>", content_type="application/json"),
        reply(""),
        reply('{"status": "OK", "data": [{"order_id": "1", "sta'),
        json_reply({"status": "FAIL", "message": "Invalid orders"}),
        reply("Internal error", status=500),
        reply("moved", status=302, headers={"Location": "/login"}),
    ],
)
async def test_garbage_is_a_provider_error_never_an_outcome(handler: Any) -> None:
    async with serve(handler) as srv, client() as session:
        with pytest.raises(ProviderError) as caught:
            await adapter(srv.base_url).fetch(session, [order("1")])
    assert type(caught.value) is ProviderError
    assert "p1" in str(caught.value)


@pytest.mark.parametrize("status", [401, 403])
async def test_refused_credentials(status: int) -> None:
    handler = reply('{"message":"Unauthenticated."}', status=status)
    async with serve(handler) as srv, client() as session:
        with pytest.raises(ProviderAuthError):
            await adapter(srv.base_url).fetch(session, [order("1")])


async def test_rate_limited() -> None:
    handler = reply("slow down", status=429, headers={"Retry-After": "17"})
    async with serve(handler) as srv, client() as session:
        with pytest.raises(RateLimited) as caught:
            await adapter(srv.base_url).fetch(session, [order("1")])
    assert caught.value.retry_after == 17.0


async def test_bounded_read_of_an_endless_body() -> None:
    async with serve(endless_body()) as srv, client() as session:
        config = provider_config("barakat", srv.base_url, secrets={"token": TOKEN}, max_body=4096)
        built = barakat.build(config)
        with pytest.raises(ProviderError, match="larger than 4096"):
            await built.fetch(session, [order("1")])


async def test_connection_refused() -> None:
    async with client() as session:
        with pytest.raises(ProviderError):
            await adapter(f"http://127.0.0.1:{closed_port()}").fetch(session, [order("1")])


async def test_slow_answer_times_out() -> None:
    # The provider's own read timeout, not the shared session's.
    async with stalled() as handler, serve(handler) as srv, client() as session:
        with pytest.raises(ProviderError):
            await adapter(srv.base_url, read_timeout=0.2, connect_timeout=0.1).fetch(
                session, [order("1")]
            )


async def test_token_never_in_logs_or_errors() -> None:
    echo_token = reply(f"<html>bad token {TOKEN}</html>", status=500)
    scenarios = [
        echo_token,
        reply(f"<html>{TOKEN}</html>"),
        reply(TOKEN, status=401),
        json_reply({"status": "ERR", "message": f"token {TOKEN} invalid"}),
    ]
    texts: list[str] = []
    with capture_logs() as logs:
        for handler in scenarios:
            async with serve(handler) as srv, client() as session:
                with pytest.raises(ProviderError) as caught:
                    await adapter(srv.base_url).fetch(session, [order("1")])
                texts.append(str(caught.value))
    assert {e["event"] for e in logs} == {
        "provider.http_error",
        "provider.bad_body",
        "provider.auth_failed",
        "provider.error_answer",
    }
    assert all(TOKEN not in text for text in texts)
    assert all(TOKEN not in flatten(event) for event in logs)


async def test_more_orders_than_max_batch_is_a_bug() -> None:
    async with client() as session:
        with pytest.raises(ValueError, match="max_batch is 2"):
            await adapter("http://127.0.0.1:1", chunk_size=2).fetch(
                session, [order("1"), order("2"), order("3")]
            )


# --- building ------------------------------------------------------------------------


def test_build_defaults() -> None:
    built = adapter("https://b.example")
    assert built.max_batch == 50
    assert built.use_order_uuid is False
    assert adapter("https://b.example", chunk_size=7).max_batch == 7


@pytest.mark.parametrize(
    ("options", "secrets", "message"),
    [
        ({}, {}, r"\[providers.p1\].secrets.token is required"),
        ({"chunk_size": 0}, {"token": TOKEN}, r"\[providers.p1\].options.chunk_size"),
        ({"chunk_size": "50"}, {"token": TOKEN}, r"\[providers.p1\].options.chunk_size"),
        ({"use_order_uuid": "yes"}, {"token": TOKEN}, r"options.use_order_uuid"),
        ({"chunksize": 5}, {"token": TOKEN}, r"options: unknown keys \['chunksize'\]"),
        ({}, {"token": TOKEN, "tokn": "x"}, r"secrets: unknown keys \['tokn'\]"),
    ],
)
def test_build_refuses_bad_config(
    options: dict[str, Any], secrets: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        barakat.build(provider_config("barakat", "https://b", options=options, secrets=secrets))
