"""The alert rules and the dashboard, against promtool and a real Prometheus.

promtool checks the rules file and runs its unit tests (one case or more per
alert). Then a real Prometheus scrapes a running daemon every second, and
every dashboard expression and every alert expression is evaluated through
its HTTP API.

An alert expression is silent by design when all is well (``up == 0``), so
"returns a series" is asked of what it is made of: every metric selector in
it, with its label matchers (``order_monitor_checks_total{outcome="error"}``),
must select a series the daemon exports, and the whole expression must
evaluate without error. A typo in a metric name, a label name or a label
value selects nothing and fails. Dashboard expressions must return a series
as written. The daemon is driven through a done order, a failed request, a
give-up and an order nobody serves first, since a labelled series exists
only once it has been counted; and, with an action that rejects failed
orders in the application (the fake of its API), through a delivery that
fails once (a 503) and is then taken, for the delivery series. The
logical decoding row is asked of a second daemon, with
ORDER_MONITOR_CAPTURE=decoding on a wal_level = logical server, driven
through an order read from the slot and the slot dropped under it (a read
error, a recreation): a daemon on the trigger counts none of those.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import psycopg
import pytest
from prometheus_client import CollectorRegistry

from order_monitor.config import OutcomeWrites
from order_monitor.daemon import Daemon
from order_monitor.delivery.relay import RelayTiming
from order_monitor.demo.application_api import ApplicationApi, prepare_application_tables
from order_monitor.demo.setup import demo_actions
from order_monitor.engine.handoff import HandoffTiming, Mode
from order_monitor.engine.policy import BackoffPolicy
from order_monitor.providers.fake import FakeProvider, Script
from tests.conftest import deploy
from tests.daemon_fixtures import App, running, settings_for
from tests.decoding.conftest import logical_dsn, logical_server
from tests.decoding.test_capture import db as decoding_db
from tests.decoding.test_capture import slot_state

MONITORING = Path(__file__).parents[2] / "monitoring"
RULES = MONITORING / "order-monitor.rules.yml"
RULE_TESTS = MONITORING / "tests" / "order-monitor.rules.test.yml"
DASHBOARD = MONITORING / "grafana-dashboard.json"
SELECTOR = re.compile(r"\b(order_monitor_\w+|up)\b(\{[^}]*\})?")
DELIVERY_ROW = "Delivery to the application"
DECODING_ROW = "Logical decoding (ORDER_MONITOR_CAPTURE=decoding)"
#: Every decoding series of order_monitor.metrics, as the dashboard asks for them.
DECODING_SERIES = (
    "order_monitor_decoding_slot_lag_bytes",
    "order_monitor_decoding_orders_total",
    "order_monitor_decoding_slot_recreated_total",
    "order_monitor_decoding_errors_total",
    "order_monitor_decoding_read_seconds_bucket",
)
#: Every delivery series of order_monitor.metrics, as the dashboard asks for them.
DELIVERY_SERIES = (
    "order_monitor_deliveries_total",
    "order_monitor_delivery_errors_total",
    "order_monitor_deliveries_undelivered",
    "order_monitor_undelivered_age_seconds",
    "order_monitor_dead_letters",
    "order_monitor_delivery_auth_failing",
    "order_monitor_delivery_latency_seconds_bucket",
)
#: The reject action delivers failed results, with the order's tenant.
DELIVERING = OutcomeWrites(deliver=("failed",), deliver_columns=("tenantId",))
API_TOKEN = "api-token-%'\"\\=?#+; x"

pytestmark = [
    pytest.mark.system,
    pytest.mark.skipif(
        shutil.which("promtool") is None or shutil.which("prometheus") is None,
        reason="promtool/prometheus are not installed (Debian: apt-get install prometheus)",
    ),
]
once = pytest.mark.skipif(
    bool(os.environ.get("ORDER_MONITOR_TEST_SKIP_PROMETHEUS")),
    reason="ORDER_MONITOR_TEST_SKIP_PROMETHEUS is set: .ci/run ran it on the first run",
)


def alert_exprs() -> dict[str, str]:
    """alert name -> expr, from the rules file (the two shapes it uses: inline and >-)."""
    found: dict[str, str] = {}
    for block in re.split(r"\n\s+- alert: ", RULES.read_text())[1:]:
        name = block.split("\n", 1)[0].strip()
        expr = re.search(r"\n\s+expr: (?:>-\n((?:\s{10,}.*\n)+)|(.*)\n)", block)
        assert expr, f"no expr for {name}"
        found[name] = " ".join((expr.group(1) or expr.group(2)).split())
    return found


def dashboard_exprs() -> list[tuple[str, str]]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [(p["title"], t["expr"]) for p in panels for t in p.get("targets", [])]


def row_panels(title: str) -> list[dict[str, Any]]:
    """The panels below the row *title*, up to the next row."""
    panels: list[dict[str, Any]] = json.loads(DASHBOARD.read_text())["panels"]
    rows = [n for n, p in enumerate(panels) if p["type"] == "row"]
    titles = [panels[n]["title"] for n in rows]
    assert title in titles, titles
    start = rows[titles.index(title)]
    return panels[start + 1 : next((n for n in rows if n > start), len(panels))]


def row_exprs(title: str) -> list[tuple[str, str]]:
    return [(p["title"], t["expr"]) for p in row_panels(title) for t in p["targets"]]


def test_the_dashboard_has_a_delivery_row_with_every_delivery_series() -> None:
    exprs = " ".join(expr for _, expr in row_exprs(DELIVERY_ROW))
    assert [name for name in DELIVERY_SERIES if name not in exprs] == []
    assert "histogram_quantile(0.5," in exprs
    assert "histogram_quantile(0.99," in exprs
    panels = json.loads(DASHBOARD.read_text())["panels"]
    # Grafana lays panels on a 24-wide grid, none overlapping.
    cells: set[tuple[int, int]] = set()
    for p in panels:
        g = p["gridPos"]
        cell = {
            (x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])
        }
        assert not cells & cell, p["title"]
        assert g["x"] + g["w"] <= 24, p["title"]
        cells |= cell


def test_the_dashboard_has_a_decoding_row_with_every_decoding_series() -> None:
    exprs = " ".join(expr for _, expr in row_exprs(DECODING_ROW))
    assert [name for name in DECODING_SERIES if name not in exprs] == []
    lag = [p for p in row_panels(DECODING_ROW) if "slot_lag_bytes" in json.dumps(p["targets"])]
    assert [p["fieldConfig"]["defaults"]["unit"] for p in lag] == ["bytes"]


def test_promtool_checks_the_rules() -> None:
    result = subprocess.run(
        ["promtool", "check", "rules", str(RULES)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_exprs())} rules found" in result.stdout


def test_promtool_unit_tests_pass_and_cover_every_alert() -> None:
    result = subprocess.run(
        ["promtool", "test", "rules", str(RULE_TESTS)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    tested = set(re.findall(r"alertname: (\w+)", RULE_TESTS.read_text()))
    firing = {
        name
        for name in tested
        if re.search(
            rf"alertname: {name}\n\s+eval_time: \w+\n\s+exp_alerts:\n\s+- ", RULE_TESTS.read_text()
        )
    }
    assert firing == set(alert_exprs()), "every alert needs a case where it fires"


def test_every_runbook_names_a_command() -> None:
    for block in re.split(r"\n\s+- alert: ", RULES.read_text())[1:]:
        runbook = block.split("runbook:", 1)[1]
        assert re.search(r"`(order-monitor|systemctl|journalctl|curl) ", runbook), block


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def query(session: aiohttp.ClientSession, base: str, expr: str) -> list[Any]:
    async with session.get(f"{base}/api/v1/query", params={"query": expr}) as response:
        body = await response.json()
    assert body["status"] == "success", (expr, body)
    return list(body["data"]["result"])


async def counted_in(registry: CollectorRegistry, name: str, labels: dict[str, str]) -> None:
    deadline = time.monotonic() + 30
    while not registry.get_sample_value(name, labels):
        assert time.monotonic() < deadline, f"{name}{labels} never counted"
        await asyncio.sleep(0.05)


@contextlib.contextmanager
def prometheus(tmp_path: Path, target_port: int) -> Iterator[tuple[str, Path]]:
    """A Prometheus scraping *target_port* every second, with the rules: (its URL, its log)."""
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        f"""
global: {{scrape_interval: 1s, evaluation_interval: 1s}}
rule_files: ["{RULES}"]
scrape_configs:
  - job_name: order-monitor
    static_configs: [{{targets: ["127.0.0.1:{target_port}"]}}]
