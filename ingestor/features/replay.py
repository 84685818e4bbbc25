"""``ingestor features replay``: the indicators recomputed from stored rows, by the live code.

Stored ``agg_trades``, ``depth_updates``, ``depth_snapshots`` and ``force_orders`` are read
in time order, in chunks (never the whole range in memory), and fed to the same
:class:`FeatureEngine` the feature worker runs, in slices much shorter than the bar close
delay, diffs first: the engine's rows do not depend on how input was interleaved within
the delay, so the slices stand in for live arrival.

Books. The live worker records in ``book_syncs`` which stored snapshot it built each book
from; the book's deeper levels depend on that choice, so the replay builds from the same
ones: for its start, the newest recorded sync at or before ``--from`` (if recent), else the
newest stored snapshot before it; afterwards, when a gap or a drift makes the engine
rebuild a book, the snapshot the live worker used next. Past the last recorded one, any
stored snapshot will do. Diffs are read from the start snapshot on (and, up to
``DIFF_LOOKBACK_MS`` before it, those it does not hold), trades and liquidations from
``--from``.

Replaying the range the live worker covered from its first bar gives its rows exactly
(tested); a replay that starts later differs where the indicators reach back before its
start (``cvd`` counts from the start, the rolling windows fill up again).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import asyncpg
import orjson

from ingestor.binance.streams import MARKETS, Market
from ingestor.db.reference import tick_sizes_at
from ingestor.feature_spec import FeatureSettings
from ingestor.features.engine import FeatureEngine, FeatureRow

RECORDED_LOOKBACK_MS = 10 * 60_000  # a recorded start sync older than this: use a newer snapshot
SNAPSHOT_LOOKBACK_MS = 60 * 60_000  # how far back to look for a snapshot to start from
# A snapshot is stored under the time it was fetched (spot's carries none), diffs under the
# exchange's event time: a diff the snapshot does not hold can carry an earlier time (the
# clocks differ, the stream lags). The live worker got it after the snapshot all the same.
DIFF_LOOKBACK_MS = 30_000
SLICE_MS = 250  # must stay well below the close delay (see the module docstring)
CHUNK_MS = 10_000
MAX_CHUNK_ROWS = 200_000
MIN_CHUNK_ROWS = 50_000


class ReplayError(Exception):
    """The replay cannot run as asked; the message says why."""


@dataclass(frozen=True)
class ReplayRange:
    from_ms: int
    to_ms: int
    markets: tuple[Market, ...] = MARKETS
    symbols: tuple[str, ...] = ()  # empty: every symbol with exchange info stored
    # Computed but not written before ``from_ms``: the rolling windows (and the book) are
    # filled by then, as the live worker's were.
    warmup_ms: int = 0


@dataclass
class ReplayStats:
    start_ms: int = 0  # the first bar's start (--from rounded up to a bar)
    end_ms: int = 0  # the last bar's end (--to rounded down)
    load_from_ms: int = 0  # where reading began (the start snapshots precede the first bar)
    symbols: int = 0
    events: dict[str, int] = field(default_factory=dict)
    rows: int = 0
    syncs: int = 0
    gaps: int = 0
    drift_ok: int = 0
    drift_mismatch: int = 0
    late: int = 0
    position_ms: int = 0
    elapsed_s: float = 0.0


@dataclass
class SyncPlan:
    """Which stored snapshots may build each book (see the module docstring)."""

    start: dict[tuple[Market, str], tuple[int, int]] = field(default_factory=dict)  # -> (time, lid)
    allowed: dict[tuple[Market, str], set[int]] = field(default_factory=dict)
    last_recorded_ms: dict[tuple[Market, str], int] = field(default_factory=dict)

    def accept(self, market: Market, symbol: str, lid: int, time_ms: int) -> bool:
        key = (market, symbol)
        if lid in self.allowed.get(key, ()):
            return True
        return time_ms > self.last_recorded_ms.get(key, -(2**62))

    def load_from(self, market: Market, default: int) -> int:
        times = [t for (m, _), (t, _lid) in self.start.items() if m == market]
        return min([default, *times])


def _dt(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=UTC)


def _ms(column: str) -> str:
    return f"(extract(epoch FROM {column}) * 1000)::bigint"


async def plan_syncs(conn: asyncpg.Connection, keys: list[tuple[Market, str]], start_ms: int,
                     end_ms: int) -> SyncPlan:
    plan = SyncPlan()
    markets = [m for m, _ in keys]
    symbols = [s for _, s in keys]
    wanted = set(keys)
    recorded: dict[tuple[Market, str], list[tuple[int, int]]] = {}
    for r in await conn.fetch(
            f"""SELECT market, symbol, {_ms("snapshot_time")} AS ms, last_update_id FROM book_syncs
                WHERE snapshot_time >= $1 AND snapshot_time < $2
                  AND market = ANY($3::text[]) AND symbol = ANY($4::text[])
                ORDER BY snapshot_time""",
            _dt(start_ms - RECORDED_LOOKBACK_MS), _dt(end_ms), markets, symbols):
        key = (r["market"], r["symbol"])
        if key in wanted:
            recorded.setdefault(key, []).append((r["ms"], r["last_update_id"]))
    fallback = {
        (r["market"], r["symbol"]): (r["ms"], int(r["lid"])) for r in await conn.fetch(
            f"""SELECT DISTINCT ON (market, symbol) market, symbol, {_ms("time")} AS ms,
                       payload->>'lastUpdateId' AS lid
                FROM depth_snapshots
                WHERE time <= $1 AND time >= $2 AND market = ANY($3::text[]) AND symbol = ANY($4::text[])
                ORDER BY market, symbol, time DESC""",
            _dt(start_ms), _dt(start_ms - SNAPSHOT_LOOKBACK_MS), markets, symbols)
    }
    for key in keys:
        rec = recorded.get(key, [])
        before = [x for x in rec if x[0] <= start_ms]
        first = before[-1] if before else fallback.get(key)
        if first is not None:
            plan.start[key] = first
        after = [x for x in rec if first is None or x[0] > first[0]]
        plan.allowed[key] = {lid for _, lid in ([first] if first else []) + after}
        if after:
            plan.last_recorded_ms[key] = after[-1][0]
        elif first is not None:
            plan.last_recorded_ms[key] = first[0]  # its own snapshot builds the book first
    return plan


class _Reader:
    """One market's stored input between two times, each table in its time order."""

    def __init__(self, conn: asyncpg.Connection, market: Market, symbols: list[str]) -> None:
        self.conn = conn
        self.market = market
        self.symbols = symbols

    async def _payloads(self, sql: str, a: int, b: int) -> list[Any]:
        texts = [r[0] for r in await self.conn.fetch(sql, _dt(a), _dt(b), self.market, self.symbols)]
        # One parse for the whole table's rows: their payloads joined as a JSON array.
        return orjson.loads("[" + ",".join(texts) + "]") if texts else []

    async def depth(self, a: int, b: int) -> list[Any]:
        return await self._payloads(
            """SELECT payload::text FROM depth_updates WHERE event_time >= $1 AND event_time < $2
               AND market = $3 AND symbol = ANY($4::text[]) ORDER BY event_time, final_update_id""", a, b)

    async def trades(self, a: int, b: int) -> list[Any]:
        return await self._payloads(
            """SELECT payload::text FROM agg_trades WHERE event_time >= $1 AND event_time < $2
               AND market = $3 AND symbol = ANY($4::text[]) ORDER BY event_time, aggregate_trade_id""", a, b)

    async def force_orders(self, a: int, b: int) -> list[Any]:
        return await self._payloads(
            """SELECT payload::text FROM force_orders WHERE event_time >= $1 AND event_time < $2
               AND market = $3 AND symbol = ANY($4::text[]) ORDER BY event_time""", a, b)

    async def snapshots(self, a: int, b: int) -> list[tuple[int, str, Any]]:
        rows = await self.conn.fetch(
            f"""SELECT {_ms("time")} AS ms, symbol, payload::text AS body FROM depth_snapshots
                WHERE time >= $1 AND time < $2 AND market = $3 AND symbol = ANY($4::text[]) ORDER BY time""",
            _dt(a), _dt(b), self.market, self.symbols)
        return [(r["ms"], r["symbol"], orjson.loads(r["body"])) for r in rows]


