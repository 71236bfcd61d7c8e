"""The operator tests' fixtures: an empty .env, a fresh least-privilege role, the check's
environment; and the integration suite's application and fake provider."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

from order_monitor import install
from order_monitor.config import Layout
from order_monitor.providers.fake import FakeProvider
from tests.conftest import Server, as_daemon
from tests.daemon_fixtures import app, fake
from tests.operator.helpers import ROLE_PASSWORD, environment, providers_file


@pytest.fixture
def env_file(tmp_path: Path) -> Path:
    """An empty .env, so a stray ./.env on the machine cannot change the settings."""
    path = tmp_path / "empty.env"
    path.write_text("")
    return path


@pytest.fixture
def role_dsn(db: str, pg_server: Server) -> Iterator[str]:
    """DSN (with a password) of a fresh least-privilege daemon role from `sql print role`."""
    role = f"om_doctor_{uuid.uuid4().hex[:8]}"
    list(install.apply(db, "role", Layout(role=role)))
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute(
            sql.SQL("ALTER ROLE {} PASSWORD {}").format(
                sql.Identifier(role), sql.Literal(ROLE_PASSWORD)
            )
        )
    try:
        yield make_conninfo(db, user=role, password=ROLE_PASSWORD)
    finally:
        with psycopg.connect(db, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
        pg_server.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))


@pytest.fixture
def check_env(db: str, fake: FakeProvider, env_file: Path, tmp_path: Path) -> dict[str, str]:
    assert fake.base_url is not None
    # As the daemon's own least-privilege role: an operator runs `check` with its settings.
    return environment(as_daemon(db), env_file, providers_file(tmp_path, fake.base_url))


__all__ = ["app", "check_env", "env_file", "fake", "role_dsn"]
