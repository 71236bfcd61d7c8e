"""json_http: providers served by configuration alone, against loopback servers."""

from __future__ import annotations

import tomllib
from typing import Any
from uuid import uuid4

import pytest
from aiohttp import web
from structlog.testing import capture_logs

from order_monitor.config import ProviderConfig, parse_providers
from order_monitor.errors import ConfigError, ProviderAuthError, ProviderError
from order_monitor.providers import barakat, json_http
from order_monitor.providers.base import OrderRef, Outcome, RateLimited, Status
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

TOKEN = "tok-SECRET-9876"
TURKISH = "İşlem tamamlandı"
ARABIC = "تم تنفيذ الطلب بنجاح"

BARAKAT_AS_JSON_HTTP = """
[providers.apstore]
kind = "json_http"
base_url = "{base_url}"
secrets = {{ token = "{token}" }}
[providers.apstore.options]
url = "/client/api/check?orders=[{{refs}}]"
batch_size = 50
auth = {{ header = "api-token" }}
success_path = "status"
success_values = ["OK"]
items_path = "data"
id_path = "order_id"
status_path = "status"
pin_path = ["pin", "code", "voucher", "serial"]
message_path = ["replay_api", "note", "message", "desc", "text", "error"]
[providers.apstore.options.status_map]
done = ["success", "ok", "done", "complete", "completed", "accept"]
failed = ["reject", "rejected", "failed", "fail", "error", "cancelled", "canceled"]
pending = ["wait", "pending", "processing", "inprogress", "queued", "queue"]
"""

INTERNAL_AS_JSON_HTTP = """
[providers.internal]
kind = "json_http"
base_url = "{base_url}"
secrets = {{ token = "{token}" }}
[providers.internal.options]
url = "/client/api/check?orders={{refs}}&uuid=1"
id_source = "order_id"
batch_size = 50
auth = {{ header = "x-api-token" }}
items_path = ""
id_path = "orderId"
status_path = "status"
pin_path = "pin"
message_path = "note"
# Current words, then those of older deployments.
status_map = {{ done = ["approved", "accept"], failed = ["rejected", "reject"], pending = ["pending", "sent", "wait"] }}
"""


def from_toml(template: str, base_url: str) -> ProviderConfig:
    document = tomllib.loads(template.format(base_url=base_url, token=TOKEN))
    (config,) = parse_providers(document, {})
    return config


def build(
    base_url: str, *, read_timeout: float = 5.0, connect_timeout: float = 5.0, **options: Any
) -> json_http.JsonHttpAdapter:
    built = json_http.build(
        provider_config(
            "json_http",
            base_url,
            options=options,
            secrets={"token": TOKEN},
            read_timeout=read_timeout,
            connect_timeout=connect_timeout,
        )
    )
    assert isinstance(built, json_http.JsonHttpAdapter)
    return built


SINGLE: dict[str, Any] = {
    "url": "/api/orders/{ref}",
    "auth": {"query": "token"},
    "status_path": "data.0.state",
    "pin_path": ["data.0.codes.0", "data.0.pin"],
    "message_path": "data.0.info",
    "status_map": {"done": ["delivered"], "failed": ["refunded"], "pending": ["new"]},
}


def order(reference: str) -> OrderRef:
    return OrderRef(order_id=uuid4(), reference=reference)


# --- paths and items (pure) ----------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("", {"data": [{"status": "ok"}]}),
        ("data.0.status", "ok"),
        ("data.1.status", None),
        ("data.x", None),
        ("data.0.status.deeper", None),
        ("missing", None),
    ],
)
def test_get_path(path: str, expected: object) -> None:
    document = {"data": [{"status": "ok"}]}
    assert json_http.get_path(document, json_http.parse_path(path)) == expected


@pytest.mark.parametrize("bad", ["a..b", ".a", "a.", "a b"])
def test_parse_path_refuses_empty_segments(bad: str) -> None:
    with pytest.raises(ValueError, match="a"):
        json_http.parse_path(bad)


SPEC = json_http.AnswerSpec(
    status_path=("s",),
    status_map={"approved": "done", "rejected": "failed", "sent": "pending"},
    pin_paths=(("pin",), ("code",)),
    message_paths=(("replies",), ("note",)),
)


@pytest.mark.parametrize(
    ("item", "expected"),
    [
        (
            {"s": "APPROVED", "pin": " - ", "code": 42},
            Outcome.done(pin="42", raw_status="APPROVED"),
        ),
        ({"s": "approved", "pin": "-"}, Outcome.done(raw_status="approved")),
        ({"s": "Rejected", "note": ARABIC}, Outcome.failed(ARABIC, raw_status="Rejected")),
        (
            {"s": "sent", "replies": ["", TURKISH], "note": "x"},
            Outcome.pending(raw_status="sent", message=TURKISH),
        ),
        ({"s": "mystery"}, Outcome.pending(raw_status="mystery")),
        ({"s": 7}, Outcome.pending(raw_status="7")),
    ],
)
def test_item_outcomes(item: dict[str, Any], expected: Outcome) -> None:
    assert SPEC.outcome(item) == expected


