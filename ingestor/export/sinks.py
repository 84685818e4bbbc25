"""Exported rows into a Parquet or CSV file, a fetch at a time.

Both sinks take the rows as the cursor returns them (tuples in ``columns`` order) and
turn each fetch into Arrow arrays, so a file is never held in memory: Parquet gets one
row group per group of rows (``ParquetWriter``), CSV gets each fetch appended (``CSVWriter``).

Types: see :func:`arrow_type`. CSV holds the same columns with the same values, written
as text: times ISO 8601 UTC with milliseconds (``2024-08-08T00:00:00.123Z``), DECIMAL
columns exactly as stored, lists of floats as JSON arrays, NULL as an empty field
(an empty string is ``""``), floats in their shortest round-trip form.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from ingestor.export.columns import Column, Kind

# Binance quantities have at most 8 decimals and open interest fits 20 integer digits with
# room to spare; a value that would not fit makes the cast fail rather than round.
DECIMAL = pa.decimal128(38, 18)
TIMESTAMP = pa.timestamp("ms", tz="UTC")
_SCALAR: dict[Kind, pa.DataType] = {
    "text": pa.string(), "json": pa.string(), "int32": pa.int32(), "int64": pa.int64(), "float64": pa.float64(),
    "bool": pa.bool_(), "timestamp": TIMESTAMP, "decimal": DECIMAL, "float64_list": pa.list_(pa.float64()),
}
_CSV_AS_TEXT = frozenset({"timestamp", "decimal", "float64_list"})


class OutputError(ValueError):
    """A value the file type cannot hold exactly (a DECIMAL beyond decimal128(38, 18))."""


def arrow_type(kind: Kind, csv: bool = False) -> pa.DataType:
    """Parquet: text and json as string, timestamps as timestamp[ms, tz=UTC], DECIMAL as
    decimal128(38, 18) (exact), lists as list<float64>. CSV: the last three as text."""
    return pa.string() if csv and kind in _CSV_AS_TEXT else _SCALAR[kind]


def schema(columns: Sequence[Column], csv: bool = False) -> pa.Schema:
    return pa.schema([pa.field(c.name, arrow_type(c.kind, csv)) for c in columns])


def to_array(values: Sequence[Any], kind: Kind, csv: bool = False) -> pa.Array:
    """One column of a batch as the cursor gives it (times as Unix ms, DECIMAL as text)."""
    if kind == "timestamp":
        arr = pa.array(values, TIMESTAMP)
        return pc.strftime(arr, format="%Y-%m-%dT%H:%M:%SZ") if csv else arr  # %S carries the .mmm
    if kind == "decimal":
        if csv:
            return pa.array(values, pa.string())
        try:
            return pa.array(values, pa.string()).cast(DECIMAL)
        except pa.ArrowInvalid as exc:
            raise OutputError(f"a DECIMAL value does not fit decimal128(38, 18) exactly ({exc}): "
                              "export it as CSV, which keeps the text") from None
    if kind == "float64_list" and csv:
        return pa.array([None if v is None else orjson.dumps(v).decode() for v in values], pa.string())
    return pa.array(values, _SCALAR[kind])


def to_batch(rows: Sequence[Sequence[Any]], columns: Sequence[Column], target: pa.Schema, csv: bool) -> pa.RecordBatch:
    by_column = list(zip(*rows, strict=True)) if rows else [() for _ in columns]
    arrays = [to_array(values, c.kind, csv) for values, c in zip(by_column, columns, strict=True)]
    return pa.RecordBatch.from_arrays(arrays, schema=target)


class Sink(Protocol):
    row_groups: int

    def write(self, rows: Sequence[Sequence[Any]]) -> None:
        """Rows for the current group (Parquet: row group), as the cursor returns them."""

    def end_group(self) -> None:
        """The current group is complete: write it out."""

    def close(self) -> None:
        """Ends the last group and closes the file."""


class ParquetSink:
    """A row group per group of rows; each fetch is turned into Arrow arrays at once (a tenth
    of the Python objects' memory) and held until its group ends. zstd: read by pyarrow,
    polars, pandas, DuckDB and Spark."""

    def __init__(self, path: Path, columns: Sequence[Column]) -> None:
        self.columns = columns
        self.schema = schema(columns)
        self.writer = pq.ParquetWriter(str(path), self.schema, compression="zstd")
        self.pending: list[pa.RecordBatch] = []
        self.row_groups = 0

    def write(self, rows: Sequence[Sequence[Any]]) -> None:
        if rows:
            self.pending.append(to_batch(rows, self.columns, self.schema, False))

    def end_group(self) -> None:
        if self.pending:
            table = pa.Table.from_batches(self.pending, self.schema)
            self.pending = []
            # row_group_size: the whole group in one row group, whatever pyarrow's default cap.
            self.writer.write_table(table, row_group_size=table.num_rows)
            self.row_groups += 1

    def close(self) -> None:
        self.end_group()
        self.writer.close()  # with no group written: the schema and 0 rows


class CsvSink:
    """A header line, then each fetch appended as it comes."""

    def __init__(self, path: Path, columns: Sequence[Column]) -> None:
        self.columns = columns
        self.schema = schema(columns, csv=True)
        self.writer = pcsv.CSVWriter(str(path), self.schema)
        self.row_groups = 0

    def write(self, rows: Sequence[Sequence[Any]]) -> None:
        if rows:
            self.writer.write_batch(to_batch(rows, self.columns, self.schema, True))

    def end_group(self) -> None:
        pass  # CSV has no groups

    def close(self) -> None:
        self.writer.close()


FORMATS = ("parquet", "csv")
SUFFIXES = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv"}


def open_sink(fmt: str, path: Path, columns: Sequence[Column]) -> Sink:
    if fmt == "parquet":
        return ParquetSink(path, columns)
    if fmt == "csv":
        return CsvSink(path, columns)
    raise ValueError(f"unknown format {fmt!r} (known: {', '.join(FORMATS)})")
