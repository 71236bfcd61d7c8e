"""What a run talks to: the PostgreSQL server (a fresh database each) and the fake provider."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

import order_monitor
from common.report import BENCH
from order_monitor import schema
from order_monitor.config import Layout

REFERENCE_DDL = Path(order_monitor.__file__).with_name("product_orders.sql")


TOKEN = "bench-token"


class Server:
    """The Postgres server: databases cloned from a template with table and install."""

    def __init__(self, admin_dsn: str) -> None:
        self.admin_dsn = admin_dsn
        self.template = f"om_bench_tpl_{os.getpid()}"
        self._made: list[str] = []
        #: Cluster-wide roles a benchmark created (role.sql, decoding.sql's
        #: decoder), dropped after the databases; roles that existed are kept.
        self._roles: list[str] = []

    def admin(self, query: sql.Composed) -> None:
        with psycopg.connect(self.admin_dsn, autocommit=True) as conn:
            conn.execute(query)

    def setup(self) -> None:
        self.admin(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(self.template)))
        self._made.append(self.template)
        with psycopg.connect(self.dsn(self.template), autocommit=True) as conn:
            conn.execute(REFERENCE_DDL.read_text().encode())
            for statement in schema.install_statements(Layout()):
                conn.execute(statement.query)

    def dsn(self, name: str) -> str:
        return make_conninfo(self.admin_dsn, dbname=name)

    def fresh(self, label: str) -> str:
        """A new database cloned from the template (the table, our install applied)."""
        name = f"om_bench_{label}_{uuid.uuid4().hex[:6]}"
        self.admin(
            sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                sql.Identifier(name), sql.Identifier(self.template)
            )
        )
        self._made.append(name)
        return self.dsn(name)

    def empty(self, label: str) -> str:
        """A new database with nothing in it (dropped with the others)."""
        name = f"om_bench_{label}_{uuid.uuid4().hex[:6]}"
        self.admin(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        self._made.append(name)
        return self.dsn(name)

    def made_role(self, name: str) -> None:
        """*name* was created by this run: :meth:`drop_all` drops it after the databases."""
        if name not in self._roles:
            self._roles.append(name)

    def setting(self, name: str) -> str:
        """A server setting as SHOW gives it (``wal_level``...)."""
        with psycopg.connect(self.admin_dsn, autocommit=True) as conn:
            row = conn.execute(sql.SQL("SHOW {}").format(sql.Identifier(name))).fetchone()
        return str(row[0]) if row else "?"

    def drop_all(self) -> None:
        for name in reversed(self._made):
            with contextlib.suppress(psycopg.Error):
                # A database with a replication slot cannot be dropped, even
                # WITH (FORCE), and the slot would keep the server's WAL for
                # ever: drop its slots first (logical decoding's databases).
                with psycopg.connect(self.admin_dsn, autocommit=True) as conn:
                    conn.execute(
                        "SELECT pg_catalog.pg_drop_replication_slot(slot_name)"
                        " FROM pg_catalog.pg_replication_slots WHERE database = %s",
                        (name,),
                    )
                self.admin(
                    sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
                )
        self._made.clear()
        for role in reversed(self._roles):
            with contextlib.suppress(psycopg.Error):
                self.admin(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))
        self._roles.clear()

    def describe(self) -> dict[str, Any]:
        info: dict[str, Any] = {}
        with psycopg.connect(self.admin_dsn, autocommit=True) as conn:
            for name in (
                "server_version",
                "shared_buffers",
                "synchronous_commit",
                "fsync",
                "wal_level",
                "max_connections",
            ):
                row = conn.execute(sql.SQL("SHOW {}").format(sql.Identifier(name))).fetchone()
                info[name] = str(row[0]) if row else "?"
        return info


class Fake:
    """bench/fake_server.py in a subprocess."""

    def __init__(self, latency: float = 0.0) -> None:
        self.latency = latency
        self.process: subprocess.Popen[str] | None = None
        self.url = ""

    def start(self) -> str:
        self.process = subprocess.Popen(
            [
                sys.executable,
                str(BENCH / "fake_server.py"),
                "--token",
                TOKEN,
                "--latency",
                str(self.latency),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line.startswith("READY "):
            raise RuntimeError(f"the fake provider did not start: {line!r}")
        self.url = line.split()[1]
        return self.url

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)
            self.process = None

    def cpu_seconds(self) -> float:
        """User + system CPU time the fake's process has used so far."""
        assert self.process is not None
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks = os.sysconf("SC_CLK_TCK")
        return (int(fields[11]) + int(fields[12])) / ticks

    async def get(self, session: aiohttp.ClientSession, path: str, **params: str) -> Any:
        async with session.get(self.url + path, params=params) as response:
            response.raise_for_status()
            return await response.json()

    async def polls(self, prefix: str) -> dict[str, list[float]]:
        async with aiohttp.ClientSession() as session:
            result: dict[str, list[float]] = await self.get(session, "/_bench/polls", prefix=prefix)
            return result

    async def requests(self) -> int:
        async with aiohttp.ClientSession() as session:
            return int((await self.get(session, "/_bench/stats"))["requests"])

    async def reset(self) -> None:
        async with (
            aiohttp.ClientSession() as session,
            session.post(self.url + "/_bench/reset") as response,
        ):
            response.raise_for_status()
