"""Sizing: what the recorder's tables take on disk, per row and per day (issue 7).

Three parts, each stated as measured or extrapolated in the report:

(a) *Measured, real payloads.* Rows built from the real Binance captures of
    ``../shared/realdata`` with the project's own encoders (``ingestor.wire.rows``), COPYed
    through the writer's path (``copier.copy_rows``) into a fresh database migrated by
    ``ingestor.db.migrate`` (TimescaleDB there: hypertables), once with ``jsonb`` payloads and
    once with ``json``. One kind is a (table, market): e.g. Spot ``agg_trades`` from the 1,910
    real Spot aggTrades of the 2021 cryptofeed capture, USD-M ``depth_updates`` from the real
    2024 BTCUSDT ``@depth@0ms`` diffs merged into 500 ms windows (what the ingestor's default
    ``@depth@500ms`` carries; ``merge_diffs``). The real messages are cycled to the row count,
    each row given its own event time (all inside one chunk) and one of ``SYMBOLS`` in turn,
    so the rows of several symbols interleave as a live feed's do (which is what makes a
    btree's pages split half full); the payload is the message re-serialised by orjson, byte
    for byte the exchange's compact JSON apart from the time and symbol fields rewritten.
    Each kind goes in in two halves with ``VACUUM ANALYZE`` and a size reading after each;
    bytes per row is the second half's growth over its rows: the marginal cost, without the
    fixed pages of a new chunk and its indexes (the average with them is in the note).
    Sizes: ``hypertable_detailed_size`` (heap, indexes, TOAST) with TimescaleDB, else
    ``pg_total_relation_size``; WAL: ``pg_current_wal_lsn`` around the second half's COPYs
    (server-wide, so anything else writing on the server at the time is in it).
(b) *Measured, the real pipeline.* ``ingestor simulate`` + ``ingestor run`` as processes
    (``benchmarks.pipeline``'s machinery: its simulator and ingestor command lines,
    ``wait_connected``, ``finish``, which pauses the simulator, waits for the rows and checks
    nothing was lost) for a few seconds at a low rate, 40 symbols a market, 1 s feature bars;
    every table's size (after ``VACUUM ANALYZE``) a third of the way in and again after
    SIGTERM (everything received is committed); bytes per row is the growth between the two
    over the rows added, as in (a). The simulator's payloads are shaped like Binance's but not
    real; this part checks (a) against what ``ingestor run`` itself builds, and gives the
    features table's figure. Tables that got few rows (snapshots, open interest, book_syncs)
    get none.
(c) *Extrapolated.* Rows per day per symbol from real message rates (``symbol_rates``):
    aggTrades per second from the 2024-08-08 BTCUSDT ``@trade`` captures (trades of one
    taker order at one price counted once: ``count_agg_trades``), diffs fixed by the stream
    speed (10/s at 100 ms, 2/s at 500 ms), one mark price a second, a snapshot every
    ``--snapshot-interval-s``, open interest every ``--open-interest-interval-s``, a feature
    row per bar; times (a)'s bytes per row (features: (b)'s). Summed for symbol sets
    (``SETS``), every symbol at BTCUSDT's rates and sizes: for any set but BTCUSDT alone
    that is an upper bound.

``python -m benchmarks sizing [--quick] [--seconds S]``; quick about 30 s (not in ``all``).
"""

from __future__ import annotations

import asyncio
import functools
import os
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
import asyncpg
import orjson

from benchmarks import pipeline
from benchmarks.book import REALDATA
from benchmarks.copy_ceiling import fresh_database
from benchmarks.procs import PG_ROOT, Service
from benchmarks.report import metric
from ingestor.binance.streams import Market
from ingestor.config import Settings
from ingestor.db.migrate import capabilities, ensure_payload_type
from ingestor.wire import copy_binary as cb
from ingestor.wire import rows as R
from ingestor.writer.copier import copy_rows

SECONDS_PER_DAY = 86_400
MB = 1_000_000
GB = 1_000_000_000
PAYLOAD_TYPES = ("jsonb", "json")
# Rows of several symbols interleave in a live feed; names of a usual length.
SYMBOLS = ("BTCUSDT", "ETHUSDT", "BNBUSDT", "SOLUSDT", "XRPUSDT", "DOGEUSDT", "ADAUSDT", "LTCUSDT", "LINKUSDT",
           "AVAXUSDT")
# 2024-08-09 00:00 UTC: on an hour (and day) boundary, so every kind's rows, spread over
# SPAN_MS after it, share one chunk of every table.
T0_MS = 1_723_161_600_000
SPAN_MS = 50 * 60 * 1000
COPY_ROWS = 5000  # the writer's default --batch-rows
COPY_BYTES = 4 * 1024 * 1024  # under the writer's MAX_COPY_BYTES: 1000-level snapshots are ~60 KB each
DATA_TABLES = ("agg_trades", "depth_updates", "mark_prices", "force_orders", "open_interest", "depth_snapshots")
ALL_TABLES = (*DATA_TABLES, "features", "book_syncs", "symbol_info", "stream_gaps")
FEW_ROWS = 1000  # below this a table's size is mostly the fixed pages of its chunk and indexes

