"""The systemd unit and its env example: systemd accepts them, and they tell the truth."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from order_monitor import config
from order_monitor.config import Env, ProviderLimits, Settings, load_settings
from order_monitor.errors import ConfigError
from order_monitor.ops.http import MAX_CONNECTIONS
from order_monitor.redaction import Secret

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "systemd" / "order-monitor.service"
ENV_EXAMPLE = ROOT / "systemd" / "order-monitor.env.example"
SHIPPED_EXEC = "/usr/bin/order-monitor"
DSN = "postgresql://monitor@db.internal/shop"

SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_systemd_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed on this machine"
)


def analyze(*args: str) -> subprocess.CompletedProcess[str]:
    assert SYSTEMD_ANALYZE is not None
    return subprocess.run(
        [SYSTEMD_ANALYZE, *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        # Colour codes and a pager would get in the way of parsing.
        env={**os.environ, "SYSTEMD_COLORS": "0", "SYSTEMD_PAGER": ""},
    )


@pytest.fixture
def unit_copy(tmp_path: Path) -> Path:
    """The unit with ExecStart= pointing at an executable that exists.

    `verify` checks that the ExecStart binary exists, and /usr/bin/order-monitor
    exists only where the package is installed system-wide; everything else in
    the copy is the shipped unit, byte for byte.
    """
    executable = tmp_path / "order-monitor"
    executable.write_text("#!/bin/sh\nexit 0\n")
    executable.chmod(0o755)
    text = UNIT.read_text()
    assert text.count(f"ExecStart={SHIPPED_EXEC} ") == 1
    copy = tmp_path / "order-monitor.service"
    copy.write_text(text.replace(f"ExecStart={SHIPPED_EXEC} ", f"ExecStart={executable} "))
    return copy


def directives(text: str) -> dict[str, list[str]]:
    values: dict[str, list[str]] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        values.setdefault(key.strip(), []).append(value.strip())
    return values


# --- systemd's own checks ------------------------------------------------------------


@needs_systemd_analyze
def test_systemd_analyze_verify_accepts_the_unit(unit_copy: Path) -> None:
    result = analyze("verify", "--man=no", str(unit_copy))
    assert result.returncode == 0, result.stderr + result.stdout
    assert result.stderr.strip() == "", result.stderr


@needs_systemd_analyze
def test_verify_of_the_shipped_unit_fails_only_for_a_missing_binary() -> None:
    result = analyze("verify", "--man=no", str(UNIT))
    if os.access(SHIPPED_EXEC, os.X_OK):
        assert result.returncode == 0, result.stderr
        return
    complaints = [line for line in result.stderr.splitlines() if line.strip()]
    assert complaints, "verify should name the missing executable"
    assert all(SHIPPED_EXEC in line for line in complaints), complaints


@needs_systemd_analyze
def test_security_exposure_is_ok_or_better(unit_copy: Path) -> None:
    result = analyze("security", "--offline=yes", str(unit_copy))
    assert result.returncode == 0, result.stderr
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+) (\w+)", result.stdout)
    assert match is not None, result.stdout[-2000:]
    exposure, verdict = float(match.group(1)), match.group(2)
    assert exposure <= 2.0, f"exposure {exposure} ({verdict}):\n{result.stdout}"


# --- what the daemon and the operator rely on ------------------------------------


def test_the_unit_carries_the_service_contract() -> None:
    unit = directives(UNIT.read_text())
    assert unit["Type"] == ["notify"]
    assert unit["ExecStart"] == [f"{SHIPPED_EXEC} run"]
    assert unit["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert unit["Restart"] == ["on-failure"]
    # The exit status of ConfigError, so a bad setting does not restart-loop.
    assert unit["RestartPreventExitStatus"] == ["78"]
    assert ConfigError.exit_code == 78
    assert unit["EnvironmentFile"] == ["-/etc/order-monitor/env"]
    assert "dsn:/etc/order-monitor/dsn" in unit["LoadCredential"]
    assert unit["SyslogIdentifier"] == ["order-monitor"]
    assert int(unit["WatchdogSec"][0]) == 30
    # sd_notify and journald speak AF_UNIX; providers and Postgres need IP.
    assert set(unit["RestrictAddressFamilies"][0].split()) == {"AF_UNIX", "AF_INET", "AF_INET6"}
    assert "IPAddressDeny" not in unit


def test_the_descriptor_limit_leaves_room_for_every_connection() -> None:
    """Running out of descriptors fails every database and provider connection."""
    unit = directives(UNIT.read_text())
    assert "LimitNOFILE" in unit, "the distribution default (often 1024 soft) leaves no room"
    soft, _, hard = unit["LimitNOFILE"][0].partition(":")
    needed = Settings(dsn=Secret("")).concurrency + MAX_CONNECTIONS
    assert int(soft) >= 16 * needed
    assert int(hard or soft) >= int(soft)


#: What the unit's memory limits rest on: the process at start (RSS), the
#: schedule's peak bytes per order under sustained load (bench/memory.py,
#: tracemalloc) and the allocator's overhead on top of what tracemalloc counts.
BASELINE_BYTES = 85 * 2**20
PEAK_BYTES_PER_ORDER = 361
ALLOCATOR_OVERHEAD = 1.5
ORDERS_IN_FLIGHT = 1_000_000


def size(value: str) -> int:
    """A systemd byte size: 768M, 1G (suffixes are powers of 1024)."""
    match = re.fullmatch(r"(\d+)([KMGT]?)", value)
    assert match, f"not a size this test reads: {value!r}"
    power: int = 1024 ** " KMGT".index(match.group(2) or " ")
    return int(match.group(1)) * power


def test_the_memory_limits_leave_room_for_a_million_orders_in_flight() -> None:
    unit = directives(UNIT.read_text())
    high = size(unit["MemoryHigh"][0])
    most = size(unit["MemoryMax"][0])
    bodies = Settings(dsn=Secret("")).concurrency * ProviderLimits().max_body
    needed = BASELINE_BYTES + bodies + ALLOCATOR_OVERHEAD * PEAK_BYTES_PER_ORDER * ORDERS_IN_FLIGHT
    assert high >= needed, "a healthy daemon at a million orders would be throttled"
    # Reclaim must start before the kill, with room between them.
    assert most >= 1.25 * high


def test_protect_home_and_exec_start_agree() -> None:
    """ProtectHome=yes hides /home and /root: a virtualenv there fails with 203/EXEC,
    which `systemd-analyze verify` does not catch, so the unit and README warn."""
    text = UNIT.read_text()
    unit = directives(text)
    assert unit["ProtectHome"] == ["yes"]
    executable = unit["ExecStart"][0].split()[0]
    assert not executable.startswith(("/home/", "/root/", "/run/user/")), executable
    readme = (ROOT / "README.md").read_text()
    for document in (text, readme):
        assert "203/EXEC" in document
        assert "/opt/order-monitor" in document


def test_stop_timeout_leaves_room_for_the_default_drain() -> None:
    unit = directives(UNIT.read_text())
    stop_timeout = config.parse_duration(unit["TimeoutStopSec"][0])
    default_drain = Settings(dsn=Secret("")).drain_timeout
    assert default_drain == load_settings({"ORDER_MONITOR_DSN": DSN}).drain_timeout
    assert stop_timeout >= 2 * default_drain + 5


# --- the env example -------------------------------------------------------------------


def documented() -> dict[str, str]:
    """ORDER_MONITOR_* variables the example lists (commented out), with their value."""
    found: dict[str, str] = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        match = re.fullmatch(r"#(ORDER_MONITOR_[A-Z0-9_]+)=(.*)", line)
        if match:
            assert match.group(1) not in found, f"{match.group(1)} is listed twice"
            found[match.group(1)] = match.group(2)
    return found


def variables_config_reads(monkeypatch: pytest.MonkeyPatch) -> set[str]:
    """Every ORDER_MONITOR_* name the config package reads.

    Two sources, because neither sees everything: load_settings() observed
    through Env.raw (this catches names built at run time, like the
    COLUMN_* ones), and the PREFIX + "NAME" literals in the source (the DSN
    and ENV_FILE are read outside Env).
    """
    seen: set[str] = set()
    original = Env.raw

    def recording(self: Env, name: str) -> str | None:
        seen.add(config.PREFIX + name)
        return original(self, name)

    monkeypatch.setattr(Env, "raw", recording)
    load_settings({"ORDER_MONITOR_DSN": DSN})
    assert len(seen) > 20, "load_settings no longer reads through Env.raw?"

    source = "\n".join(p.read_text() for p in Path(config.__file__).parent.glob("*.py"))
    literals = {config.PREFIX + name for name in re.findall(r'PREFIX \+ "([A-Z0-9_]+)"', source)}
    literals |= set(re.findall(r'"(ORDER_MONITOR_[A-Z0-9_]+)"', source))
    # Known to the config package so that they are not reported as typos, but read only
    # by the test suite: no place in a deployment's env file.
    return {name for name in seen | literals if not name.startswith(config.TEST_PREFIX)}


def test_the_env_example_documents_every_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    read = variables_config_reads(monkeypatch)
    listed = set(documented())
    assert sorted(read - listed) == [], (
        "read by the config package but missing from the env example"
    )
    assert sorted(listed - read) == [], "in the env example but never read by the config package"


def test_the_env_example_defaults_are_the_real_defaults() -> None:
    values = {
        name: value
        for name, value in documented().items()
        # Paths that must exist, and the DSN, which has no default.
        if name not in {"ORDER_MONITOR_PROVIDERS_FILE", "ORDER_MONITOR_ENV_FILE"}
    }
    values["ORDER_MONITOR_DSN"] = DSN
    assert load_settings(values) == load_settings({"ORDER_MONITOR_DSN": DSN})


def test_the_documented_providers_file_is_the_default() -> None:
    assert documented()["ORDER_MONITOR_PROVIDERS_FILE"] == str(config.DEFAULT_PROVIDERS_FILE)
