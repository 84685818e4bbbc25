"""The migrations ship inside the package, and an install without them refuses to start."""

from __future__ import annotations

from pathlib import Path

import asyncpg
import pytest

from ingestor.db.migrate import SQL_DIR, apply_policies, capabilities, load_migrations


def test_the_migrations_are_package_data_numbered_in_order() -> None:
    assert SQL_DIR.parent == Path(__file__).resolve().parents[1] / "ingestor" / "db"
    migrations = load_migrations()
    assert [m.version for m in migrations] == list(range(1, len(migrations) + 1))
    assert migrations[0].name == "001_tables.sql"


def test_no_migrations_is_an_error_not_an_empty_schema(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no migrations"):
        load_migrations(tmp_path)


def test_a_badly_named_migration_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "tables.sql").write_text("SELECT 1;")
    with pytest.raises(ValueError, match="001_name.sql"):
        load_migrations(tmp_path)


async def test_policies_warn_once_only_when_asked_for_on_an_unlicensed_server(db_dsn: str) -> None:
    """The machine's TimescaleDB is Debian's Apache build: asking for compression or retention
    is a warning, asking for nothing is silent; plain PostgreSQL has nothing to say."""
    conn = await asyncpg.connect(db_dsn)
    try:
        caps = await capabilities(conn)
        assert await apply_policies(conn, caps, None, None) == []
        warned = await apply_policies(conn, caps, 7, 30)
        if caps.timescaledb is None:
            assert warned == []
        else:
            assert caps.license != "timescale"  # else the licensed path runs here: see apply_policies
            assert len(warned) == 1 and "licence" in warned[0]
    finally:
        await conn.close()