# The captures (``../shared/realdata``) each kind's payloads come from.
HFT_SPOT = "nkaz001_hftbacktest__examples-spot-btcusdt_20240808.gz"
HFT_USDM = "nkaz001_hftbacktest__examples-usdm-btcusdt_20240808.gz"
CF_SPOT_2021 = "bmoscon_cryptofeed__sample_data-BINANCE-ee25be.0@29970208"
CF_FUTURES = "bmoscon_cryptofeed__sample_data-BINANCE_FUTURES.ws.1.0"
PREMIUM_INDEX = "danghungithp_funding-rate-binance-bot__premiumIndex.json"
FORCE_LOG = "dannyspk_arbitra-backend__tools-ccxt_out-binance_force_orders_ws.log"
OPEN_INTEREST = "Zews123_OpenInteres__openInterest.json"
BIG_BOOKS = ("BTCUSDT", "ETHUSDT")  # snapshots: the deep books the symbol sets are about

# (b): the pipeline's load. A low rate: sizes do not depend on it, and the host is shared.
PIPELINE_RATE = 5000.0
# Many symbols: the features table gets a row per symbol and market a second (1 s bars),
# enough for its growth to be read in pages of 8 KB.
PIPELINE_SYMBOLS = 40
MARGINAL_ROWS = 300


# ---- pure parts: rates and the per-day arithmetic ------------------------------------------


def count_agg_trades(trades: Sequence[Mapping[str, Any]]) -> int:
    """How many aggTrades a ``@trade`` stream's trades (in stream order) make.

    An aggTrade is the fills of one taker order at one price. The trade stream carries no
    order ids, so a taker order is recognised by what its fills share: the trade time ``T``
    and the taker's side ``m``; a run of consecutive trades with the same ``(T, m, p)`` is
    counted once."""
    count, prev = 0, None
    for t in trades:
        key = (t["T"], t["m"], t["p"])
        if key != prev:
            count += 1
        prev = key
    return count


def merge_diffs(diffs: Sequence[Mapping[str, Any]], window_ms: int) -> list[dict[str, Any]]:
    """Consecutive diff-depth events merged per ``window_ms`` of event time, as the same
    book's slower stream sends them: ``U`` and ``pu`` of the window's first event, ``E``,
    ``T`` and ``u`` of its last, each price level changed in the window once, with its last
    quantity. Keys stay in the exchange's order (the payload's size is the point)."""
    out: list[dict[str, Any]] = []
    group: list[Mapping[str, Any]] = []

    def flush() -> None:
        first, last = group[0], group[-1]
        sides: dict[str, dict[str, str]] = {"b": {}, "a": {}}
        for d in group:
            for side, levels in sides.items():
                for price, qty in d[side]:
                    levels[price] = qty
        merged = dict(first)
        for key in ("E", "T", "u"):
            if key in last:
                merged[key] = last[key]
        for side, levels in sides.items():
            merged[side] = [[p, q] for p, q in levels.items()]
        out.append(merged)

    for d in diffs:
        if group and d["E"] // window_ms != group[0]["E"] // window_ms:
            flush()
            group = []
        group.append(d)
    if group:
        flush()
    return out


def speed_ms(speed: str) -> int:
    """``100ms`` -> 100."""
    if not speed.endswith("ms"):
        raise ValueError(f"a depth speed looks like 100ms, not {speed!r}")
    return int(speed[:-2])


def symbol_rates(agg_trades_per_s: Mapping[str, float], settings: Settings, bar_seconds: int,
                 features: bool = True) -> dict[str, float]:
    """Rows per second that one symbol adds to each ``table/market``, recorded on both markets
    with ``settings``: aggTrades as given (measured), everything else fixed by the settings.
    Diffs assume the book changed in every interval (a busy symbol's does); REST replies,
    mark prices and feature bars come on a clock whatever the market does."""
    rates: dict[str, float] = {}
    for market, speed in (("spot", settings.spot_depth_speed), ("futures", settings.futures_depth_speed)):
        rates[f"agg_trades/{market}"] = agg_trades_per_s[market]
        rates[f"depth_updates/{market}"] = 1000 / speed_ms(speed)
        if settings.snapshot_interval_s > 0:
            rates[f"depth_snapshots/{market}"] = 1 / settings.snapshot_interval_s
        if features:
            rates[f"features/{market}"] = 1 / bar_seconds
    rates["mark_prices/futures"] = 1.0  # !markPrice@arr@1s: one element per symbol a second
    if settings.open_interest_interval_s > 0:
        rates["open_interest/futures"] = 1 / settings.open_interest_interval_s
    return rates


def per_day(rows_per_s: Mapping[str, float], bytes_per_row: Mapping[str, float | None],
            symbols: int = 1) -> dict[str, dict[str, float | None]]:
    """Rows and bytes a day per key for ``symbols`` symbols at the same rates (bytes None
    where the key has no bytes-per-row figure)."""
    out: dict[str, dict[str, float | None]] = {}
    for key, rate in rows_per_s.items():
        rows = rate * SECONDS_PER_DAY * symbols
        size = bytes_per_row.get(key)
        out[key] = {"rows": rows, "bytes": None if size is None else rows * size}
    return out


