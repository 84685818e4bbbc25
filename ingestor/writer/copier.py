"""Rows into one table over one connection: the fast path and the careful ones.

- Fast: one binary ``COPY`` of the whole group.
- A key already stored (sql/005: every table has a unique key on what makes a row the
  same message): the group goes into a temporary table and on with ``INSERT ... ON
  CONFLICT DO NOTHING``; what was skipped is counted as duplicates, not as errors.
- A row the server refuses for a reason of its own (``errors.Kind.ROW``: bad data, a
  constraint, a program limit, a trigger's exception): the group is split until each
  refused row is alone; those are kept in ``rejected_rows`` (sql/006) with their error and
  raw bytes, counted, and logged at most once per table per ``REFUSED_LOG_PERIOD_S``; the
  rest is stored.
- A backfill (trades fetched over REST to fill a gap): trades already stored with that id
  are left out first (counted as duplicates; the unique key holds the trade time ``T``,
  the same on both paths), then the gap's row is closed with the number of trades that came in.
- A closing row of ``stream_gaps`` (kind ``close``): it updates the open row of the same
  gap, or stands alone if that one never came.

``store_group`` is the writer's one entry: it returns an explicit outcome per group
(``Stored``, which says how many rows were isolated, or ``Lost`` when the database went
away) and raises ``StoreFailed`` for an error it does not understand, which the writer
turns into a loud exit (``errors``).
"""

from __future__ import annotations

import logging
import time
from array import array
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import asyncpg

from ingestor.wire import rows as R
from ingestor.wire.batching import Backfill, Batch
from ingestor.wire.copy_binary import EncodeError, copy_file, tuple_offsets
from ingestor.writer.errors import Kind, classify, sqlstate

log = logging.getLogger(__name__)

# A bad 5,000-row batch must not write 5,000 lines: one per table per period, with a count.
REFUSED_LOG_PERIOD_S = 60.0
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


@dataclass(frozen=True)
class Stored:
    """The group is committed: every row stored, a duplicate, or isolated in rejected_rows."""

    result: CopyResult


@dataclass(frozen=True)
class Lost:
    """The database went away (``errors.Kind.AWAY``) before the group was committed whole:
    keep it and store it again (rows it did commit come back as duplicates)."""

    error: BaseException


Outcome = Stored | Lost


class StoreFailed(Exception):
    """An error storing a group that is neither the rows' fault nor the database being
    away: the writer stops loudly (its batches are delivered again to the next one)."""

    def __init__(self, table: str, rows: int, cause: BaseException) -> None:
        state = sqlstate(cause)
        super().__init__(f"storing {rows} rows into {table} failed: {type(cause).__name__}"
                         f"{f' (SQLSTATE {state})' if state else ''}: {cause}")
        self.table = table
        self.rows = rows
        self.cause = cause


async def store_group(conn: asyncpg.Connection, group: Sequence[Batch]) -> Outcome:
    """Store one group (batches of one table and kind, or one backfill): ``Stored`` or
    ``Lost``; ``StoreFailed`` for anything else. Tests: tests/test_writer_store.py."""
    first = group[0]
    rows = sum(b.rows for b in group)
    try:
        if first.kind == "backfill":
            if first.backfill is None:
                raise ValueError("a backfill batch without its gap")
            return Stored(await store_backfill(conn, first.data, first.ids, first.backfill))
        return Stored(await store(conn, first.table, b"".join(b.data for b in group), rows, first.kind))
    except Exception as exc:  # noqa: BLE001 - every error is classified: away, or the writer stops
        if classify(exc) is Kind.AWAY:
            return Lost(exc)
        raise StoreFailed(first.table, rows, exc) from exc


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


def _is_row_error(exc: BaseException) -> bool:
    return isinstance(exc, asyncpg.PostgresError) and classify(exc) is Kind.ROW


async def store(conn: asyncpg.Connection, table: str, data: bytes, n: int, kind: str = "rows") -> CopyResult:
    """Store ``n`` encoded rows of ``table``; refused rows isolated into ``rejected_rows``.
    Raises every error that is not the rows' fault (the caller classifies it)."""
    if kind == "close":
        try:
            return CopyResult(inserted=await _staged(conn, table, data, _CLOSE))
        except asyncpg.PostgresError as exc:
            if not _is_row_error(exc):
                raise
            return await _isolate(conn, table, data, _close_chunk)
    try:
        await copy_rows(conn, table, data)
        return CopyResult(inserted=n)
    except asyncpg.UniqueViolationError:
        pass
    except asyncpg.PostgresError as exc:
        if not _is_row_error(exc):
            raise
        return await _isolate(conn, table, data, _copy_chunk)
    try:
        inserted = await _staged(conn, table, data, _SKIP)
    except asyncpg.PostgresError as exc:
        if not _is_row_error(exc):
            raise
        return await _isolate(conn, table, data, _copy_chunk)
    return CopyResult(inserted=inserted, duplicates=n - inserted)


async def _copy_chunk(conn: asyncpg.Connection, table: str, chunk: bytes) -> int:
    """Rows of a chunk stored by COPY; a UniqueViolationError if one is already there."""
    await copy_rows(conn, table, chunk)
    return -1  # every row


async def _close_chunk(conn: asyncpg.Connection, table: str, chunk: bytes) -> int:
    return await _staged(conn, table, chunk, _CLOSE)


