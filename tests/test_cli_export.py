"""``ingestor export`` on both real databases: real Binance captures stored through the
socket worker's encoders (``FrameHandler``, ``rows``) and the writer's COPY path
(``copier.store``), exported to Parquet and CSV, read back (pyarrow, the csv module) and
compared with a SELECT of the same rows: every stored column, the payload as JSON, and each
flattened field against the payload's own value parsed here. The mapping from Binance's
field names in ``FLAT`` below is written out independently of ``ingestor.export.columns``.

The full table x format x flatten matrix runs in-process (``run_export``, what the command
runs); the command itself runs as a subprocess for Parquet (several row groups), CSV (with
a terminal on stderr), the filters and range bounds, an empty range, and each bad input.
"""

from __future__ import annotations

import csv
import functools
import io
import math
import os
import pty
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ingestor.binance.streams import MARKETS, Market
from ingestor.export.job import ExportRequest, run_export
from ingestor.export.progress import Progress, render, time_fraction
from ingestor.export.sinks import OutputError, to_array
from ingestor.feature_spec import FEATURE_COLUMNS
from ingestor.sim.captures import event_type, read_capture
from ingestor.wire import rows
from ingestor.wire.batching import Batch
from ingestor.workers.frames import FrameHandler
from ingestor.writer import copier

from .conftest import DOCS_DATA, REALDATA

HAVE_REALDATA = (REALDATA / "README.md").is_file()
needs_realdata = pytest.mark.skipif(not HAVE_REALDATA, reason=f"real captures not available at {REALDATA}")

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
FAR_MS = 4_102_444_800_000  # 2100-01-01
STREAM_CAPTURES: list[tuple[str, Market]] = [
    ("bmoscon_cryptofeed__sample_data-BINANCE-ee25be.0@29970208", "spot"),  # 1,910 trades, 2,688 diffs, 3 books
    ("bmoscon_cryptofeed__sample_data-BINANCE.ws.1.0", "spot"),
    ("bmoscon_cryptofeed__sample_data-BINANCE_FUTURES.ws.1.0", "futures"),
    ("dannyspk_arbitra-backend__tools-ccxt_out-binance_force_orders_ws.log", "futures"),
]
SNAPSHOT_CAPTURES = ["bmoscon_cryptofeed__sample_data-BINANCE-ee25be.0@29970208",
                     "bmoscon_cryptofeed__sample_data-BINANCE.http.0.0",
                     "bmoscon_cryptofeed__sample_data-BINANCE_FUTURES.http.0.0"]
PREMIUM_INDEX = "danghungithp_funding-rate-binance-bot__premiumIndex.json"
OPEN_INTEREST = [REALDATA / "Zews123_OpenInteres__openInterest.json",
                 DOCS_DATA / "http_futures_market_open_interest.json"]
T_GAP = 1_717_514_000_000
FEATURE_KEYS: list[tuple[Market, str]] = [("spot", "BTCUSDT"), ("futures", "ETHUSDT")]

# What makes the order of each table's rows, and which columns are NUMERIC (compared as text).
ORDER = {
    "agg_trades": "event_time, market, symbol, aggregate_trade_id",
    "depth_updates": "event_time, market, symbol, final_update_id",
    "mark_prices": "event_time, market, symbol",
    "force_orders": "event_time, market, symbol, transaction_time",
    "open_interest": "time, market, symbol",
    "depth_snapshots": "time, market, symbol",
    "features": "bar_time, market, symbol, bar_seconds",
    "stream_gaps": "detected_at, id",
    "book_syncs": "time, market, symbol, last_update_id",
}
NUMERIC = {"force_orders": {"quantity"}, "open_interest": {"open_interest"}}
TIME_COLUMN = {"open_interest": "time", "depth_snapshots": "time", "features": "bar_time",
               "stream_gaps": "detected_at", "book_syncs": "time"}  # else event_time


def ms(value: int) -> datetime:
    return EPOCH + timedelta(milliseconds=value)