def test_item_without_status_has_no_outcome() -> None:
    assert SPEC.outcome({"pin": "X"}) is None
    assert SPEC.outcome({"s": {"nested": 1}}) is None


def test_unmapped_may_mean_unknown() -> None:
    spec = json_http.AnswerSpec(status_path=("s",), status_map={}, unmapped="unknown")
    assert spec.outcome({"s": "??"}) == Outcome.unknown()


# --- barakat and internal, by configuration alone ------------------------------------


BARAKAT_ANSWER = {
    "status": "OK",
    "data": [
        {"order_id": 5001, "status": "Completed", "pin": " - ", "code": "ABC-1", "note": TURKISH},
        {"order_id": "5002", "status": "cancelled", "replay_api": ["", ARABIC], "note": "n"},
        {"order_id": "5003", "status": "inprogress"},
        {"order_id": "5003", "status": "done"},
        {"order_id": "9999", "status": "done"},
        {"order_id": "5004", "status": "shipped"},
    ],
}


async def test_barakat_by_configuration_matches_the_barakat_adapter() -> None:
    orders = [order(r) for r in ("5001", "5002", "5003", "5004", "5005")]
    async with serve(json_reply(BARAKAT_ANSWER)) as srv, client() as session:
        configured = json_http.build(from_toml(BARAKAT_AS_JSON_HTTP, srv.base_url))
        native = barakat.build(provider_config("barakat", srv.base_url, secrets={"token": TOKEN}))
        by_config = await configured.fetch(session, orders)
        by_code = await native.fetch(session, orders)
    assert by_config == by_code
    assert srv.seen[0].raw_query == srv.seen[1].raw_query
    assert srv.seen[0].headers["api-token"] == TOKEN
    assert configured.max_batch == 50
    assert by_config[orders[0].order_id] == Outcome.done("ABC-1", TURKISH, "Completed")
    assert by_config[orders[1].order_id].message == ARABIC
    assert by_config[orders[2].order_id].status is Status.PENDING  # the first answer wins
    assert by_config[orders[3].order_id].status is Status.PENDING
    assert orders[4].order_id not in by_config


async def test_barakat_by_configuration_refuses_a_failed_request() -> None:
    handler = json_reply({"status": "ERROR", "message": "Invalid orders"})
    async with serve(handler) as srv, client() as session:
        adapter = json_http.build(from_toml(BARAKAT_AS_JSON_HTTP, srv.base_url))
        with capture_logs() as logs, pytest.raises(ProviderError):
            await adapter.fetch(session, [order("1")])
    assert [e["event"] for e in logs] == ["provider.error_answer"]


@pytest.mark.parametrize(
    ("word", "status"),
    [
        ("approved", Status.DONE),
        ("rejected", Status.FAILED),
        ("pending", Status.PENDING),
        ("sent", Status.PENDING),
        ("accept", Status.DONE),
        ("reject", Status.FAILED),
        ("wait", Status.PENDING),
        ("Approved", Status.DONE),
    ],
)
async def test_internal_by_configuration(word: str, status: Status) -> None:
    first, second = order("r1"), order("r2")

    async def handler(request: web.Request) -> web.Response:
        ids = request.query["orders"].split(",")
        return web.json_response(
            [{"orderId": ids[0].upper(), "status": word, "pin": "PIN-7", "note": TURKISH}]
        )

    async with serve(handler) as srv, client() as session:
        adapter = json_http.build(from_toml(INTERNAL_AS_JSON_HTTP, srv.base_url))
        result = await adapter.fetch(session, [first, second])
    assert srv.seen[0].query == {"orders": f"{first.order_id},{second.order_id}", "uuid": "1"}
    assert srv.seen[0].headers["x-api-token"] == TOKEN
    assert result[first.order_id].status is status
    assert result[first.order_id].pin == ("PIN-7" if status is Status.DONE else None)
    assert result[first.order_id].message == TURKISH
    assert second.order_id not in result


# --- one order per request -------------------------------------------------------------


