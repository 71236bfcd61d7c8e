"""The shipped unit under a real systemd (252, Debian 12's), booted in systemd-nspawn.

The unit is installed as shipped; ExecStart= is changed by a drop-in, as the
README tells users, and a second drop-in adds the provider token's
LoadCredential= (the README's way to give a provider secret). A third,
test-only drop-in shortens RestartSec= and WatchdogSec= so that the restart
tests take seconds, not half a minute each.

The daemon connects over TCP as the least-privilege role from `sql print
role`, with a password full of characters that need escaping, and polls the
fake provider, which runs in this process on 127.0.0.1 (the container shares
the host's network). The tests run in order on one container and one service,
each leaving it running for the next.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import psycopg
import pytest
from click.testing import CliRunner
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from order_monitor.cli import cli
from order_monitor.providers.fake import Behaviour, FakeProvider, Script
from tests.conftest import Server
from tests.system import nspawn
from tests.system.nspawn import Container, message

UNIT_FILE = Path(__file__).parents[2] / "systemd" / "order-monitor.service"
UNIT = "order-monitor.service"
ETC = "/etc/order-monitor"
# Characters that need escaping in a URI, in JSON, in a shell and in TOML.
DSN_PASSWORD = "p@ss:w/rd%20&'\"-dsn"
TOKEN = "t0k@n:w/rd%20&'\"-api"
WATCHDOG_SEC = 4
PRIORITY = {"debug": "7", "info": "6", "warning": "4", "error": "3", "critical": "2"}

T = TypeVar("T")

_why_not = nspawn.unavailable()
pytestmark = [
    pytest.mark.system,
    pytest.mark.skipif(_why_not is not None, reason=f"no real systemd here: {_why_not}"),
    pytest.mark.timeout(180),
]


def wait_for(
    what: str,
    probe: Callable[[], T | None],
    within: float = 30.0,
    explain: Callable[[], str] = lambda: "",
) -> T:
    """Poll *probe* until it returns something truthy; fail naming *what*."""
    deadline = time.monotonic() + within
    while True:
        got = probe()
        if got:
            return got
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {within}s waiting for {what}\n{explain()}")
        time.sleep(0.1)


class ThreadedFake:
    """The fake provider on its own event loop, so the tests can be plain functions."""

    def __init__(self, token: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.fake = FakeProvider(Behaviour(), token=token, clock=time.time)
        self.url = self._call(self.fake.start("127.0.0.1", 0))

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    def close(self) -> None:
        self._call(self.fake.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


class Deployment:
    """The service in the container, and the database it works on."""

    def __init__(self, box: Container, admin_dsn: str, fake: ThreadedFake) -> None:
        self.box = box
        self.admin_dsn = admin_dsn
        self.fake = fake

    def systemctl(self, *args: str, check: bool = True) -> Any:
        return self.box.run("systemctl", *args, check=check)

    def state(self) -> dict[str, str]:
        return self.box.show(
            UNIT,
            "ActiveState",
            "SubState",
            "MainPID",
            "StatusText",
            "Result",
            "ExecMainCode",
            "ExecMainStatus",
            "NRestarts",
        )

    def ensure_active(self) -> dict[str, str]:
        state = self.state()
        if state["ActiveState"] != "active":
            self.systemctl("reset-failed", UNIT, check=False)
            self.systemctl("start", UNIT)
            state = self.state()
        assert state["ActiveState"] == "active", state
        return state

    def dispatch(self, reference: str, provider_id: str = "fake") -> uuid.UUID:
        with psycopg.connect(self.admin_dsn, autocommit=True) as conn:
            row = conn.execute(
                """INSERT INTO product_orders (provider_referans, "providerId", "externalStatus", "sentAt")
                   VALUES (%s, %s, 'sent', now()) RETURNING id""",
                (reference, provider_id),
            ).fetchone()
        assert row is not None
        return uuid.UUID(str(row[0]))

    def external_status(self, order: uuid.UUID) -> str:
        with psycopg.connect(self.admin_dsn, autocommit=True) as conn:
            row = conn.execute(
                'SELECT "externalStatus" FROM product_orders WHERE id = %s', (order,)
            ).fetchone()
        assert row is not None
        return str(row[0])

    def wait_done(self, order: uuid.UUID, within: float = 30.0) -> None:
        wait_for(
            f"order {order} to be done",
            lambda: self.external_status(order) == "done",
            within,
            explain=self.journal_tail,
        )

    def journal_tail(self) -> str:
        return self.box.run("journalctl", "--no-pager", "-n", "40", check=False).stdout

    def daemon_lines(self, after: int | None = None, *args: str) -> list[dict[str, Any]]:
        """The daemon's own JSON log lines (not systemd's lines about the unit)."""
        lines = []
        for entry in self.box.journal("-u", UNIT, *args, after=after):
            with contextlib.suppress(ValueError):
                event = json.loads(message(entry))
                if isinstance(event, dict) and "event" in event:
                    lines.append({**entry, "event": event})
        return lines

    def wait_event(self, name: str, after: int, within: float = 30.0) -> dict[str, Any]:
        def probe() -> dict[str, Any] | None:
            found = [e for e in self.daemon_lines(after) if e["event"]["event"] == name]
            return found[0] if found else None

        return wait_for(f"{name} in the journal", probe, within, explain=self.journal_tail)

    def write_providers(self, provider_ids: list[str], *, broken: bool = False) -> None:
        ids = ", ".join(json.dumps(i) for i in provider_ids)
        text = f"""
