"""Reading the ``features`` table for people: which bar sizes a symbol has, its latest bars, a range.

Every query walks the unique index ``features_bar_key (market, symbol, bar_seconds, bar_time)``
(sql/004) with equality on its first columns, so its cost is the rows returned (and a probe per
chunk on TimescaleDB), never the table's size: the table grows by a row per symbol per bar.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

import asyncpg

from ingestor.feature_spec import FEATURE_COLUMNS

COLUMNS = ("market", "symbol", "bar_time", "bar_seconds", *FEATURE_COLUMNS)
_SELECT = ", ".join(COLUMNS)

# The distinct bar sizes by a skip scan (one index probe per size, where SELECT DISTINCT would
# read every row), then each size's first and last bar by a probe at either end.
INVENTORY_SQL = """
WITH RECURSIVE sizes(bar_seconds) AS (
    (SELECT bar_seconds FROM features WHERE market = $1 AND symbol = $2 ORDER BY bar_seconds LIMIT 1)
    UNION ALL
    SELECT (SELECT f.bar_seconds FROM features f
            WHERE f.market = $1 AND f.symbol = $2 AND f.bar_seconds > s.bar_seconds
            ORDER BY f.bar_seconds LIMIT 1)
    FROM sizes s WHERE s.bar_seconds IS NOT NULL
)
SELECT s.bar_seconds,
       (SELECT f.bar_time FROM features f
        WHERE f.market = $1 AND f.symbol = $2 AND f.bar_seconds = s.bar_seconds
        ORDER BY f.bar_time LIMIT 1) AS first_bar,
       (SELECT f.bar_time FROM features f
        WHERE f.market = $1 AND f.symbol = $2 AND f.bar_seconds = s.bar_seconds
        ORDER BY f.bar_time DESC LIMIT 1) AS last_bar
FROM sizes s WHERE s.bar_seconds IS NOT NULL
"""

LATEST_SQL = f"""
SELECT {_SELECT} FROM features
WHERE market = $1 AND symbol = $2 AND bar_seconds = $3
ORDER BY bar_time DESC LIMIT $4
"""

RANGE_SQL = f"""
SELECT {_SELECT} FROM features
WHERE market = $1 AND symbol = $2 AND bar_seconds = $3 AND bar_time >= $4 AND bar_time < $5
ORDER BY bar_time LIMIT $6
"""


class NoFeatures(LookupError):
    """Nothing stored for what was asked; the message says what is stored instead."""


@dataclass(frozen=True, slots=True)
class BarSize:
    """One bar size stored for a (market, symbol): its first and last bar."""

    bar_seconds: int
    first: datetime
    last: datetime


def utc(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)


def fmt_time(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


def describe(sizes: list[BarSize]) -> str:
    return "; ".join(f"{s.bar_seconds} s bars from {fmt_time(s.first)} to {fmt_time(s.last)} UTC" for s in sizes)


async def bar_sizes(conn: asyncpg.Connection, market: str, symbol: str) -> list[BarSize]:
    """The bar sizes stored for ``(market, symbol)``; raises :class:`NoFeatures` if there are none."""
    recs = await conn.fetch(INVENTORY_SQL, market, symbol)
    if not recs:
        raise NoFeatures(f"no features rows for {market} {symbol}: the feature worker or "
                         f"`ingestor features replay` fills the features table")
    return [BarSize(r["bar_seconds"], r["first_bar"], r["last_bar"]) for r in recs]


def choose_bar_seconds(sizes: list[BarSize], market: str, symbol: str, wanted: int | None = None,
                       start: datetime | None = None, end: datetime | None = None) -> int:
    """``wanted`` if stored, else the size with the most recent bar (ties: the larger bar, the
    easier to read). With a range ``[start, end)``, sizes whose bars overlap it come first."""
    if wanted is not None:
        if any(s.bar_seconds == wanted for s in sizes):
            return wanted
        raise NoFeatures(f"no {wanted} s bars for {market} {symbol}; stored: {describe(sizes)}")
    pool = sizes
    if start is not None and end is not None:
        pool = [s for s in sizes if s.first < end and s.last >= start] or sizes
    return max(pool, key=lambda s: (s.last, s.bar_seconds)).bar_seconds


async def latest(conn: asyncpg.Connection, market: str, symbol: str, bar_seconds: int,
                 n: int) -> list[asyncpg.Record]:
    """The latest ``n`` bars, oldest first."""
    recs = await conn.fetch(LATEST_SQL, market, symbol, bar_seconds, n)
    recs.reverse()
    return recs


async def in_range(conn: asyncpg.Connection, market: str, symbol: str, bar_seconds: int,
                   start: datetime, end: datetime, limit: int) -> list[asyncpg.Record]:
    """Bars starting in ``[start, end)``, oldest first, at most ``limit``."""
    return list(await conn.fetch(RANGE_SQL, market, symbol, bar_seconds, start, end, limit))