async def test_single_order_with_query_token() -> None:
    answer = {"data": [{"state": "Delivered", "codes": ["", "-"], "pin": "P-3", "info": ARABIC}]}
    async with serve(json_reply(answer)) as srv, client() as session:
        o = order("A/B 7")
        result = await build(srv.base_url, **SINGLE).fetch(session, [o])
    (seen,) = srv.seen
    # The reference stays one path segment, whatever it contains.
    assert seen.raw_path == f"/api/orders/A%2FB%207?token={TOKEN}"
    assert seen.query == {"token": TOKEN}
    assert result == {o.order_id: Outcome.done("P-3", ARABIC, "Delivered")}


async def test_single_order_empty_list_is_absent() -> None:
    async with serve(json_reply({"data": []})) as srv, client() as session:
        options = {**SINGLE, "items_path": "data", "status_path": "state"}
        assert await build(srv.base_url, **options).fetch(session, [order("1")]) == {}


async def test_single_order_without_status_is_an_error() -> None:
    async with serve(json_reply({"error": "not found"})) as srv, client() as session:
        with capture_logs() as logs, pytest.raises(ProviderError):
            await build(srv.base_url, **SINGLE).fetch(session, [order("1")])
    assert logs[0]["event"] == "provider.bad_body"
    assert logs[0]["reason"] == "no status at options.status_path"


async def test_post_method() -> None:
    async with serve(json_reply({"data": [{"state": "new"}]})) as srv, client() as session:
        o = order("1")
        result = await build(srv.base_url, method="post", **SINGLE).fetch(session, [o])
    assert srv.seen[0].method == "POST"
    assert result[o.order_id].status is Status.PENDING


BATCHED: dict[str, Any] = {
    "url": "/check?ids={refs}",
    "ref_separator": ";",
    "batch_size": 3,
    "auth": {"header": "Authorization"},
    "items_path": "result.items",
    "id_path": "id",
    "status_path": "st",
    "status_map": {"done": ["ok"], "failed": ["ko"]},
}


async def test_batched_with_separator_and_bad_items() -> None:
    a, b, c = order("1"), order("2"), order("3")
    answer = {
        "result": {"items": [{"id": 1, "st": "OK"}, {"id": 2}, "junk", {"id": 3, "st": "ko"}]}
    }
    async with serve(json_reply(answer)) as srv, client() as session:
        with capture_logs() as logs:
            result = await build(srv.base_url, **BATCHED).fetch(session, [a, b, c])
    assert srv.seen[0].query == {"ids": "1;2;3"}
    assert srv.seen[0].headers["Authorization"] == TOKEN
    assert result[a.order_id].status is Status.DONE
    assert b.order_id not in result
    assert result[c.order_id].status is Status.FAILED
    assert [(e["event"], e["count"]) for e in logs] == [("provider.bad_item", 2)]


@pytest.mark.parametrize(
    "handler",
    [
        reply("<html><body>Cloudflare 520</body></html>", content_type="text/html"),
        reply(""),
        reply('{"result": {"items": [{"id": 1, "st"'),
        json_reply({"result": {"items": {"id": 1}}}),
        json_reply([{"id": 1, "st": "ok"}]),
    ],
)
async def test_garbage_is_a_provider_error(handler: Any) -> None:
    async with serve(handler) as srv, client() as session:
        with pytest.raises(ProviderError) as caught:
            await build(srv.base_url, **BATCHED).fetch(session, [order("1")])
    assert type(caught.value) is ProviderError


# --- transport, wired through this adapter ------------------------------------------


async def test_transport_failures_are_errors_and_never_leak_the_token() -> None:
    scenarios: list[tuple[Any, type[Exception]]] = [
        (reply(f"denied {TOKEN}", status=401), ProviderAuthError),
        (reply("", status=429, headers={"Retry-After": "3"}), RateLimited),
        (reply(f"<h1>{TOKEN}</h1>", status=502), ProviderError),
        (endless_body(), ProviderError),
    ]
    texts: list[str] = []
    with capture_logs() as logs:
        for handler, expected in scenarios:
            async with serve(handler) as srv, client() as session:
                adapter = json_http.build(
                    provider_config(
                        "json_http",
                        srv.base_url,
                        options=SINGLE,
                        secrets={"token": TOKEN},
                        max_body=10_000,
                    )
                )
                with pytest.raises(ProviderError) as caught:
                    await adapter.fetch(session, [order("1")])
                assert type(caught.value) is expected
                texts.append(str(caught.value))
        async with client() as session:
            with pytest.raises(ProviderError) as caught:
                await build(f"http://127.0.0.1:{closed_port()}", **SINGLE).fetch(
                    session, [order("1")]
                )
            texts.append(str(caught.value))
        async with stalled() as handler, serve(handler) as srv, client() as session:
            with pytest.raises(ProviderError) as caught:
                await build(srv.base_url, read_timeout=0.2, connect_timeout=0.1, **SINGLE).fetch(
                    session, [order("1")]
                )
            texts.append(str(caught.value))
    assert len(texts) == 6
    assert all(TOKEN not in text for text in texts)
    assert all(TOKEN not in flatten(event) for event in logs)
    assert any("token=***" in str(event.get("url")) for event in logs)


