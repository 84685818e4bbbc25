"""Where the previous run stopped: the last stored id and time per (market, symbol, stream).

A new ``ingestor run`` seeds its socket workers' sequence trackers with these, so the first
event of each stream shows the hole the downtime left, exactly as a restarted worker sees
its predecessor's: a trade gap is backfilled over REST (``aggTrades`` by ``fromId``), a
depth gap is recorded (the book resyncs), and the id-less streams get a time gap from
their last stored event (tests/chaos/test_restarts.py, the downtime test).

One index probe per symbol and table (``LATERAL ... ORDER BY time DESC LIMIT 1`` on the
unique keys, which lead with market and symbol), so it costs milliseconds on tables of any
size, on TimescaleDB and plain PostgreSQL alike.
"""

from __future__ import annotations

import asyncpg

from ingestor.binance.sequence import Positions
from ingestor.binance.streams import Market

# kind (as SequenceTracker names it) -> (table, the id column or None: the event time is
# the id, the time column its unique key leads with after market and symbol)
_SOURCES: dict[str, tuple[str, str | None, str]] = {
    "t": ("agg_trades", "aggregate_trade_id", "trade_time"),
    "d": ("depth_updates", "final_update_id", "event_time"),
    "m": ("mark_prices", None, "event_time"),
    "f": ("force_orders", None, "event_time"),
}


def _query(table: str, id_col: str | None, time_col: str) -> str:
    ms = "(extract(epoch FROM x.event_time) * 1000)::bigint"
    ident = f"x.{id_col}" if id_col else ms
    order = f"x.{time_col} DESC, x.{id_col} DESC" if id_col else f"x.{time_col} DESC"
    return (f"SELECT s.symbol, last.id, last.ms FROM unnest($2::text[]) AS s(symbol) "
            f"CROSS JOIN LATERAL (SELECT {ident} AS id, {ms} AS ms FROM {table} x "
            f"WHERE x.market = $1 AND x.symbol = s.symbol ORDER BY {order} LIMIT 1) AS last")


async def stored_positions(conn: asyncpg.Connection, symbols: dict[Market, list[str]]) -> dict[Market, Positions]:
    """Per market, the tracker positions ({kind: {symbol: (id or E, event ms)}}) of the newest
    stored row of each recorded symbol; symbols never stored are absent."""
    out: dict[Market, Positions] = {}
    for market, names in symbols.items():
        if not names:
            continue
        positions: Positions = {}
        for kind, (table, id_col, time_col) in _SOURCES.items():
            rows = await conn.fetch(_query(table, id_col, time_col), market, list(names))
            if rows:
                positions[kind] = {r["symbol"]: (int(r["id"]), int(r["ms"])) for r in rows}
        if positions:
            out[market] = positions
    return out
