"""The fake provider: both protocols over real HTTP, scripts, knobs and the poll record."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from click.testing import CliRunner

from order_monitor.providers.fake import (
    BARAKAT_PATH,
    GARBAGE_BODIES,
    MSG_DONE,
    MSG_FAILED,
    MSG_PENDING,
    ZNET_AUTH_ERROR,
    ZNET_NOT_FOUND,
    ZNET_PATH,
    Answer,
    Behaviour,
    FakeProvider,
    Script,
    default_pin,
    main,
    mixture,
    parse_order_list,
)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
        yield s


async def barakat(
    session: aiohttp.ClientSession,
    url: str,
    ids: list[str],
    *,
    token: str | None = "t",
    uuid: bool = False,
) -> tuple[int, Any]:
    query = "orders=[" + ",".join(ids) + "]" + ("&uuid=1" if uuid else "")
    headers = {"api-token": token} if token is not None else {}
    async with session.get(f"{url}{BARAKAT_PATH}?{query}", headers=headers) as response:
        text = await response.text()
        try:
            return response.status, json.loads(text)
        except ValueError:
            return response.status, text


async def znet(
    session: aiohttp.ClientSession, url: str, ref: str, *, kod: str = "kod", sifre: str = "sifre"
) -> tuple[int, str]:
    params = {"kod": kod, "sifre": sifre, "tahsilat_api_islem_id": ref}
    async with session.get(f"{url}{ZNET_PATH}", params=params) as response:
        return response.status, await response.text()


# --- pure parts ------------------------------------------------------------------


def test_a_script_answers_pending_for_its_pending_polls_then_its_final_answer() -> None:
    script = Script.done("PIN", after=2)
    assert [script.at(n) for n in (1, 2, 3, 4)] == [
        Answer.PENDING,
        Answer.PENDING,
        Answer.DONE,
        Answer.DONE,
    ]
    assert Script.unknown().at(1) is Answer.UNKNOWN
    assert Script.pending().at(1000) is Answer.PENDING


@pytest.mark.parametrize(
    ("raw", "ids"),
    [
        ("[A,B,C]", ["A", "B", "C"]),
        ('["A", "B"]', ["A", "B"]),
        ("A,B", ["A", "B"]),
        ("[A,A,B]", ["A", "B"]),
        ("[]", []),
        ("", []),
    ],
)
def test_order_lists_are_read_in_every_spelling(raw: str, ids: list[str]) -> None:
    assert parse_order_list(raw) == ids


def test_mixture_is_stable_per_reference_and_depends_on_the_seed() -> None:
    refs = [str(n) for n in range(300)]
    first = [mixture(seed=1)(r) for r in refs]
    assert first == [mixture(seed=1)(r) for r in reversed(refs)][::-1]
    assert first != [mixture(seed=2)(r) for r in refs]
    answers = {s.answer for s in first}
    assert answers == {Answer.DONE, Answer.FAILED, Answer.UNKNOWN}


# --- barakat ------------------------------------------------------------------------


async def test_barakat_answers_a_batch_by_script(session: aiohttp.ClientSession) -> None:
    fake = FakeProvider(token="t")
    fake.set_script("A", Script.done("PIN-A", after=1))
    fake.set_script("B", Script.failed("Stok yok"))
    fake.set_script("C", Script.unknown())
    async with fake.running() as url:
        first = await barakat(session, url, ["A", "B", "C"])
        second = await barakat(session, url, ["A", "B", "C"])
    assert first == (
        200,
        {
            "status": "OK",
            "data": [
                {"order_id": "A", "status": "wait", "replay_api": [MSG_PENDING]},
                {"order_id": "B", "status": "reject", "replay_api": ["Stok yok"]},
            ],
        },
    )
    assert second[1]["data"][0] == {
        "order_id": "A",
        "status": "accept",
        "pin": "PIN-A",
        "replay_api": [MSG_DONE],
    }


async def test_barakat_with_uuid_echoes_the_callers_ids(session: aiohttp.ClientSession) -> None:
    ref = "1b4e28ba-2fa1-11d2-883f-0016d3cca427"
    async with FakeProvider().running() as url:
        status, body = await barakat(session, url, [ref], uuid=True)
    assert status == 200
    assert body["data"] == [
        {
            "order_id": ref,
            "uuid": ref,
            "status": "accept",
            "pin": default_pin(ref),
            "replay_api": [MSG_DONE],
        }
    ]


async def test_barakat_status_words_can_be_chosen(session: aiohttp.ClientSession) -> None:
    fake = FakeProvider()
    fake.set_script("A", Script(Answer.DONE, word="Completed"))
    async with fake.running() as url:
        _, body = await barakat(session, url, ["A"])
    assert body["data"][0]["status"] == "Completed"


@pytest.mark.parametrize("token", ["wrong", None])
async def test_barakat_refuses_a_wrong_or_missing_token(
    session: aiohttp.ClientSession, token: str | None
) -> None:
    fake = FakeProvider(token="right")
    async with fake.running() as url:
        status, body = await barakat(session, url, ["A"], token=token)
    assert status == 401
    assert body["status"] == "ERROR"
    assert fake.answered("A") == 0  # a refused request does not move the script


# --- znet ------------------------------------------------------------------------------


async def test_znet_answers_each_state_in_its_pipe_format(session: aiohttp.ClientSession) -> None:
    fake = FakeProvider(kod="555", sifre="gizli")
    fake.set_script("100", Script.done("ABC123XYZ789", after=1))
    fake.set_script("200", Script.failed())
    fake.set_script("300", Script.unknown())
    fake.set_script("400", Script.done(""))
    async with fake.running() as url:

        async def ask(ref: str) -> str:
            status, text = await znet(session, url, ref, kod="555", sifre="gizli")
            assert status == 200
            return text

        assert await ask("100") == f"OK|1| - |{MSG_PENDING}"
        assert await ask("100") == f"OK|2|ABC123XYZ789|{MSG_DONE}"
        assert await ask("200") == f"OK|3| - |{MSG_FAILED}"
        assert (await ask("300")).startswith(f"{ZNET_NOT_FOUND}|")
        assert await ask("400") == f"OK|2| - |{MSG_DONE}"  # done, but no PIN
        assert await ask("500") == f"OK|2|{default_pin('500')}|{MSG_DONE}"


async def test_znet_wrong_credentials_is_an_error_code_not_an_answer(
    session: aiohttp.ClientSession,
) -> None:
    fake = FakeProvider(kod="555", sifre="gizli")
    async with fake.running() as url:
        status, text = await znet(session, url, "100", kod="555", sifre="yanlis")
    assert status == 200
    assert text.startswith(f"{ZNET_AUTH_ERROR}|")
    assert fake.answered("100") == 0


# --- knobs --------------------------------------------------------------------------------


async def test_retry_after_answers_the_next_n_requests_then_normal_service(
    session: aiohttp.ClientSession,
) -> None:
    fake = FakeProvider()
    fake.set_script("A", Script.done("P", after=1))
    fake.rate_limit(2, retry_after=7)
    async with fake.running() as url:
        statuses = []
        for _ in range(3):
            async with session.get(
                f"{url}{BARAKAT_PATH}?orders=[A]", headers={"api-token": "t"}
            ) as response:
                statuses.append((response.status, response.headers.get("Retry-After")))
    assert statuses == [(429, "7"), (429, "7"), (200, None)]
    assert fake.poll_count("A") == 3
    assert fake.answered("A") == 1  # the 429s did not move the script on


async def test_error_and_garbage_rates_are_seeded(session: aiohttp.ClientSession) -> None:
    async def run(seed: int) -> list[tuple[int, str]]:
        fake = FakeProvider(Behaviour(error_rate=0.3, garbage_rate=0.3), seed=seed)
        seen = []
        async with fake.running() as url:
            for n in range(40):
                async with session.get(
                    f"{url}{BARAKAT_PATH}?orders=[R{n}]", headers={"api-token": "t"}
                ) as response:
                    seen.append((response.status, await response.text()))
        return seen

    first, again, other = await run(1), await run(1), await run(2)
    assert first == again
    assert first != other
    statuses = {status for status, _ in first}
    assert statuses == {200, 500}
    garbage = [body for status, body in first if status == 200 and body in GARBAGE_BODIES]
    answers = [
        body for status, body in first if status == 200 and body.startswith('{"status": "OK"')
    ]
    assert garbage
    assert answers


async def test_latency_delays_each_answer(session: aiohttp.ClientSession) -> None:
    fake = FakeProvider(Behaviour(latency=(0.05, 0.06)))
    async with fake.running() as url:
        started = time.monotonic()
        await barakat(session, url, ["A"])
        elapsed = time.monotonic() - started
    # A lower bound only: the server must have slept; how much longer is the machine's business.
    assert elapsed >= 0.045


async def test_a_hanging_reference_never_answers_and_stop_still_returns(
    session: aiohttp.ClientSession,
) -> None:
    fake = FakeProvider()
    fake.set_script("H", Script.hang())
    await fake.start()
    assert fake.base_url is not None
    request = asyncio.create_task(barakat(session, fake.base_url, ["A", "H"]))
    for _ in range(200):
        if fake.in_flight:
            break
        await asyncio.sleep(0.005)
    assert fake.in_flight == 1
    assert not request.done()
    async with asyncio.timeout(5):
        await fake.stop()
    status, _ = await request
    assert status == 503


async def test_the_default_rule_serves_references_without_a_script(
    session: aiohttp.ClientSession,
) -> None:
    asked: list[str] = []

    def rule(ref: str) -> Script:
        asked.append(ref)
        return Script.failed("Kural") if ref.startswith("F") else Script.pending()

    fake = FakeProvider(Behaviour(default=rule))
    async with fake.running() as url:
        for _ in range(2):
            _, body = await barakat(session, url, ["F1", "P1"])
    assert [item["status"] for item in body["data"]] == ["reject", "wait"]
    assert asked == ["F1", "P1"]  # once per reference, not once per poll


# --- recording and scale -------------------------------------------------------------


async def test_every_poll_is_recorded_with_its_time(session: aiohttp.ClientSession) -> None:
    clock = Clock()
    fake = FakeProvider(clock=clock)
    async with fake.running() as url:
        clock.now = 10.0
        await barakat(session, url, ["A", "B"])
        clock.now = 25.0
        await barakat(session, url, ["A"])
        clock.now = 30.0
        await znet(session, url, "A")
    assert fake.polls("A") == [10.0, 25.0, 30.0]
    assert fake.polls("B") == [10.0]
    assert fake.poll_count("never") == 0
    assert fake.requests_total == 3
    assert fake.references == {"A", "B"}
    fake.reset_recording()
    assert fake.requests_total == 0
    assert fake.polls("A") == []


async def test_ten_thousand_orders_in_batched_requests(session: aiohttp.ClientSession) -> None:
    fake = FakeProvider(Behaviour(default=mixture(seed=3)))
    refs = [f"R{n}" for n in range(10_000)]
    async with fake.running() as url:
        replies = await asyncio.gather(
            *(barakat(session, url, refs[i : i + 100]) for i in range(0, len(refs), 100))
        )
    assert all(status == 200 for status, _ in replies)
    answered = {item["order_id"] for _, body in replies for item in body["data"]}
    unknown = {r for r in refs if fake.script(r).answer is Answer.UNKNOWN}
    assert answered == set(refs) - unknown
    assert fake.requests_total == 100
    assert all(fake.poll_count(r) == 1 for r in refs)


def test_it_runs_standalone() -> None:
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    assert "--port" in result.output
