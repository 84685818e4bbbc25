"""``ingestor export`` as a job: one table's rows over a time range into a Parquet or CSV file.

Rows are streamed with a server-side cursor (asyncpg ``conn.cursor`` in a read-only,
repeatable-read transaction: one consistent snapshot however long the export takes),
in groups of ``batch_rows`` (a Parquet row group each), fetched at most ``FETCH_ROWS``
at a time: memory holds one fetch as Python objects and one group as Arrow arrays,
whatever the range. A cursor rather than ``COPY (SELECT ...) TO STDOUT``:
asyncpg's C codecs hand over typed values (int8, float8, float8[] for the book levels,
numeric text), which become Arrow arrays directly; COPY would give one text or binary
stream to parse again in Python, column by column.

The file is written as ``<out>.part`` and renamed over ``--out`` when complete, so an
interrupted or failed export never leaves a truncated file under the name asked for.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg

from ingestor.export.columns import TABLES, export_columns, select_sql
from ingestor.export.progress import Progress, time_fraction
from ingestor.export.sinks import OutputError, Sink, open_sink
from ingestor.timespec import now_ms

# Rows per FETCH: a round trip's worth, and its Python objects (about 1.5 kB a flattened
# trade row) stay in the tens of MB; a group's Arrow arrays take far less per row.
FETCH_ROWS = 10_000


class ExportError(Exception):
    """An export that cannot be done or finished: the message says why, on one line."""


@dataclass(frozen=True, slots=True)
class ExportRequest:
    table: str  # a key of columns.TABLES
    start_ms: int  # included
    end_ms: int  # excluded
    markets: tuple[str, ...]
    symbols: tuple[str, ...]  # empty: every symbol
    fmt: str  # parquet or csv
    out: Path
    flatten: bool = True
    batch_rows: int | None = None  # rows per group (Parquet row group); None: the table's default


@dataclass(frozen=True, slots=True)
class ExportResult:
    table: str
    rows: int
    bytes: int
    row_groups: int
    seconds: float
    out: Path
    fmt: str

    def summary(self) -> str:
        rate = self.rows / self.seconds if self.seconds > 0 else 0.0
        groups = f", {self.row_groups} row group{'s' if self.row_groups != 1 else ''}" if self.fmt == "parquet" else ""
        return (f"exported {self.rows:,} {self.table} rows to {self.out} ({self.bytes:,} bytes, "
                f"{_size(self.bytes)}{groups}) in {self.seconds:.1f} s ({rate:,.0f} rows/s)")


def partial_path(out: Path) -> Path:
    return out.with_name(out.name + ".part")


def check_output(out: Path) -> None:
    """Fails now, before any database work, if ``out`` cannot be written."""
    if out.is_dir():
        raise ExportError(f"{out} is a directory")
    part = partial_path(out)
    try:
        with part.open("wb"):
            pass
        part.unlink()
    except OSError as exc:
        raise ExportError(f"cannot write {out}: {exc.strerror or exc}") from None


def _dt(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=UTC)


def _size(n: int) -> str:
    if n < 1000:
        return f"{n} B"
    value = n / 1000
    units = ["kB", "MB", "GB", "TB"]
    while value >= 1000 and len(units) > 1:
        value /= 1000
        units.pop(0)
    return f"{value:.1f} {units[0]}"


async def _stream(cursor: Any, sink: Sink, batch_rows: int, on_fetch: Callable[[list[Any]], None]) -> None:
    """Every row of ``cursor`` into ``sink``, a group of ``batch_rows`` at a time."""
    in_group = 0
    while True:
        want = min(FETCH_ROWS, batch_rows - in_group)
        fetched = await cursor.fetch(want)
        if fetched:
            sink.write(fetched)
            in_group += len(fetched)
            on_fetch(fetched)
        if in_group >= batch_rows:
            sink.end_group()
            in_group = 0
        if len(fetched) < want:
            return  # the cursor is exhausted


async def run_export(dsn: str, req: ExportRequest, progress: Progress, clock_ms: int | None = None) -> ExportResult:
    """Writes the file (``<out>.part``, renamed when complete); raises ExportError for a value the
    format cannot hold or a database failure."""
    spec = TABLES[req.table]
    columns = export_columns(spec, req.flatten)
    at = [c.name for c in columns].index(spec.time_column)
    # The share done runs to the range's end, or to now when that is earlier (no data lies ahead of it).
    end_ms = min(req.end_ms, now_ms() if clock_ms is None else clock_ms)
    part = partial_path(req.out)
    rows = 0
    first_ms = 0

    def on_fetch(fetched: list[Any]) -> None:
        nonlocal rows, first_ms
        if rows == 0:
            first_ms = fetched[0][at]
        rows += len(fetched)
        progress.update(rows, time_fraction(first_ms, fetched[-1][at], end_ms))

    try:
        conn = await asyncpg.connect(dsn, timeout=10)
        try:
            sink = open_sink(req.fmt, part, columns)
            try:
                async with conn.transaction(isolation="repeatable_read", readonly=True):
                    cursor = await conn.cursor(select_sql(spec, columns), _dt(req.start_ms), _dt(req.end_ms),
                                               list(req.markets), list(req.symbols))
                    progress.start()
                    await _stream(cursor, sink, req.batch_rows or spec.default_batch_rows, on_fetch)
            finally:
                sink.close()
        finally:
            await conn.close()
        seconds = progress.finish()
        size = part.stat().st_size
        os.replace(part, req.out)
    except BaseException as exc:
        progress.abort()
        part.unlink(missing_ok=True)
        if isinstance(exc, OutputError):
            raise ExportError(str(exc)) from None
        if isinstance(exc, (asyncpg.PostgresError, asyncpg.InterfaceError, ConnectionError)):
            raise ExportError(f"the database failed during the export of {req.table}: {exc}") from None
        raise
    return ExportResult(req.table, rows, size, sink.row_groups, seconds, req.out, req.fmt)