def book(bids: list[list[str]], asks: list[list[str]]) -> dict[str, list[float]]:
    return {"bid_prices": [float(p) for p, _ in bids], "bid_qtys": [float(q) for _, q in bids],
            "ask_prices": [float(p) for p, _ in asks], "ask_qtys": [float(q) for _, q in asks]}


# Binance's documented fields, one letter on the streams, per flattened column.
FLAT: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "agg_trades": lambda p: {"price": float(p["p"]), "quantity": float(p["q"]), "first_trade_id": p["f"],
                             "last_trade_id": p["l"], "trade_time": ms(p["T"]), "is_buyer_maker": p["m"]},
    "depth_updates": lambda p: {"prev_final_update_id": p.get("pu"),
                                "transaction_time": ms(p["T"]) if "T" in p else None, **book(p["b"], p["a"])},
    "mark_prices": lambda p: {"mark_price": float(p["p"]), "index_price": float(p["i"]),
                              "estimated_settle_price": float(p["P"]), "funding_rate": float(p["r"]),
                              "next_funding_time": ms(p["T"])},
    "force_orders": lambda p: {"order_type": p["o"]["o"], "time_in_force": p["o"]["f"], "price": float(p["o"]["p"]),
                               "avg_price": float(p["o"]["ap"]), "filled_qty": float(p["o"]["z"]),
                               "last_filled_qty": float(p["o"]["l"]), "status": p["o"]["X"]},
    "open_interest": lambda p: {},
    "depth_snapshots": lambda p: {"last_update_id": p["lastUpdateId"], **book(p["bids"], p["asks"])},
}
TS = pa.timestamp("ms", tz="UTC")
EXACT = pa.decimal128(38, 18)
STORED_TYPES = {"force_orders": {"side": pa.string(), "quantity": EXACT}, "open_interest": {"open_interest": EXACT}}
FLOATS = pa.list_(pa.float64())
FLAT_TYPES: dict[str, dict[str, pa.DataType]] = {
    "agg_trades": {"price": pa.float64(), "quantity": pa.float64(), "first_trade_id": pa.int64(),
                   "last_trade_id": pa.int64(), "trade_time": TS, "is_buyer_maker": pa.bool_()},
    "depth_updates": {"prev_final_update_id": pa.int64(), "transaction_time": TS, "bid_prices": FLOATS,
                      "bid_qtys": FLOATS, "ask_prices": FLOATS, "ask_qtys": FLOATS},
    "mark_prices": {"mark_price": pa.float64(), "index_price": pa.float64(), "estimated_settle_price": pa.float64(),
                    "funding_rate": pa.float64(), "next_funding_time": TS},
    "force_orders": {"order_type": pa.string(), "time_in_force": pa.string(), "price": pa.float64(),
                     "avg_price": pa.float64(), "filled_qty": pa.float64(), "last_filled_qty": pa.float64(),
                     "status": pa.string()},
    "open_interest": {},
    "depth_snapshots": {"last_update_id": pa.int64(), "bid_prices": FLOATS, "bid_qtys": FLOATS,
                        "ask_prices": FLOATS, "ask_qtys": FLOATS},
}


# ---------------------------------------------------------------------- storing real rows


def envelope(stream: str, data: bytes) -> bytes:
    return b'{"stream":"' + stream.encode() + b'","data":' + data + b"}"


