"""Rows into one table over one connection: the fast path and the careful ones.

- Fast: one binary ``COPY`` of the whole group.
- A key already stored (sql/005: every table has a unique key on what makes a row the
  same message): the group goes into a temporary table and on with ``INSERT ... ON
  CONFLICT DO NOTHING``; what was skipped is counted as duplicates, not as errors.
- A row the server refuses (bad data): the group is split until each refused row is
  alone, and those are logged and counted; the rest is stored.
- A backfill (trades fetched over REST to fill a gap): trades already stored with that id
  are left out first (counted as duplicates; the unique key holds the trade time ``T``,
  the same on both paths), then the gap's row is closed with the number of trades that came in.
- A closing row of ``stream_gaps`` (kind ``close``): it updates the open row of the same
  gap, or stands alone if that one never came.

Connection errors are not handled here: they go to the caller, which owns reconnecting
and, while the database is away, the spool.
"""

from __future__ import annotations

import logging
from array import array
from dataclasses import dataclass
from datetime import UTC, datetime

import asyncpg

from ingestor.binance import rows as R
from ingestor.workers.batching import Backfill
from ingestor.writer.copy_binary import copy_file, tuple_offsets

log = logging.getLogger(__name__)

ROW_ERRORS = (asyncpg.DataError, asyncpg.IntegrityConstraintViolationError)
_GAP_KEY = "market, symbol, stream, COALESCE(from_id, -1), COALESCE(to_id, -1), COALESCE(from_time, 'epoch')"


@dataclass
class CopyResult:
    inserted: int = 0
    duplicates: int = 0
    rejected: int = 0
    closed_how: str | None = None  # a backfill: how its gap's row was closed here (None: closed before)

    def add(self, other: CopyResult) -> None:
        self.inserted += other.inserted
        self.duplicates += other.duplicates
        self.rejected += other.rejected


def _columns(table: str) -> str:
    return ", ".join(R.TABLES[table])


async def copy_rows(conn: asyncpg.Connection, table: str, data: bytes, into: str | None = None) -> None:
    """COPY encoded rows of ``table`` into it (or into ``into``, a table of the same columns)."""
    # asyncpg takes a bytes source for a file name; a memoryview is read as the data.
    await conn.copy_to_table(into or table, source=memoryview(copy_file(data)), columns=R.TABLES[table],
                             format="binary")


async def _staged(conn: asyncpg.Connection, table: str, data: bytes, insert_sql: str) -> int:
    """COPY into a temporary twin of ``table``, then ``insert_sql`` from it; rows inserted."""
    tmp = f"_in_{table}"
    async with conn.transaction():
        await conn.execute(f"CREATE TEMP TABLE IF NOT EXISTS {tmp} (LIKE {table} INCLUDING DEFAULTS) "
                           "ON COMMIT DELETE ROWS")
        await copy_rows(conn, table, data, into=tmp)
        status = await conn.execute(insert_sql.format(table=table, tmp=tmp, cols=_columns(table)))
    return int(status.split()[-1])


_SKIP = "INSERT INTO {table} ({cols}) SELECT {cols} FROM {tmp} ON CONFLICT DO NOTHING"
_CLOSE = ("INSERT INTO {table} ({cols}) SELECT {cols} FROM {tmp} ON CONFLICT (" + _GAP_KEY + ") DO UPDATE SET "
          "closed_how = EXCLUDED.closed_how, closed_rows = EXCLUDED.closed_rows, closed_at = EXCLUDED.closed_at "
          "WHERE {table}.closed_how = 'open'")


async def store(conn: asyncpg.Connection, table: str, data: bytes, n: int, kind: str = "rows") -> CopyResult:
    """Store ``n`` encoded rows of ``table``; raises only connection (and server) errors."""
    if kind == "close":
        return CopyResult(inserted=await _staged(conn, table, data, _CLOSE))
    try:
        await copy_rows(conn, table, data)
        return CopyResult(inserted=n)
    except asyncpg.UniqueViolationError:
        pass
    except ROW_ERRORS as exc:
        return await _isolate(conn, table, data, exc)
    try:
        inserted = await _staged(conn, table, data, _SKIP)
    except ROW_ERRORS as exc:
        return await _isolate(conn, table, data, exc)
    return CopyResult(inserted=inserted, duplicates=n - inserted)


async def _isolate(conn: asyncpg.Connection, table: str, data: bytes, exc: BaseException) -> CopyResult:
    """Store every row the server takes; a refused row is logged and counted, a duplicate counted."""
    offsets = tuple_offsets(data)
    result = CopyResult()
    spans = [(0, len(offsets) - 1)]
    while spans:
        lo, hi = spans.pop()
        chunk = data[offsets[lo] : offsets[hi]]
        try:
            await copy_rows(conn, table, chunk)
            result.inserted += hi - lo
        except asyncpg.UniqueViolationError:
            if hi - lo == 1:
                result.duplicates += 1
            else:
                mid = (lo + hi) // 2
                spans.extend(((mid, hi), (lo, mid)))
        except ROW_ERRORS as err:
            if hi - lo == 1:
                result.rejected += 1
                log.error("%s: row refused by the database (%s): %r", table, err, chunk[:300])
            else:
                mid = (lo + hi) // 2
                spans.extend(((mid, hi), (lo, mid)))
    log.warning("%s: batch refused (%s); stored %d rows, %d duplicates, refused %d", table, exc,
                result.inserted, result.duplicates, result.rejected)
    return result


async def store_backfill(conn: asyncpg.Connection, data: bytes, ids: bytes, info: Backfill) -> CopyResult:
    """Trades fetched over REST for one gap: those not stored yet, then the gap's row closed.

    Only the caller's ordering makes this safe: every batch taken before this one has been
    committed, so a trade of the gap that came over the WebSocket after all is stored by
    now and shows up here."""
    trade_ids = array("q")
    trade_ids.frombytes(ids)
    result = CopyResult()
    if trade_ids:
        # The table's key (sql/007) holds the trade time T, the same on both paths: the
        # query reads the key's range, and the key itself refuses any copy it misses.
        times = await conn.fetch(
            """SELECT aggregate_trade_id FROM agg_trades
               WHERE market = $1 AND symbol = $2 AND trade_time >= $3 AND trade_time <= $4
                 AND aggregate_trade_id BETWEEN $5 AND $6""",
            info.market, info.symbol, _dt(info.first_trade_ms), _dt(info.last_trade_ms),
            min(trade_ids), max(trade_ids))
        have = {r[0] for r in times}
        offsets = tuple_offsets(data)
        keep = [data[offsets[i] : offsets[i + 1]] for i, a in enumerate(trade_ids) if a not in have]
        result.duplicates = len(trade_ids) - len(keep)
        if keep:
            result.add(await store(conn, "agg_trades", b"".join(keep), len(keep)))
    how = "backfilled" if info.complete else "unrecoverable"
    closing = R.stream_gap(info.market, info.symbol, "aggTrade", info.from_id, info.to_id, info.from_ms,
                           info.to_ms, info.detected_ms, how, int(datetime.now(UTC).timestamp() * 1000),
                           closed_rows=result.inserted)
    # 0 rows: an earlier backfill of the same gap (asked again meanwhile) closed it already.
    if await _staged(conn, "stream_gaps", closing, _CLOSE):
        result.closed_how = how
    return result


def _dt(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=UTC)
