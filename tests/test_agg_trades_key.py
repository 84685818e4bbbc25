"""One row per trade whatever path it came by (issue 16, item 10), on both backends.

A trade that came over the WebSocket has an event time ``E``; the same trade fetched over
REST to fill a gap has only its trade time ``T``. The table is keyed (and on TimescaleDB
partitioned) on ``trade_time``, so the database itself refuses the second copy, in either
order; migration 007 removes the doubles stored before it.
"""

from __future__ import annotations

import shutil
from array import array
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest

from ingestor.db.migrate import SQL_DIR, migrate
from ingestor.wire import rows
from ingestor.wire.batching import Backfill
from ingestor.writer import copier
from tests.databases import BACKENDS, check_backend, create_database, drop_database

T0 = 1_795_132_800_000
SYMBOL = "BTCUSDT"


def rest_item(a: int) -> dict[str, Any]:
    """A trade as REST ``aggTrades`` gives it: no event type, no event time, no symbol."""
    return {"a": a, "p": "100.0", "q": "1", "f": a, "l": a, "T": T0 + a, "m": False, "M": True}


def stream_row(a: int, lag_ms: int = 40) -> bytes:
    msg = {"e": "aggTrade", "E": T0 + a + lag_ms, "s": SYMBOL, **rest_item(a)}
    del msg["M"]
    return rows.agg_trade("futures", msg, orjson.dumps(msg))


def backfill(ids: list[int]) -> tuple[bytes, bytes, Backfill]:
    """The rows, ids and gap of a backfill, encoded as the REST worker encodes them."""
    items = [rest_item(a) for a in ids]
    data = b"".join(rows.agg_trade("futures", {"E": t["T"], "T": t["T"], "s": SYMBOL, "a": t["a"]},
                                   orjson.dumps({**t, "s": SYMBOL})) for t in items)
    info = Backfill("futures", SYMBOL, ids[0], ids[-1], T0, T0 + ids[-1] + 1, T0 + ids[-1] + 5,
                    items[0]["T"], items[-1]["T"], True)
    return data, array("q", ids).tobytes(), info


async def stored(conn: asyncpg.Connection) -> list[asyncpg.Record]:
    return await conn.fetch("SELECT aggregate_trade_id AS a, payload->>'E' AS e FROM agg_trades "
                            "ORDER BY aggregate_trade_id")


async def test_a_backfilled_trade_then_its_stream_copy_is_one_row(db_dsn: str) -> None:
    conn = await asyncpg.connect(db_dsn)
    try:
        data, ids, info = backfill([1, 2, 3])
        result = await copier.store_backfill(conn, data, ids, info)
        assert result.inserted == 3
        # The stream's copies come after (a rotated connection's overlap, a batch sent again).
        late = await copier.store(conn, "agg_trades", b"".join(stream_row(a) for a in (2, 3, 4)), 3)
        assert (late.inserted, late.duplicates) == (1, 2)
        assert [r["a"] for r in await stored(conn)] == [1, 2, 3, 4]
    finally:
        await conn.close()


async def test_a_stream_trade_then_its_backfill_is_one_row(db_dsn: str) -> None:
    conn = await asyncpg.connect(db_dsn)
    try:
        # E far after T (a slow exchange): the old filter's 2-minute slack did not reach it.
        await copier.store(conn, "agg_trades", stream_row(2, lag_ms=300_000), 1)
        data, ids, info = backfill([1, 2, 3])
        result = await copier.store_backfill(conn, data, ids, info)
        assert (result.inserted, result.duplicates) == (2, 1)
        got = await stored(conn)
        assert [r["a"] for r in got] == [1, 2, 3] and got[1]["e"] is not None  # the stream copy kept
    finally:
        await conn.close()


async def test_the_database_refuses_a_second_copy_under_another_event_time(db_dsn: str) -> None:
    conn = await asyncpg.connect(db_dsn)
    try:
        await copier.copy_rows(conn, "agg_trades", stream_row(7))
        with pytest.raises(asyncpg.UniqueViolationError):
            await copier.copy_rows(conn, "agg_trades", stream_row(7, lag_ms=900))
    finally:
        await conn.close()


def _dt(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=UTC)


@pytest.mark.parametrize("backend", BACKENDS)
async def test_migration_keeps_one_row_per_trade_and_keys_on_trade_time(backend: str, pg_servers: Any,
                                                                        tmp_path: Path) -> None:
    admin = pg_servers.admin_dsn(backend)
    dsn = await create_database(admin, migrated=False)
    try:
        await check_backend_unmigrated(dsn, backend, tmp_path)
    finally:
        await drop_database(admin, dsn)


async def check_backend_unmigrated(dsn: str, backend: str, tmp_path: Path) -> None:
    before = tmp_path / "sql"
    before.mkdir()
    for path in SQL_DIR.glob("*.sql"):
        if int(path.name[:3]) < 7:
            shutil.copy(path, before / path.name)
    conn = await asyncpg.connect(dsn)
    try:
        await migrate(conn, before)
        await check_backend(dsn, backend)
        # Doubles as the old key let them in: trade 2 backfilled (E = T) and streamed (E
        # later); trade 3 streamed twice under different event times; trade 1 once.
        trades = [(1, T0 + 1 + 40, True), (2, T0 + 2, False), (2, T0 + 2 + 40, True), (3, T0 + 3 + 40, True),
                  (3, T0 + 3 + 90, True)]
        for a, e_ms, streamed in trades:
            payload = {**rest_item(a), "s": SYMBOL} | ({"e": "aggTrade", "E": e_ms} if streamed else {})
            await conn.execute("INSERT INTO agg_trades (market, event_time, symbol, aggregate_trade_id, payload) "
                               "VALUES ('futures', $1, $2, $3, $4)", _dt(e_ms), SYMBOL, a,
                               orjson.dumps(payload).decode())
        await migrate(conn)
        got = await conn.fetch(
            "SELECT aggregate_trade_id AS a, (extract(epoch FROM event_time) * 1000)::bigint AS e, "
            "(extract(epoch FROM trade_time) * 1000)::bigint AS t FROM agg_trades ORDER BY aggregate_trade_id")
        assert [(r["a"], r["e"], r["t"]) for r in got] == [
            (1, T0 + 41, T0 + 1), (2, T0 + 42, T0 + 2), (3, T0 + 43, T0 + 3)]  # the stream copy, first E
        with pytest.raises(asyncpg.UniqueViolationError):
            await copier.copy_rows(conn, "agg_trades", stream_row(3, lag_ms=500))
        if backend == "timescale":
            dims = await conn.fetch("SELECT column_name FROM timescaledb_information.dimensions "
                                    "WHERE hypertable_name = 'agg_trades'")
            assert [r[0] for r in dims] == ["trade_time"]
    finally:
        await conn.close()