@functools.cache
def encoded() -> tuple[tuple[str, int, bytes, str], ...]:
    """(table, rows, COPY data, kind) of every capture, as the socket and REST workers encode them."""
    batches: list[Batch] = []
    for name, market in STREAM_CAPTURES:
        handler = FrameHandler(market, batches.append)
        for frame in read_capture(REALDATA / name).frames:
            if event_type(frame) in ("aggTrade", "depthUpdate", "forceOrder"):
                if frame.stream is not None:
                    handler.on_frame(envelope(frame.stream, frame.data))
                else:
                    handler.on_payload(frame.data)
        handler.flush(force=True)
    # The all-market mark price array, with the real premiumIndex reply's values.
    (body,) = [b for e, b in read_capture(REALDATA / PREMIUM_INDEX).rest_bodies if e.endswith("/premiumIndex")]
    items = [{"e": "markPriceUpdate", "E": x["time"], "s": x["symbol"], "p": x["markPrice"], "i": x["indexPrice"],
              "P": x["estimatedSettlePrice"], "r": x["lastFundingRate"], "T": x["nextFundingTime"]}
             for x in orjson.loads(body)[:200]]
    handler = FrameHandler("futures", batches.append)
    handler.on_frame(envelope("!markPrice@arr", orjson.dumps(items)))
    handler.flush(force=True)
    out = [(b.table, b.rows, b.data, b.kind) for b in batches]
    # A trade backfilled over REST: the aggTrades item plus "s", stored under its T (no E).
    for item in orjson.loads((DOCS_DATA / "http_futures_market_agg_trades.json").read_bytes()):
        item["s"] = "BTCUSDT"
        fields = {"E": item["T"], "T": item["T"], "s": "BTCUSDT", "a": item["a"]}
        out.append(("agg_trades", 1, rows.agg_trade("futures", fields, orjson.dumps(item)), "rows"))

    snaps = [s for name in SNAPSHOT_CAPTURES for s in read_capture(REALDATA / name).snapshots]
    for s in snaps:
        reply = orjson.loads(s.body)
        out.append(("depth_snapshots", 1, rows.depth_snapshot(s.market, s.symbol, reply.get("T", s.recv_ns // 10**6),
                                                              s.body), "rows"))
    for path in OPEN_INTEREST:
        raw = path.read_bytes()
        out.append(("open_interest", 1, rows.open_interest("futures", orjson.loads(raw), raw), "rows"))
    gaps = [
        rows.stream_gap("spot", "BTCUSDT", "aggTrade", 11, 20, T_GAP, T_GAP + 9, T_GAP + 10, "backfilled",
                        T_GAP + 30, 10),
        rows.stream_gap("spot", "ETHUSDT", "depth", 5, 9, T_GAP + 1, T_GAP + 2, T_GAP + 20),
        rows.stream_gap("futures", "*", "markPrice", None, None, T_GAP + 3, T_GAP + 8, T_GAP + 40, "unrecoverable",
                        T_GAP + 40, 0),
    ]
    out += [("stream_gaps", 1, g, "close" if b"backfilled" in g or b"unrecoverable" in g else "rows") for g in gaps]
    syncs = [rows.book_sync(s.market, s.symbol, T_GAP + i, T_GAP + i - 1, orjson.loads(s.body)["lastUpdateId"],
                            ("start", "gap", "drift")[i % 3], i) for i, s in enumerate(snaps)]
    out.append(("book_syncs", len(syncs), b"".join(syncs), "rows"))
    out.append(("features", 6, b"".join(rows.features(m, sym, T_GAP + k * 60_000, 60, feature_row(k))
                                        for k in range(3) for m, sym in FEATURE_KEYS),
                "rows"))
    return tuple(out)


def feature_row(k: int) -> dict[str, Any]:
    """A features row with every kind of value, NaN (NULL) included."""
    out: dict[str, Any] = {}
    for i, col in enumerate(FEATURE_COLUMNS):
        if col in ("bull_div", "bear_div"):
            out[col] = (i + k) % 2 == 0
        elif col in ("trades", "fp_buy_imb", "fp_sell_imb", "fp_stacked_buy", "fp_stacked_sell", "signal"):
            out[col] = i * (k + 1) - 3
        else:
            out[col] = math.nan if (i + k) % 7 == 0 else i * 1.25 + k / 3
    return out


async def store_everything(dsn: str) -> None:
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        for table, n, data, kind in encoded():
            result = await copier.store(conn, table, data, n, kind)
            assert result.rejected == 0, table
    finally:
        await conn.close()


# ---------------------------------------------------------------------- the oracle


async def stored(dsn: str, table: str, where: str = "TRUE", *args: Any) -> list[dict[str, Any]]:
    """The table's rows as asyncpg reads them (payload as its JSON text, NUMERIC also as text)."""
    extra = "".join(f", {c}::text AS {c}_text" for c in NUMERIC.get(table, ()))
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        got = await conn.fetch(f"SELECT *{extra} FROM {table} WHERE {where} ORDER BY {ORDER[table]}", *args)
    finally:
        await conn.close()
    return [dict(r) for r in got]


def expected(table: str, row: dict[str, Any], flatten: bool) -> dict[str, Any]:
    """The exported row for a stored one: its columns, then the payload's fields or its JSON."""
    out = {k: v for k, v in row.items() if k != "payload" and not k.endswith("_text")}
    if "payload" in row:
        if flatten:
            out.update(FLAT[table](orjson.loads(row["payload"])))
        else:
            out["payload"] = orjson.loads(row["payload"])
    return out


def read_parquet(path: Path) -> list[dict[str, Any]]:
    got = pq.read_table(path).to_pylist()
    for r in got:
        if "payload" in r:
            r["payload"] = orjson.loads(r["payload"])
    return got


def csv_value(text: str, like: Any) -> Any:
    """A CSV cell read back as the type of the value it should equal."""
    if like is None:
        return None if text == "" else text
    if isinstance(like, bool):
        return {"true": True, "false": False}[text]
    if isinstance(like, datetime):
        return datetime.fromisoformat(text)
    if isinstance(like, Decimal):
        return Decimal(text)
    if isinstance(like, int):
        return int(text)
    if isinstance(like, float):
        return float(text)
    if isinstance(like, (list, dict)):
        return orjson.loads(text)
    return text


def assert_exported(path: Path, fmt: str, table: str, want_rows: list[dict[str, Any]], flatten: bool) -> None:
    want = [expected(table, r, flatten) for r in want_rows]
    if fmt == "parquet":
        got = read_parquet(path)
        schema = pq.read_schema(path)
        types = {**STORED_TYPES.get(table, {}), **(FLAT_TYPES.get(table, {}) if flatten else {})}
        for name, typ in types.items():
            assert schema.field(name).type == typ, (table, name)
        assert schema.field(TIME_COLUMN.get(table, "event_time")).type == TS
    else:
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            header = list(reader.fieldnames or [])
            texts = list(reader)
        assert header == (list(want[0]) if want else header)
        assert len(texts) == len(want), table
        got = [{k: csv_value(t[k], w[k]) for k in t} for t, w in zip(texts, want, strict=True)]
        # DECIMAL columns are the stored text, character for character.
        for t, r in zip(texts, want_rows, strict=True):
            for c in NUMERIC.get(table, ()):
                assert t[c] == r[c + "_text"]
    assert len(got) == len(want), table
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert list(g) == list(w), (table, i)  # the same columns, in order
        assert g == w, (table, fmt, flatten, i, {k: (g[k], w[k]) for k in w if g[k] != w[k]})


def quiet() -> Progress:
    return Progress(io.StringIO(), False, "test")


# ---------------------------------------------------------------------- in-process: the matrix


@needs_realdata
async def test_every_table_exports_exactly_what_is_stored(db_dsn: str, tmp_path: Path) -> None:
    await store_everything(db_dsn)
    for table in ORDER:
        want = await stored(db_dsn, table)
        assert len(want) >= 2, table
        for flatten in (True, False) if table in FLAT else (True,):
            for fmt in ("parquet", "csv"):
                out = tmp_path / f"{table}-{flatten}.{fmt}"
                result = await run_export(db_dsn, ExportRequest(table, 0, FAR_MS, MARKETS, (), fmt, out, flatten),
                                          quiet())
                assert result.rows == len(want) and result.bytes == out.stat().st_size
                assert_exported(out, fmt, table, want, flatten)
                assert not list(tmp_path.glob("*.part"))


@needs_realdata
async def test_payloads_stored_as_json_text_export_the_same(db_dsn: str, tmp_path: Path) -> None:
    """--payload-type json tables (json, not jsonb) go through the same SQL."""
    await store_everything(db_dsn)
    conn = await asyncpg.connect(db_dsn, timeout=10)
    try:
        for table in ("agg_trades", "depth_updates", "depth_snapshots", "force_orders"):
            await conn.execute(f"ALTER TABLE {table} ALTER COLUMN payload TYPE json USING payload::json")
            assert await conn.fetchval("SELECT format_type(atttypid, atttypmod) FROM pg_attribute "
                                       "WHERE attrelid = $1::regclass AND attname = 'payload'", table) == "json"
    finally:
        await conn.close()
    for table in ("agg_trades", "depth_updates", "depth_snapshots", "force_orders"):
        want = await stored(db_dsn, table)
        for flatten in (True, False):
            out = tmp_path / f"{table}-{flatten}.parquet"
            await run_export(db_dsn, ExportRequest(table, 0, FAR_MS, MARKETS, (), "parquet", out, flatten), quiet())
            assert_exported(out, "parquet", table, want, flatten)


@needs_realdata
async def test_a_symbol_filter_keeps_the_gaps_of_every_symbol(db_dsn: str, tmp_path: Path) -> None:
    await store_everything(db_dsn)
    out = tmp_path / "gaps.csv"
    await run_export(db_dsn, ExportRequest("stream_gaps", 0, FAR_MS, MARKETS, ("BTCUSDT",), "csv", out), quiet())
    want = await stored(db_dsn, "stream_gaps", "symbol IN ('BTCUSDT', '*')")
    assert {r["symbol"] for r in want} == {"BTCUSDT", "*"}
    assert_exported(out, "csv", "stream_gaps", want, True)


@needs_realdata
async def test_the_registry_holds_every_stored_column_with_its_type(db_dsn: str) -> None:
    from ingestor.export.columns import PG_TYPES, TABLES

    conn = await asyncpg.connect(db_dsn, timeout=10)
    try:
        for name, spec in TABLES.items():
            cols = await conn.fetch("SELECT column_name, data_type FROM information_schema.columns "
                                    "WHERE table_name = $1 ORDER BY ordinal_position", name)
            have = [(r["column_name"], r["data_type"]) for r in cols if r["column_name"] != "payload"]
            assert have == [(c.name, PG_TYPES[c.kind]) for c in spec.columns], name
            assert (spec.payload is not None) == any(r["column_name"] == "payload" for r in cols), name
    finally:
        await conn.close()
    assert set(TABLES) == set(ORDER)


# ---------------------------------------------------------------------- the command


def ingestor(*args: str, cwd: Path, stderr: int | None = None) -> subprocess.CompletedProcess[str]:
    # cwd: no .env of the checkout's; the environment's INGESTOR_TEST_* are allowed.
    return subprocess.run([sys.executable, "-m", "ingestor.cli", *args], cwd=cwd, text=True, timeout=120,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE if stderr is None else stderr)


@needs_realdata
async def test_command_writes_parquet_in_row_groups_and_csv_with_a_bar(db_dsn: str, tmp_path: Path) -> None:
    await store_everything(db_dsn)
    trades = await stored(db_dsn, "agg_trades")
    out = tmp_path / "trades.parquet"
    run = ingestor("export", "--dsn", db_dsn, "--table", "agg_trades", "--from", "0", "--out", str(out),
                   "--batch-rows", "500", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert f"exported {len(trades):,} agg_trades rows to {out} ({out.stat().st_size:,} bytes" in run.stdout
    assert "\r" not in run.stderr  # not a terminal: no bar
    meta = pq.ParquetFile(out).metadata
    sizes = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
    assert len(trades) > 2000 and sizes == [500] * (len(trades) // 500) + [len(trades) % 500]
    assert_exported(out, "parquet", "agg_trades", trades, True)

    diffs = await stored(db_dsn, "depth_updates")
    out = tmp_path / "diffs.csv"
    main, child = pty.openpty()
    try:
        run = ingestor("export", "--dsn", db_dsn, "--table", "depth_updates", "--from", "2000-01-01", "--out",
                       str(out), cwd=tmp_path, stderr=child)
        os.close(child)
        bar = b""
        while True:
            try:
                chunk = os.read(main, 65536)
            except OSError:  # EIO: the child's side is closed and everything read
                break
            if not chunk:
                break
            bar += chunk
    finally:
        os.close(main)
    assert run.returncode == 0, bar
    assert b"\r" in bar and b"100%" in bar and f"{len(diffs):,} rows".encode() in bar
    assert f"exported {len(diffs):,} depth_updates rows" in run.stdout
    assert_exported(out, "csv", "depth_updates", diffs, True)


@needs_realdata
async def test_command_filters_by_market_symbol_and_half_open_range(db_dsn: str, tmp_path: Path) -> None:
    await store_everything(db_dsn)
    trades = await stored(db_dsn, "agg_trades")
    futures = [r for r in trades if r["market"] == "futures"]
    out = tmp_path / "futures.parquet"
    run = ingestor("export", "--dsn", db_dsn, "--table", "agg_trades", "--market", "futures", "--from", "0",
                   "--out", str(out), cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert 0 < len(futures) < len(trades)
    assert_exported(out, "parquet", "agg_trades", futures, True)

    spot = [r for r in trades if r["market"] == "spot"]
    lo, hi = spot[len(spot) // 4]["event_time"], spot[3 * len(spot) // 4]["event_time"]
    want = [r for r in spot if r["symbol"] in ("BTCUSDT", "ETHUSDT") and lo <= r["event_time"] < hi]
    # The bounds matter: rows at `lo` are in, rows at `hi` are out; DOTUSDT's are left out.
    assert any(r["event_time"] == lo for r in want)
    assert any(r["event_time"] == hi and r["symbol"] in ("BTCUSDT", "ETHUSDT") for r in spot)
    assert any(r["symbol"] == "DOTUSDT" and lo <= r["event_time"] < hi for r in spot)
    out = tmp_path / "some.data"
    run = ingestor("export", "--dsn", db_dsn, "--table", "agg_trades", "--market", "spot", "--symbols",
                   "btcusdt, ETHUSDT", "--from", lo.isoformat(), "--to", str(int(hi.timestamp() * 1000)),
                   "--format", "csv", "--no-flatten", "--out", str(out), cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert 0 < len(want) < len(spot)
    assert_exported(out, "csv", "agg_trades", want, False)


@needs_realdata
async def test_an_empty_range_gives_the_schema_and_no_rows(db_dsn: str, tmp_path: Path) -> None:
    await store_everything(db_dsn)
    out = tmp_path / "none.parquet"
    run = ingestor("export", "--dsn", db_dsn, "--table", "mark_prices", "--from", "2000-01-01", "--to",
                   "2000-01-02", "--out", str(out), cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "exported 0 mark_prices rows" in run.stdout
    table = pq.read_table(out)
    assert table.num_rows == 0
    assert table.schema.names == ["market", "event_time", "symbol", *FLAT_TYPES["mark_prices"]]
    assert [table.schema.field(n).type for n in FLAT_TYPES["mark_prices"]] == list(FLAT_TYPES["mark_prices"].values())
    csv_out = tmp_path / "none.csv"
    await run_export(db_dsn, ExportRequest("force_orders", 0, 1, MARKETS, (), "csv", csv_out), quiet())
    assert csv_out.read_text().splitlines() == [",".join(f'"{c}"' for c in [
        "market", "event_time", "transaction_time", "symbol", "side", "quantity", "order_type", "time_in_force",
        "price", "avg_price", "filled_qty", "last_filled_qty", "status"])]


@pytest.mark.parametrize(("args", "code", "says"), [
    (["--table", "trades", "--from", "-1h", "--out", "x.parquet"], 2,
     "'trades' is not one of 'agg_trades', 'depth_updates', 'mark_prices', 'force_orders', 'open_interest', "
     "'depth_snapshots', 'features', 'stream_gaps', 'book_syncs'"),
    (["--table", "agg_trades", "--from", "-1h", "--to", "-2h", "--out", "x.parquet"], 2, "--from"),
    (["--table", "agg_trades", "--from", "-1h", "--format", "xlsx", "--out", "x.parquet"], 2,
     "'xlsx' is not one of 'parquet', 'csv'"),
    (["--table", "agg_trades", "--from", "-1h", "--out", "x.xlsx"], 2, "give --format"),
    (["--table", "agg_trades", "--from", "-1h", "--out", "afile/x.parquet"], 2, "cannot write afile/x.parquet"),
    (["--table", "agg_trades", "--from", "-1h", "--out", "."], 2, "is a directory"),
    (["--table", "agg_trades", "--from", "-1h", "--symbols", "BTC-USDT", "--out", "x.csv"], 2, "not a symbol"),
    (["--table", "agg_trades", "--from", "yesterday", "--out", "x.csv"], 2, "not a time"),
    (["--table", "agg_trades", "--from", "-1h", "--out", "x.csv", "--dsn",
      "postgresql://exporter:s3cret@127.0.0.1:1/nothing"], 1,
     "cannot connect to the database postgresql://exporter:***@127.0.0.1:1/nothing"),
])
def test_bad_input_is_a_one_line_error(tmp_path: Path, args: list[str], code: int, says: str) -> None:
    (tmp_path / "afile").write_text("a file, not a directory")
    run = ingestor("export", *args, cwd=tmp_path)
    assert run.returncode == code, run.stderr
    assert says in " ".join(run.stderr.split()), run.stderr  # click may wrap a usage error's lines
    assert "Traceback" not in run.stderr and "s3cret" not in run.stderr
    if code == 1:
        assert len(run.stderr.strip().splitlines()) == 1, run.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]  # nothing written


# ---------------------------------------------------------------------- pure parts


def test_a_decimal_is_exact_or_refused() -> None:
    assert to_array(["80579.225", "0.00100000", None], "decimal").to_pylist() == [
        Decimal("80579.225"), Decimal("0.001"), None]
    assert to_array(["0.00100000"], "decimal", csv=True).to_pylist() == ["0.00100000"]  # CSV: the stored text
    with pytest.raises(OutputError, match="decimal128"):
        to_array(["1.0000000000000000001"], "decimal")


def test_progress_is_a_share_of_the_time_range() -> None:
    assert time_fraction(1000, 1000, 2000) == 0.0
    assert time_fraction(1000, 1500, 2000) == 0.5
    assert time_fraction(1000, 2500, 2000) == 1.0  # clamped
    assert time_fraction(1000, 900, 1000) == 1.0  # empty span
    assert render(1500, 0.5, 0.5, bar=True, width=10) == "[#####.....]  50%  1,500 rows, 3,000 rows/s"
    assert render(1500, 0.5, 0.25, bar=False) == "1,500 rows, 3,000 rows/s, 25% of the time range"
    clock = iter([0.0, 1.0, 1.1, 7.0, 8.0]).__next__
    out = io.StringIO()
    p = Progress(out, False, "export x", clock=clock)  # 0.0
    p.start()  # 1.0
    p.update(10, 0.1)  # 1.1: too soon for a line
    p.update(20, 0.2)  # 7.0: a line
    assert p.finish() == 7.0 and out.getvalue() == "export x: 20 rows, 3 rows/s, 20% of the time range\n"
