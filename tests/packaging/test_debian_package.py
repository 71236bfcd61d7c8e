"""The .deb on a clean Debian 12, as a sysadmin installs it: install, configure, upgrade, remove, purge.

A minimal Debian 12 (packaging/rootfs: mmdebstrap, cached) is booted with
systemd-nspawn; nothing of the host is inside. The commands are the README's:
`apt install ./order-monitor_*.deb`, the DSN written to the credential file,
a providers file, `systemctl enable --now order-monitor`. The service follows
an order to done against the test database as the least-privilege role from
`order-monitor sql print role` (run inside, from the package), with a password
that needs escaping. Then an upgrade to a rebuilt, higher version keeps the
configuration and restarts the service; remove keeps the configuration, purge
removes it. The tests run in order on one container.
"""

from __future__ import annotations

import urllib.parse
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

import order_monitor
from tests.conftest import Server
from tests.packaging import clean_system
from tests.packaging.conftest import UPGRADE_VERSION
from tests.system.test_systemd_unit import Deployment, ThreadedFake, wait_for

UNIT = "order-monitor.service"
ETC = "/etc/order-monitor"
DSN_PASSWORD = "p@ss:w/rd%20&'\"-deb"
TOKEN = "t0k@n:w/rd%20&'\"-deb"
# What the sysadmin appends to the packaged env file (a modified conffile the
# upgrade must keep): test timings, and the role's name for `sql print role`.
ENV_ADDED = """
# --- added by the administrator ---
ORDER_MONITOR_ROLE={role}
ORDER_MONITOR_INITIAL_DELAY=0
ORDER_MONITOR_BACKOFF_BASE=1
"""

_why_not = clean_system.unavailable()
pytestmark = [
    pytest.mark.system,
    pytest.mark.skipif(_why_not is not None, reason=f"no clean Debian 12 here: {_why_not}"),
    pytest.mark.timeout(900),
]


class Machine(Deployment):
    """The systemd test's helpers, on the clean system with the package."""

    def __init__(
        self, box: clean_system.CleanSystem, admin_dsn: str, fake: ThreadedFake, role: str, dsn: str
    ) -> None:
        super().__init__(box, admin_dsn, fake)
        self.clean = box
        self.role = role
        self.service_dsn = dsn

    def apt(self, *args: str) -> str:
        result = self.box.run(
            "sh",
            "-c",
            'cd /root && DEBIAN_FRONTEND=noninteractive apt-get -y -q "$@" 2>&1',
            "-",
            *args,
            check=False,
            timeout=300,
        )
        assert result.returncode == 0, result.stdout
        return result.stdout

    def exists(self, path: str) -> bool:
        return self.box.run("test", "-e", path, check=False).returncode == 0

    def mode(self, path: str) -> str:
        return self.box.run("stat", "-c", "%a %U:%G", path).stdout.strip()

    def dpkg_status(self) -> str:
        return self.box.run(
            "dpkg-query", "-W", "-f=${Status} ${Version}", "order-monitor", check=False
        ).stdout


@pytest.fixture(scope="module")
def machine(
    tcp_server: tuple[str, int],
    pg_server: Server,
    templates: tuple[str, str],
    deb: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Machine]:
    host, port = tcp_server
    suffix = uuid.uuid4().hex[:8]
    dbname = role = f"om_deb_{suffix}"
    admin_dsn = pg_server.create_database(dbname, template=templates[1])
    fake = ThreadedFake(TOKEN)
    try:
        with clean_system.booted(f"om-deb-{suffix}", tmp_path_factory.mktemp("clean")) as box:
            service_dsn = (
                f"postgresql://{role}:{urllib.parse.quote(DSN_PASSWORD, safe='')}"
                f"@{host}:{port}/{dbname}"
            )
            yield Machine(box, admin_dsn, fake, role, service_dsn)
    finally:
        fake.close()
        pg_server.drop_database(dbname)
        pg_server.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))


def copy_in(machine: Machine, deb: Path) -> str:
    (machine.clean.tree / "root" / deb.name).write_bytes(deb.read_bytes())
    return f"./{deb.name}"


def test_install_leaves_an_enabled_service_waiting_for_its_dsn_not_a_failed_one(
    machine: Machine, deb: Path
) -> None:
    machine.apt("install", copy_in(machine, deb))
    assert machine.dpkg_status() == f"install ok installed {order_monitor.__version__}"
    assert machine.box.run("order-monitor", "--version").stdout.strip() == (
        f"order-monitor, version {order_monitor.__version__}"
    )
    state = machine.box.show(UNIT, "ActiveState", "UnitFileState", "ConditionResult", "Result")
    assert state == {
        "ActiveState": "inactive",
        "UnitFileState": "enabled",
        "ConditionResult": "no",
        "Result": "success",
    }, state
    assert machine.box.run("systemctl", "--failed", "--no-legend").stdout.strip() == ""
    # Where Debian puts things, with safe modes on the conffiles.
    assert machine.mode(f"{ETC}/env") == "600 root:root"
    assert machine.mode(f"{ETC}/providers.toml.example") == "644 root:root"
    conffiles = machine.box.run("dpkg-query", "-W", "-f=${Conffiles}", "order-monitor").stdout
    assert f"{ETC}/env " in conffiles
    assert f"{ETC}/providers.toml.example " in conffiles
    for path in (
        "/usr/share/order-monitor/sql/install.sql",
        "/usr/share/order-monitor/sql/role.sql",
        "/usr/share/order-monitor/sql/uninstall.sql",
        "/usr/share/order-monitor/monitoring/order-monitor.rules.yml",
        "/usr/share/order-monitor/monitoring/grafana-dashboard.json",
        # The unit's Documentation=.
        "/usr/share/doc/order-monitor/README.md",
        "/usr/share/doc/order-monitor/changelog.gz",
        "/lib/systemd/system/order-monitor.service",
    ):
        assert machine.exists(path), path


