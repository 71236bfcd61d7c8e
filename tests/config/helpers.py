"""What the settings tests share: a DSN with a password, and settings or a providers file made from a few values."""

from __future__ import annotations

from pathlib import Path

from order_monitor.config import load_settings

DSN = "postgresql://monitor:s3cr3t-pw@db.internal:5432/shop"


BASE = {"ORDER_MONITOR_DSN": DSN}


def settings(**extra: str) -> object:
    return load_settings({**BASE, **{f"ORDER_MONITOR_{k}": v for k, v in extra.items()}})


def write_providers(tmp_path: Path, text: str) -> dict[str, str]:
    path = tmp_path / "providers.toml"
    path.write_text(text)
    return {**BASE, "ORDER_MONITOR_PROVIDERS_FILE": str(path)}