# --- building ------------------------------------------------------------------------


def test_defaults() -> None:
    single = build("https://x", **SINGLE)
    assert single.max_batch == 1
    assert single.method == "GET"
    assert single.spec.items_path is None
    batched = build("https://x", **{**BATCHED, "batch_size": 50})
    assert batched.max_batch == 50
    assert batched.spec.items_path == ("result", "items")


def without(options: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in options.items() if k != key}


OPT = r"\[providers.p1\].options"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (without(SINGLE, "status_path"), rf"{OPT}.status_path is required"),
        (without(SINGLE, "url"), rf"{OPT}.url is required"),
        (without(SINGLE, "status_map"), rf"{OPT}.status_map is required"),
        ({**SINGLE, "url": "/a"}, rf"{OPT}.url = '/a': must contain exactly one of"),
        ({**SINGLE, "url": "/{ref}/{refs}"}, rf"{OPT}.url .* exactly one of"),
        ({**SINGLE, "url": "https://evil/{ref}"}, rf"{OPT}.url .* relative to base_url"),
        ({**SINGLE, "batch_size": 5}, rf"{OPT}.batch_size needs {{refs}}"),
        ({**SINGLE, "ref_separator": ";"}, rf"{OPT}.ref_separator needs {{refs}}"),
        (without(BATCHED, "id_path"), rf"{OPT}.id_path is required"),
        ({**BATCHED, "batch_size": 0}, rf"{OPT}.batch_size = 0"),
        ({**SINGLE, "id_path": "id"}, rf"{OPT}.id_path needs {OPT}.items_path"),
        ({**SINGLE, "method": "DELETE"}, rf"{OPT}.method = 'DELETE'"),
        ({**SINGLE, "id_source": "uuid"}, rf"{OPT}.id_source = 'uuid'"),
        ({**SINGLE, "auth": {"cookie": "x"}}, rf"{OPT}.auth = "),
        ({**SINGLE, "auth": {"header": "a", "query": "b"}}, rf"{OPT}.auth = "),
        ({**SINGLE, "status_path": "a..b"}, rf"{OPT}.status_path = 'a..b'"),
        ({**SINGLE, "pin_path": ["pin", 3]}, rf"{OPT}.pin_path = "),
        ({**SINGLE, "message_path": ["ok", "a..b"]}, rf"{OPT}.message_path: 'a..b'"),
        ({**SINGLE, "status_map": {"failed": ["x"]}}, rf"{OPT}.status_map is required"),
        ({**SINGLE, "status_map": {"done": ["x"], "gone": []}}, rf"{OPT}.status_map: unknown"),
        ({**SINGLE, "status_map": {"done": "ok"}}, rf"{OPT}.status_map.done = 'ok'"),
        (
            {**SINGLE, "status_map": {"done": ["OK"], "failed": ["ok"]}},
            rf"{OPT}.status_map: 'ok' is listed under both done and failed",
        ),
        ({**SINGLE, "unmapped": "failed"}, rf"{OPT}.unmapped = 'failed'"),
        ({**SINGLE, "success_path": "status"}, r"success_path and .*success_values go together"),
        ({**SINGLE, "statuspath": "x"}, rf"{OPT}: unknown keys \['statuspath'\]"),
    ],
)
def test_build_refuses_bad_options(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build("https://x", **options)


def test_build_checks_the_token_against_auth() -> None:
    with pytest.raises(ConfigError, match=r"\[providers.p1\].secrets.token is required"):
        json_http.build(provider_config("json_http", "https://x", options=SINGLE))
    with pytest.raises(ConfigError, match=r"secrets.token is set but options.auth"):
        build("https://x", **without(SINGLE, "auth"))
    no_auth = json_http.build(
        provider_config("json_http", "https://x", options=without(SINGLE, "auth"))
    )
    assert isinstance(no_auth, json_http.JsonHttpAdapter)
    assert no_auth.headers() == {}


def test_the_documented_example_builds() -> None:
    # The module docstring is what an operator copies; it must build.
    doc = json_http.__doc__ or ""
    example = doc.split("::", 1)[1].split("Paths are", 1)[0]
    lines = [line[4:] for line in example.splitlines()]
    text = "\n".join(lines).replace('{ env = "INTERNAL_TOKEN" }', '"t"')
    (config,) = parse_providers(tomllib.loads(text), {})
    assert json_http.build(config).max_batch == 50
