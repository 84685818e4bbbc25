"""``features replay`` on hand-written stored rows in a real database: the cases where stored
times and update ids disagree, which a simulator run reaches only by chance (under load)."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from typing import Any

import asyncpg

from ingestor.feature_spec import FeatureSettings
from ingestor.features.engine import FeatureRow
from ingestor.features.replay import ReplayRange, replay

FS = FeatureSettings(bar_seconds=1, window=4, obi_levels=2)
T0 = 1_795_000_000_000  # a whole second


def dt(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=UTC)


async def store(conn: asyncpg.Connection, snapshot_ms: int, diffs: list[dict[str, Any]],
                trades: list[dict[str, Any]]) -> None:
    await conn.execute("INSERT INTO symbol_info (market, time, symbol, tick_size, payload) "
                       "VALUES ('spot', $1, 'XUSDT', 0.01, '{}')", dt(T0 - 60_000))
    snap = {"lastUpdateId": 100, "bids": [["10.00", "1"], ["9.99", "1"]], "asks": [["10.01", "1"], ["10.02", "1"]]}
    await conn.execute("INSERT INTO depth_snapshots (market, time, symbol, market_type, payload) "
                       "VALUES ('spot', $1, 'XUSDT', 'spot', $2)", dt(snapshot_ms), json.dumps(snap))
    await conn.execute("INSERT INTO book_syncs (market, time, symbol, snapshot_time, last_update_id, reason, "
                       "buffered) VALUES ('spot', $1, 'XUSDT', $1, 100, 'start', 1)", dt(snapshot_ms))
    await conn.executemany(
        "INSERT INTO depth_updates (market, event_time, symbol, first_update_id, final_update_id, payload) "
        "VALUES ('spot', $1, 'XUSDT', $2, $3, $4)",
        [(dt(d["E"]), d["U"], d["u"], json.dumps(d)) for d in diffs])
    await conn.executemany(
        "INSERT INTO agg_trades (market, event_time, trade_time, symbol, aggregate_trade_id, payload) "
        "VALUES ('spot', $1, $2, 'XUSDT', $3, $4)", [(dt(t["E"]), dt(t["T"]), t["a"], json.dumps(t)) for t in trades])


def diff(U: int, u: int, E: int, b: Any = (), a: Any = ()) -> dict[str, Any]:  # noqa: N803
    return {"e": "depthUpdate", "E": E, "s": "XUSDT", "U": U, "u": u, "b": [list(x) for x in b],
            "a": [list(x) for x in a]}


def trade(E: int, a: int) -> dict[str, Any]:  # noqa: N803
    return {"e": "aggTrade", "E": E, "s": "XUSDT", "a": a, "p": "10.00", "q": "1", "f": a, "l": a, "T": E,
            "m": False}


async def replayed(dsn: str, from_ms: int, to_ms: int) -> list[FeatureRow]:
    made: list[FeatureRow] = []

    async def write(rows: list[FeatureRow]) -> None:
        made.extend(rows)

    conn = await asyncpg.connect(dsn)
    try:
        await replay(conn, FS, ReplayRange(from_ms, to_ms, ("spot",)), write)
    finally:
        await conn.close()
    return made


async def test_a_diff_stamped_before_its_snapshot_but_not_in_it_is_applied(db_dsn: str) -> None:
    # The snapshot is stored under the time it was fetched, the diffs under the exchange's
    # event time: here the first diff the snapshot does not hold (U = lastUpdateId + 1)
    # carries a time 200 ms *before* the snapshot's. The live worker got it after the
    # snapshot and built its book; the replay must find it too, or its book never syncs.
    snapshot_ms = T0 + 300
    diffs = [diff(90, 100, T0 + 50),  # held by the snapshot: dropped
             diff(101, 105, T0 + 100, b=[("10.00", "3")]),  # not held, stamped before the snapshot
             diff(106, 110, T0 + 900, b=[("9.99", "5")]),
             diff(111, 115, T0 + 1100),
             diff(116, 120, T0 + 2100)]
    trades = [trade(T0 + 1200, 1), trade(T0 + 2500, 2)]
    conn = await asyncpg.connect(db_dsn)
    try:
        await store(conn, snapshot_ms, diffs, trades)
    finally:
        await conn.close()
    rows = await replayed(db_dsn, T0 + 1000, T0 + 3000)
    by_start = {r.bar.start_ms: r.row for r in rows}
    assert set(by_start) == {T0 + 1000, T0 + 2000}
    obi = by_start[T0 + 1000]["obi"]
    assert not math.isnan(obi), "the book never synced: the diff before the snapshot's time was not read"
    assert obi == (3 + 5 - 1 - 1) / (3 + 5 + 1 + 1)
