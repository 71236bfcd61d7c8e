"""The container image under podman, against the test database: start, follow an order, drain on stop.

The image is built from the .deb on packaging/rootfs's minimal Debian 12,
imported (nothing pulled). The container runs as the image's non-root user
on the host's network (the test database and the fake provider listen on
127.0.0.1), takes the DSN from a podman secret mounted at /run/secrets/dsn
and the provider token from another, as { credential = "fake-token" } in the
providers file, and logs JSON lines to stdout.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from click.testing import CliRunner
from psycopg import sql

import order_monitor
from order_monitor.cli import cli
from tests.conftest import Server
from tests.packaging.conftest import ROOT, timed
from tests.system.test_systemd_unit import ThreadedFake, wait_for

DSN_PASSWORD = "p@ss:w/rd%20&'\"-oci"
TOKEN = "t0k@n:w/rd%20&'\"-oci"
CONTAINERS_CONF = ROOT / "packaging" / "containers.conf"


def unavailable() -> str | None:
    if os.geteuid() != 0:
        return "building the image's root file system (mmdebstrap) needs root"
    for tool, package in (("podman", "podman"), ("runc", "runc"), ("mmdebstrap", "mmdebstrap")):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (Debian: apt-get install {package})"
    return None


_why_not = unavailable()
pytestmark = [
    pytest.mark.system,
    pytest.mark.skipif(_why_not is not None, reason=f"no podman here: {_why_not}"),
    pytest.mark.timeout(900),
]


def podman(
    *args: str, check: bool = True, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        ["podman", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env={**os.environ, "CONTAINERS_CONF": str(CONTAINERS_CONF)},
    )
    if check and result.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)}: {result.returncode}\n{result.stderr}")
    return result


@pytest.fixture(scope="module")
def image(tcp_server: tuple[str, int], deb: Path) -> str:
    """The image, built once, in the run that has a TCP server (it runs the proofs)."""

    def build() -> Path:
        result = subprocess.run(
            [ROOT / "packaging" / "build-image", deb],
            capture_output=True,
            text=True,
            timeout=900,
            check=False,
            env={**os.environ, "CONTAINERS_CONF": str(CONTAINERS_CONF)},
        )
        if result.returncode != 0:
            pytest.fail(f"packaging/build-image failed:\n{result.stderr[-4000:]}")
        return Path(result.stdout.strip().splitlines()[-1])

    tag = str(timed("build the image", build))
    size = int(podman("image", "inspect", tag, "--format", "{{.Size}}").stdout)
    print(f"[packaging] image {tag}: {size / 1e6:.0f} MB")
    return tag


def json_events(container: str) -> list[dict[str, Any]]:
    """The daemon's JSON log lines on the container's stdout."""
    events = []
    for line in podman("logs", container).stdout.splitlines():
        with contextlib.suppress(ValueError):
            event = json.loads(line)
            if isinstance(event, dict) and "event" in event:
                events.append(event)
    return events


def healthz_answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Running:
    def __init__(self, name: str, admin_dsn: str, fake: ThreadedFake, service_dsn: str) -> None:
        self.name = name
        self.admin_dsn = admin_dsn
        self.fake = fake
        self.service_dsn = service_dsn

    def inspect(self, template: str) -> str:
        return podman("inspect", self.name, "--format", template).stdout.strip()

    def logs(self) -> list[dict[str, Any]]:
        return json_events(self.name)

    def dispatch(self, reference: str) -> uuid.UUID:
        with psycopg.connect(self.admin_dsn, autocommit=True) as conn:
            row = conn.execute(
                """INSERT INTO product_orders (provider_referans, "providerId", "externalStatus", "sentAt")
                   VALUES (%s, 'fake', 'sent', now()) RETURNING id""",
                (reference,),
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

    def wait_done(self, order: uuid.UUID) -> None:
        logs = ["logs", "--tail", "30", self.name]
        wait_for(
            f"order {order} to be done",
            lambda: self.external_status(order) == "done",
            explain=lambda: podman(*logs, check=False).stderr + podman(*logs, check=False).stdout,
        )


@pytest.fixture(scope="module")
def running(
    tcp_server: tuple[str, int],
    pg_server: Server,
    templates: tuple[str, str],
    image: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Running]:
    host, port = tcp_server
    suffix = uuid.uuid4().hex[:8]
    dbname = role = f"om_oci_{suffix}"
    name = f"om-oci-{suffix}"
    admin_dsn = pg_server.create_database(dbname, template=templates[1])
    fake = ThreadedFake(TOKEN)
    work = tmp_path_factory.mktemp("oci")
    try:
        role_sql = CliRunner().invoke(
            cli, ["sql", "print", "role"], env={"ORDER_MONITOR_ROLE": role}, catch_exceptions=False
        )
        with psycopg.connect(admin_dsn, autocommit=True) as conn:
            conn.execute(role_sql.output)
            conn.execute(
                sql.SQL("ALTER ROLE {} PASSWORD {}").format(
                    sql.Identifier(role), sql.Literal(DSN_PASSWORD)
                )
            )
        quoted = urllib.parse.quote(DSN_PASSWORD, safe="")
        service_dsn = f"postgresql://{role}:{quoted}@{host}:{port}/{dbname}"
        (work / "dsn").write_text(service_dsn + "\n")
        (work / "token").write_text(TOKEN)
        providers = work / "providers.toml"
        providers.write_text(
            f'[providers.fake]\nkind = "barakat"\nbase_url = "{fake.url}"\n'
            'secrets = { token = { credential = "fake-token" } }\n'
            "limits = { read_timeout = 5 }\n"
        )
        providers.chmod(0o644)
        podman("secret", "create", f"{name}-dsn", str(work / "dsn"))
        podman("secret", "create", f"{name}-token", str(work / "token"))
        http_port = free_port()
        podman(
            "run",
            "--detach",
            f"--name={name}",
            "--network=host",
            f"--secret={name}-dsn,target=dsn,uid=10001,mode=0400",
            f"--secret={name}-token,target=fake-token,uid=10001,mode=0400",
            f"--volume={providers}:/etc/order-monitor/providers.toml:ro",
            f"--env=ORDER_MONITOR_HTTP_LISTEN=127.0.0.1:{http_port}",
            "--env=ORDER_MONITOR_INITIAL_DELAY=0",
            "--env=ORDER_MONITOR_BACKOFF_BASE=1",
            image,
        )
        yield Running(name, admin_dsn, fake, service_dsn)
    finally:
        podman("rm", "--force", "--time=0", name, check=False)
        podman("secret", "rm", f"{name}-dsn", f"{name}-token", check=False)
        fake.close()
        pg_server.drop_database(dbname)
        pg_server.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))


def test_the_image_runs_this_checkouts_code(image: str) -> None:
    version = podman("run", "--rm", image, "--version").stdout.strip()
    assert version == f"order-monitor, version {order_monitor.__version__}"
    shipped_unit = podman("run", "--rm", image, "files", "print", "unit").stdout
    assert shipped_unit == (ROOT / "systemd" / "order-monitor.service").read_text()


def test_it_runs_as_a_non_root_user_and_logs_json_to_stdout(running: Running) -> None:
    wait_for(
        "the listener to connect",
        lambda: any(e["event"] == "listener.connected" for e in running.logs()),
        explain=lambda: podman("logs", running.name, check=False).stderr,
    )
    assert running.inspect("{{.Config.User}}") == "10001:10001"
    pid = running.inspect("{{.State.Pid}}")
    assert Path(f"/proc/{pid}/status").read_text().count("\t10001") >= 2  # Uid:, Gid:


def test_the_health_check_answers(running: Running) -> None:
    wait_for(
        "a healthy health check",
        lambda: podman("healthcheck", "run", running.name, check=False).returncode == 0,
    )


def test_an_order_is_followed_to_done(running: Running) -> None:
    running.wait_done(running.dispatch("OCI-DONE-1"))


def test_doctor_runs_in_the_container_with_its_configuration(running: Running) -> None:
    result = podman("exec", running.name, "order-monitor", "doctor", check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "providers: /etc/order-monitor/providers.toml parsed" in result.stdout


def test_podman_stop_drains_and_exits_0(running: Running) -> None:
    running.fake.fake.behaviour.latency = 2.0
    try:
        order = running.dispatch("OCI-DRAIN-1")
        wait_for("a check under way", lambda: running.fake.fake.in_flight > 0)
        podman("stop", running.name)
    finally:
        running.fake.fake.behaviour.latency = 0.0
    assert running.inspect("{{.State.ExitCode}}") == "0"
    events = [e["event"] for e in running.logs()]
    assert "daemon.stopping" in events
    assert "daemon.stopped" in events
    assert "daemon.checks_abandoned" not in events
    assert running.external_status(order) == "done"


def test_the_compose_example_runs_as_its_comments_say(
    tcp_server: tuple[str, int], image: str, tmp_path: Path
) -> None:
    """packaging/compose.yaml as it is (its bridge network, its published port).

    No database on that network: the proof is that the DSN arrives from the
    secret file (the daemon logs it, password hidden, while it retries), the
    published /healthz answers, and a stop drains and exits 0.
    """
    if shutil.which("podman-compose") is None:
        pytest.skip("podman-compose is not installed (Debian: apt-get install podman-compose)")
    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", 9187)) == 0:
            pytest.skip("127.0.0.1:9187, the example's published port, is taken here")
    suffix = uuid.uuid4().hex[:8]
    project = tmp_path / "deploy"
    project.mkdir()
    shutil.copy(ROOT / "packaging" / "compose.yaml", project / "compose.yaml")
    # As the file's comments say: readable by the image's user only.
    dsn = project / "dsn"
    # TEST-NET-1: nothing answers; the daemon logs its attempts.
    dsn.write_text(
        f"postgresql://om_{suffix}:{urllib.parse.quote(DSN_PASSWORD, safe='')}"
        "@192.0.2.1:5432/shop?connect_timeout=2\n"
    )
    os.chown(dsn, 10001, -1)
    dsn.chmod(0o400)
    (project / "providers.toml").write_text(
        '[providers.fake]\nkind = "barakat"\nbase_url = "http://127.0.0.1:9"\n'
        'secrets = { token = "not-used" }\n'
    )
    (project / "providers.toml").chmod(0o644)
    name = f"om-compose-{suffix}"
    compose = ["podman-compose", "-p", name, "-f", "compose.yaml"]

    def run(*args: str) -> None:
        result = subprocess.run(
            [*compose, *args],
            cwd=project,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            env={**os.environ, "CONTAINERS_CONF": str(CONTAINERS_CONF)},
        )
        # podman-compose exits 0 when a podman command failed: it prints the code.
        assert result.returncode == 0, result.stdout + result.stderr
        assert "exit code: 125" not in result.stdout + result.stderr, result.stdout

    container = f"{name}_order-monitor_1"
    # The file names :latest; this test's image is what build-image tagged so.
    assert podman(
        "image", "inspect", "localhost/order-monitor:latest", "--format", "{{.Id}}"
    ).stdout == (podman("image", "inspect", image, "--format", "{{.Id}}").stdout)
    run("up", "-d")
    try:
        started = wait_for(
            "the daemon to log its database",
            lambda: [e for e in json_events(container) if "database" in e and "version" in e],
            explain=lambda: podman("logs", container, check=False).stderr,
        )
        assert started[0]["database"].startswith(f"postgresql://om_{suffix}:***@192.0.2.1")
        wait_for(
            "/healthz on the published port",
            lambda: healthz_answers("http://127.0.0.1:9187/healthz"),
        )
        run("stop")
        assert podman("inspect", container, "--format", "{{.State.ExitCode}}").stdout.strip() == "0"
        assert "daemon.stopped" in [e["event"] for e in json_events(container)]
    finally:
        run("down")
        # podman-compose 1.0.3's down leaves the project's network behind.
        podman("network", "rm", f"{name}_default", check=False)
