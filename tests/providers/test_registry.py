"""From a providers-file entry to a LimitedProvider: kinds, lazy imports, clear errors."""

from __future__ import annotations

import asyncio
import sys
import types
import uuid
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar
from uuid import UUID

import aiohttp
import pytest

from order_monitor.config import ProviderConfig, ProviderLimits
from order_monitor.errors import ConfigError
from order_monitor.metrics import Metrics
from order_monitor.providers import registry
from order_monitor.providers.base import OrderRef, Outcome, Status
from order_monitor.providers.fake import FakeProvider, Script
from order_monitor.providers.limits import LimitedProvider
from order_monitor.redaction import Secret


def config(kind: str, base_url: str = "http://127.0.0.1:1", **secrets: str) -> ProviderConfig:
    return ProviderConfig(
        name="shop",
        kind=kind,
        base_url=base_url,
        provider_ids=("shop",),
        limits=ProviderLimits(concurrency=2, breaker_failures=3),
        secrets={k: Secret(v) for k, v in secrets.items()},
        options={},
    )


class EchoAdapter:
    max_batch = 7
    times_its_requests: ClassVar[bool] = False

    def __init__(self, seen: ProviderConfig) -> None:
        self.seen = seen

    async def fetch(
        self, session: aiohttp.ClientSession, orders: Sequence[OrderRef]
    ) -> Mapping[UUID, Outcome]:
        return {o.order_id: Outcome.pending() for o in orders}


@pytest.fixture
def stand_in(monkeypatch: pytest.MonkeyPatch) -> str:
    """A throwaway adapter module registered under a test kind."""
    name = "tests_stand_in_adapter"
    module = types.ModuleType(name)
    module.build = EchoAdapter  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setitem(registry.KINDS, "stand_in", name)
    return name


def test_unknown_kind_names_the_provider_and_the_valid_kinds() -> None:
    with pytest.raises(ConfigError) as caught:
        registry.build_adapter(config("zent"))
    message = str(caught.value)
    assert "[providers.shop]" in message
    assert "'zent'" in message
    for kind in ("znet", "barakat", "apstore", "json_http"):
        assert kind in message


def test_apstore_is_served_by_the_barakat_module() -> None:
    assert registry.KINDS["apstore"] == registry.KINDS["barakat"]


def test_the_adapter_module_is_imported_only_when_its_kind_is_used(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(registry.KINDS, "later", "order_monitor.providers.not_written_yet")
    with pytest.raises(ConfigError, match=r"kind 'later' is not available"):
        registry.build_adapter(config("later"))
    assert "order_monitor.providers.not_written_yet" not in sys.modules


def test_a_missing_dependency_inside_an_adapter_is_not_disguised(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    name = "tests_broken_adapter"

    class Finder:
        def find_spec(self, fullname: str, *args: Any) -> None:
            if fullname == name:
                raise ModuleNotFoundError("No module named 'leftpad'", name="leftpad")

    monkeypatch.setattr(sys, "meta_path", [Finder(), *sys.meta_path])
    monkeypatch.setitem(registry.KINDS, "broken", name)
    with pytest.raises(ModuleNotFoundError, match="leftpad"):
        registry.build_adapter(config("broken"))


def test_a_module_without_build_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tests_no_build", types.ModuleType("tests_no_build"))
    monkeypatch.setitem(registry.KINDS, "nobuild", "tests_no_build")
    with pytest.raises(ConfigError, match="no build"):
        registry.build_adapter(config("nobuild"))


async def test_build_provider_wires_adapter_limits_session_and_semaphore(stand_in: str) -> None:
    shared = asyncio.Semaphore(3)
    cfg = config("Stand_In")  # kinds are matched case-insensitively
    async with aiohttp.ClientSession() as session:
        provider = registry.build_provider(
            cfg, session=session, session_limit=shared, metrics=Metrics()
        )
        assert isinstance(provider, LimitedProvider)
        assert isinstance(provider.adapter, EchoAdapter)
        assert provider.adapter.seen is cfg
        assert provider.name == "shop"
        assert provider.limits is cfg.limits
        assert provider.breaker.threshold == 3
        result = await provider.check([OrderRef(uuid.uuid4(), "R1")])
    assert [o.status for o in result.values()] == [Status.PENDING]


async def test_barakat_from_the_registry_against_the_fake_provider() -> None:
    pytest.importorskip("order_monitor.providers.barakat")
    fake = FakeProvider(token="tok-123")
    fake.set_script("R1", Script.done("PIN-1"))
    fake.set_script("R2", Script.failed("Stok yok"))
    fake.set_script("R3", Script.unknown())
    refs = [OrderRef(uuid.uuid4(), f"R{n}") for n in (1, 2, 3)]
    async with fake.running() as url, aiohttp.ClientSession() as session:
        provider = registry.build_provider(
            config("apstore", url, token="tok-123"),
            session=session,
            session_limit=asyncio.Semaphore(4),
            metrics=Metrics(),
        )
        result = await provider.check(refs)
    assert [result[r.order_id].status for r in refs] == [
        Status.DONE,
        Status.FAILED,
        Status.UNKNOWN,
    ]
    assert result[refs[0].order_id].pin == "PIN-1"
    assert result[refs[1].order_id].message == "Stok yok"
    assert fake.requests_total == 1  # one batched request
