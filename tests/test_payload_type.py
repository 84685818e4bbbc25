"""``--payload-type json``: the data tables keep the exchange's JSON text verbatim, set on an
empty database only; stored rows of the other type are never rewritten behind the user's back."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import asyncpg
import orjson
import pytest

from ingestor.db.migrate import PAYLOAD_TABLES, PayloadTypeError, ensure_payload_type
from ingestor.wire import copy_binary as cb
from ingestor.wire import rows
from ingestor.writer import copier

T0 = 1_795_132_800_000
# Binance's own spacing is compact; this one is not, so "verbatim" is visible.
RAW = b'{"e": "aggTrade", "E": 1795132800001, "s": "BTCUSDT", "a": 7, "p": "100.10", "q": "2.000", ' \
      b'"f": 7, "l": 7, "T": 1795132800000, "m": true}'


@pytest.fixture
def json_rows() -> Iterator[None]:
    cb.use_payload_type("json")
    try:
        yield
    finally:
        cb.use_payload_type("jsonb")


async def _types(conn: asyncpg.Connection) -> set[str]:
    return {await conn.fetchval(f"SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = "
                                f"'{t}'::regclass AND attname = 'payload'") for t in PAYLOAD_TABLES}


async def test_json_payloads_are_stored_verbatim(db_dsn: str, json_rows: None) -> None:
    conn = await asyncpg.connect(db_dsn)
    try:
        assert await ensure_payload_type(conn, "json") == list(PAYLOAD_TABLES)
        assert await _types(conn) == {"json"}
        row = rows.agg_trade("futures", orjson.loads(RAW), RAW)
        assert row.endswith(len(RAW).to_bytes(4, "big") + RAW)  # no jsonb version byte
        assert await copier.store(conn, "agg_trades", row, 1, "rows") == copier.CopyResult(inserted=1)
        assert (await conn.fetchval("SELECT payload::text FROM agg_trades")).encode() == RAW
        assert await conn.fetchval("SELECT payload->>'p' FROM agg_trades") == "100.10"
        # The same message again is a duplicate, as with jsonb.
        assert await copier.store(conn, "agg_trades", row, 1, "rows") == copier.CopyResult(duplicates=1)
        assert await ensure_payload_type(conn, "json") == []
        with pytest.raises(PayloadTypeError, match="agg_trades holds rows with json payloads.*ALTER TABLE agg_trades"):
            await ensure_payload_type(conn, "jsonb")
        assert await _types(conn) == {"json"}
    finally:
        await conn.close()


async def test_an_unknown_payload_type_is_refused() -> None:
    with pytest.raises(ValueError, match="jsonb, json"):
        cb.use_payload_type("bytea")


async def test_migrate_refuses_to_change_the_type_of_stored_rows(db_dsn: str) -> None:
    conn = await asyncpg.connect(db_dsn)
    try:
        msg = orjson.loads(RAW)
        await copier.store(conn, "agg_trades", rows.agg_trade("spot", msg, orjson.dumps(msg)), 1, "rows")
    finally:
        await conn.close()
    cmd = [sys.executable, "-m", "ingestor.cli", "migrate", "--dsn", db_dsn, "--payload-type", "json"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    assert "agg_trades holds rows with jsonb payloads" in out.stderr and "ALTER TABLE" in out.stderr
    bad = subprocess.run(cmd[:-1] + ["xml"], capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "payload_type must be jsonb or json" in bad.stderr