"""
    )
    log = tmp_path / "prometheus.log"
    with log.open("wb") as log_file:
        server = subprocess.Popen(
            [
                "prometheus",
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=log_file,
        )
    try:
        yield f"http://127.0.0.1:{port}", log
    finally:
        server.terminate()
        server.wait(30)


def tail(log: Path) -> str:
    return log.read_text()[-2000:]


async def until_every_series(
    base: str, log: Path, evaluated: list[str], selecting: list[tuple[str, str]]
) -> None:
    """Until every expression of *selecting* returns a series; each of *evaluated* evaluates."""
    async with aiohttp.ClientSession() as session:
        missing: list[str] = ["(not asked yet)"]
        deadline = time.monotonic() + 60
        while missing:
            assert time.monotonic() < deadline, f"no series for: {missing}\n" + tail(log)
            await asyncio.sleep(0.5)
            try:
                for expr in evaluated:
                    await query(session, base, expr)  # evaluates, series or not
            except aiohttp.ClientConnectionError:
                continue  # not listening yet
            missing = [
                f"{title}: {expr}"
                for title, expr in selecting
                if not await query(session, base, expr)
            ]


@pytest.fixture
async def application(db: str) -> AsyncIterator[ApplicationApi]:
    """The application's API, on the install rendered for the reject action."""
    deploy(db, DELIVERING)
    with psycopg.connect(db, autocommit=True) as conn:
        prepare_application_tables(conn)
    api = ApplicationApi(db, token=API_TOKEN)
    await api.start()
    try:
        yield api
    finally:
        await api.close()


