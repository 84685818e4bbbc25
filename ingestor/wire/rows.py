"""Binance messages to PostgreSQL binary COPY tuples, as pure functions.

One function per table takes the parsed message (for the fields that become columns)
and the message's own JSON bytes (the payload column: ``jsonb``, or ``json`` under
``--payload-type json``) and returns one encoded tuple. ``TABLES`` names each table's
columns in tuple order; the writer COPYs with exactly these column lists.
"""

from __future__ import annotations

from typing import Any

from ingestor.binance.streams import Market
from ingestor.feature_spec import FEATURE_COLUMNS
from ingestor.wire import copy_binary as cb

TABLES: dict[str, tuple[str, ...]] = {
    # trade_time (T) is in the key: a REST trade has no event time E (sql/007).
    "agg_trades": ("market", "event_time", "trade_time", "symbol", "aggregate_trade_id", "payload"),
    "depth_updates": ("market", "event_time", "symbol", "first_update_id", "final_update_id", "payload"),
    "mark_prices": ("market", "event_time", "symbol", "payload"),
    "force_orders": ("market", "event_time", "transaction_time", "symbol", "side", "quantity", "payload"),
    "open_interest": ("market", "time", "symbol", "open_interest", "payload"),
    "depth_snapshots": ("market", "time", "symbol", "market_type", "payload"),
    "stream_gaps": (
        "market", "symbol", "stream", "from_id", "to_id", "from_time", "to_time", "detected_at", "closed_how",
        "closed_rows", "closed_at",
    ),
    "book_syncs": ("market", "time", "symbol", "snapshot_time", "last_update_id", "reason", "buffered"),
}

# features: the bar's identity, then the indicator columns in ingestor.feature_spec's order.
_FEATURE_INTS = frozenset({"fp_buy_imb", "fp_sell_imb", "fp_stacked_buy", "fp_stacked_sell", "signal"})
_FEATURE_BOOLS = frozenset({"bull_div", "bear_div"})
TABLES["features"] = ("market", "symbol", "bar_time", "bar_seconds", *FEATURE_COLUMNS)

# Each table's time column: the one batches report their event-to-commit lag by.
TIME_COLUMN: dict[str, str] = {t: ("time" if "time" in c else "event_time") for t, c in TABLES.items()}
TIME_COLUMN["stream_gaps"] = "detected_at"
TIME_COLUMN["book_syncs"] = "time"
TIME_COLUMN["features"] = "bar_time"

_HEAD = {t: cb.tuple_header(len(c)) for t, c in TABLES.items()}
MARKET_FIELD: dict[Market, bytes] = {"spot": cb.text("spot"), "futures": cb.text("futures")}

# Symbols repeat on every row; their encoded form is cached (a few thousand at most).
_symbol_cache: dict[str, bytes] = {}


def symbol_field(symbol: str) -> bytes:
    enc = _symbol_cache.get(symbol)
    if enc is None:
        if len(_symbol_cache) > 100_000:  # hostile input must not grow this without bound
            _symbol_cache.clear()
        enc = _symbol_cache[symbol] = cb.text(symbol)
    return enc


def _prefixes(table: str) -> dict[Market, bytes]:
    """Per market, the start of every row of ``table``: its field count and market field."""
    return {m: _HEAD[table] + f for m, f in MARKET_FIELD.items()}


_AGG_PREFIX = _prefixes("agg_trades")
_DEPTH_PREFIX = _prefixes("depth_updates")
_MARK_PREFIX = _prefixes("mark_prices")
_FORCE_PREFIX = _prefixes("force_orders")


# The stream encoders run once per message: each builds its tuple from cached prefixes and
# as few packs as the column order allows, with the payload as it is (the symbol cache is
# read in place: a call less on the hit path). The hot two also come as parts, for a batch
# that joins them once with the rest: no copy of the payload per row.
def agg_trade_parts(market: Market, msg: dict[str, Any], payload: bytes) -> tuple[bytes, ...]:
    """``agg_trade``'s tuple in pieces (``b"".join`` of them is the tuple)."""
    s = msg["s"]
    return (_AGG_PREFIX[market], cb.timestamptz_ms(msg["E"]), cb.timestamptz_ms(msg["T"]),
            _symbol_cache.get(s) or symbol_field(s), cb.int8_payload_head(msg["a"], payload), payload)


def agg_trade(market: Market, msg: dict[str, Any], payload: bytes) -> bytes:
    return b"".join(agg_trade_parts(market, msg, payload))


