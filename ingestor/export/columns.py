"""What ``ingestor export`` reads from each table: its columns, with their SQL and types.

This registry is the only source of table and column names in the export's SQL: the
user's ``--table`` picks an entry, never text that reaches the query. Each column carries
its SELECT expression and a kind that says how it is written out.

Stored columns are exported as stored: times as UTC timestamps in milliseconds (every
time the recorder writes is the exchange's or the clock's millisecond), DECIMAL columns
exactly (``numeric::text``, then a decimal128 in Parquet, the text itself in CSV).

``--flatten`` replaces ``payload`` by typed columns of its fields (``PAYLOAD``), pulled
out in PostgreSQL (``(payload->>'p')::float8``): the server reads the payload anyway, a
missing field becomes NULL (Spot diffs carry no ``pu``), and asyncpg's C codecs hand
over floats and lists of floats with no JSON parsing in Python. Binance sends prices and
quantities as decimal strings; flattened they are float64, the type a researcher
computes with (``--no-flatten`` keeps the exact text). ``payload->'b'`` is cast to jsonb
so the same SQL serves ``--payload-type json`` tables.

Book levels (``b``/``a``, ``bids``/``asks``) become four ``list<float64>`` columns,
``bid_prices``, ``bid_qtys``, ``ask_prices``, ``ask_qtys``, in the exchange's order (best
first): polars ``explode``s parallel lists in one call and pandas gets a float64 ndarray
per cell, where ``list<list<float64>>`` gives pandas an object array of arrays and
polars a second level to unpack.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ingestor.feature_spec import FEATURE_COLUMNS

Kind = Literal["text", "int32", "int64", "float64", "bool", "timestamp", "decimal", "float64_list", "json"]

# PostgreSQL's type for each kind of stored column (tests check the registry against the schema).
PG_TYPES: dict[Kind, str] = {
    "text": "text", "int32": "integer", "int64": "bigint", "float64": "double precision", "bool": "boolean",
    "timestamp": "timestamp with time zone", "decimal": "numeric",
}


@dataclass(frozen=True, slots=True)
class Column:
    name: str
    kind: Kind
    sql: str  # the SELECT expression, built in this module only
    stored: bool = True  # a column of the table (False: a field of its payload)


@dataclass(frozen=True, slots=True)
class TableSpec:
    name: str
    time_column: str  # --from/--to apply to it, rows come in its order
    tie_break: tuple[str, ...]  # after the time: a stable order for rows of the same time
    columns: tuple[Column, ...]  # every stored column but payload, in the table's order
    payload: tuple[Column, ...] | None  # the flattened payload fields; None: no payload column
    default_batch_rows: int  # rows per fetch and per Parquet row group, sized by row width
    wildcard_symbol: bool = False  # rows of symbol '*' concern every symbol (stream_gaps)


def _stored(name: str, kind: Kind) -> Column:
    if kind == "timestamp":
        # Milliseconds since the epoch, floored: the exported type is timestamp[ms].
        return Column(name, kind, f"floor(extract(epoch FROM {name}) * 1000)::int8")
    if kind == "decimal":
        return Column(name, kind, f"{name}::text")  # exact: no float on the way
    return Column(name, kind, name)


_CAST = {"float64": "::float8", "int64": "::int8", "bool": "::boolean", "timestamp": "::int8", "text": ""}


def _field(name: str, kind: Kind, *path: str) -> Column:
    """A payload field: ``_field("price", "float64", "o", "p")`` is ``(payload->'o'->>'p')::float8``."""
    head = "".join(f"->'{p}'" for p in path[:-1])
    return Column(name, kind, f"(payload{head}->>'{path[-1]}'){_CAST[kind]}", stored=False)


def _levels(prefix: str, key: str) -> tuple[Column, Column]:
    """The prices and quantities of a side's ``[["price", "qty"], ...]``, in the exchange's order."""
    def part(i: int) -> str:
        return (f"ARRAY(SELECT (lv->>{i})::float8 FROM jsonb_array_elements((payload->'{key}')::jsonb) "
                f"WITH ORDINALITY AS e(lv, n) ORDER BY n)")
    return (Column(f"{prefix}_prices", "float64_list", part(0), stored=False),
            Column(f"{prefix}_qtys", "float64_list", part(1), stored=False))


def _table(name: str, time_column: str, tie_break: tuple[str, ...], columns: tuple[tuple[str, Kind], ...],
           payload: tuple[Column, ...] | None, batch_rows: int, wildcard_symbol: bool = False) -> TableSpec:
    return TableSpec(name, time_column, tie_break, tuple(_stored(n, k) for n, k in columns), payload, batch_rows,
                     wildcard_symbol)


_INT32_FEATURES = {"fp_buy_imb", "fp_sell_imb", "fp_stacked_buy", "fp_stacked_sell", "signal"}
_BOOL_FEATURES = {"bull_div", "bear_div"}


def _feature_kind(name: str) -> Kind:
    if name == "trades":
        return "int64"
    if name in _INT32_FEATURES:
        return "int32"
    if name in _BOOL_FEATURES:
        return "bool"
    return "float64"


# Field names are Binance's (one letter on the streams), with their documented meaning.
TABLES: dict[str, TableSpec] = {t.name: t for t in (
    _table("agg_trades", "event_time", ("market", "symbol", "aggregate_trade_id"),
           # trade_time is T, stored as a column (the table's key, sql/007), not read from the payload.
           (("market", "text"), ("event_time", "timestamp"), ("trade_time", "timestamp"), ("symbol", "text"),
            ("aggregate_trade_id", "int64")),
           (_field("price", "float64", "p"),
            _field("quantity", "float64", "q"),
            _field("first_trade_id", "int64", "f"),
            _field("last_trade_id", "int64", "l"),
            _field("is_buyer_maker", "bool", "m")),  # m: the buyer was the maker, so the taker sold
           100_000),
    _table("depth_updates", "event_time", ("market", "symbol", "final_update_id"),
           (("market", "text"), ("event_time", "timestamp"), ("symbol", "text"), ("first_update_id", "int64"),
            ("final_update_id", "int64")),
           (_field("prev_final_update_id", "int64", "pu"),  # USD-M only: the previous event's u
            _field("transaction_time", "timestamp", "T"),  # USD-M only
            *_levels("bid", "b"), *_levels("ask", "a")),
           10_000),
    _table("mark_prices", "event_time", ("market", "symbol"),
           (("market", "text"), ("event_time", "timestamp"), ("symbol", "text")),
           (_field("mark_price", "float64", "p"),
            _field("index_price", "float64", "i"),
            _field("estimated_settle_price", "float64", "P"),  # only meaningful in the last hour before settlement
            _field("funding_rate", "float64", "r"),
            _field("next_funding_time", "timestamp", "T")),
           100_000),
    # side and quantity (o.S, o.q: the original quantity) are stored columns already.
    _table("force_orders", "event_time", ("market", "symbol", "transaction_time"),
           (("market", "text"), ("event_time", "timestamp"), ("transaction_time", "timestamp"), ("symbol", "text"),
            ("side", "text"), ("quantity", "decimal")),
           (_field("order_type", "text", "o", "o"),
            _field("time_in_force", "text", "o", "f"),
            _field("price", "float64", "o", "p"),
            _field("avg_price", "float64", "o", "ap"),
            _field("filled_qty", "float64", "o", "z"),  # accumulated filled quantity
            _field("last_filled_qty", "float64", "o", "l"),
            _field("status", "text", "o", "X")),
           100_000),
    # The reply is {"openInterest", "symbol", "time"}: every field is a stored column.
    _table("open_interest", "time", ("market", "symbol"),
           (("market", "text"), ("time", "timestamp"), ("symbol", "text"), ("open_interest", "decimal")),
           (), 100_000),
    # 1000-level books (5000 allowed): a row is up to ~160 kB of floats, hence the small batch.
    _table("depth_snapshots", "time", ("market", "symbol"),
           (("market", "text"), ("time", "timestamp"), ("symbol", "text"), ("market_type", "text")),
           (_field("last_update_id", "int64", "lastUpdateId"),
            *_levels("bid", "bids"), *_levels("ask", "asks")),
           200),
    _table("features", "bar_time", ("market", "symbol", "bar_seconds"),
           (("market", "text"), ("symbol", "text"), ("bar_time", "timestamp"), ("bar_seconds", "int32"),
            *((c, _feature_kind(c)) for c in FEATURE_COLUMNS)),
           None, 50_000),
    _table("stream_gaps", "detected_at", ("id",),
           (("id", "int64"), ("market", "text"), ("symbol", "text"), ("stream", "text"), ("from_id", "int64"),
            ("to_id", "int64"), ("from_time", "timestamp"), ("to_time", "timestamp"), ("detected_at", "timestamp"),
            ("closed_how", "text"), ("closed_rows", "int64"), ("closed_at", "timestamp")),
           None, 100_000, wildcard_symbol=True),
    _table("book_syncs", "time", ("market", "symbol", "last_update_id"),
           (("market", "text"), ("time", "timestamp"), ("symbol", "text"), ("snapshot_time", "timestamp"),
            ("last_update_id", "int64"), ("reason", "text"), ("buffered", "int32")),
           None, 100_000),
)}

TABLE_NAMES: tuple[str, ...] = tuple(TABLES)

_PAYLOAD = Column("payload", "json", "payload::text")


def export_columns(spec: TableSpec, flatten: bool) -> tuple[Column, ...]:
    """The columns written for ``spec``: its stored ones, then the payload's fields
    (``flatten``) or the payload as JSON text."""
    if spec.payload is None:
        return spec.columns
    return spec.columns + (spec.payload if flatten else (_PAYLOAD,))


def select_sql(spec: TableSpec, columns: tuple[Column, ...]) -> str:
    """The export query. Parameters: $1/$2 the time range [from, to), $3 the markets,
    $4 the symbols (empty: every symbol)."""
    symbol = "symbol = ANY($4::text[])" + (" OR symbol = '*'" if spec.wildcard_symbol else "")
    return (f"SELECT {', '.join(f'{c.sql} AS {c.name}' for c in columns)} FROM {spec.name} "
            f"WHERE {spec.time_column} >= $1 AND {spec.time_column} < $2 AND market = ANY($3::text[]) "
            f"AND (cardinality($4::text[]) = 0 OR {symbol}) "
            # Qualified: a bare name in ORDER BY would mean the output column of that name (the
            # time as Unix ms), which no index serves.
            f"ORDER BY {', '.join(f'{spec.name}.{c}' for c in (spec.time_column, *spec.tie_break))}")
