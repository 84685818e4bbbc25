"""Numbered SQL migrations from ``ingestor/db/sql/``, applied once each and recorded.

The files are package data, so an installed wheel carries them.

Every file is idempotent on its own; ``schema_migrations`` records which ran (with a
checksum, so an edited migration is reported rather than silently skipped). An advisory
lock keeps two starting processes from applying the same file at once.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import asyncpg

log = logging.getLogger(__name__)

SQL_DIR = Path(__file__).resolve().parent / "sql"
_NAME = re.compile(r"^(\d{3})_[a-z0-9_]+\.sql$")
_LOCK_KEY = 0x1A6E5704  # arbitrary, fixed: "ingestor migrations"


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def load_migrations(sql_dir: Path = SQL_DIR) -> list[Migration]:
    out = []
    for path in sorted(sql_dir.glob("*.sql")):
        m = _NAME.match(path.name)
        if not m:
            raise ValueError(f"migration file name must look like 001_name.sql: {path}")
        out.append(Migration(int(m.group(1)), path.name, path.read_text()))
    if not out:  # an install without its migrations must not start on an empty schema
        raise FileNotFoundError(f"no migrations (NNN_name.sql) in {sql_dir}: the package is installed without them")
    versions = [m.version for m in out]
    if len(set(versions)) != len(versions):
        raise ValueError(f"two migrations share a number in {sql_dir}")
    return out


async def migrate(conn: asyncpg.Connection, sql_dir: Path = SQL_DIR) -> list[str]:
    """Apply the migrations not yet recorded; returns the names applied."""
    applied: list[str] = []
    await conn.execute("SELECT pg_advisory_lock($1)", _LOCK_KEY)
    try:
        await conn.execute(
            """CREATE TABLE IF NOT EXISTS schema_migrations (
                   version    INTEGER PRIMARY KEY,
                   name       TEXT NOT NULL,
                   checksum   TEXT NOT NULL,
                   applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"""
        )
        done = {r["version"]: r for r in await conn.fetch("SELECT version, name, checksum FROM schema_migrations")}
        for mig in load_migrations(sql_dir):
            rec = done.get(mig.version)
            if rec is not None:
                if rec["checksum"] != mig.checksum:
                    log.warning("migration %s changed since it was applied; not re-applied", mig.name)
                continue
            async with conn.transaction():
                await conn.execute(mig.sql)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
                    mig.version, mig.name, mig.checksum,
                )
            log.info("applied migration %s", mig.name)
            applied.append(mig.name)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_KEY)
    return applied


@dataclass(frozen=True)
class DbCapabilities:
    timescaledb: str | None  # extension version, None on plain PostgreSQL
    license: str | None  # timescaledb.license ('apache' or 'timescale')
    server_version: str


async def capabilities(conn: asyncpg.Connection) -> DbCapabilities:
    version = await conn.fetchval("SELECT extversion FROM pg_extension WHERE extname = 'timescaledb'")
    lic = None
    if version is not None:
        lic = await conn.fetchval("SELECT current_setting('timescaledb.license', true)")
    server = await conn.fetchval("SHOW server_version")
    return DbCapabilities(version, lic, server)


COMPRESSED_TABLES = ("agg_trades", "depth_updates", "mark_prices", "force_orders", "open_interest", "depth_snapshots")
PAYLOAD_TABLES = COMPRESSED_TABLES  # the recorded messages, each with its payload


class PayloadTypeError(Exception):
    """The tables hold rows of another payload type than the one asked for."""


async def ensure_payload_type(conn: asyncpg.Connection, kind: str) -> list[str]:
    """Make every data table's ``payload`` column ``kind`` (jsonb or json); returns the tables
    changed. Only an empty table is changed: converting stored rows rewrites the whole
    table, which is the user's decision to take (the error says how)."""
    changed = []
    for table in PAYLOAD_TABLES:  # every table checked before any is changed: all or none
        current = await conn.fetchval(
            "SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = $1::regclass "
            "AND attname = 'payload'", table)
        if current == kind:
            continue
        if await conn.fetchval(f"SELECT EXISTS (SELECT 1 FROM {table})"):
            raise PayloadTypeError(
                f"{table} holds rows with {current} payloads, and --payload-type is {kind}: keep {current}, or "
                f"convert the stored rows yourself (a rewrite of the table): "
                f"ALTER TABLE {table} ALTER COLUMN payload TYPE {kind} USING payload::{kind}")
        changed.append(table)
    async with conn.transaction():
        for table in changed:
            await conn.execute(f"ALTER TABLE {table} ALTER COLUMN payload TYPE {kind} USING payload::{kind}")
    if changed:
        log.info("payload columns are now %s: %s", kind, ", ".join(changed))
    return changed


async def apply_policies(conn: asyncpg.Connection, caps: DbCapabilities, compress_after_days: int | None,
                         retention_days: int | None) -> list[str]:
    """Compression (segment by market, symbol) and retention, where the licence allows.

    Returns warnings to show once: the Apache edition (Debian's build) has hypertables
    but neither compression nor policies.

    Each start makes the policies what the settings say: an existing policy is removed
    and added again (``add_*_policy(if_not_exists)`` would keep an old interval and only
    warn), and a setting turned off removes its policy.
    """
    if caps.timescaledb is None:
        return []
    if caps.license != "timescale":
        if compress_after_days is None and retention_days is None:
            return []
        return [
            f"TimescaleDB licence is {caps.license!r}: compression and retention policies need the "
            "Timescale License edition; tables are hypertables without them"
        ]
    for table in COMPRESSED_TABLES:
        await conn.execute("SELECT remove_compression_policy($1::regclass, if_exists => TRUE)", table)
        if compress_after_days is not None:
            await conn.execute(
                f"ALTER TABLE {table} SET (timescaledb.compress, timescaledb.compress_segmentby = 'market, symbol')"
            )
            await conn.execute(
                "SELECT add_compression_policy($1::regclass, make_interval(days => $2))", table, compress_after_days,
            )
        await conn.execute("SELECT remove_retention_policy($1::regclass, if_exists => TRUE)", table)
        if retention_days is not None:
            await conn.execute(
                "SELECT add_retention_policy($1::regclass, make_interval(days => $2))", table, retention_days,
            )
    return []