@dataclass
class Refused:
    """One row the server refused, as it goes into ``rejected_rows``."""

    table: str
    sqlstate: str
    error: str
    raw: bytes
    payload: str | None = None


async def _isolate(conn: asyncpg.Connection, table: str, data: bytes,
                   put: Callable[[asyncpg.Connection, str, bytes], Awaitable[int]]) -> CopyResult:
    """Store every row the server takes (halving the refused spans until each refused row is
    alone); a refused row is kept in ``rejected_rows``, a duplicate counted. An error that
    is not the rows' fault goes up at once (the caller classifies it)."""
    offsets = tuple_offsets(data)
    result = CopyResult()
    refused: list[Refused] = []
    spans = [(0, len(offsets) - 1)]
    while spans:
        lo, hi = spans.pop()
        chunk = data[offsets[lo] : offsets[hi]]
        try:
            n = await put(conn, table, chunk)
            inserted = hi - lo if n < 0 else n
            result.inserted += inserted
            result.duplicates += hi - lo - inserted
        except asyncpg.UniqueViolationError:
            if hi - lo == 1:
                result.duplicates += 1
            else:
                mid = (lo + hi) // 2
                spans.extend(((mid, hi), (lo, mid)))
        except asyncpg.PostgresError as err:
            if not _is_row_error(err):
                raise
            if hi - lo == 1:
                refused.append(Refused(table, sqlstate(err), str(err), chunk, payload_of(table, chunk)))
            else:
                mid = (lo + hi) // 2
                spans.extend(((mid, hi), (lo, mid)))
    if refused:
        await keep_refused(conn, refused)
        result.rejected = len(refused)
        REFUSED_LOG.note(refused, result)
    return result


async def keep_refused(conn: asyncpg.Connection, refused: Sequence[Refused]) -> None:
    """Keep refused rows in ``rejected_rows`` (sql/006), in one statement."""
    await conn.executemany(
        "INSERT INTO rejected_rows (table_name, sqlstate, error, raw, payload) VALUES ($1, $2, $3, $4, $5)",
        [(r.table, r.sqlstate, r.error, r.raw, r.payload) for r in refused])


def payload_of(table: str, row: bytes) -> str | None:
    """The exchange's message in an encoded row (its ``payload`` field), as text; None when
    the table has none or the row cannot be cut (it is kept raw either way)."""
    columns = R.TABLES.get(table, ())
    if "payload" not in columns:
        return None
    try:
        fields = tuple_fields(row)
    except EncodeError:
        return None
    if len(fields) != len(columns):
        return None
    value = fields[columns.index("payload")]
    if value is None:
        return None
    if value[:1] == b"\x01" and value[1:2] in (b"{", b"["):  # jsonb: a version byte first
        value = value[1:]
    return value.decode("utf-8", errors="replace").replace("\x00", "")


def tuple_fields(row: bytes) -> list[bytes | None]:
    """The fields of one encoded COPY tuple (None for NULL); EncodeError if it is cut."""
    if len(row) < 2:
        raise EncodeError("truncated tuple")
    n = int.from_bytes(row[:2], "big", signed=True)
    pos = 2
    out: list[bytes | None] = []
    for _ in range(n):
        if pos + 4 > len(row):
            raise EncodeError("truncated tuple")
        length = int.from_bytes(row[pos : pos + 4], "big", signed=True)
        pos += 4
        if length < 0:
            out.append(None)
            continue
        if pos + length > len(row):
            raise EncodeError("truncated tuple")
        out.append(row[pos : pos + length])
        pos += length
    return out


@dataclass
class RefusedLog:
    """At most one ERROR line per table per ``period_s``: the first refused row's error and
    a sample of it, and how many were refused since the last line (the metric counts each)."""

    period_s: float = REFUSED_LOG_PERIOD_S
    clock: Callable[[], float] = time.monotonic
    last: dict[str, float] = field(default_factory=dict)
    unlogged: dict[str, int] = field(default_factory=dict)

    def note(self, refused: Sequence[Refused], result: CopyResult) -> bool:
        """Count ``refused`` (rows of one table); True when a line was written."""
        table = refused[0].table
        self.unlogged[table] = self.unlogged.get(table, 0) + len(refused)
        now = self.clock()
        if table in self.last and now - self.last[table] < self.period_s:
            return False
        self.last[table] = now
        n, self.unlogged[table] = self.unlogged[table], 0
        first = refused[0]
        log.error("%s: %d row(s) refused by the database since the last such line, kept in rejected_rows "
                  "(this group: %d stored, %d duplicates, %d refused); first: SQLSTATE %s %s: %r", table, n,
                  result.inserted, result.duplicates, len(refused), first.sqlstate, first.error, first.raw[:300],
                  extra={"event": "rows_refused", "table": table, "refused": n, "sqlstate": first.sqlstate})
        return True


REFUSED_LOG = RefusedLog()


async def store_backfill(conn: asyncpg.Connection, data: bytes, ids: bytes, info: Backfill) -> CopyResult:
    """Trades fetched over REST for one gap: those not stored yet, then the gap's row closed.

    No order with the other batches is needed: the table's key holds the trade time, the
    same on both paths, so a WebSocket copy stored before this is left out here, and one
    stored after it meets the key (tests/test_agg_trades_key.py)."""
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