def test_configured_as_the_readme_says_it_starts_and_follows_an_order(machine: Machine) -> None:
    role = machine.role
    box = machine.box
    # The DBA's part: the role from the packaged CLI (install.sql is in the template).
    role_sql = box.run(
        "env", f"ORDER_MONITOR_ROLE={role}", "order-monitor", "sql", "print", "role"
    ).stdout
    with psycopg.connect(machine.admin_dsn, autocommit=True) as conn:
        conn.execute(role_sql)
        conn.execute(
            sql.SQL("ALTER ROLE {} PASSWORD {}").format(
                sql.Identifier(role), sql.Literal(DSN_PASSWORD)
            )
        )
    # The sysadmin's part.
    env = box.run("cat", f"{ETC}/env").stdout
    box.write(f"{ETC}/env", env + ENV_ADDED.format(role=role), mode="0600")
    box.run("install", "-m", "0600", "/dev/null", f"{ETC}/dsn")
    box.write(f"{ETC}/dsn", machine.service_dsn + "\n", mode="0600")
    box.write(f"{ETC}/fake-token", TOKEN, mode="0600")
    box.write(
        f"/etc/systemd/system/{UNIT}.d/credentials.conf",
        f"[Service]\nLoadCredential=fake-token:{ETC}/fake-token\n",
    )
    machine.write_providers(["fake"])
    box.run("systemctl", "daemon-reload")
    box.run("systemctl", "enable", "--now", "order-monitor")
    state = machine.state()
    assert (state["ActiveState"], state["SubState"]) == ("active", "running"), state
    machine.wait_done(machine.dispatch("DEB-DONE-1"))
    # The daemon runs as the unit's dynamic user, not root.
    uid = box.run("stat", "-c", "%u", f"/proc/{state['MainPID']}").stdout.strip()
    assert uid not in ("", "0"), uid


def test_doctor_checks_the_install_with_the_services_configuration(machine: Machine) -> None:
    # As root, outside the service, as the unit's header says: plain
    # `order-monitor doctor` reads the service's env file and credentials
    # (dsn, the provider token) from /etc/order-monitor itself.
    result = machine.box.run("order-monitor", "doctor", check=False)
    print(result.stdout, result.stderr)
    assert result.returncode in (0, 1), result.stdout + result.stderr
    assert "FAIL" not in result.stdout, result.stdout


def test_upgrade_keeps_the_configuration_and_restarts_the_service(
    machine: Machine, upgrade_deb: Path
) -> None:
    before = machine.ensure_active()
    env_before = machine.box.run("cat", f"{ETC}/env").stdout
    machine.apt("install", copy_in(machine, upgrade_deb))
    assert machine.dpkg_status() == f"install ok installed {UPGRADE_VERSION}"
    after = wait_for(
        "the restarted service",
        lambda: (
            s
            if (s := machine.state())["ActiveState"] == "active"
            and s["MainPID"] not in ("0", before["MainPID"])
            else None
        ),
    )
    assert after["SubState"] == "running", after
    assert machine.box.run("cat", f"{ETC}/env").stdout == env_before
    assert machine.exists(f"{ETC}/dsn")
    assert machine.box.run("order-monitor", "--version").stdout.strip().endswith(UPGRADE_VERSION)
    machine.wait_done(machine.dispatch("DEB-AFTER-UPGRADE"))


def test_remove_stops_the_service_and_keeps_the_configuration(machine: Machine) -> None:
    machine.apt("remove", "order-monitor")
    assert machine.dpkg_status().startswith("deinstall ok config-files")
    assert machine.state()["ActiveState"] == "inactive"
    assert not machine.exists("/usr/bin/order-monitor")
    assert not machine.exists("/opt/venvs/order-monitor")
    for kept in ("env", "dsn", "providers.toml", "providers.toml.example"):
        assert machine.exists(f"{ETC}/{kept}"), kept


def test_purge_removes_the_configuration(machine: Machine) -> None:
    machine.apt("purge", "order-monitor")
    assert machine.dpkg_status() == ""
    assert not machine.exists(ETC)
    assert not machine.exists("/etc/systemd/system/multi-user.target.wants/order-monitor.service")