def _cut(events: list[Any], i: int, until: int, key: Callable[[Any], int]) -> tuple[list[Any], int]:
    """``events[i:j]`` with every event before ``until`` (the list is in time order)."""
    j = i
    n = len(events)
    while j < n and key(events[j]) < until:
        j += 1
    return events[i:j], j


def _event_ms(ev: Any) -> int:
    return int(ev["E"])


def _snapshot_ms(item: tuple[int, str, Any]) -> int:
    return item[0]


async def replay(
    conn: asyncpg.Connection,
    settings: FeatureSettings,
    rng: ReplayRange,
    write: Callable[[list[FeatureRow]], Awaitable[None]],
    *,
    snapshot_limit: int | None = None,
    progress: Callable[[ReplayStats], None] | None = None,
    begin: Callable[[int, int, list[tuple[Market, str]]], Awaitable[None]] | None = None,
) -> ReplayStats:
    """Recompute ``features`` rows for whole bars inside ``rng``; ``write`` gets them in batches.
    ``begin(first bar start, last bar end, (market, symbol) pairs)`` runs before the first write."""
    started = time.monotonic()
    bar_ms = settings.bar_seconds * 1000
    start = -(-rng.from_ms // bar_ms) * bar_ms
    end = rng.to_ms - rng.to_ms % bar_ms
    if end <= start:
        raise ReplayError(f"the range holds no whole {settings.bar_seconds} s bar")
    stats = ReplayStats(start_ms=start, end_ms=end)
    computed = start - -(-max(0, rng.warmup_ms) // bar_ms) * bar_ms  # the first bar computed
    ticks = {k: v for k, v in (await tick_sizes_at(conn, computed)).items()
             if k[0] in rng.markets and (not rng.symbols or k[1] in rng.symbols)}
    if rng.symbols:
        missing = [s for s in rng.symbols if not any(k[1] == s for k in ticks)]
        if missing:
            raise ReplayError(f"no exchange info stored for {', '.join(missing)} on "
                              f"{' or '.join(rng.markets)} (ingestor run stores it when it starts)")
    if not ticks:
        raise ReplayError("no exchange info stored for any symbol (ingestor run stores it when it starts)")
    keys = sorted(ticks)
    stats.symbols = len(keys)
    if begin is not None:
        await begin(start, end, keys)
    plan = await plan_syncs(conn, keys, computed, end)
    engine = FeatureEngine(settings, ticks, snapshot_limit=snapshot_limit,
                           start_ms={m: computed for m in rng.markets}, accept_snapshot=plan.accept)
    markets = [m for m in rng.markets if any(k[0] == m for k in keys)]
    readers = {m: _Reader(conn, m, [s for mk, s in keys if mk == m]) for m in markets}
    # Enough after the last bar to close it and read the book at its end.
    tail = settings.bar_close_delay_ms + 3000
    a = stats.load_from_ms = min(plan.load_from(m, computed) for m in markets)
    early = {m: [ev for ev in await rd.depth(a - DIFF_LOOKBACK_MS, a) if ev["u"] > plan.start.get(
        (m, ev["s"]), (0, 2**63))[1]] for m, rd in readers.items()}
    chunk = CHUNK_MS
    last_progress = 0.0
    while a < end + tail:
        b = min(a + chunk, end + tail)
        fetched = 0
        data: dict[Market, tuple[list[Any], list[Any], list[Any], list[Any]]] = {}
        for m, rd in readers.items():
            depth = early.pop(m, []) + await rd.depth(a, b)
            snaps = await rd.snapshots(a, b)
            live = b > computed  # trades and liquidations before the first bar are not needed
            trades = await rd.trades(max(a, computed), b) if live else []
            liqs = await rd.force_orders(max(a, computed), b) if live and m == "futures" else []
            data[m] = (depth, snaps, liqs, trades)
            fetched += len(depth) + len(snaps) + len(liqs) + len(trades)
        pos = {m: [0, 0, 0, 0] for m in data}
        t = a
        while t < b:
            t = min(t + SLICE_MS, b)
            for m, (depth, snaps, liqs, trades) in data.items():
                p = pos[m]
                part, p[0] = _cut(depth, p[0], t, _event_ms)
                engine.depth(m, part)
                sn, p[1] = _cut(snaps, p[1], t, _snapshot_ms)
                for ms, symbol, body in sn:
                    engine.snapshot(m, symbol, ms, body)
                part, p[2] = _cut(liqs, p[2], t, _event_ms)
                engine.force_orders(m, part)
                part, p[3] = _cut(trades, p[3], t, _event_ms)
                engine.trades(m, part)
                engine.clock(m, t)
            await _drain(engine, stats, start, end, write)
        for depth, snaps, liqs, trades in data.values():
            for kind, items in (("aggTrade", trades), ("depthUpdate", depth), ("forceOrder", liqs),
                                ("snapshot", snaps)):
                stats.events[kind] = stats.events.get(kind, 0) + len(items)
        stats.position_ms = b
        if fetched > MAX_CHUNK_ROWS and chunk > 1000:
            chunk //= 2
        elif fetched < MIN_CHUNK_ROWS and chunk < 3_600_000:
            chunk *= 2
        a = b
        if progress is not None and time.monotonic() - last_progress >= 1.0:
            last_progress = time.monotonic()
            stats.elapsed_s = last_progress - started
            progress(stats)
    for m in markets:
        engine.finish(m, end)
    await _drain(engine, stats, start, end, write)
    for m in markets:
        c = engine.counters[m]
        stats.drift_ok += c.drift_ok
        stats.drift_mismatch += c.drift_mismatch
        stats.late += c.late
    stats.elapsed_s = time.monotonic() - started
    stats.position_ms = end
    if progress is not None:
        progress(stats)
    return stats


async def _drain(engine: FeatureEngine, stats: ReplayStats, start: int, end: int,
                 write: Callable[[list[FeatureRow]], Awaitable[None]]) -> None:
    out = engine.outbox.take()  # snapshot requests are moot here: the stored ones come in order
    stats.syncs += len(out.syncs)
    stats.gaps += len(out.gaps)
    batch = [fr for fr in out.rows if start <= fr.bar.start_ms < end]
    if batch:
        stats.rows += len(batch)
        await write(batch)