def depth_update_parts(market: Market, msg: dict[str, Any], payload: bytes) -> tuple[bytes, ...]:
    """``depth_update``'s tuple in pieces (``b"".join`` of them is the tuple)."""
    s = msg["s"]
    return (_DEPTH_PREFIX[market], cb.timestamptz_ms(msg["E"]), _symbol_cache.get(s) or symbol_field(s),
            cb.int8_int8_payload_head(msg["U"], msg["u"], payload), payload)


def depth_update(market: Market, msg: dict[str, Any], payload: bytes) -> bytes:
    return b"".join(depth_update_parts(market, msg, payload))


def mark_price(market: Market, msg: dict[str, Any], payload: bytes) -> bytes:
    s = msg["s"]
    return b"".join((
        _MARK_PREFIX[market], cb.timestamptz_ms(msg["E"]), _symbol_cache.get(s) or symbol_field(s),
        cb.payload_head(payload), payload,
    ))


def force_order(market: Market, msg: dict[str, Any], payload: bytes) -> bytes:
    order = msg["o"]
    return b"".join((
        _FORCE_PREFIX[market], cb.timestamptz_ms(msg["E"]), cb.timestamptz_ms(order["T"]),
        symbol_field(order["s"]), cb.text(order["S"]), cb.numeric(order["q"]),
        cb.payload_head(payload), payload,
    ))


def open_interest(market: Market, msg: dict[str, Any], payload: bytes) -> bytes:
    return b"".join((
        _HEAD["open_interest"], MARKET_FIELD[market], cb.timestamptz_ms(msg["time"]), symbol_field(msg["symbol"]),
        cb.numeric(msg["openInterest"]), cb.payload(payload),
    ))


def depth_snapshot(market: Market, symbol: str, time_ms: int, payload: bytes) -> bytes:
    """A REST depth snapshot. Spot replies carry no time, so ``time_ms`` is the caller's:
    the Futures reply's ``T`` where there is one, else when the reply arrived."""
    return b"".join((
        _HEAD["depth_snapshots"], MARKET_FIELD[market], cb.timestamptz_ms(time_ms), symbol_field(symbol),
        MARKET_FIELD[market], cb.payload(payload),
    ))


def stream_gap(
    market: Market, symbol: str, stream: str, from_id: int | None, to_id: int | None,
    from_ms: int | None, to_ms: int | None, detected_ms: int, closed_how: str = "open",
    closed_ms: int | None = None, closed_rows: int | None = None,
) -> bytes:
    def opt_int(v: int | None) -> bytes:
        return cb.NULL if v is None else cb.int8(v)

    def opt_ts(v: int | None) -> bytes:
        return cb.NULL if v is None else cb.timestamptz_ms(v)

    return b"".join((
        _HEAD["stream_gaps"], MARKET_FIELD[market], symbol_field(symbol), cb.text(stream),
        opt_int(from_id), opt_int(to_id), opt_ts(from_ms), opt_ts(to_ms), cb.timestamptz_ms(detected_ms),
        cb.text(closed_how), opt_int(closed_rows), opt_ts(closed_ms),
    ))


def book_sync(market: Market, symbol: str, time_ms: int, snapshot_time_ms: int, last_update_id: int,
              reason: str, buffered: int) -> bytes:
    """The feature worker built ``symbol``'s book from the snapshot stored at ``snapshot_time_ms``."""
    return b"".join((
        _HEAD["book_syncs"], MARKET_FIELD[market], cb.timestamptz_ms(time_ms), symbol_field(symbol),
        cb.timestamptz_ms(snapshot_time_ms), cb.int8(last_update_id), cb.text(reason), cb.int4(buffered),
    ))


def features(market: Market, symbol: str, bar_start_ms: int, bar_seconds: int, row: dict[str, Any]) -> bytes:
    """One ``features`` row from ``FeatureState.update``'s dict (NaN -> NULL)."""
    parts = [_HEAD["features"], MARKET_FIELD[market], symbol_field(symbol), cb.timestamptz_ms(bar_start_ms),
             cb.int4(bar_seconds)]
    for col in TABLES["features"][4:]:
        v = row[col]
        if col == "trades":
            parts.append(cb.int8(int(v)))
        elif col in _FEATURE_INTS:
            parts.append(cb.int4(int(v)))
        elif col in _FEATURE_BOOLS:
            parts.append(cb.boolean(bool(v)))
        else:
            parts.append(cb.float8(float(v)))
    return b"".join(parts)
