"""Doctor's delivery checks (issue #20): the outbox and the role's rights on it, the write
function against the actions, each action's host, and what the outbox's entries say.

Against the real database (deployed as a DBA would, the checks run as the
daemon's role) and real local HTTP servers.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace

import aiohttp
import psycopg
import pytest
from aiohttp import web
from hypothesis import given
from hypothesis import strategies as st

from order_monitor import schema
from order_monitor.config import ActionConfig, Layout, OutcomeWrites, ProviderLimits, Settings
from order_monitor.operator.doctor import diagnose
from order_monitor.operator.doctor.delivery import (
    check_actions,
    check_outbox,
    probe_action,
    probe_target,
)
from order_monitor.operator.findings import Finding, Verdict
from order_monitor.redaction import Secret
from tests.conftest import DAEMON_ROLE, as_daemon, deploy
from tests.operator.helpers import execute
from tests.providers.test_leaks import tls_stall

WRITES = OutcomeWrites(deliver=("done", "failed"), deliver_columns=("tenantId",))
OUTBOX = schema.Names(Layout()).outbox.as_string(None)
#: Needs escaping anywhere it goes; must never be sent by a probe or shown.
TOKEN = "s3cr%t'\"\\=?#+;tok en"
QUERY_KEY = "k3y-in-the-query-0123456789"
FAST = ProviderLimits(connect_timeout=0.5, read_timeout=0.5)


def action(name: str, outcome: str, url: str, limits: ProviderLimits = FAST) -> ActionConfig:
    return ActionConfig(
        name=name,
        kind="http",
        outcomes=(outcome,),
        url=url,
        limits=limits,
        secrets={"token": Secret(TOKEN)},
        headers={"Authorization": "Bearer {secret:token}", "X-Tenant-Id": "{column:tenantId}"},
        body={"ids": "{ids}", "note": "{message}"},
        success={"ok": True},
        errors_path="errors",
        confirm_status="approved",
    )


def settings_for(db: str, *actions: ActionConfig, writes: OutcomeWrites = WRITES) -> Settings:
    return Settings(dsn=Secret(as_daemon(db)), writes=writes, actions=actions)


@dataclass
class Findings:
    found: list[Finding] = field(default_factory=list)

    def emit(self, verdict: Verdict, check: str, detail: str) -> None:
        self.found.append(Finding(verdict, check, detail))

    def report(self, finding: Finding) -> None:
        self.found.append(finding)

    def by_check(self) -> dict[str, Finding]:
        checks = [f.check for f in self.found]
        assert len(checks) == len(set(checks)), checks  # one line per check
        return {f.check: f for f in self.found}

    def text(self) -> str:
        return "\n".join(f"{f.verdict.value} {f.check}: {f.detail}" for f in self.found)


@dataclass
class Seen:
    method: str
    path: str
    query: str
    headers: dict[str, str]


@pytest.fixture
async def app_host() -> AsyncIterator[tuple[str, list[Seen]]]:
    """An application that answers every request 405 but POST, and records what it got."""
    seen: list[Seen] = []

    async def anything(request: web.Request) -> web.Response:
        seen.append(Seen(request.method, request.path, request.query_string, dict(request.headers)))
        return web.Response(status=200 if request.method == "POST" else 405)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", anything)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}", seen
    finally:
        await runner.cleanup()


@pytest.fixture
def closed_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.fixture
async def silent_host() -> AsyncIterator[int]:
    """Accepts connections and never answers."""
    async with tls_stall() as port:
        yield port


@pytest.fixture
def delivering_db(db: str) -> str:
    """The install rendered for the actions (the write function records done and failed)."""
    deploy(db, WRITES)
    return db


def add_entry(
    db: str,
    *,
    outcome: str = "done",
    age: str = "1 minute",
    verdict: str | None = None,
    dead: bool = False,
) -> None:
    execute(
        db,
        f"INSERT INTO {OUTBOX} (order_id, outcome, recorded_at, last_verdict, dead_at)"
        " VALUES (gen_random_uuid(), %s, now() - %s::interval, %s,"
        " CASE WHEN %s THEN now() END)",
        (outcome, age, verdict, dead),
    )


# --- the whole doctor ------------------------------------------------------------


async def test_a_fresh_install_for_the_actions_passes_and_the_probe_sends_nothing_secret(
    delivering_db: str, app_host: tuple[str, list[Seen]]
) -> None:
    base, seen = app_host
    settings = settings_for(
        delivering_db,
        action("approve", "done", f"{base}/api/admin/orders/bulk/approve?key={QUERY_KEY}"),
        action("reject", "failed", f"{base}/api/{{column:tenantId}}/reject"),
    )
    findings = Findings()

    await diagnose(settings, findings.report, notify_timeout=2.0)

    found = findings.by_check()
    text = findings.text()
    assert found["write function"].verdict is not Verdict.FAIL, text
    assert found["outbox"].verdict is Verdict.PASS, text
    assert found["deliveries"].verdict is Verdict.PASS, text
    assert "nothing undelivered" in found["deliveries"].detail
    for name in ("approve", "reject"):
        line = found[f"action {name}"]
        assert line.verdict is Verdict.PASS, text
        assert (
            line.detail
            == f"{base.removeprefix('http://')} answers: HTTP 405 to HEAD (no action taken)"
        )
    # A request that performs nothing: HEAD, no credentials, no query; the
    # templated path cut before its placeholder.
    assert sorted((s.method, s.path) for s in seen) == [
        ("HEAD", "/api/"),
        ("HEAD", "/api/admin/orders/bulk/approve"),
    ]
    for request in seen:
        assert request.query == ""
        assert "Authorization" not in request.headers
        assert "X-Tenant-Id" not in request.headers
        assert TOKEN not in str(request.headers)
    assert TOKEN not in text
    assert QUERY_KEY not in text


async def test_no_action_and_an_empty_outbox_say_nothing_of_delivery(db: str) -> None:
    findings = Findings()

    await diagnose(settings_for(db, writes=OutcomeWrites()), findings.report, notify_timeout=2.0)

    checks = set(findings.by_check())
    assert "write function" in checks  # the database part did run
    assert not checks & {"outbox", "deliveries", "dead letters", "undelivered"}
    assert not any(check.startswith("action ") for check in checks)


# --- the write function against the actions ---------------------------------------


async def test_the_write_function_of_an_install_without_actions_fails_naming_the_fix(
    db: str, app_host: tuple[str, list[Seen]]
) -> None:
    settings = settings_for(db, action("approve", "done", app_host[0]))
    findings = Findings()

    await diagnose(settings, findings.report, notify_timeout=2.0)

    line = findings.by_check()["write function"]
    assert line.verdict is Verdict.FAIL
    assert "records no results for delivery" in line.detail
    assert "the actions deliver done, failed results with tenantId" in line.detail
    assert "re-render and apply install.sql for these actions" in line.detail


async def test_the_write_function_recording_for_other_actions_fails_naming_both(
    delivering_db: str,
) -> None:
    # Rendered for done and failed with the tenant; the actions now deliver done alone.
    other = replace(WRITES, deliver=("done",), deliver_columns=())
    findings = Findings()

    await diagnose(settings_for(delivering_db, writes=other), findings.report, notify_timeout=2.0)

    line = findings.by_check()["write function"]
    assert line.verdict is Verdict.FAIL
    assert "records done, failed results with tenantId for delivery" in line.detail
    assert "the actions deliver done results:" in line.detail
    assert "re-render and apply install.sql for these actions" in line.detail


async def test_a_write_function_recording_deliveries_nobody_configured_says_so(
    delivering_db: str,
) -> None:
    findings = Findings()

    await diagnose(
        settings_for(delivering_db, writes=OutcomeWrites()), findings.report, notify_timeout=2.0
    )

    line = findings.by_check()["write function"]
    assert line.verdict is Verdict.FAIL
    assert "but no action is configured: re-render and apply install.sql" in line.detail


async def test_another_difference_keeps_the_general_message(delivering_db: str) -> None:
    settings = settings_for(delivering_db, writes=replace(WRITES, done_external_status="finished"))
    findings = Findings()

    await diagnose(settings, findings.report, notify_timeout=2.0)

    line = findings.by_check()["write function"]
    assert line.verdict is Verdict.FAIL
    assert "installed for other settings" in line.detail
    assert "for these actions" not in line.detail


# --- the outbox and the role ------------------------------------------------------


async def check(db: str, *actions: ActionConfig) -> Findings:
    findings = Findings()
    async with await psycopg.AsyncConnection.connect(as_daemon(db), autocommit=True) as conn:
        await check_outbox(conn, settings_for(db, *actions), findings.emit)
    return findings


APPROVE = action("approve", "done", "http://127.0.0.1:9/approve")
REJECT = action("reject", "failed", "http://127.0.0.1:9/reject")


async def test_a_role_that_may_not_delete_or_update_the_bookkeeping_fails_with_the_fix(
    delivering_db: str,
) -> None:
    execute(delivering_db, f'REVOKE DELETE ON {OUTBOX} FROM "{DAEMON_ROLE}"')
    execute(delivering_db, f'REVOKE UPDATE (tries, dead_at) ON {OUTBOX} FROM "{DAEMON_ROLE}"')

    found = (await check(delivering_db, APPROVE)).by_check()

    line = found["outbox"]
    assert line.verdict is Verdict.FAIL
    assert f"role {DAEMON_ROLE} may not DELETE; UPDATE (tries, dead_at) on {OUTBOX}" in line.detail
    assert "run install.sql and role.sql of this release" in line.detail
    assert "deliveries" in found  # it may still read: the entries are looked at


async def test_a_role_that_may_not_read_the_outbox_fails_and_reads_nothing(
    delivering_db: str,
) -> None:
    execute(delivering_db, f'REVOKE SELECT ON {OUTBOX} FROM "{DAEMON_ROLE}"')

    found = (await check(delivering_db, APPROVE)).by_check()

    assert found["outbox"].verdict is Verdict.FAIL
    assert "may not SELECT on" in found["outbox"].detail
    assert set(found) == {"outbox"}


async def test_a_missing_outbox_fails_with_the_fix(delivering_db: str) -> None:
    execute(delivering_db, f"DROP TABLE {OUTBOX} CASCADE")

    found = (await check(delivering_db, APPROVE)).by_check()

    assert found["outbox"].verdict is Verdict.FAIL
    assert found["outbox"].detail.startswith(f"{OUTBOX} is missing — run install.sql and role.sql")
    assert set(found) == {"outbox"}


async def test_a_role_without_usage_on_the_schema_fails_naming_it(delivering_db: str) -> None:
    execute(delivering_db, f'REVOKE USAGE ON SCHEMA public FROM PUBLIC, "{DAEMON_ROLE}"')

    found = (await check(delivering_db, APPROVE)).by_check()

    assert found["outbox"].verdict is Verdict.FAIL
    assert "no USAGE on schema public" in found["outbox"].detail
    assert set(found) == {"outbox"}


async def test_the_outbox_health(delivering_db: str) -> None:
    add_entry(delivering_db, age="10 minutes")  # waiting, not for long: fine

    fine = (await check(delivering_db, APPROVE, REJECT)).by_check()
    assert fine["deliveries"].verdict is Verdict.PASS, fine
    assert "1 undelivered, the oldest written 10m ago" in fine["deliveries"].detail

    add_entry(delivering_db, age="2 hours")
    add_entry(delivering_db, outcome="failed", age="5 minutes", verdict="auth")
    add_entry(delivering_db, outcome="failed", age="6 minutes", verdict="auth")
    add_entry(delivering_db, age="3 days", verdict="rejected", dead=True)
    add_entry(delivering_db, age="3 days", verdict="rejected", dead=True)

    found = (await check(delivering_db, APPROVE, REJECT)).by_check()

    assert "deliveries" not in found
    credentials = found["delivery credentials"]
    assert credentials.verdict is Verdict.FAIL
    assert "the application refuses the action's credentials" in credentials.detail
    assert "2 delivery(ies)" in credentials.detail
    assert "(reject (2))" in credentials.detail
    dead = found["dead letters"]
    assert dead.verdict is Verdict.WARN
    assert dead.detail.startswith("2 delivery(ies) were given up")
    assert "order-monitor deliveries --dead" in dead.detail
    waiting = found["undelivered"]
    assert waiting.verdict is Verdict.WARN
    assert waiting.detail.startswith("4 result(s) wait for delivery, the oldest written 2h")


async def test_entries_nothing_delivers_warn_when_no_action_is_configured(db: str) -> None:
    add_entry(db)
    add_entry(db, dead=True)
    findings = Findings()
    async with await psycopg.AsyncConnection.connect(as_daemon(db), autocommit=True) as conn:
        await check_outbox(conn, settings_for(db, writes=OutcomeWrites()), findings.emit)

    found = findings.by_check()
    assert set(found) == {"deliveries"}
    assert found["deliveries"].verdict is Verdict.WARN
    assert "1 undelivered result(s) and 1 dead letter(s)" in found["deliveries"].detail
    assert "nothing delivers them" in found["deliveries"].detail


# --- the actions' hosts -----------------------------------------------------------


async def test_a_host_that_refuses_connections_fails_naming_host_and_port_only(
    closed_port: int,
) -> None:
    url = f"http://user:pw-{QUERY_KEY}@127.0.0.1:{closed_port}/approve?key={QUERY_KEY}"
    findings = Findings()

    await check_actions(
        Settings(dsn=Secret(""), actions=(action("approve", "done", url),)), findings.emit
    )

    line = findings.by_check()["action approve"]
    assert line.verdict is Verdict.FAIL
    assert line.detail.startswith(f"127.0.0.1:{closed_port} does not answer: ")
    assert QUERY_KEY not in line.detail
    assert "/approve" not in line.detail
    assert TOKEN not in line.detail


async def test_a_host_that_never_answers_fails_within_the_actions_timeouts(
    silent_host: int,
) -> None:
    async with aiohttp.ClientSession() as session:
        started = asyncio.get_running_loop().time()
        verdict, detail = await probe_action(
            action("approve", "done", f"http://127.0.0.1:{silent_host}/approve"), session
        )
        took = asyncio.get_running_loop().time() - started

    assert verdict is Verdict.FAIL
    assert detail.startswith(f"127.0.0.1:{silent_host} did not answer within 1 s")
    assert took < 3.0


async def test_a_url_whose_host_is_a_template_is_not_probed() -> None:
    async with aiohttp.ClientSession() as session:
        verdict, detail = await probe_action(
            action("approve", "done", "https://{column:tenantId}.shop.example/approve"), session
        )

    assert verdict is Verdict.WARN
    assert "not probed" in detail


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("https://app.example/api/approve", "https://app.example/api/approve"),
        ("https://u:p@app.example:8443/a?key=1#f", "https://app.example:8443/a"),
        ("http://app.example/api/{column:tenantId}/approve", "http://app.example/api/"),
        ("http://app.example/api/x{column:tenantId}", "http://app.example/api/"),
        ("http://app.example/approve?tenant={column:tenantId}", "http://app.example/approve"),
        ("http://{column:host}/approve", None),
        ("http://app{column:x}.example/approve", None),
        ("ftp://app.example/approve", None),
        ("not a url", None),
    ],
)
def test_the_probe_target(template: str, expected: str | None) -> None:
    target = probe_target(template)
    assert (None if target is None else str(target)) == expected


@given(
    host=st.from_regex(r"[a-z][a-z0-9-]{0,20}(\.[a-z]{2,6}){0,2}", fullmatch=True),
    path=st.text(max_size=40),
    query=st.text(min_size=1, max_size=40),
)
def test_the_probe_target_never_keeps_the_query_or_a_placeholder(
    host: str, path: str, query: str
) -> None:
    template = f"https://{host}/{path}?{query}"
    target = probe_target(template)
    if target is None:
        return
    assert target.host == host
    assert target.query_string == ""
    assert target.fragment == ""
    assert "{" not in target.raw_path
    assert "{" not in target.path


@given(st.text(max_size=200))
def test_the_probe_target_takes_any_text(template: str) -> None:
    # Lone surrogates, NUL, control characters: an answer or None, never an exception.
    target = probe_target(template)
    assert target is None or target.scheme in ("http", "https")