@once
async def test_every_expression_selects_real_series(
    db: str, app: App, fake: FakeProvider, application: ApplicationApi, tmp_path: Path
) -> None:
    # Two attempts and the order gives up, so a give-up is quick to get.
    policy = BackoffPolicy(
        initial_delay=0.0, base=0.1, cap=0.2, jitter=0.0, max_attempts=2, max_age=3600
    )
    # The first delivery fails: an error and a retry are counted, then it is taken.
    application.fail_next(503)
    reject = demo_actions(application.base_url, API_TOKEN)[1]
    settings = replace(
        settings_for(db, fake),
        policy=policy,
        http_listen="127.0.0.1:0",
        writes=DELIVERING,
        actions=(reject,),
    )
    # Quick to go idle, so the first orders come by NOTIFY and the listener's
    # series exist (later ones may come through the inbox).
    daemon = Daemon(
        settings,
        handoff_timing=HandoffTiming(calm_window=0.5, idle_check=0.2, idle_retry=0.2),
        relay_timing=RelayTiming(poll_interval=0.2, summary_interval=0.2, retry_scale=0.02),
    )
    async with running(daemon):
        assert daemon.http_server is not None
        with prometheus(tmp_path, daemon.http_server.port) as (base, log):
            registry = daemon.metrics.registry

            async def counted(name: str, labels: dict[str, str]) -> None:
                await counted_in(registry, name, labels)

            deadline = time.monotonic() + 30
            while daemon.handoff is None or daemon.handoff.mode is not Mode.IDLE:
                assert time.monotonic() < deadline, "the daemon never went idle"
                await asyncio.sleep(0.05)
            fake.set_script("M-GIVEUP", Script.pending())
            await app.dispatch(["M-DONE", "M-GIVEUP"])
            await app.dispatch(["M-NOBODY"], provider_id="nobody")
            await counted("order_monitor_orders_finished_total", {"outcome": "done"})
            await counted("order_monitor_orders_finished_total", {"outcome": "gave_up"})
            await counted("order_monitor_unconfigured_provider_orders_total", {})
            fake.behaviour.error_rate = 1.0
            await app.dispatch(["M-ERR"])
            await counted("order_monitor_checks_total", {"provider": "fake", "outcome": "error"})
            fake.behaviour.error_rate = 0.0
            fake.set_script("M-REJECT", Script.failed())
            await app.conn.execute(
                """INSERT INTO product_orders (provider_referans, "providerId", "externalStatus",
                                               "sentAt", "tenantId", "userId")
                   VALUES ('M-REJECT', 'fake', 'sent', now(), gen_random_uuid(),
                           gen_random_uuid())"""
            )
            delivered = {"action": reject.name, "result": "delivered"}
            await counted("order_monitor_deliveries_total", delivered)
            await counted("order_monitor_deliveries_total", {**delivered, "result": "retried"})
            await counted(
                "order_monitor_delivery_errors_total",
                {"action": reject.name, "kind": "server_error"},
            )

            alerts = alert_exprs()
            selectors = sorted({m.group(0) for e in alerts.values() for m in SELECTOR.finditer(e)})
            # The decoding row's labelled series exist only in decoding mode
            # (test_the_decoding_row_selects_real_series); here they evaluate.
            decoding = set(row_exprs(DECODING_ROW))
            panels = [panel for panel in dashboard_exprs() if panel not in decoding]
            await until_every_series(
                base,
                log,
                [*alerts.values(), *(expr for _, expr in decoding)],
                [(s, s) for s in selectors] + panels,
            )
            async with aiohttp.ClientSession() as session:
                # The server loaded the very rules file, and none fails to evaluate.
                async with session.get(f"{base}/api/v1/rules") as response:
                    groups = (await response.json())["data"]["groups"]
                loaded = {r["name"]: r for g in groups for r in g["rules"]}
                assert set(loaded) == set(alerts)
                assert all(r["health"] != "err" for r in loaded.values()), loaded


