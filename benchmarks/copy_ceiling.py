"""COPY ceiling: the rate at which PostgreSQL itself takes the recorder's rows (issue 6).

The end-to-end pipeline (``benchmarks/pipeline.py``) is only as fast as the database
takes its rows; this suite measures that limit without the pipeline, so the two can be
compared as a ratio.

- Rows: the project's own encoders (``ingestor.wire.rows.agg_trade`` /
  ``depth_update``) on payloads from the simulator's model stepped in-process
  (``ingestor.sim.offline``): Spot and USD-M aggTrades, diff-depth updates at the
  ingestor's default speeds, and depth updates of 20 bid + 20 ask levels (the issue's
  reference size). Ids and times are renumbered when the rows are built (fresh payloads,
  payload and columns agree), so the unique keys of sql/005 never meet a duplicate.
- Pre-encoded: a pool of batches is built before timing. Every COPY takes the next batch
  of the pool; after a pass through the pool the ids and times of a copy are shifted
  (every id and time field, column and JSON, rewritten in place with numpy: all are
  13-digit numbers, so the bytes keep their length), which keeps every key unique for as
  long as the COPYs run, at about a millisecond of client CPU per 5,000-row batch.
- Database: a fresh database on the system PostgreSQL per measurement, migrated with
  ``ingestor.db.migrate`` (TimescaleDB there: hypertables), dropped afterwards.
- Load: N connections, each COPYing batches of the writer's ``--batch-rows`` through the
  copier's own path (``ingestor.writer.copier.copy_rows``: binary COPY, one implicit
  transaction per COPY) back to back for a fixed time after a warm-up. Each connection
  prepares its next batch while its COPY is in flight.
- Why: on one connection, the same aggTrade rows into twins of ``agg_trades`` that differ
  only in the payload's type (``json``, ``text``, ``bytea`` instead of ``jsonb``) or lack
  the unique key and time index; the server's CPU per row then splits into jsonb parsing,
  index maintenance and the rest. And jsonb on one connection against N.

``measure_ceiling`` is one measurement (fresh database, a mix of kinds, N connections);
the pipeline benchmark can call it with its own mix to put its stored rate next to it.
"""

from __future__ import annotations

import asyncio
import functools
import statistics
import sys
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import numpy as np
import orjson

from benchmarks.procs import PG_ROOT, cpu_delta, cpu_seconds, postgres_backends
from benchmarks.report import metric
from ingestor.binance.streams import Market
from ingestor.config import Settings
from ingestor.db.migrate import capabilities, migrate
from ingestor.sim.offline import generate
from ingestor.sim.tape import digits as ascii_digits
from ingestor.wire import copy_binary as cb
from ingestor.wire import rows as R
from ingestor.writer.copier import copy_rows
from ingestor.writer.process import MAX_COPY_BYTES

_DEFAULTS = Settings()
CONNECTIONS = _DEFAULTS.writer_connections  # the writer's default --writer-connections
BATCH_ROWS = _DEFAULTS.batch_rows  # the socket workers' default --batch-rows
POOL_BATCHES = 4  # distinct pre-encoded batches per kind; ids and times shift per pass
# Message kinds: the table they go to. ``depthUpdate`` is the simulator's diffs at the
# ingestor's default speeds; ``depthUpdate20`` is always 20 bid + 20 ask levels.
KINDS: dict[str, str] = {"aggTrade": "agg_trades", "depthUpdate": "depth_updates", "depthUpdate20": "depth_updates"}
DEFAULT_MIX: dict[str, float] = {"aggTrade": 0.9, "depthUpdate": 0.1}
PAYLOAD_TYPES = ("jsonb", "json", "text", "bytea")

# The simulator run the payloads come from: 20 symbols per market as in the pipeline
# benchmark, at a rate between its quick levels (diffs grow with the rate).
N_SYMBOLS = 20
SIM_RATE = 5000.0
SIM_SECONDS = 2.5
DEPTH_SUFFIX: dict[Market, str] = {"spot": "@depth@100ms", "futures": "@depth@500ms"}
LEVELS_20 = 20

# Renumbering. Every id and time is a 13-digit number, so shifting one never changes the
# length of the JSON text (a payload is patched in place). Each kind has its own id range,
# so depthUpdate and depthUpdate20 rows can share depth_updates in one mix.
T0_MS = 1_700_000_000_000  # 22:13:20 UTC: ~46 min of event time before the next hourly chunk
ROWS_PER_MS = 10  # event time advances 1 ms per 10 rows of a kind (a 10,000 msg/s feed)
ID_BASE = {"aggTrade": 1_000_000_000_000, "depthUpdate": 2_000_000_000_000, "depthUpdate20": 3_000_000_000_000}
TRADE_BASE = 4_000_000_000_000  # aggTrade f/l (trade ids)
TRADES_PER_AGG = 8  # room for f..l per aggTrade
UPDATE_STRIDE = 10_000  # room for U..u per depth update
DIGITS = 13
_COPY_OVERHEAD = len(cb.HEADER) + len(cb.TRAILER)

