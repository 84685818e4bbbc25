"""The two real databases the tests run on, and a fresh migrated database per test.

- ``timescale``: the machine's PostgreSQL server (``INGESTOR_TEST_PG``, default
  127.0.0.1:5432) with TimescaleDB, installed by ``scripts/install_timescaledb.sh``;
- ``plain``: an embedded PostgreSQL without TimescaleDB, started once per test session.

Each test gets its own database, created empty and migrated, and dropped afterwards.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from ingestor.db.embedded import EmbeddedPostgres
from ingestor.db.migrate import capabilities, migrate

BACKENDS = ("timescale", "plain")
SYSTEM_PG = os.environ.get("INGESTOR_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")


def with_database(dsn: str, dbname: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit((parts.scheme, parts.netloc, "/" + dbname, parts.query, parts.fragment))


class Servers:
    """Admin DSNs of both backends; the embedded server starts on first use."""

    def __init__(self, tmp: Path) -> None:
        self._tmp = tmp
        self._embedded: EmbeddedPostgres | None = None
        self._embedded_dsn: str | None = None

    def admin_dsn(self, backend: str) -> str:
        if backend == "timescale":
            return SYSTEM_PG
        if self._embedded_dsn is None:
            self._embedded = EmbeddedPostgres(self._tmp)
            self._embedded_dsn = self._embedded.start()
        return self._embedded_dsn

    def stop(self) -> None:
        if self._embedded is not None:
            self._embedded.stop()


async def create_database(admin_dsn: str, *, migrated: bool = True) -> str:
    name = f"ingestor_test_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(admin_dsn, timeout=10)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    dsn = with_database(admin_dsn, name)
    if migrated:
        conn = await asyncpg.connect(dsn, timeout=10)
        try:
            await migrate(conn)
        finally:
            await conn.close()
    return dsn


async def drop_database(admin_dsn: str, dsn: str) -> None:
    name = urlsplit(dsn).path.lstrip("/")
    conn = await asyncpg.connect(admin_dsn, timeout=10)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


async def check_backend(dsn: str, backend: str) -> None:
    """The timescale backend must really have TimescaleDB: a silent fallback to plain
    PostgreSQL would test one capability twice."""
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        caps = await capabilities(conn)
    finally:
        await conn.close()
    if backend == "timescale":
        assert caps.timescaledb is not None, (
            "TimescaleDB is not available on the system server: run scripts/install_timescaledb.sh"
        )
    else:
        assert caps.timescaledb is None
