"""Builds the packages once per test session, for the proofs that install them."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from psycopg.conninfo import conninfo_to_dict

import order_monitor
from tests.conftest import Server

ROOT = Path(__file__).parents[2]
# Higher than the checkout's version for dpkg and for PEP 440 alike.
UPGRADE_VERSION = f"{order_monitor.__version__}.post1"


def deb_unavailable() -> str | None:
    """Why the .deb cannot be built here, or None."""
    for tool, package in (
        ("dpkg-buildpackage", "dpkg-dev"),
        ("dh", "debhelper"),
        ("dh_virtualenv", "dh-virtualenv"),
    ):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (Debian: apt-get install {package})"
    if subprocess.run(["/usr/bin/python3", "-c", "import venv, ensurepip"], check=False).returncode:
        return "/usr/bin/python3 has no venv/ensurepip (Debian: apt-get install python3-venv)"
    return None


def timed(what: str, build: Callable[[], Path]) -> Path:
    """Run *build*, saying how long it took (CI's log keeps the build times)."""
    started = time.monotonic()
    path = build()
    took = time.monotonic() - started
    size = f", {path.stat().st_size / 1e6:.1f} MB" if path.is_file() else ""
    print(f"\n[packaging] {what}: {took:.0f} s{size}: {path}")
    return path


def build_deb(out: Path, version: str | None = None) -> Path:
    command = [str(ROOT / "packaging" / "build-deb"), str(out)]
    if version:
        command.append(version)
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, check=False)
    if result.returncode != 0:
        pytest.fail(f"packaging/build-deb failed:\n{result.stderr[-4000:]}")
    return Path(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """order-monitor_<version>_<arch>.deb, built from this checkout."""
    why = deb_unavailable()
    if why:
        pytest.skip(f"cannot build the .deb: {why}")
    out = tmp_path_factory.mktemp("deb")
    return timed("build the .deb", lambda: build_deb(out))


@pytest.fixture(scope="session")
def upgrade_deb(deb: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same checkout rebuilt as a higher version, to upgrade to."""
    out = tmp_path_factory.mktemp("deb-upgrade")
    return timed("rebuild the .deb as a higher version", lambda: build_deb(out, UPGRADE_VERSION))


@pytest.fixture(scope="session")
def tcp_server(pg_server: Server) -> tuple[str, int]:
    """The test server's (host, port); skips, before anything is built, without one.

    Ask for it before `deb`: the proofs need both, and a skip should not cost a build.
    """
    params = conninfo_to_dict(pg_server.admin_dsn)
    host = str(params.get("host") or "")
    if not host or host.startswith("/"):
        pytest.skip(
            "the test server listens on a Unix socket only; the installed service "
            "reaches its database over TCP: set ORDER_MONITOR_TEST_DSN to a TCP server "
            "(.ci/run's second run does)"
        )
    return host, int(params.get("port") or 5432)