# Which fields are renumbered: JSON key -> (class, multiplier of the row sequence).
# ``time`` fields advance with the row sequence / ROWS_PER_MS; ``id`` fields with it
# times the multiplier. Columns follow the JSON field they mirror.
_JSON_FIELDS: dict[str, dict[str, tuple[str, int]]] = {
    "agg_trades": {"E": ("time", 0), "T": ("time", 0), "a": ("id", 1), "f": ("id", TRADES_PER_AGG),
                   "l": ("id", TRADES_PER_AGG)},
    "depth_updates": {"E": ("time", 0), "T": ("time", 0), "U": ("id", UPDATE_STRIDE), "u": ("id", UPDATE_STRIDE),
                      "pu": ("id", UPDATE_STRIDE)},
}
_COLUMNS: dict[str, dict[str, str]] = {  # column -> the JSON field it mirrors
    "agg_trades": {"event_time": "E", "trade_time": "T", "aggregate_trade_id": "a"},
    "depth_updates": {"event_time": "E", "first_update_id": "U", "final_update_id": "u"},
}


# ---- payloads --------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def sim_messages() -> dict[str, list[tuple[Market, dict[str, Any]]]]:
    """(market, parsed payload) per kind, both markets merged in event-time order."""
    merged: list[tuple[int, int, Market, str, dict[str, Any]]] = []
    books: dict[tuple[Market, str], dict[str, Any]] = {}
    markets: tuple[Market, ...] = ("spot", "futures")
    for m, market in enumerate(markets):
        _, items = generate(market, SIM_SECONDS, N_SYMBOLS, seed=1, rate=SIM_RATE, depth_suffix=DEPTH_SUFFIX[market])
        for it in items:
            if it.kind == "snapshot":
                books.setdefault((market, it.symbol), it.payload)  # the first one: the book at the start
            elif it.kind in ("aggTrade", "depthUpdate"):
                merged.append((it.time_ms, m, market, it.kind, it.payload))
    merged.sort(key=lambda x: (x[0], x[1]))
    out: dict[str, list[tuple[Market, dict[str, Any]]]] = {k: [] for k in KINDS}
    for _, _, market, kind, msg in merged:
        out[kind].append((market, msg))
        if kind == "depthUpdate":
            # The same update with 20 levels a side near the touch, shifted through the book
            # so the 20x20 payloads do not all repeat one set of levels.
            book = books[(market, msg["s"])]
            o = len(out["depthUpdate20"]) % LEVELS_20
            out["depthUpdate20"].append((market, {**msg, "b": book["bids"][o:o + LEVELS_20],
                                                  "a": book["asks"][o:o + LEVELS_20]}))
    return out


def _renumbered(kind: str, g: int, msg: dict[str, Any]) -> dict[str, Any]:
    """``msg`` as the ``g``-th message of its kind: fresh, unique ids and times, with the
    original's spans (f..l, U..u, E - T) kept."""
    e = T0_MS + g // ROWS_PER_MS
    out = dict(msg)  # key order kept: orjson writes the fields as the exchange does
    out["E"] = e
    if "T" in msg:
        out["T"] = e - min(max(msg["E"] - msg["T"], 0), 999)
    if KINDS[kind] == "agg_trades":
        out["a"] = ID_BASE[kind] + g
        out["f"] = TRADE_BASE + g * TRADES_PER_AGG
        out["l"] = out["f"] + min(max(msg["l"] - msg["f"], 0), TRADES_PER_AGG - 1)
    else:
        out["u"] = ID_BASE[kind] + g * UPDATE_STRIDE + UPDATE_STRIDE - 1
        out["U"] = out["u"] - min(max(msg["u"] - msg["U"], 0), UPDATE_STRIDE - 2)
        if "pu" in msg:
            out["pu"] = out["U"] - 1
    return out


def payload_field(payload_type: str, raw: bytes) -> bytes:
    """The payload as a binary COPY field of ``payload_type``: jsonb carries a version byte
    before the JSON text (``copy_binary.jsonb``); json, text and bytea are the bytes alone."""
    if payload_type == "jsonb":
        return cb.jsonb(raw)
    return len(raw).to_bytes(4, "big") + raw


def _field_starts(row: bytes) -> list[int]:
    """Offset of every field's value in one encoded tuple."""
    pos, out = 2, []
    for _ in range(int.from_bytes(row[:2], "big")):
        n = int.from_bytes(row[pos:pos + 4], "big", signed=True)
        out.append(pos + 4)
        pos += 4 + max(n, 0)
    return out


# ---- pre-encoded batches ---------------------------------------------------------------


# ASCII digits of 0000..9999 as one uint32 each: a 13-digit number is 4 lookups.
@dataclass(frozen=True)
class Patch:
    """One renumbered field in one batch: where it is, its values, how it shifts per pass."""

    index: np.ndarray  # (rows, width) byte positions in the batch
    values: np.ndarray  # int64 values in the batch as built
    step: int  # added per pass through the pool
    digits: bool  # JSON decimal digits; else a big-endian int64 (bigint, timestamptz in us)

    def apply(self, buf: np.ndarray, passes: int) -> None:
        new = self.values + passes * self.step
        if self.digits:
            buf[self.index] = ascii_digits(new)
        else:
            buf[self.index] = new.astype(">i8").view(np.uint8).reshape(-1, 8)