@once
async def test_the_decoding_row_selects_real_series(
    decoding_db: str, fake: FakeProvider, tmp_path: Path
) -> None:
    settings = replace(
        settings_for(decoding_db, fake, capture="decoding", sweep_interval=3600.0),
        http_listen="127.0.0.1:0",
    )
    async with running(Daemon(settings)) as daemon:
        assert daemon.http_server is not None
        registry = daemon.metrics.registry
        with prometheus(tmp_path, daemon.http_server.port) as (base, log):
            async with await psycopg.AsyncConnection.connect(decoding_db, autocommit=True) as conn:
                await App(conn).dispatch(["D-SLOT"])
            await counted_in(registry, "order_monitor_decoding_orders_total", {"result": "taken"})
            # The slot dropped under the daemon: a read fails, the slot is recreated.
            state = slot_state(decoding_db)
            assert state is not None
            deadline = time.monotonic() + 30
            while True:
                try:
                    with psycopg.connect(decoding_db, autocommit=True) as admin:
                        admin.execute("SELECT pg_drop_replication_slot(%s)", (state[0],))
                    break
                except psycopg.errors.ObjectInUse:  # read at this very moment
                    assert time.monotonic() < deadline, "the slot was never free to drop"
                    await asyncio.sleep(0.05)
            await counted_in(registry, "order_monitor_decoding_errors_total", {"kind": "slot"})
            await counted_in(registry, "order_monitor_decoding_slot_recreated_total", {})

            decoding_alerts = [e for n, e in alert_exprs().items() if "Decoding" in n]
            selectors = sorted({m.group(0) for e in decoding_alerts for m in SELECTOR.finditer(e)})
            await until_every_series(
                base,
                log,
                decoding_alerts,
                [(s, s) for s in selectors] + row_exprs(DECODING_ROW),
            )


__all__ = ["decoding_db", "logical_dsn", "logical_server"]
