"""``ingestor run/migrate/config/demo`` as a user calls them: real processes, clear errors."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import asyncpg
import orjson
import pytest

from ingestor.sim.server import SimConfig, Simulator

from .databases import SYSTEM_PG, create_database, drop_database
from .pipeline import INGESTOR, sim_flags


async def ingestor(*args: str, timeout: float = 60, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("INGESTOR_")}
    proc = await asyncio.create_subprocess_exec(
        INGESTOR, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**base, **(env or {})})
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@pytest.mark.parametrize(("args", "message"), [
    (["--shards", "0"], "shards must be at least 1"),
    (["--spot-ws-url", "ftp://example.com"], "spot_ws_url: 'ftp://example.com' is not a ws/wss:// URL"),
    (["--futures-rest-url", "fapi.binance.com"], "futures_rest_url"),
    (["--futures-depth-speed", "1000ms"], "not a documented speed"),
    (["--dsn", "mysql://root@localhost/x"], "dsn must be a postgresql:// URL"),
    (["--markets", "options"], "markets must be some of spot,futures"),
    (["--symbols", "BTCUSDT", "--top", "5"], "either symbols or top"),
    (["--batch-rows", "abc"], "batch_rows: 'abc' is not a valid int"),
])
async def test_bad_config_fails_before_anything_starts(args: list[str], message: str) -> None:
    rc, out, err = await ingestor("run", *args, timeout=20)
    assert rc == 2
    assert message in err
    assert "Traceback" not in err and "started" not in err


async def test_unknown_environment_setting_is_named() -> None:
    rc, _, err = await ingestor("config", env={"INGESTOR_SHARD": "2"}, timeout=20)
    assert rc == 2 and "unknown setting INGESTOR_SHARD" in err


async def test_unreachable_database_is_one_clear_line() -> None:
    rc, _, err = await ingestor("run", "--dsn", "postgresql://postgres:s3cret@127.0.0.1:1/nowhere", timeout=30)
    assert rc == 1
    lines = [ln for ln in err.splitlines() if "cannot connect to the database" in ln]
    assert len(lines) == 1 and "s3cret" not in err and "***" in lines[0]
    assert "Traceback" not in err


async def test_config_priority_and_masking(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("INGESTOR_SHARDS=3\nINGESTOR_TOP=7\nINGESTOR_DSN=postgresql://u:pw@h/db\n")
    base = {k: v for k, v in os.environ.items() if not k.startswith("INGESTOR_")}
    proc = await asyncio.create_subprocess_exec(
        INGESTOR, "config", "--json", "--top", "9", cwd=tmp_path, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env={**base, "INGESTOR_SHARDS": "4"})
    out, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 0, err
    cfg = orjson.loads(out)
    assert cfg["shards"] == 4  # environment beats .env
    assert cfg["top"] == 9  # the flag beats both
    assert cfg["dsn"] == "postgresql://u:***@h/db" and b"pw" not in out


@pytest.mark.parametrize("sim", [SimConfig(n_symbols=2)], indirect=True)
async def test_unknown_symbol_is_a_clear_error(sim: Simulator) -> None:
    dsn = await create_database(SYSTEM_PG, migrated=False)
    try:
        rc, _, err = await ingestor("run", "--dsn", dsn, "--symbols", "BTCUSDT,NOPEUSDT", *sim_flags(sim))
    finally:
        await drop_database(SYSTEM_PG, dsn)
    assert rc == 1
    assert "unknown symbol(s): NOPEUSDT" in err and "Traceback" not in err


async def test_migrate_is_idempotent_and_records_versions() -> None:
    dsn = await create_database(SYSTEM_PG, migrated=False)
    try:
        for _ in range(2):
            rc, out, err = await ingestor("migrate", "--dsn", dsn)
            assert rc == 0, err
            assert "schema up to date" in out
        conn = await asyncpg.connect(dsn)
        try:
            versions = [r["name"] for r in await conn.fetch("SELECT name FROM schema_migrations ORDER BY version")]
            hyper = await conn.fetchval("SELECT count(*) FROM timescaledb_information.hypertables")
        finally:
            await conn.close()
        assert versions == sorted(p.name for p in (Path(__file__).parents[1] / "ingestor" / "db" / "sql").glob("*.sql"))
        assert hyper == 7  # six data tables and features
    finally:
        await drop_database(SYSTEM_PG, dsn)


async def test_demo_json_on_the_embedded_default(tmp_path: Path) -> None:
    rc, out, err = await ingestor("demo", "--duration", "4", "--json", timeout=120,
                                  env={"XDG_DATA_HOME": str(tmp_path)})
    assert rc == 0, err[-3000:]
    result = orjson.loads(out.strip().splitlines()[-1])
    assert result["dsn"] == "embedded"
    assert (tmp_path / "ingestor" / "pg" / "PG_VERSION").exists()
    tables = result["tables"]
    assert tables["agg_trades"]["sent"] > 100
    assert all(t["sent"] == t["stored"] for t in tables.values()), tables
    assert result["gaps"] == 0 and result["errors"] == 0 and result["msgs_per_s"] > 0


@pytest.mark.parametrize("sim", [SimConfig(n_symbols=1)], indirect=True)
async def test_run_without_dsn_starts_embedded_and_says_where(sim: Simulator, tmp_path: Path) -> None:
    from .pipeline import Pipeline

    pipe = await Pipeline([*sim_flags(sim)], env={"XDG_DATA_HOME": str(tmp_path)}).start()
    try:
        await pipe.wait_health(200)
        assert await pipe.stop() == 0
    finally:
        await pipe.kill()
    said = [line for line in pipe.log if "embedded PostgreSQL in" in line]
    assert said and str(tmp_path / "ingestor" / "pg") in said[0] and "INGESTOR_DSN" in said[0]
