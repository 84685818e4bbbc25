"""Reference data the indicators need to be recomputed later: each symbol's exchangeInfo entry."""

from __future__ import annotations

from typing import cast

import asyncpg

from ingestor.binance.streams import Market
from ingestor.binance.universe import Universe

# A row only where the entry differs from the newest one stored for that symbol (jsonb
# equality ignores key order and spacing), so restarts add nothing while Binance changes
# nothing.
_INSERT_CHANGED = """
INSERT INTO symbol_info (market, time, symbol, tick_size, payload)
SELECT n.market, to_timestamp($1::double precision / 1000), n.symbol, n.tick::numeric, n.payload::jsonb
FROM unnest($2::text[], $3::text[], $4::text[], $5::text[]) AS n(market, symbol, tick, payload)
WHERE NOT EXISTS (
    SELECT 1 FROM (
        SELECT s.payload FROM symbol_info s WHERE s.market = n.market AND s.symbol = n.symbol
        ORDER BY s.time DESC LIMIT 1
    ) AS newest
    WHERE newest.payload = n.payload::jsonb
)
"""


async def record_symbol_info(conn: asyncpg.Connection, universe: Universe, now_ms: int) -> int:
    """Store the chosen symbols' exchangeInfo entries that changed; returns how many."""
    keys = [k for k in universe.info if k in universe.tick_sizes]
    if not keys:
        return 0
    status = await conn.execute(
        _INSERT_CHANGED, now_ms, [m for m, _ in keys], [s for _, s in keys],
        [universe.tick_sizes[k] for k in keys], [universe.info[k].decode() for k in keys])
    return int(status.split()[-1])


async def tick_sizes_at(conn: asyncpg.Connection, time_ms: int) -> dict[tuple[Market, str], float]:
    """Every stored symbol's tick size as it stood at ``time_ms`` (or the first one known
    after, for symbols recorded only later)."""
    rows = await conn.fetch(
        """SELECT DISTINCT ON (market, symbol) market, symbol, tick_size::float8 AS tick
           FROM symbol_info
           ORDER BY market, symbol, (time > to_timestamp($1::double precision / 1000)),
                    CASE WHEN time <= to_timestamp($1::double precision / 1000) THEN -extract(epoch FROM time)
                         ELSE extract(epoch FROM time) END""", time_ms)
    return {(cast(Market, r["market"]), r["symbol"]): r["tick"] for r in rows}
