"""Where replayed feature rows go: the ``features`` table, a CSV file or a Parquet file.

Every sink takes rows in batches as the replay makes them, so a long replay never holds
its output in memory. The table sink replaces what was there: in one transaction it
deletes the range's rows (same markets, symbols and bar size) and COPYs the new ones, so
an interrupted replay leaves the old rows, and a finished one leaves exactly one row per bar.
"""

from __future__ import annotations

import csv
import math
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import asyncpg

from ingestor.binance.streams import Market
from ingestor.feature_spec import FEATURE_COLUMNS
from ingestor.features.engine import FeatureRow
from ingestor.wire import rows
from ingestor.wire.copy_binary import copy_file

COLUMNS = rows.TABLES["features"]  # market, symbol, bar_time, bar_seconds, then FEATURE_COLUMNS
_INTS = {"trades", "fp_buy_imb", "fp_sell_imb", "fp_stacked_buy", "fp_stacked_sell", "signal", "bar_seconds"}
_BOOLS = {"bull_div", "bear_div"}


class Sink(Protocol):
    async def write(self, batch: list[FeatureRow]) -> None: ...

    async def close(self) -> None: ...


def record(fr: FeatureRow, bar_seconds: int) -> dict[str, Any]:
    """One row as plain values: bar_time in Unix ms, NaN as None."""
    out: dict[str, Any] = {"market": fr.market, "symbol": fr.symbol, "bar_time": fr.bar.start_ms,
                           "bar_seconds": bar_seconds}
    for col in FEATURE_COLUMNS:
        v = fr.row[col]
        out[col] = None if isinstance(v, float) and math.isnan(v) else v
    return out


class TableSink:
    """Replaces the range's rows in ``features`` inside one transaction."""

    def __init__(self, conn: asyncpg.Connection, bar_seconds: int) -> None:
        self.conn = conn
        self.bar_seconds = bar_seconds
        self.tx: Any = None
        self.deleted = 0
        self.written = 0

    async def begin(self, from_ms: int, to_ms: int, keys: list[tuple[Market, str]]) -> None:
        self.tx = self.conn.transaction()
        await self.tx.start()
        status = await self.conn.execute(
            """DELETE FROM features WHERE (market, symbol) IN (SELECT * FROM unnest($1::text[], $2::text[]))
               AND bar_seconds = $3 AND bar_time >= $4 AND bar_time < $5""",
            [m for m, _ in keys], [s for _, s in keys], self.bar_seconds, _dt(from_ms), _dt(to_ms))
        self.deleted = int(status.split()[-1])

    async def write(self, batch: list[FeatureRow]) -> None:
        if not batch:
            return
        data = b"".join(rows.features(fr.market, fr.symbol, fr.bar.start_ms, self.bar_seconds, fr.row)
                        for fr in batch)
        await self.conn.copy_to_table("features", source=memoryview(copy_file(data)), columns=COLUMNS,
                                      format="binary")
        self.written += len(batch)

    async def close(self) -> None:
        if self.tx is not None:
            await self.tx.commit()

    async def abort(self) -> None:
        if self.tx is not None:
            await self.tx.rollback()


class CsvSink:
    """One header line, then a line per row; bar_time in ISO 8601 UTC, NULL as empty."""

    def __init__(self, path: Path, bar_seconds: int) -> None:
        self.path = path
        self.bar_seconds = bar_seconds
        self.file = path.open("w", newline="")
        self.out = csv.writer(self.file)
        self.out.writerow(COLUMNS)
        self.written = 0

    async def write(self, batch: list[FeatureRow]) -> None:
        for fr in batch:
            rec = record(fr, self.bar_seconds)
            rec["bar_time"] = _dt(rec["bar_time"]).isoformat()
            self.out.writerow(["" if rec[c] is None else rec[c] for c in COLUMNS])
        self.written += len(batch)

    async def close(self) -> None:
        self.file.close()


class ParquetSink:
    """Typed columns (bar_time a UTC timestamp, NULL where undefined), one row group per batch."""

    def __init__(self, path: Path, bar_seconds: int) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.pa = pa
        self.bar_seconds = bar_seconds
        fields = []
        for c in COLUMNS:
            if c in ("market", "symbol"):
                t = pa.string()
            elif c == "bar_time":
                t = pa.timestamp("ms", tz="UTC")
            elif c in _INTS:
                t = pa.int64() if c == "trades" else pa.int32()
            elif c in _BOOLS:
                t = pa.bool_()
            else:
                t = pa.float64()
            fields.append(pa.field(c, t))
        self.schema = pa.schema(fields)
        self.writer = pq.ParquetWriter(str(path), self.schema)
        self.written = 0

    async def write(self, batch: list[FeatureRow]) -> None:
        if not batch:
            return
        recs = [record(fr, self.bar_seconds) for fr in batch]
        cols = {c: [r[c] for r in recs] for c in COLUMNS}
        self.writer.write_table(self.pa.table(cols, schema=self.schema))
        self.written += len(batch)

    async def close(self) -> None:
        self.writer.close()


def file_sink(path: Path, bar_seconds: int) -> CsvSink | ParquetSink:
    """By the file's extension; anything but .csv and .parquet is an error."""
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return CsvSink(path, bar_seconds)
    if suffix in (".parquet", ".pq"):
        return ParquetSink(path, bar_seconds)
    raise ValueError(f"{path}: --out must end in .csv or .parquet")


def _dt(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=UTC)
