"""``db.resume.stored_positions`` on both backends: the newest stored row per symbol and
stream, in the sequence trackers' terms."""

from __future__ import annotations

import asyncpg

from ingestor.db.resume import stored_positions
from ingestor.wire import rows as R
from ingestor.writer.copier import copy_rows


def trade(symbol: str, a: int, e_ms: int) -> bytes:
    return R.agg_trade("spot", {"e": "aggTrade", "E": e_ms, "s": symbol, "a": a, "p": "1.0", "q": "2.0", "f": a,
                                "l": a, "T": e_ms - 1, "m": True, "M": True}, b'{"x":1}')


def diff(symbol: str, u: int, e_ms: int) -> bytes:
    return R.depth_update("spot", {"e": "depthUpdate", "E": e_ms, "s": symbol, "U": u - 1, "u": u, "b": [],
                                   "a": []}, b'{"x":1}')


async def test_the_newest_row_of_each_symbol_and_stream(db_dsn: str) -> None:
    conn = await asyncpg.connect(db_dsn)
    try:
        # Out of order on purpose: the newest by event time wins, not the last inserted.
        await copy_rows(conn, "agg_trades", trade("BTCUSDT", 7, 3_000) + trade("BTCUSDT", 5, 1_000)
                        + trade("ETHUSDT", 40, 2_000))
        await copy_rows(conn, "depth_updates", diff("BTCUSDT", 900, 3_100) + diff("BTCUSDT", 800, 1_100))
        got = await stored_positions(conn, {"spot": ["BTCUSDT", "ETHUSDT", "XRPUSDT"], "futures": ["BTCUSDT"]})
    finally:
        await conn.close()
    assert got == {"spot": {"t": {"BTCUSDT": (7, 3_000), "ETHUSDT": (40, 2_000)},
                            "d": {"BTCUSDT": (900, 3_100)}}}


async def test_an_empty_database_gives_nothing(db_dsn: str) -> None:
    conn = await asyncpg.connect(db_dsn)
    try:
        assert await stored_positions(conn, {"spot": ["BTCUSDT"], "futures": []}) == {}
    finally:
        await conn.close()