@dataclass(frozen=True)
class Template:
    kind: str
    table: str  # whose columns the rows have
    payload_type: str
    batches: tuple[bytes, ...]
    patches: tuple[tuple[Patch, ...], ...]
    rows: int  # per batch
    payload_bytes: tuple[int, ...]  # JSON size of every row of the first batch
    row_bytes: tuple[int, ...]  # encoded tuple size of every row of the first batch


@functools.lru_cache(maxsize=32)
def template(kind: str, payload_type: str = "jsonb", batch_rows: int = BATCH_ROWS,
             pool_batches: int = POOL_BATCHES) -> Template:
    """``pool_batches`` batches of ``batch_rows`` rows of ``kind``, encoded as the writer
    would COPY them, with where every id and time sits in them."""
    table = KINDS[kind]
    pool_rows = batch_rows * pool_batches
    if pool_rows % ROWS_PER_MS:
        raise ValueError(f"rows per pool must be a multiple of {ROWS_PER_MS}")
    source = sim_messages()[kind]
    encode = R.agg_trade if table == "agg_trades" else R.depth_update
    json_fields, columns = _JSON_FIELDS[table], _COLUMNS[table]
    col_index = {c: R.TABLES[table].index(c) for c in columns}
    steps = {k: (pool_rows // ROWS_PER_MS if cls == "time" else pool_rows * mult)
             for k, (cls, mult) in json_fields.items()}
    batches, patches, sizes, row_sizes = [], [], [], []
    for b in range(pool_batches):
        parts: list[bytes] = []
        pos: dict[str, list[int]] = {}
        vals: dict[str, list[int]] = {}
        offset = 0
        for j in range(batch_rows):
            g = b * batch_rows + j
            market, msg = source[g % len(source)]
            msg = _renumbered(kind, g, msg)
            raw = orjson.dumps(msg)
            row = encode(market, msg, raw)
            if payload_type != "jsonb":  # the payload is the last column: swap its field
                row = row[:len(row) - len(cb.jsonb(raw))] + payload_field(payload_type, raw)
            starts = _field_starts(row)
            json_at = starts[-1] + (1 if payload_type == "jsonb" else 0)
            for key in json_fields:
                at = raw.find(b'"' + key.encode() + b'":')
                if at < 0:
                    continue  # T and pu: USD-M only
                at += len(key) + 3
                if not (raw[at:at + DIGITS].isdigit() and not raw[at + DIGITS:at + DIGITS + 1].isdigit()):
                    raise ValueError(f"{kind} field {key} is not a {DIGITS}-digit number: {raw[:120]!r}")
                pos.setdefault(key, []).append(offset + json_at + at)
                vals.setdefault(key, []).append(msg[key])
            for col, key in columns.items():
                v = msg[key]
                pos.setdefault(col, []).append(offset + starts[col_index[col]])
                vals.setdefault(col, []).append((v - cb.PG_EPOCH_MS) * 1000 if col == "event_time" else v)
            if b == 0:
                sizes.append(len(raw))
                row_sizes.append(len(row))
            parts.append(row)
            offset += len(row)
        data = b"".join(parts)
        if len(data) + _COPY_OVERHEAD > MAX_COPY_BYTES:
            raise ValueError(f"{batch_rows} rows of {kind} exceed the writer's {MAX_COPY_BYTES} bytes per COPY")
        batch_patches = []
        for key, where in pos.items():
            digits = key in json_fields
            width = DIGITS if digits else 8
            step = steps[key] if digits else steps[columns[key]] * (1000 if key == "event_time" else 1)
            batch_patches.append(Patch(np.asarray(where, dtype=np.int64)[:, None] + np.arange(width),
                                       np.asarray(vals[key], dtype=np.int64), step, digits))
        batches.append(data)
        patches.append(tuple(batch_patches))
    return Template(kind, table, payload_type, tuple(batches), tuple(patches), batch_rows, tuple(sizes),
                    tuple(row_sizes))


class Feed:
    """Batches of one template for one measurement: the next pool batch, shifted past
    every id and time already handed out."""

    def __init__(self, tpl: Template, into: str) -> None:
        self.tpl = tpl
        self.into = into
        self.issued = 0  # batches handed out

    def take(self) -> tuple[int, int]:
        """(pool batch, passes through the pool) of the next COPY."""
        k, passes = self.issued % len(self.tpl.batches), self.issued // len(self.tpl.batches)
        self.issued += 1
        return k, passes

    def build(self, k: int, passes: int) -> bytes:
        """Pool batch ``k`` with its ids and times shifted ``passes`` times. Pure, so it can
        run in a thread (numpy releases the GIL for most of it)."""
        if passes == 0:
            return self.tpl.batches[k]
        buf = bytearray(self.tpl.batches[k])
        view = np.frombuffer(buf, dtype=np.uint8)
        for p in self.tpl.patches[k]:
            p.apply(view, passes)
        return bytes(buf)

    def next_batch(self) -> bytes:
        return self.build(*self.take())


class Scheduler:
    """Which kind the next COPY carries: the one furthest behind its share of rows, so a
    mix holds its proportions by row count however the COPYs interleave."""

    def __init__(self, feeds: dict[str, Feed], mix: dict[str, float]) -> None:
        self.feeds = feeds
        self.mix = mix
        self.rows = dict.fromkeys(feeds, 0)

    def take(self) -> tuple[Feed, int, int]:
        kind = min(self.feeds, key=lambda k: (self.rows[k] + self.feeds[k].tpl.rows) / self.mix[k])
        feed = self.feeds[kind]
        self.rows[kind] += feed.tpl.rows
        return (feed, *feed.take())


# ---- the database --------------------------------------------------------------------------


def _with_db(dsn_root: str, db: str) -> str:
    parts = urlsplit(dsn_root)
    return urlunsplit((parts.scheme, parts.netloc, "/" + db, parts.query, parts.fragment))


@asynccontextmanager
async def fresh_database(dsn_root: str, prefix: str = "bench_copy") -> AsyncIterator[str]:
    """A new database on ``dsn_root``'s server, migrated; dropped on the way out."""
    db = f"{prefix}_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(_with_db(dsn_root, "postgres"), timeout=10)
    try:
        await admin.execute(f"CREATE DATABASE {db}")
        dsn = _with_db(dsn_root, db)
        try:
            conn = await asyncpg.connect(dsn, timeout=10)
            try:
                await migrate(conn)
            finally:
                await conn.close()
            yield dsn
        finally:
            await admin.execute(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
    finally:
        await admin.close()


async def payload_twin(conn: asyncpg.Connection, table: str, payload_type: str, indexes: bool = True) -> str:
    """A table like ``table`` (columns, keys and indexes, hypertable with the same chunk
    interval) whose payload is ``payload_type``; its name. ``indexes=False``: without the
    unique key and the time index. jsonb with indexes is ``table`` itself."""
    if payload_type not in PAYLOAD_TYPES:
        raise ValueError(f"payload type must be one of {PAYLOAD_TYPES}")
    if payload_type == "jsonb" and indexes:
        return table
    twin = f"{table}_{payload_type}" + ("" if indexes else "_noindex")
    # INCLUDING ALL copies the hypertable's own time index too, so it is not made twice below.
    await conn.execute(f"CREATE TABLE {twin} (LIKE {table} {'INCLUDING ALL' if indexes else 'INCLUDING DEFAULTS'})")
    if payload_type != "jsonb":
        using = "convert_to(payload::text, 'UTF8')" if payload_type == "bytea" else f"payload::text::{payload_type}"
        await conn.execute(f"ALTER TABLE {twin} ALTER COLUMN payload TYPE {payload_type} USING {using}")
    dim = await conn.fetchrow(
        "SELECT column_name, time_interval FROM timescaledb_information.dimensions WHERE hypertable_name = $1",
        table) if (await capabilities(conn)).timescaledb else None
    if dim is not None:  # the same time column (agg_trades: trade_time, sql/007) and interval
        await conn.execute("SELECT create_hypertable($1::regclass, $2::name, chunk_time_interval => $3::interval, "
                           "create_default_indexes => FALSE)", twin, dim["column_name"], dim["time_interval"])
    return twin


# ---- one measurement ---------------------------------------------------------------------


@dataclass(frozen=True)
class Copy:
    kind: str
    into: str
    start: float
    end: float
    rows: int
    nbytes: int  # the COPY stream, header and trailer included


async def _copier(conn: asyncpg.Connection, sched: Scheduler, pool: ThreadPoolExecutor, done: list[Copy],
                  stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()

    async def prepare() -> tuple[Feed, bytes]:
        feed, k, passes = sched.take()  # on the loop: the scheduler's counters are not shared with threads
        return feed, await loop.run_in_executor(pool, feed.build, k, passes)

    pending = asyncio.ensure_future(prepare())
    try:
        while not stop.is_set():
            feed, data = await pending
            # The next batch is patched in a thread while this COPY runs, as the writer has
            # its batches ready when a connection frees up.
            pending = asyncio.ensure_future(prepare())
            t0 = time.perf_counter()
            await copy_rows(conn, feed.tpl.table, data, into=feed.into)
            done.append(Copy(feed.tpl.kind, feed.into, t0, time.perf_counter(), feed.tpl.rows,
                             len(data) + _COPY_OVERHEAD))
    finally:
        pending.cancel()


async def _sample_waits(ctl: asyncpg.Connection, pids: list[int], stop: asyncio.Event, every: float = 0.02,
                        ) -> dict[str, int]:
    """What the COPY backends are doing, sampled from pg_stat_activity until ``stop``:
    ``CPU`` (active, no wait event), else the wait event (``Client:ClientRead`` is waiting
    for this client, inside a COPY or between two)."""
    counts: dict[str, int] = {}
    while not stop.is_set():
        for r in await ctl.fetch("SELECT state, wait_event_type, wait_event FROM pg_stat_activity "
                                 "WHERE pid = ANY($1::int[])", pids):
            key = ("CPU" if r["state"] == "active" else "idle") if r["wait_event"] is None else \
                f"{r['wait_event_type']}:{r['wait_event']}"
            counts[key] = counts.get(key, 0) + 1
        try:
            await asyncio.wait_for(stop.wait(), every)
        except TimeoutError:
            pass
    return counts


def _in_window(copies: list[Copy], t0: float, t1: float) -> list[tuple[Copy, float]]:
    """Each COPY with the share of it inside [t0, t1]: its rows are spread evenly over its
    duration, so the boundaries do not count or drop whole batches."""
    out = []
    for c in copies:
        overlap = min(c.end, t1) - max(c.start, t0)
        if overlap > 0:
            out.append((c, overlap / max(c.end - c.start, 1e-9)))
    return out


async def copy_into(dsn: str, mix: dict[str, float], connections: int, seconds: float, warmup: float = 1.0,
                    payload_type: str = "jsonb", batch_rows: int = BATCH_ROWS, indexes: bool = True) -> dict[str, Any]:
    """COPY ``mix`` (kind -> share of rows) over ``connections`` connections into the
    migrated database ``dsn`` for ``warmup`` + ``seconds``; figures over the last
    ``seconds``, and a check that the tables hold every row COPYed. ``payload_type`` other
    than jsonb, or ``indexes=False``, COPY into twins of the tables (``payload_twin``)."""
    if not mix or any(k not in KINDS or w <= 0 for k, w in mix.items()):
        raise ValueError(f"mix: kinds among {sorted(KINDS)} with shares > 0, got {mix}")
    ctl = await asyncpg.connect(dsn, timeout=10)
    conns: list[asyncpg.Connection] = []
    try:
        targets = {t: await payload_twin(ctl, t, payload_type, indexes) for t in sorted({KINDS[k] for k in mix})}
        feeds = {k: Feed(template(k, payload_type, batch_rows), targets[KINDS[k]]) for k in mix}
        sched = Scheduler(feeds, mix)
        conns = list(await asyncio.gather(*(asyncpg.connect(dsn, timeout=10) for _ in range(connections))))
        db = await ctl.fetchval("SELECT current_database()")
        stop = asyncio.Event()
        done: list[Copy] = []
        pool = ThreadPoolExecutor(max_workers=connections, thread_name_prefix="copy-ceiling")
        tasks = [asyncio.ensure_future(_copier(c, sched, pool, done, stop)) for c in conns]
        try:
            await asyncio.sleep(warmup)
            backends = await postgres_backends(ctl, db)
            window_over = asyncio.Event()
            sampler = asyncio.ensure_future(_sample_waits(ctl, [c.get_server_pid() for c in conns], window_over))
            cpu0, client0, t0 = cpu_seconds(backends), time.process_time(), time.perf_counter()
            await asyncio.sleep(seconds)
            cpu1, client1, t1 = cpu_seconds(backends), time.process_time(), time.perf_counter()
            window_over.set()
            waits = await sampler
            stop.set()
            await asyncio.gather(*tasks)  # every COPY in flight finishes: the check counts it
        finally:
            stop.set()
            for t in tasks:
                t.cancel()
            pool.shutdown(wait=True)
        stored = {t: int(await ctl.fetchval(f"SELECT count(*) FROM {t}")) for t in targets.values()}
        server = {k: await ctl.fetchval(f"SHOW {k}") for k in ("server_version", "shared_buffers", "wal_buffers",
                                                                "max_wal_size", "synchronous_commit", "fsync")}
        server["timescaledb"] = (await capabilities(ctl)).timescaledb
    finally:
        for c in conns:
            await c.close()
        await ctl.close()
    copied = {t: sum(c.rows for c in done if c.into == t) for t in targets.values()}
    window = t1 - t0
    inside = _in_window(done, t0, t1)
    rows = sum(c.rows * share for c, share in inside)
    pg_cpu = sum(cpu_delta(cpu0, cpu1).values())
    client_cpu = client1 - client0
    durations = sorted(c.end - c.start for c in done if c.start >= t0 and c.end <= t1)
    per_m = rows / 1e6 if rows else float("nan")
    return {
        "mix": mix, "connections": connections, "payload_type": payload_type, "indexes": indexes,
        "batch_rows": batch_rows,
        "window_s": window,
        "rows_per_s": rows / window,
        "rows_per_s_by_kind": {k: sum(c.rows * s for c, s in inside if c.kind == k) / window for k in mix},
        "bytes_per_s": sum(c.nbytes * s for c, s in inside) / window,
        "postgres_cpu_s": pg_cpu, "client_cpu_s": client_cpu,
        "postgres_cores": pg_cpu / window, "client_cores": client_cpu / window,
        "postgres_cpu_s_per_m_rows": pg_cpu / per_m, "client_cpu_s_per_m_rows": client_cpu / per_m,
        "postgres_backends": len(backends),
        "copies": len(done), "copy_s_p50": statistics.median(durations) if durations else None,
        # Share of the COPY backends' samples per state / wait event over the window.
        "waits": {k: v / max(sum(waits.values()), 1) for k, v in sorted(waits.items(), key=lambda kv: -kv[1])},
        "copied_rows": copied, "stored_rows": stored, "stored_ok": copied == stored,
        "server": server,
    }


async def measure_ceiling(dsn_root: str, mix: dict[str, float], connections: int, seconds: float,
                          warmup: float = 1.0, payload_type: str = "jsonb", batch_rows: int = BATCH_ROWS,
                          indexes: bool = True) -> dict[str, Any]:
    """One measurement in a fresh, migrated database on ``dsn_root``'s server (e.g.
    ``postgresql://postgres@127.0.0.1:5432``), dropped afterwards; see ``copy_into``.

    ``mix``: kind (``aggTrade``, ``depthUpdate``, ``depthUpdate20``) -> share of the rows,
    e.g. ``{"aggTrade": 0.9, "depthUpdate": 0.1}``. Returns rows/s (all and per kind), COPY
    bytes/s, CPU seconds and cores of the database's backends and of this process over the
    window, and per million rows; ``stored_ok`` says the tables hold every row COPYed."""
    for k in mix:  # built before the database exists, so its cost is never in the window
        template(k, payload_type, batch_rows)
    t0 = time.perf_counter()
    async with fresh_database(dsn_root) as dsn:
        result = await copy_into(dsn, mix, connections, seconds, warmup, payload_type, batch_rows, indexes)
    # DROP DATABASE forces a checkpoint: the cost of a fresh database per measurement.
    result["wall_s"] = time.perf_counter() - t0
    return result


# ---- the suite -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    key: str
    label: str
    mix: dict[str, float]
    payload_type: str
    connections: int
    indexes: bool = True


def _mix_label(mix: dict[str, float]) -> str:
    return " / ".join(f"{w * 100:g}% {k}" for k, w in mix.items())


def configs(connections: int) -> list[Config]:
    agg = {"aggTrade": 1.0}
    out = [
        Config("agg", f"(a) agg_trades, jsonb, {connections} conns", agg, "jsonb", connections),
        Config("depth20", f"(a) depth_updates 20x20 levels, jsonb, {connections} conns",
               {"depthUpdate20": 1.0}, "jsonb", connections),
        Config("mix", f"(a) mix {_mix_label(DEFAULT_MIX)}, jsonb, {connections} conns", DEFAULT_MIX, "jsonb",
               connections),
    ]
    out += [Config(f"agg1_{t}", f"(b) agg_trades, payload {t}, 1 conn", agg, t, 1) for t in PAYLOAD_TYPES]
    out += [Config(f"agg1_{t}_noindex", f"(b) agg_trades, payload {t}, no indexes, 1 conn", agg, t, 1, False)
            for t in ("jsonb", "bytea")]
    return out


def _runs_of(results: dict[str, list[dict[str, Any]]], key: str, field: str,
             scale: float = 1.0) -> list[float | None]:
    return [None if r.get("error") or r.get(field) is None else r[field] * scale for r in results[key]]


def _med(values: list[float | None]) -> float | None:
    clean = [v for v in values if v is not None]
    return statistics.median(clean) if clean else None


def _sizes(kind: str) -> dict[str, float]:
    tpl = template(kind)
    p, r = sorted(tpl.payload_bytes), sorted(tpl.row_bytes)
    return {"payload_p50": p[len(p) // 2], "payload_min": p[0], "payload_max": p[-1], "row_p50": r[len(r) // 2]}


def run(quick: bool, connections: int | None = None, seconds: float | None = None,
        runs: int | None = None) -> dict[str, Any]:
    connections = connections or CONNECTIONS
    seconds = seconds or (4.0 if quick else 10.0)
    # One connection's rate is steadier than N competing ones: quick mode gives the six
    # (b) variants half the window, which keeps the suite near 40 s.
    seconds_b = seconds / 2 if quick else seconds
    runs = runs or (1 if quick else 3)
    warmup = 0.5 if quick else 1.0
    plan = configs(connections)
    t_build = time.perf_counter()
    for c in plan:
        for k in c.mix:
            template(k, c.payload_type)
    build_s = time.perf_counter() - t_build
    sizes = {k: _sizes(k) for k in KINDS}
    results: dict[str, list[dict[str, Any]]] = {c.key: [] for c in plan}
    # Run by run, every configuration in turn: a noisy spell on the shared host then hits
    # one run of each rather than every run of one.
    for i in range(runs):
        for c in plan:
            print(f"[copy_ceiling] run {i + 1}/{runs}: {c.label} ...", file=sys.stderr, flush=True)
            try:
                window = seconds_b if c.key.startswith("agg1_") else seconds
                r = _run_async(measure_ceiling(PG_ROOT, c.mix, c.connections, window, warmup, c.payload_type,
                                               indexes=c.indexes))
                if not r["stored_ok"]:
                    r["error"] = f"stored {r['stored_rows']} rows, COPYed {r['copied_rows']}"
            except Exception as exc:  # noqa: BLE001 - the report says what failed; the rest still runs
                r = {"error": f"{type(exc).__name__}: {exc}"}
            results[c.key].append(r)
            print(f"[copy_ceiling]   {r.get('error') or format(r['rows_per_s'], ',.0f') + ' rows/s'}",
                  file=sys.stderr, flush=True)
    metrics = _metrics(plan, results, sizes, connections)
    server = next((r["server"] for rs in results.values() for r in rs if "server" in r), None)
    errors = [f"{c.label}: {r['error']}" for c in plan for r in results[c.key] if r.get("error")]
    notes = _notes(connections, sizes, server)
    if errors:
        notes.append("Errors: " + "; ".join(errors))
    return {
        "suite": "copy_ceiling", "title": "COPY ceiling: pre-encoded rows straight into PostgreSQL",
        "params": {"connections": connections, "window_s_a": seconds, "window_s_b": seconds_b, "warmup_s": warmup,
                   "runs": runs,
                   "batch_rows": BATCH_ROWS, "pool_batches": POOL_BATCHES, "mix": _mix_label(DEFAULT_MIX),
                   "sim": f"{N_SYMBOLS} symbols/market, rate {SIM_RATE:g}, seed 1"},
        "metrics": metrics, "notes": notes,
        "details": {"server": server, "payload_sizes": sizes, "template_build_s": build_s,
                    "runs": {c.key: results[c.key] for c in plan}},
    }


def _run_async(coro: Any) -> dict[str, Any]:
    # The writer runs on uvloop; so does this client, so its CPU per row is comparable.
    import uvloop

    return uvloop.run(coro)  # type: ignore[no-any-return]


def _metrics(plan: list[Config], results: dict[str, list[dict[str, Any]]], sizes: dict[str, dict[str, float]],
             connections: int) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    by = {c.key: c for c in plan}

    def rate_note(key: str) -> str:
        mb = _med(_runs_of(results, key, "bytes_per_s", 1e-6))
        cpu = _med(_runs_of(results, key, "postgres_cpu_s_per_m_rows"))
        parts = [", ".join(f"{k} payload p50 {sizes[k]['payload_p50']:g} B, row {sizes[k]['row_p50']:g} B"
                           for k in by[key].mix)]
        if mb is not None:
            parts.append(f"COPY stream {mb:.1f} MB/s")
        if cpu:
            # Less noisy than rows/s on a shared host: what one fully available core would take.
            parts.append(f"{1e6 / cpu:,.0f} rows per postgres CPU-s")
        return "; ".join(parts)

    for key in ("agg", "depth20", "mix"):
        rows.append(metric(by[key].label, _runs_of(results, key, "rows_per_s"), "rows/s", rate_note(key)))
    jsonb1 = _med(_runs_of(results, "agg1_jsonb", "rows_per_s"))
    for c in plan:
        if not c.key.startswith("agg1_"):
            continue
        v = _med(_runs_of(results, c.key, "rows_per_s"))
        ratio = f"x{v / jsonb1:.2f} vs jsonb with indexes" if v is not None and jsonb1 and c.key != "agg1_jsonb" else ""
        rows.append(metric(c.label, _runs_of(results, c.key, "rows_per_s"), "rows/s",
                           "; ".join(x for x in (ratio, rate_note(c.key) if c.key == "agg1_jsonb" else "") if x)))
    jsonb_n = _med(_runs_of(results, "agg", "rows_per_s"))
    rows.append(metric(f"(b) jsonb agg_trades: {connections} conns / 1 conn",
                       jsonb_n / jsonb1 if jsonb_n is not None and jsonb1 else None, "ratio",
                       "medians of the (a) agg_trades row and the 1-conn jsonb row; the host has 2 shared cores"))
    # Server CPU per row (CPU-s per 1M rows = us per row), split by the differences between
    # the 1-connection variants: each differs from the next in one thing only.
    cpu = {c.key: _med(_runs_of(results, c.key, "postgres_cpu_s_per_m_rows")) for c in plan}

    def diff(a: str, b: str) -> float | None:
        x, y = cpu.get(a), cpu.get(b)
        return None if x is None or y is None else x - y

    rows.append(metric("(c) server CPU per row: jsonb parsing", diff("agg1_jsonb", "agg1_bytea"), "us",
                       "jsonb - bytea, both with indexes, 1 conn"))
    rows.append(metric("(c) server CPU per row: unique key + time index", diff("agg1_jsonb", "agg1_jsonb_noindex"),
                       "us", "jsonb with - without indexes, 1 conn"))
    rows.append(metric("(c) server CPU per row: the rest (COPY, heap, WAL, chunk routing)",
                       cpu.get("agg1_bytea_noindex"), "us", "bytea without indexes, 1 conn"))
    rows.append(metric("(c) server CPU per row: all, jsonb with indexes", cpu.get("agg1_jsonb"), "us",
                       "the three rows above add up to about this (each is a difference of medians)"))
    for c in plan:
        rows.append(metric(f"(d) postgres CPU per 1M rows, {c.label[4:]}",
                           _runs_of(results, c.key, "postgres_cpu_s_per_m_rows"), "CPU-s",
                           "backends of the benchmark database, user + system"))
    for c in plan[:3]:  # the (b) variants' client CPU is in the details: the same work per row
        rows.append(metric(f"(d) client CPU per 1M rows, {c.label[4:]}",
                           _runs_of(results, c.key, "client_cpu_s_per_m_rows"), "CPU-s",
                           "this process: batch patching, asyncpg, the loop"))
    for c in plan:
        rows.append(metric(f"(d) postgres busy, {c.label[4:]}", _runs_of(results, c.key, "postgres_cores"),
                           "cores", ""))
    for c in plan:
        on_cpu = [None if r.get("error") else r["waits"].get("CPU", 0.0) for r in results[c.key]]
        rows.append(metric(f"(d) COPY backends on CPU, {c.label[4:]}", on_cpu, "share",
                           "pg_stat_activity samples every 20 ms; most frequent waits: "
                           + _top_waits(results[c.key])))
    return rows


def _top_waits(runs: list[dict[str, Any]], n: int = 3) -> str:
    """The ``n`` most frequent wait events over the runs (median share of the samples)."""
    ok = [r["waits"] for r in runs if not r.get("error")]
    keys = {k for w in ok for k in w if k != "CPU"}
    shares = {k: statistics.median(w.get(k, 0.0) for w in ok) for k in keys}
    top = sorted(shares.items(), key=lambda kv: -kv[1])[:n]
    return ", ".join(f"{k} {v:.0%}" for k, v in top) or "none"


def _notes(connections: int, sizes: dict[str, dict[str, float]], server: dict[str, Any] | None) -> list[str]:
    srv = ("unknown server" if server is None else
           f"PostgreSQL {server['server_version']}, TimescaleDB {server['timescaledb']}, shared_buffers "
           f"{server['shared_buffers']}, wal_buffers {server['wal_buffers']}, max_wal_size {server['max_wal_size']}, "
           f"synchronous_commit {server['synchronous_commit']}, fsync {server['fsync']}")

    def size(kind: str) -> str:
        z = sizes[kind]
        return f"p50 {z['payload_p50']:g} B ({z['payload_min']:g}-{z['payload_max']:g}), row {z['row_p50']:g} B"

    return [
        "What it is: the rate PostgreSQL takes the recorder's own rows when nothing else of the pipeline runs: "
        "rows encoded beforehand with ingestor.wire.rows, binary COPY through ingestor.writer.copier.copy_rows "
        f"(one implicit transaction per COPY), {BATCH_ROWS}-row batches (--batch-rows), back to back on "
        f"{connections} connections (--writer-connections) or 1, into a fresh migrated database per measurement. "
        "(a) is the ceiling: divide the pipeline's stored rate by the (a) row of the same mix to see how close "
        "it gets to the database's limit (`measure_ceiling` takes any mix).",
        f"Server: {srv}. Every measurement starts from empty tables (small indexes, one new hourly chunk); a "
        "table that has grown for hours is slower, so this is the best case.",
        "Payloads (JSON): the simulator's model stepped in-process (20 symbols per market, Spot and USD-M merged "
        f"in event-time order). aggTrade {size('aggTrade')}; depthUpdate, the simulator's diffs at the "
        f"ingestor's default speeds (Spot 100 ms, USD-M 500 ms), {size('depthUpdate')}; depthUpdate20, 20 bid + "
        f"20 ask levels, {size('depthUpdate20')}. Ids and times are 13-digit numbers (a few digits longer than "
        "Binance's ids), unique, and the same in a row's columns and its JSON: after each pass through the "
        f"pool of {POOL_BATCHES} pre-encoded batches every id and time field is shifted in place (numpy, in a "
        "thread, while the connection's current COPY runs).",
        "Rows/s: every COPY's rows are spread over its duration and counted for the part inside the window; "
        "after the window the tables are counted and must hold every row COPYed (else the run is an error).",
        "(b) shows where the ceiling comes from, on one connection: the same aggTrade rows into twins of "
        "agg_trades that differ only in the payload's type (same unique key, time index and hypertable "
        "chunking), and, without the unique key and time index, jsonb and bytea. jsonb's binary COPY field is "
        "a version byte and the JSON text, which the server parses into its binary form for every row; json "
        "only checks the text; text and bytea store the bytes. The issue's reference: jsonb 150-210k rows/s at "
        "300 B on one connection, text/bytea 0.6-0.9 M rows/s.",
        "(c) splits the server's CPU per row (CPU-s per million rows = us per row) by differences between the "
        "(b) variants: parsing jsonb, maintaining the unique key + time index, and the rest (COPY framing, "
        "heap insert, WAL, TimescaleDB's chunk routing). On a shared host CPU per row is steadier than rows/s.",
        "(d) CPU: user + system seconds from /proc of the backends connected to the benchmark database (the "
        "COPY connections and TimescaleDB's worker there; WAL writer, checkpointer and other databases are not "
        "counted) and of this client process, over the window, per million rows. 'postgres busy' below 1 core "
        "on one connection is the time it waits for the client and for each COPY's commit (WAL flush). /proc "
        "counts in 10 ms ticks. 'COPY backends on CPU' is the share of pg_stat_activity samples (every 20 ms, "
        "the COPY connections only) with no wait event; the note names the most frequent waits: LWLock "
        "BufferContent (inserts meeting on the same index pages), WALWrite / WALBufMapping / IO WALSync (WAL "
        "and each COPY's commit), Lock extend (growing the table), Client ClientRead (waiting for this client).",
        "The host is shared (2 cores, other benchmarks may run): the client, the backends and whatever else "
        "runs compete for the same cores, so N connections cannot take more than about 2 cores in all. "
        "Compare medians, look at the runs.",
        "The writer joins queued batches of one table into one COPY of up to 8 MiB when it is behind; COPYs "
        f"of {BATCH_ROWS} rows are what it sends when it keeps up.",
    ]