def day_total(day: Mapping[str, Mapping[str, float | None]], markets: Sequence[str]) -> float:
    """Bytes a day over the keys of ``markets`` that have a size."""
    return sum(v["bytes"] or 0.0 for k, v in day.items() if k.split("/")[1] in markets)


@dataclass(frozen=True)
class SymbolSet:
    label: str
    symbols: int
    markets: tuple[str, ...]


SETS = (
    SymbolSet("BTCUSDT, both markets", 1, ("spot", "futures")),
    SymbolSet("BTCUSDT + ETHUSDT, both markets", 2, ("spot", "futures")),
    SymbolSet("top 50 USD-M symbols, futures only", 50, ("futures",)),
    SymbolSet("top 50 symbols, both markets", 50, ("spot", "futures")),
)


# ---- the real payloads -------------------------------------------------------------------


@dataclass(frozen=True)
class Kind:
    table: str
    market: Market
    origin: str  # where the payloads come from, for the report
    messages: tuple[Any, ...]  # parsed events / REST replies; snapshots: the raw bodies
    quick_rows: int

    @property
    def key(self) -> str:
        return f"{self.table}/{self.market}"


def _events(cap: Any, kind: str) -> list[dict[str, Any]]:
    needle = f'"e":"{kind}"'.encode()
    return [orjson.loads(f.data) for f in cap.frames if needle in f.data[:40]]