[providers.fake]
kind = "barakat"
base_url = "{self.fake.url}"
provider_ids = [{ids}]
secrets = {{ token = {{ credential = "fake-token" }} }}
limits = {{ read_timeout = 5, breaker_failures = 50 }}
"""
        if broken:
            text += "\n[providers.fake.limits\n"  # unterminated table header
        self.box.write(f"{ETC}/providers.toml", text, mode="0644")


# The default outcome writes: the role from `sql print role` writes through the
# write function that install.sql made for them.
ENV_FILE = """\
ORDER_MONITOR_PROVIDERS_FILE=/etc/order-monitor/providers.toml
ORDER_MONITOR_ROLE={role}
ORDER_MONITOR_INITIAL_DELAY=0
ORDER_MONITOR_BACKOFF_BASE=1
ORDER_MONITOR_LOG_LEVEL=debug
"""


@pytest.fixture(scope="module")
def deployment(
    pg_server: Server, templates: tuple[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Deployment]:
    params = conninfo_to_dict(pg_server.admin_dsn)
    host = str(params.get("host") or "")
    if not host or host.startswith("/"):
        pytest.skip(
            "the test server listens on a Unix socket in a directory the service's "
            "dynamic user cannot reach; set ORDER_MONITOR_TEST_DSN to a TCP server "
            "(.ci/run's second run does)"
        )
    suffix = uuid.uuid4().hex[:8]
    dbname, role = f"om_systemd_{suffix}", f"om_systemd_{suffix}"
    admin_dsn = pg_server.create_database(dbname, template=templates[1])
    fake = ThreadedFake(TOKEN)
    try:
        role_sql = CliRunner().invoke(
            cli,
            ["sql", "print", "role"],
            # The SQL for the very settings the service gets.
            env={
                **dict(line.split("=", 1) for line in ENV_FILE.format(role=role).splitlines()),
                "ORDER_MONITOR_PROVIDERS_FILE": None,
                "ORDER_MONITOR_DSN": None,
            },
            catch_exceptions=False,
        )
        assert role_sql.exit_code == 0, role_sql.output
        with psycopg.connect(admin_dsn, autocommit=True) as conn:
            conn.execute(role_sql.output)  # type: ignore[call-overload]
            conn.execute(
                sql.SQL("ALTER ROLE {} PASSWORD {}").format(
                    sql.Identifier(role), sql.Literal(DSN_PASSWORD)
                )
            )
        quoted = urllib.parse.quote(DSN_PASSWORD, safe="")
        port = params.get("port") or 5432
        service_dsn = f"postgresql://{role}:{quoted}@{host}:{port}/{dbname}"
        with nspawn.booted(f"om-{suffix}", tmp_path_factory.mktemp("nspawn") / "console") as box:
            script = box.make_venv()
            box.write(f"/etc/systemd/system/{UNIT}", UNIT_FILE.read_text())
            box.write(
                f"/etc/systemd/system/{UNIT}.d/exec-start.conf",
                f"[Service]\nExecStart=\nExecStart={script} run\n",
            )
            box.write(
                f"/etc/systemd/system/{UNIT}.d/provider-credentials.conf",
                f"[Service]\nLoadCredential=fake-token:{ETC}/fake-token\n",
            )
            box.write(
                f"/etc/systemd/system/{UNIT}.d/test-timings.conf",
                "# Test only: restarts in 1 s, a wedge noticed in 4 s, not 5 s and 30 s.\n"
                f"[Service]\nRestartSec=1\nWatchdogSec={WATCHDOG_SEC}\n",
            )
            box.write(f"{ETC}/env", ENV_FILE.format(role=role), mode="0600")
            box.write(f"{ETC}/dsn", service_dsn, mode="0600")
            box.write(f"{ETC}/fake-token", TOKEN, mode="0600")
            deployment = Deployment(box, admin_dsn, fake)
            deployment.write_providers(["fake"])
            box.run("systemctl", "daemon-reload")
            yield deployment
    finally:
        fake.close()
        pg_server.drop_database(dbname)
        pg_server.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))


def test_start_returns_once_ready_with_a_meaningful_status(deployment: Deployment) -> None:
    after = deployment.box.cursor()
    deployment.systemctl("start", UNIT)
    # Type=notify: `start` returned, so systemd had READY=1 already.
    state = deployment.state()
    assert (state["ActiveState"], state["SubState"]) == ("active", "running"), state
    assert re.match(r"leader: (listening|\d+ pending)", state["StatusText"]), state
    connected = deployment.wait_event("listener.connected", after, within=1)
    assert connected["SYSLOG_IDENTIFIER"] == "order-monitor"
    # The housekeeping loop keeps STATUS= current with the numbers.
    wait_for(
        "a STATUS= with the numbers",
        lambda: "pending" in deployment.state()["StatusText"],
        within=WATCHDOG_SEC,
    )
    assert "listener up" in deployment.state()["StatusText"]


def test_an_order_is_followed_to_done(deployment: Deployment) -> None:
    deployment.ensure_active()
    order = deployment.dispatch("SD-DONE-1")
    deployment.wait_done(order)


def test_reload_applies_a_new_providers_file(deployment: Deployment) -> None:
    pid = deployment.ensure_active()["MainPID"]
    order = deployment.dispatch("SD-RELOAD-1", provider_id="fake-2")
    after = deployment.box.cursor()
    deployment.write_providers(["fake", "fake-2"])
    deployment.systemctl("reload", UNIT)
    deployment.wait_event("config.reloaded", after)
    deployment.wait_done(order)
    state = deployment.state()
    assert (state["ActiveState"], state["MainPID"]) == ("active", pid)


def test_a_broken_providers_file_is_rejected_and_the_service_stays(
    deployment: Deployment,
) -> None:
    pid = deployment.ensure_active()["MainPID"]
    after = deployment.box.cursor()
    deployment.write_providers(["fake"], broken=True)
    try:
        deployment.systemctl("reload", UNIT)
        rejected = deployment.wait_event("config.reload_rejected", after)
        assert rejected["PRIORITY"] == "3"
        assert "providers.toml" in rejected["event"]["error"]
        state = deployment.state()
        assert (state["ActiveState"], state["MainPID"]) == ("active", pid)
        # The running configuration still works.
        deployment.wait_done(deployment.dispatch("SD-AFTER-BROKEN", provider_id="fake-2"))
    finally:
        deployment.write_providers(["fake", "fake-2"])


def _restarted(deployment: Deployment, old_pid: str) -> dict[str, str] | None:
    state = deployment.state()
    fresh = state["MainPID"] not in ("0", old_pid)
    return state if fresh and state["ActiveState"] == "active" else None


def test_a_sigkill_is_restarted(deployment: Deployment) -> None:
    before = deployment.ensure_active()
    deployment.systemctl("kill", "--signal=KILL", UNIT)
    after = wait_for("a restart", lambda: _restarted(deployment, before["MainPID"]))
    assert int(after["NRestarts"]) == int(before["NRestarts"]) + 1
    deployment.wait_done(deployment.dispatch("SD-AFTER-KILL"))


def test_a_stopped_process_is_killed_by_the_watchdog_and_restarted(
    deployment: Deployment,
) -> None:
    before = deployment.ensure_active()
    after_cursor = deployment.box.cursor()
    deployment.box.run("kill", "-STOP", before["MainPID"])
    after = wait_for(
        "the watchdog's restart",
        lambda: _restarted(deployment, before["MainPID"]),
        within=WATCHDOG_SEC + 20,
    )
    assert int(after["NRestarts"]) == int(before["NRestarts"]) + 1
    systemd_said = [message(e) for e in deployment.box.journal("-u", UNIT, after=after_cursor)]
    assert any("Watchdog timeout" in line for line in systemd_said), systemd_said


def test_stop_drains_and_exits_cleanly(deployment: Deployment) -> None:
    deployment.ensure_active()
    deployment.fake.fake.behaviour.latency = 2.0
    try:
        order = deployment.dispatch("SD-DRAIN-1")
        wait_for("a check under way", lambda: deployment.fake.fake.in_flight > 0)
        after = deployment.box.cursor()
        started = time.monotonic()
        deployment.systemctl("stop", UNIT)
        took = time.monotonic() - started
    finally:
        deployment.fake.fake.behaviour.latency = 0.0
    state = deployment.state()
    assert state["ActiveState"] == "inactive", state
    assert (state["Result"], state["ExecMainStatus"]) == ("success", "0"), state
    timeout = float(deployment.box.show(UNIT, "TimeoutStopUSec")["TimeoutStopUSec"].rstrip("s"))
    assert took < timeout
    said = [message(e) for e in deployment.box.journal("-u", UNIT, after=after)]
    assert any("Deactivated successfully" in line for line in said), said
    events = [e["event"]["event"] for e in deployment.daemon_lines(after)]
    assert "daemon.stopping" in events
    assert "daemon.stopped" in events
    assert "daemon.checks_abandoned" not in events
    # The check under way at SIGTERM was finished and written, not dropped.
    assert deployment.external_status(order) == "done"


def test_a_config_error_exits_78_is_not_restarted_and_is_logged_at_err(
    deployment: Deployment,
) -> None:
    deployment.systemctl("stop", UNIT)
    deployment.systemctl("reset-failed", UNIT, check=False)
    env = deployment.box.run("cat", f"{ETC}/env").stdout
    after = deployment.box.cursor()
    deployment.box.write(f"{ETC}/env", env + "ORDER_MONITOR_BATCH_SIZE=banana\n", mode="0600")
    try:
        assert deployment.systemctl("start", UNIT, check=False).returncode != 0
        state = deployment.state()
        # failed, not activating (auto-restart): RestartPreventExitStatus=78.
        assert (state["ActiveState"], state["SubState"]) == ("failed", "failed"), state
        assert (state["Result"], state["ExecMainStatus"], state["NRestarts"]) == (
            "exit-code",
            "78",
            "0",
        ), state

        def the_line() -> list[str]:
            return [
                message(e)
                for e in deployment.box.journal("-u", UNIT, "-p", "err", after=after)
                if e.get("SYSLOG_IDENTIFIER") == "order-monitor"
                and message(e).startswith("order-monitor: ORDER_MONITOR_BATCH_SIZE")
            ]

        wait_for(
            "the line naming the bad variable at priority err",
            the_line,
            within=5,
            explain=lambda: json.dumps(
                deployment.box.journal("-u", UNIT, "-p", "err", after=after), indent=1
            ),
        )
    finally:
        deployment.box.write(f"{ETC}/env", env, mode="0600")
        deployment.systemctl("reset-failed", UNIT, check=False)
    deployment.ensure_active()


def test_journal_priorities_identifier_and_no_secret(deployment: Deployment) -> None:
    deployment.ensure_active()
    after = deployment.box.cursor()
    # A warning: an order nobody serves.
    deployment.dispatch("SD-NOBODY-1", provider_id="nobody")
    warned = deployment.wait_event("provider.not_configured", after)
    assert warned["PRIORITY"] == "4"
    # A debug line: an order finished by someone else while it waits.
    deployment.fake.fake.set_script("SD-LEFT-1", Script.pending())
    order = deployment.dispatch("SD-LEFT-1")
    wait_for("a first poll", lambda: deployment.fake.fake.poll_count("SD-LEFT-1") > 0)
    with psycopg.connect(deployment.admin_dsn, autocommit=True) as conn:
        conn.execute("UPDATE product_orders SET status = 'approved' WHERE id = %s", (order,))
    deployment.wait_event("order.left_flight", after)
    lines = deployment.daemon_lines()
    levels = {line["event"]["level"] for line in lines}
    # debug (LOG_LEVEL=debug), info, warning (just now), error (the broken reload).
    assert {"debug", "info", "warning", "error"} <= levels, levels
    for line in lines:
        assert line["PRIORITY"] == PRIORITY[line["event"]["level"]], line
        assert line["SYSLOG_IDENTIFIER"] == "order-monitor", line
    filtered = deployment.daemon_lines(None, "-p", "warning")
    assert filtered
    assert all(int(line["PRIORITY"]) <= 4 for line in filtered)
    assert {line["__CURSOR"] for line in filtered} == {
        line["__CURSOR"] for line in lines if int(line["PRIORITY"]) <= 4
    }
    everything = deployment.box.run("journalctl", "--no-pager", "-o", "export").stdout
    for secret in (DSN_PASSWORD, TOKEN):
        for encoded in (
            secret,
            urllib.parse.quote(secret, safe=""),
            urllib.parse.quote(secret),
            json.dumps(secret)[1:-1],
            secret.split("%")[0],  # the part before anything an encoder touches
        ):
            assert encoded not in everything, f"a secret in the journal as {encoded!r}"


def test_systemd_analyze_security_rates_the_unit_at_most_2(deployment: Deployment) -> None:
    out = deployment.box.run("systemd-analyze", "security", "--no-pager", UNIT).stdout
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", out)
    assert found, out
    assert float(found.group(1)) <= 2.0, out


def test_the_daemon_connects_as_the_least_privilege_role(deployment: Deployment) -> None:
    deployment.ensure_active()
    role = str(conninfo_to_dict(deployment.box.run("cat", f"{ETC}/dsn").stdout)["user"])
    with psycopg.connect(deployment.admin_dsn, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT DISTINCT usename FROM pg_stat_activity WHERE datname = current_database() "
            "AND application_name LIKE 'order-monitor %%'"
        ).fetchall()
    assert rows == [(role,)]
