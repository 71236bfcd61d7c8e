"""The files a deployment needs besides the program, reachable from an installed package.

The systemd unit and its env file, the Prometheus rules, the Grafana dashboard
and an example providers file live in the checkout where their owners keep
them; a wheel carries copies as package data (setup.py puts them in at build
time), so `order-monitor files print unit` works wherever pip put the program.
This module imports nothing but the standard library: setup.py loads it.
"""

from __future__ import annotations

from importlib import resources
from pathlib import PurePosixPath

# Name on the command line -> path in the checkout. In the wheel each is
# order_monitor/shipped/<the path's last part>.
FILES: dict[str, str] = {
    "unit": "systemd/order-monitor.service",
    "env": "systemd/order-monitor.env.example",
    "rules": "monitoring/order-monitor.rules.yml",
    "dashboard": "monitoring/grafana-dashboard.json",
    "providers": "packaging/providers.toml.example",
}

PACKAGE_DIR = "shipped"


def packaged_name(name: str) -> str:
    return PurePosixPath(FILES[name]).name


def read(name: str) -> str:
    """The text of a shipped file: the wheel's copy, else the checkout's (editable install)."""
    packaged = resources.files("order_monitor").joinpath(PACKAGE_DIR, packaged_name(name))
    if packaged.is_file():
        return packaged.read_text(encoding="utf-8")
    checkout = resources.files("order_monitor").joinpath("..", *FILES[name].split("/"))
    if checkout.is_file():
        return checkout.read_text(encoding="utf-8")
    raise FileNotFoundError(f"{FILES[name]} is neither in the installed package nor beside it")