@functools.lru_cache(maxsize=1)
def real_inputs() -> dict[str, Any]:
    """The kinds of (a) and the measured rates of (c), from the captures (read once)."""
    from ingestor.sim.captures import read_capture

    caps = {name: read_capture(REALDATA / name) for name in (HFT_SPOT, HFT_USDM, CF_SPOT_2021, CF_FUTURES)}
    spot_diffs = _events(caps[HFT_SPOT], "depthUpdate")
    usdm_diffs = _events(caps[HFT_USDM], "depthUpdate")
    futures_speed = speed_ms(Settings().futures_depth_speed)
    usdm_merged = merge_diffs(usdm_diffs, futures_speed)
    premium = orjson.loads((REALDATA / PREMIUM_INDEX).read_bytes())
    # The stream's element for each symbol, with the REST reply's values (no real
    # !markPrice@arr was recorded; the field order is the stream's).
    marks = [{"e": "markPriceUpdate", "E": x["time"], "s": x["symbol"], "p": x["markPrice"], "i": x["indexPrice"],
              "P": x["estimatedSettlePrice"], "r": x["lastFundingRate"], "T": x["nextFundingTime"]} for x in premium]
    # The log's recorder re-serialised with spaces; orjson gives the exchange's compact form back.
    forces = [orjson.loads(line)["msg"] for line in (REALDATA / FORCE_LOG).read_bytes().splitlines() if line.strip()]
    oi = orjson.loads((REALDATA / OPEN_INTEREST).read_bytes())
    snaps: dict[str, list[bytes]] = {"spot": [], "futures": []}
    for cap in caps.values():
        for s in cap.snapshots:
            if s.symbol in BIG_BOOKS and s.limit in (None, 1000):
                snaps[s.market].append(s.body)
    spot_trades = _events(caps[CF_SPOT_2021], "aggTrade")
    futures_trades = _events(caps[CF_FUTURES], "aggTrade")
    kinds = [
        Kind("agg_trades", "spot", f"the {len(spot_trades):,} real Spot aggTrades "
             f"({', '.join(sorted({t['s'] for t in spot_trades}))}) of the 2021 cryptofeed capture",
             tuple(spot_trades), 20_000),
        Kind("agg_trades", "futures", f"the {len(futures_trades):,} real USD-M aggTrades "
             f"({len({t['s'] for t in futures_trades})} symbols) of the 2021 cryptofeed capture",
             tuple(futures_trades), 20_000),
        Kind("depth_updates", "spot", f"the {len(spot_diffs):,} real Spot BTCUSDT @depth@100ms diffs of 2024-08-08 "
             "(hftbacktest)", tuple(spot_diffs), 10_000),
        Kind("depth_updates", "futures", f"the {len(usdm_diffs):,} real USD-M BTCUSDT @depth@0ms diffs of "
             f"2024-08-08 (hftbacktest) merged into {len(usdm_merged):,} {futures_speed} ms diffs",
             tuple(usdm_merged), 3_000),
        Kind("mark_prices", "futures", f"the {len(marks)} symbols of a real /fapi/v1/premiumIndex reply as "
             "!markPrice@arr elements", tuple(marks), 20_000),
        Kind("force_orders", "futures", f"the {len(forces)} real forceOrder events of 2025-10-02", tuple(forces),
             2_000),
        Kind("open_interest", "futures", "a real /fapi/v1/openInterest reply (BTCUSDT)", (oi,), 2_000),
        Kind("depth_snapshots", "spot", f"{len(snaps['spot'])} real Spot limit=1000 snapshots of BTCUSDT/ETHUSDT "
             "(2021, 2024)", tuple(snaps["spot"]), 60),
        Kind("depth_snapshots", "futures", f"{len(snaps['futures'])} real USD-M limit=1000 snapshot of BTCUSDT "
             "(2024)", tuple(snaps["futures"]), 60),
    ]
    rates: dict[str, dict[str, Any]] = {}
    for market, name in (("spot", HFT_SPOT), ("futures", HFT_USDM)):
        trades = _events(caps[name], "trade")
        span_s = (trades[-1]["T"] - trades[0]["T"]) / 1000
        diffs = spot_diffs if market == "spot" else usdm_diffs
        rates[market] = {"trades": len(trades), "span_s": span_s, "trades_per_s": len(trades) / span_s,
                         "agg_trades_per_s": count_agg_trades(trades) / span_s,
                         "diffs_per_s": len(diffs) / ((diffs[-1]["E"] - diffs[0]["E"]) / 1000),
                         "from_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime(trades[0]["T"] / 1000))}
    # A cross-check from another year: the 2021 Spot capture's aggTrades per symbol (ids are
    # consecutive, so the id span over the time span is the rate) and fills per aggTrade.
    by_symbol: dict[str, list[dict[str, Any]]] = {}
    for t in spot_trades:
        by_symbol.setdefault(t["s"], []).append(t)
    rates["spot_2021"] = {s: {"agg_trades_per_s": (ts[-1]["a"] - ts[0]["a"] + 1) / ((ts[-1]["T"] - ts[0]["T"]) / 1000),
                              "trades_per_agg": sum(t["l"] - t["f"] + 1 for t in ts) / len(ts)}
                          for s, ts in by_symbol.items()}
    # Smaller books' diffs, for the notes: the 2021 USD-M capture's symbols (@depth@100ms).
    alt: dict[str, list[int]] = {}
    for f in caps[CF_FUTURES].frames:
        if b'"e":"depthUpdate"' in f.data[:40]:
            alt.setdefault(orjson.loads(f.data)["s"], []).append(len(f.data))
    rates["small_diff_bytes"] = {s: sum(v) / len(v) for s, v in alt.items()}
    return {"kinds": kinds, "rates": rates}


def encode(kind: Kind, i: int, n: int) -> tuple[bytes, int]:
    """Row ``i`` of ``n`` of ``kind``: the next real message as one of ``SYMBOLS`` in turn, at
    its own event time inside ``SPAN_MS``; (the encoded tuple, the payload's JSON bytes)."""
    msg = kind.messages[i % len(kind.messages)]
    symbol = SYMBOLS[i % len(SYMBOLS)]
    t = T0_MS + i * max(1, SPAN_MS // n)
    if kind.table == "depth_snapshots":
        return R.depth_snapshot(kind.market, symbol, t, msg), len(msg)
    m = dict(msg)
    if kind.table == "open_interest":
        m["time"], m["symbol"] = t, symbol
        raw = orjson.dumps(m)
        return R.open_interest(kind.market, m, raw), len(raw)
    if kind.table == "force_orders":
        m["E"], m["o"] = t, {**msg["o"], "T": t - min(max(msg["E"] - msg["o"]["T"], 0), 999), "s": symbol}
        raw = orjson.dumps(m)
        return R.force_order(kind.market, m, raw), len(raw)
    if "T" in m and kind.table != "mark_prices":  # a mark price's T is the next funding time
        m["T"] = t - min(max(msg["E"] - msg["T"], 0), 999)
    m["E"], m["s"] = t, symbol
    raw = orjson.dumps(m)
    fn = {"agg_trades": R.agg_trade, "depth_updates": R.depth_update, "mark_prices": R.mark_price}[kind.table]
    return fn(kind.market, m, raw), len(raw)


# ---- the database -----------------------------------------------------------------------


async def is_hypertable(conn: asyncpg.Connection, table: str) -> bool:
    if (await capabilities(conn)).timescaledb is None:
        return False
    return bool(await conn.fetchval("SELECT EXISTS (SELECT 1 FROM timescaledb_information.hypertables "
                                    "WHERE hypertable_name = $1)", table))


async def table_size(conn: asyncpg.Connection, table: str) -> dict[str, int]:
    """Heap, index and TOAST bytes and their total (the free-space and visibility maps are
    in the heap's figure), over every chunk of a hypertable."""
    if await is_hypertable(conn, table):
        r = await conn.fetchrow("SELECT table_bytes, index_bytes, toast_bytes, total_bytes "
                                "FROM hypertable_detailed_size($1::regclass)", table)
        chunks = int(await conn.fetchval("SELECT count(*) FROM show_chunks($1::regclass)", table))
        return {"table": int(r["table_bytes"] or 0), "index": int(r["index_bytes"] or 0),
                "toast": int(r["toast_bytes"] or 0), "total": int(r["total_bytes"] or 0), "chunks": chunks}
    r = await conn.fetchrow(
        "SELECT pg_total_relation_size(c.oid) AS total, pg_indexes_size(c.oid) AS index, "
        "COALESCE(pg_total_relation_size(NULLIF(c.reltoastrelid, 0)), 0) AS toast "
        "FROM pg_class c WHERE c.oid = $1::regclass", table)
    total, index, toast = int(r["total"]), int(r["index"]), int(r["toast"])
    return {"table": total - index - toast, "index": index, "toast": toast, "total": total, "chunks": 0}


async def vacuum(conn: asyncpg.Connection, table: str) -> None:
    # Sizes after VACUUM ANALYZE: the free-space and visibility maps exist, as they do on a
    # table autovacuum has been through.
    await conn.execute(f"VACUUM ANALYZE {table}")


async def wal_lsn(conn: asyncpg.Connection) -> int:
    """The server's WAL insert position in bytes (asyncpg decodes pg_lsn to an int)."""
    return int(await conn.fetchval("SELECT pg_current_wal_lsn()"))


async def others_active(conn: asyncpg.Connection) -> int:
    """Sessions busy in other databases: their WAL would be counted with ours."""
    return int(await conn.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND datname IS NOT NULL "
        "AND datname <> current_database() AND pid <> pg_backend_pid()"))


async def copy_all(conn: asyncpg.Connection, table: str, rows: Sequence[bytes]) -> None:
    batch: list[bytes] = []
    size = 0
    for row in rows:
        batch.append(row)
        size += len(row)
        if len(batch) >= COPY_ROWS or size >= COPY_BYTES:
            await copy_rows(conn, table, b"".join(batch))
            batch, size = [], 0
    if batch:
        await copy_rows(conn, table, b"".join(batch))


async def load_kind(conn: asyncpg.Connection, kind: Kind, n: int) -> dict[str, Any]:
    """``n`` rows of ``kind`` in two halves; sizes after each (see the module doc)."""
    encoded = [encode(kind, i, n) for i in range(n)]
    rows = [r for r, _ in encoded]
    half = n // 2
    before = await table_size(conn, kind.table)  # another market's rows may be in the table already
    await copy_all(conn, kind.table, rows[:half])
    await vacuum(conn, kind.table)
    first = await table_size(conn, kind.table)
    busy = await others_active(conn)
    lsn0 = await wal_lsn(conn)
    await copy_all(conn, kind.table, rows[half:])
    lsn1 = await wal_lsn(conn)
    busy = max(busy, await others_active(conn))
    wal = lsn1 - lsn0
    await vacuum(conn, kind.table)
    second = await table_size(conn, kind.table)
    stored = await conn.fetchval(f"SELECT avg(pg_column_size(payload)) FROM {kind.table} WHERE market = $1",
                                 kind.market)
    added = n - half
    grew = {k: second[k] - first[k] for k in ("table", "index", "toast", "total")}
    return {
        "rows": n, "bytes_per_row": grew["total"] / added,
        "split_per_row": {k: grew[k] / added for k in ("table", "index", "toast")},
        "first_half_bytes_per_row": (first["total"] - before["total"]) / half,
        "payload_json_bytes": sum(p for _, p in encoded) / n,
        "payload_stored_bytes": float(stored) if stored is not None else None,
        "wal_bytes_per_row": wal / added, "others_active": busy,
        "chunks": second["chunks"], "size_after": second, "messages": len(kind.messages), "origin": kind.origin,
    }


async def measure_real(payload_type: str, kinds: Sequence[Kind], scale: float) -> dict[str, Any]:
    """(a) for one payload type, in a fresh database dropped afterwards."""
    out: dict[str, Any] = {}
    async with fresh_database(PG_ROOT, prefix="bench_sizing") as dsn:
        conn = await asyncpg.connect(dsn, timeout=10)
        try:
            await ensure_payload_type(conn, payload_type)
            caps = await capabilities(conn)
            out["server"] = {"timescaledb": caps.timescaledb, "license": caps.license,
                             "server_version": caps.server_version}
            cb.use_payload_type(payload_type)
            try:
                for kind in kinds:
                    out[kind.key] = await load_kind(conn, kind, max(4, int(kind.quick_rows * scale)))
            finally:
                cb.use_payload_type("jsonb")  # the encoders are module state: leave the default behind
        finally:
            await conn.close()
    return out


async def measure_tables(dsn: str, tables: Sequence[str]) -> dict[str, Any]:
    """Every table's rows and size, each after VACUUM ANALYZE (which may run while the
    ingestor writes: it takes no lock a COPY waits for)."""
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        out: dict[str, Any] = {}
        for t in tables:
            await vacuum(conn, t)
            size = await table_size(conn, t)
            n = int(await conn.fetchval(f"SELECT count(*) FROM {t}"))
            has_payload = await conn.fetchval("SELECT EXISTS (SELECT 1 FROM information_schema.columns "
                                              "WHERE table_name = $1 AND column_name = 'payload')", t)
            stored = await conn.fetchval(f"SELECT avg(pg_column_size(payload)) FROM {t}") if has_payload else None
            out[t] = {"rows": n, **size, "bytes_per_row": size["total"] / n if n else None,
                      "payload_stored_bytes": float(stored) if stored is not None else None}
        return out
    finally:
        await conn.close()


def marginal(mid: Mapping[str, Any], end: Mapping[str, Any]) -> dict[str, Any] | None:
    """Growth per row between two readings of one table; None when too few rows came in
    between for pages of 8 KB to give a per-row figure, or a new chunk opened (its fixed
    pages would be counted as rows')."""
    rows = end["rows"] - mid["rows"]
    if rows < MARGINAL_ROWS or end["chunks"] != mid["chunks"]:
        return None
    return {"rows": rows, **{k: (end[k] - mid[k]) / rows for k in ("table", "index", "toast", "total")}}


async def measure_pipeline(payload_type: str, seconds: float, rate: float = PIPELINE_RATE,
                           n_symbols: int = PIPELINE_SYMBOLS) -> dict[str, Any]:
    """(b): simulator + ``ingestor run`` for ``seconds``; every table's size a third of the
    way in and at the end, and the growth per row between the two."""
    db = f"bench_sizing_{os.getpid()}_{payload_type}"
    dsn = f"{PG_ROOT}/{db}"
    await pipeline.pg_exec(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
    await pipeline.pg_exec(f"CREATE DATABASE {db}")
    sim = Service("simulator", pipeline.simulator_cmd(rate, n_symbols), read_stdout=True)
    ingestor: Service | None = None
    out: dict[str, Any] = {"payload_type": payload_type, "seconds": seconds, "rate": rate, "n_symbols": n_symbols,
                           "error": None}
    try:
        sim.start()
        urls = orjson.loads(sim.first_line(30.0))
        port = pipeline.free_port()
        # 1 s bars, so the features table gets rows within seconds (a row's size does not
        # depend on the bar).
        extra = ("--payload-type", payload_type, "--feature-params", "bar_seconds=1")
        ingestor = Service("ingestor", pipeline.ingestor_cmd(dsn, 1, urls, port, extra))
        out["commands"] = [" ".join(sim.cmd), " ".join(ingestor.cmd)]
        base = f"http://127.0.0.1:{port}"
        ingestor.start()
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
            await pipeline.wait_connected(http, f"{base}/health", ingestor, 60.0)
            # The first reading comes after the start-up rows (a snapshot per book, symbol_info),
            # so the growth after it is the steady feed's.
            await asyncio.sleep(seconds / 3)
            mid = await measure_tables(dsn, ALL_TABLES)
            await asyncio.sleep(seconds * 2 / 3)
            check = await pipeline.finish(http, urls["admin"], base, dsn, features=False)
            health = await pipeline.get_json(http, f"{base}/health")
        out.update({k: check[k] for k in ("sent", "stored", "missing", "duplicates", "drain_s")})
        out["mismatched_streams"] = check["mismatched_streams"][:5]
        out["restarts"] = {n: w.get("restarts") for n, w in health["workers"].items()}
        # SIGTERM: the ingestor commits everything it received before it exits.
        out["ingestor_exit_code"] = ingestor.stop(60.0)
        ingestor = None
        end = await measure_tables(dsn, ALL_TABLES)
        out["tables"] = {t: {**end[t], "mid": mid[t], "marginal": marginal(mid[t], end[t])} for t in ALL_TABLES}
    except Exception as exc:  # noqa: BLE001 - the report says what failed; (a) and (c) stand without it
        out["error"] = f"{type(exc).__name__}: {exc}"
        if ingestor is not None:
            out["ingestor_stderr_tail"] = ingestor.stderr_tail()
    finally:
        if ingestor is not None:
            out["ingestor_exit_code"] = ingestor.stop(60.0)
        out["sim_exit_code"] = sim.stop(30.0)
        await pipeline.pg_exec(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
    return out


# ---- the suite ----------------------------------------------------------------------------


def _kb(n: float | None) -> str:
    return "n/a" if n is None else f"{n:,.0f}"


def _real_rows(real: dict[str, dict[str, Any]], kinds: Sequence[Kind]) -> list[dict[str, Any]]:
    rows = []
    for kind in kinds:
        for pt in PAYLOAD_TYPES:
            r = real.get(pt, {}).get(kind.key)
            if r is None:
                continue
            s = r["split_per_row"]
            wal = (f"{r['wal_bytes_per_row']:,.0f} B/row (server-wide)" if not r["others_active"] else
                   "n/a (other sessions were writing on the server)")
            rows.append(metric(
                f"(a) {kind.table}, {kind.market}: bytes/row, {pt}", r["bytes_per_row"], "B",
                f"heap {s['table']:,.0f} + indexes {s['index']:,.0f} + TOAST {s['toast']:,.0f}; payload "
                f"{r['payload_json_bytes']:,.0f} B of JSON, stored {_kb(r['payload_stored_bytes'])} B "
                f"(pg_column_size); WAL {wal}; marginal over the second half of {r['rows']:,} rows "
                f"({r['first_half_bytes_per_row']:,.0f} B/row over the first half, a new chunk's fixed pages "
                f"included); {r['chunks']} chunk(s); {kind.origin}"))
    return rows


def _pipeline_rows(pipe: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for pt, p in pipe.items():
        if p.get("error"):
            rows.append(metric(f"(b) pipeline, {pt}", None, "", f"error: {p['error'][:300]}"))
            continue
        restarted = {n: r for n, r in (p.get("restarts") or {}).items() if r}
        rows.append(metric(f"(b) pipeline, {pt}: loss", p.get("missing"), "msgs",
                           f"sent {p.get('sent', 0):,} aggTrades + diffs, stored {p.get('stored', 0):,}, "
                           f"duplicates {p.get('duplicates')}; worker restarts {restarted or 'none'}; ingestor exit "
                           f"{p.get('ingestor_exit_code')}" + (f"; e.g. {p['mismatched_streams'][0]}"
                                                               if p.get("mismatched_streams") else "")))
        for t, s in p["tables"].items():
            m = s["marginal"]
            if m is not None:
                value = m["total"]
                how = (f"growth over the last {m['rows']:,} rows: heap {m['table']:,.0f} + indexes {m['index']:,.0f} "
                       f"+ TOAST {m['toast']:,.0f}; ")
            else:
                value = s["bytes_per_row"] if s["rows"] >= FEW_ROWS else None
                how = "" if value is not None else "too few rows for a per-row figure; "
            avg = "n/a" if s["bytes_per_row"] is None else f"{s['bytes_per_row']:,.0f}"
            rows.append(metric(
                f"(b) pipeline, {t}: bytes/row, {pt}", value, "B",
                f"{how}all {s['rows']:,} rows: {s['total']:,} B ({avg} B/row with the fixed pages), "
                f"{s['chunks']} chunk(s); payload stored {_kb(s['payload_stored_bytes'])} B"))
    return rows


def _bytes_per_row(real: dict[str, Any], pipe: dict[str, Any], pt: str) -> dict[str, float | None]:
    """(a)'s figure for each data table and market; the features row from (b) (same payload
    type if it ran, else jsonb: the features table has no payload)."""
    out: dict[str, float | None] = {k: v["bytes_per_row"] for k, v in real.get(pt, {}).items()
                                    if isinstance(v, dict) and "bytes_per_row" in v}
    feats = None
    for p in (pipe.get(pt), pipe.get("jsonb")):
        if p and not p.get("error") and p["tables"]["features"]["marginal"] is not None:
            feats = p["tables"]["features"]["marginal"]["total"]
            break
    out["features/spot"] = out["features/futures"] = feats
    return out


def run(quick: bool, seconds: float | None = None) -> dict[str, Any]:
    if not (REALDATA / "README.md").is_file():
        raise RuntimeError(f"the real captures are not at {REALDATA}: (a) and (c) need them")
    seconds = seconds or (12.0 if quick else 30.0)
    scale = 1.0 if quick else 4.0
    pipeline_types = ("jsonb",) if quick else PAYLOAD_TYPES
    t0 = time.perf_counter()
    inputs = real_inputs()
    kinds: list[Kind] = inputs["kinds"]
    rates = inputs["rates"]
    read_s = time.perf_counter() - t0
    print(f"[sizing] captures read in {read_s:.1f} s; (a) real payloads ...", file=sys.stderr, flush=True)
    real = {pt: asyncio.run(measure_real(pt, kinds, scale)) for pt in PAYLOAD_TYPES}
    pipe: dict[str, Any] = {}
    for pt in pipeline_types:
        print(f"[sizing] (b) pipeline, {pt}, {seconds:g} s ...", file=sys.stderr, flush=True)
        pipe[pt] = asyncio.run(measure_pipeline(pt, seconds))

    settings = Settings()
    bar_seconds = settings.feature_settings().bar_seconds
    per_symbol = symbol_rates({m: rates[m]["agg_trades_per_s"] for m in ("spot", "futures")}, settings, bar_seconds)
    metrics = _real_rows(real, kinds) + _pipeline_rows(pipe)
    days: dict[str, dict[str, Any]] = {}
    for pt in PAYLOAD_TYPES:
        days[pt] = per_day(per_symbol, _bytes_per_row(real, pipe, pt))
    for key, rate in per_symbol.items():
        d, dj = days["jsonb"][key], days["json"][key]
        json_mb = "n/a" if dj["bytes"] is None else f"{dj['bytes'] / MB:,.1f}"
        market = key.split("/")[1]
        basis = (f"measured: BTCUSDT {'Spot' if market == 'spot' else 'USD-M'} @trade capture, "
                 f"{rates[market]['from_utc']} UTC") if key.startswith("agg_trades") else "fixed by the settings"
        metrics.append(metric(
            f"(c) {key}: MB/day per symbol, jsonb", None if d["bytes"] is None else d["bytes"] / MB, "MB",
            f"{rate:.4g} rows/s ({basis}) x 86,400 = {d['rows']:,.0f} rows/day; json: "
            f"{json_mb} MB"))
    for s in SETS:
        for pt in PAYLOAD_TYPES:
            day = per_day(per_symbol, _bytes_per_row(real, pipe, pt), s.symbols)
            total = day_total(day, s.markets)
            rows_day = sum(v["rows"] or 0.0 for k, v in day.items() if k.split("/")[1] in s.markets)
            metrics.append(metric(f"(d) {s.label}: GB/day, {pt}", total / GB, "GB",
                                  f"extrapolated: {s.symbols} symbol(s) x BTCUSDT's rates and sizes"
                                  + (" (an upper bound)" if s.symbols > 1 else "")
                                  + f"; {rows_day:,.0f} rows/day; force_orders left out (see notes)"))
    fo = real["jsonb"].get("force_orders/futures")
    if fo is not None:
        metrics.append(metric("(d) force_orders at its ceiling: MB/day per symbol, jsonb",
                              fo["bytes_per_row"] * SECONDS_PER_DAY / MB, "MB",
                              "the stream sends at most one liquidation per symbol a second; real counts are far "
                              "lower and bursty"))
    spot21 = rates["spot_2021"]

    def real_json(key: str) -> float:
        return float(real["jsonb"][key]["payload_json_bytes"])

    notes = [
        "Measured: (a) and (b). Extrapolated: (c) and (d), from (a)'s bytes per row (features: (b)'s) and the "
        "rates below; nothing in (c) or (d) was recorded for a day.",
        f"aggTrades/s: the 2024-08-08 BTCUSDT @trade captures (hftbacktest), Spot {rates['spot']['trades']:,} trades "
        f"over {rates['spot']['span_s']:.0f} s = {rates['spot']['trades_per_s']:.1f} trades/s -> "
        f"{rates['spot']['agg_trades_per_s']:.1f} aggTrades/s; USD-M {rates['futures']['trades']:,} over "
        f"{rates['futures']['span_s']:.0f} s = {rates['futures']['trades_per_s']:.1f} -> "
        f"{rates['futures']['agg_trades_per_s']:.1f} aggTrades/s (consecutive trades with the same trade time, "
        "side and price counted as one aggTrade: the trade stream has no order ids; every trade an aggTrade "
        "would be the upper bound). A 6-minute window of one night: a day's average can differ either way.",
        "Cross-check, 2021 Spot cryptofeed capture (90 s, aggTrade ids): "
        + ", ".join(f"{s} {v['agg_trades_per_s']:.1f} aggTrades/s ({v['trades_per_agg']:.2f} trades each)"
                    for s, v in sorted(spot21.items()))
        + ". ETHUSDT is taken at BTCUSDT's rates in the sets: an upper bound.",
        f"Diffs: fixed by the stream speed when the book changes every interval: Spot 100 ms -> 10/s (the 2024 "
        f"capture: {rates['spot']['diffs_per_s']:.2f}/s), USD-M 500 ms -> 2/s. USD-M 500 ms diffs are the real "
        f"@depth@0ms events ({rates['futures']['diffs_per_s']:.1f}/s) merged per 500 ms of event time "
        "(merge_diffs), the levels changed in the window once each.",
        f"Mark prices 1/s per USD-M symbol (!markPrice@arr@1s, filtered to the recorded symbols); snapshots every "
        f"{settings.snapshot_interval_s:g} s per symbol and market (plus one per book (re)sync, left out); open "
        f"interest every {settings.open_interest_interval_s:g} s per USD-M symbol; features one row per "
        f"{bar_seconds} s bar per symbol and market (--features true).",
        "force_orders: no rate can be read from the captures (the one log holds 42 events over 8 hours, with "
        "gaps); it is left out of the totals, and its ceiling is given.",
        "Not counted: stream_gaps, book_syncs and symbol_info (a few rows a day), PostgreSQL's WAL (recycled "
        "after each checkpoint unless archived: max_wal_size of disk) and the catalog.",
        "Every symbol of a set is taken at BTCUSDT's rates and sizes (the busiest, deepest book): for the sets "
        "of more than one symbol the figure is an upper bound. Smaller books send smaller diffs and fewer "
        "trades: the 2021 cryptofeed USD-M @depth@100ms diffs average "
        + ", ".join(f"{s} {b:,.0f} B" for s, b in sorted(rates["small_diff_bytes"].items()))
        + f" of JSON, against BTCUSDT's {real_json('depth_updates/spot'):,.0f} B (Spot, 100 ms) and "
        f"{real_json('depth_updates/futures'):,.0f} B (USD-M, merged to 500 ms). The USD-M aggTrade payloads of "
        "(a) are small 2021 symbols': BTCUSDT's carry a few more digits.",
        "WAL per row (in (a)'s notes): the server's WAL position before and after the second half's COPYs, "
        "so server-wide: shown only where no session of another database was busy then. It holds the full-page "
        "images of pages first touched since the last checkpoint, so it depends on when checkpoints fall; the "
        "WAL is recycled after each checkpoint (max_wal_size of disk), not kept, unless archived or held by a "
        "replication slot.",
        f"Server: PostgreSQL {real['jsonb']['server']['server_version']}, TimescaleDB "
        f"{real['jsonb']['server']['timescaledb']} ({real['jsonb']['server']['license']} licence: no compression "
        "here, so every figure is uncompressed; jsonb and json values over ~2 KB are compressed by PostgreSQL's "
        "TOAST all the same).",
    ]
    params = {"pipeline_seconds": seconds, "pipeline_rate": PIPELINE_RATE, "pipeline_symbols": PIPELINE_SYMBOLS,
              "rows_scale": scale, "symbols_interleaved": len(SYMBOLS)}
    return {"suite": "sizing", "title": "bytes per row per table (measured) and per day (extrapolated)",
            "params": params, "metrics": metrics, "notes": notes,
            "details": {"real": real, "pipeline": pipe, "rates": rates, "per_symbol_rows_per_s": per_symbol,
                        "per_day": days, "read_captures_s": read_s}}

