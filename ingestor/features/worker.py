"""Feature worker process: books, bars and indicators from exactly what is being stored.

In, on one queue: :class:`Feed` batches from the socket workers (the stored payloads of
trades, diffs and liquidations), :class:`Snapshot` from the REST worker (every depth
snapshot it fetched), ``DRAIN`` from the supervisor. Out: ``features``, ``book_syncs``
and ``stream_gaps`` rows to the writer, :class:`SnapshotRequest` to the REST worker, a
status line a second for ``/health`` and the metrics.

The :class:`FeatureEngine` runs on exchange time: per market, the latest event time seen,
moved on by the wall time elapsed since it was seen, so a quiet market still closes its
bars and a local clock that is off by seconds changes nothing.

Shutdown: the supervisor queues ``DRAIN`` once the socket and REST workers have exited;
everything before it is processed, book gaps still open are recorded as such, every row is
handed to the writer, and the process exits. Bars not yet closed are not written: they
would be incomplete.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import time
from array import array
from typing import Any

import asyncpg
import orjson

from ingestor.binance.streams import Market
from ingestor.config import Settings
from ingestor.features.engine import (
    DIFF_WAIT_MS,
    RESYNC_MAX_WAIT_MS,
    UNSYNCED_PROBLEM_MS,
    BookGap,
    FeatureEngine,
    Outbox,
)
from ingestor.wire import rows
from ingestor.wire.batching import Batch, Batcher
from ingestor.wire.child import ChildContext, run_child, tune_gc
from ingestor.wire.delivery import Delivery, WriterLink
from ingestor.wire.feed import DRAIN, Feed, Snapshot, SnapshotRequest

log = logging.getLogger(__name__)

TICK_S = 0.1
SETTLE_S = 5.0  # after a market's first bar starts, before the bars missed before it are looked for
RECOMPUTE_STOP_WAIT_S = 30.0
ACK_WAIT_S = 20.0  # at stop, how long to wait for the writer to acknowledge the last rows
STATUS_PERIOD_S = 1.0
MAX_ITEMS_PER_TURN = 256  # queue items taken per turn before the clock and outputs get a look
WATCH_INDICATORS = ("close", "cvd", "panic_index", "absorption", "obi", "cascade_exhaustion", "fp_imbalance",
                    "dist_to_buy_wall", "dist_to_sell_wall", "signal")
_BAD_EVENT = (KeyError, TypeError, ValueError, IndexError, AttributeError)
class FeatureWorker:
    def __init__(self, ctx: ChildContext, tick_sizes: dict[tuple[Market, str], float], in_queue: Any,
                 link: WriterLink, request_queue: Any, status_queue: Any, dsn: str | None = None,
                 predecessor: dict[str, int] | None = None) -> None:
        """``predecessor``: for a worker started in place of a dead one, the first bar (ms)
        per market of the chain of workers before it; ``None`` for the first worker."""
        after_crash = predecessor is not None
        self.ctx = ctx
        s = self.settings = ctx.settings
        self.fs = s.feature_settings()
        # After a crash the first bar starts a trailing allowance and a bar past the first
        # event, so it holds nothing the predecessor took; the bars before it are recomputed.
        margin = self.fs.bar_close_delay_ms + DIFF_WAIT_MS + self.fs.bar_seconds * 1000 if after_crash else 0
        self.engine = FeatureEngine(self.fs, tick_sizes, snapshot_limit=s.snapshot_limit, start_margin_ms=margin)
        self.in_queue = in_queue
        self.request_queue = request_queue
        self.status_queue = status_queue
        self.delivery = Delivery(ctx.name, link)
        self.batcher = Batcher(self.delivery.send, batch_rows=s.batch_rows, batch_age_s=s.batch_age_ms / 1000,
                               producer=ctx.name)
        self.watch = set(s.feature_watchlist)
        # Exchange clock per market: (latest event time seen, wall time when it was seen).
        self.seen: dict[Market, tuple[int, float]] = {}
        self.rejected: dict[tuple[Market, str], int] = {}
        self.lost: dict[tuple[Market, str], int] = {}  # never handed over: this queue was full
        self.items = 0
        self.dsn = dsn if after_crash else None  # only a worker that replaces a dead one has bars to fill
        # Where the bars owed by this chain of workers start: a predecessor that died before
        # any of its rows were stored leaves no trace in the table, only here.
        self.owed_from: dict[str, int] = dict(predecessor or {})
        self.recomputing: dict[Market, asyncio.Task[None]] = {}  # per market, the fill of missed bars
        self.recomputed: dict[str, Any] = {}
        self.start_syncs = 0  # books built from their first snapshot, not yet logged
        self.resynced_gaps: dict[Market, int] = {}  # book gaps closed by a rebuilt book
        self.totals: Any = None
        self._last_log_reject = 0.0

    # -- input ----------------------------------------------------------------------------

    def _take(self) -> list[Any]:
        """Blocking (briefly): the next items on the queue, up to a turn's worth."""
        try:
            first = self.in_queue.get(timeout=TICK_S)
        except queue.Empty:
            return []
        return [first, *self._take_ready(MAX_ITEMS_PER_TURN - 1)]

    def _take_ready(self, limit: int = MAX_ITEMS_PER_TURN) -> list[Any]:
        """Without blocking: the items on the queue now, at most ``limit``."""
        items: list[Any] = []
        while len(items) < limit:
            try:
                items.append(self.in_queue.get_nowait())
            except queue.Empty:
                break
        return items

    def _lost(self, market: Market, kind: str, n: int) -> None:
        # A socket worker found this worker too far behind and kept these back; the diffs'
        # gap resyncs the book by itself, the trades' leaves bars short. Stored all the same.
        self.lost[(market, kind)] = self.lost.get((market, kind), 0) + n
        log.warning("%s: %d %s message(s) were not handed to the feature worker (it was behind); the bars "
                    "around now lack them: `ingestor features replay` recomputes them from the database",
                    market, n, kind)

    def handle(self, item: Any) -> None:
        eng = self.engine
        self.items += 1
        if isinstance(item, Feed):
            if item.lost:
                self._lost(item.market, item.kind, item.lost)
            try:
                events = orjson.loads(item.data)
            except orjson.JSONDecodeError:
                self._reject(item.market, item.kind, item.count, "not JSON")
                return
            if item.kind == "aggTrade":
                bad = eng.trades(item.market, events)
            elif item.kind == "depthUpdate":
                bad = eng.depth(item.market, events)
            else:
                bad = eng.force_orders(item.market, events)
            if bad:
                self._reject(item.market, item.kind, bad, "bad fields")
            self._saw(item.market)
        elif isinstance(item, Snapshot):
            try:
                eng.snapshot(item.market, item.symbol, item.time_ms, orjson.loads(item.body))
            except _BAD_EVENT as exc:  # JSONDecodeError is a ValueError
                self._reject(item.market, "snapshot", 1, f"{item.symbol}: {exc!r}")
        else:
            log.error("unexpected item on the feature queue: %r", type(item))

    def _saw(self, market: Market) -> None:
        ms = self.engine.data_ms.get(market)
        if ms is not None and ms != self.seen.get(market, (None, 0.0))[0]:
            self.seen[market] = (ms, time.time())

    def _reject(self, market: Market, kind: str, n: int, why: str) -> None:
        key = (market, kind)
        self.rejected[key] = self.rejected.get(key, 0) + n
        now = time.monotonic()
        if now - self._last_log_reject >= 10.0:  # bad input must not flood the log
            self._last_log_reject = now
            log.warning("%s %s: %d event(s) the feature engine could not use (%s)", market, kind, n, why)

    # -- clock and output -----------------------------------------------------------------

    def tick(self) -> None:
        wall = time.time()
        for market, (ms, at) in self.seen.items():
            self.engine.clock(market, ms + int((wall - at) * 1000))
        self.emit(self.engine.outbox.take(), wall)
        self.batcher.flush()
        self.delivery.poll()

    def emit(self, out: Outbox, wall: float) -> None:
        from ingestor import metrics as M

        bar_s = self.fs.bar_seconds
        w = self.ctx.name
        oldest: dict[Market, int] = {}  # per market, the earliest bar end emitted now
        for fr in out.rows:
            self.batcher.add("features", rows.features(fr.market, fr.symbol, fr.bar.start_ms, bar_s, fr.row),
                             fr.bar.end_ms)
            if fr.bar.end_ms < oldest.get(fr.market, 2**62):
                oldest[fr.market] = fr.bar.end_ms
            if fr.symbol in self.watch:
                for name in WATCH_INDICATORS:
                    M.FEATURE_VALUE.labels(w, fr.market, fr.symbol, name).set(float(fr.row[name]))
        for market, end_ms in oldest.items():  # one observation per turn: metrics cost nothing per row
            M.FEATURE_BAR_DELAY.labels(w, market).observe(max(0.0, wall - end_ms / 1000))
        # A resync closes the book's gap in the same turn: one line says both.
        closed: dict[tuple[Market, str], list[BookGap]] = {}
        for g in out.gaps:
            if g.closed_ms is not None:
                closed.setdefault((g.market, g.symbol), []).append(g)
            self._gap_row(g.market, g.symbol, g.first_missing, g.last_missing, g.from_ms, g.to_ms,
                          g.detected_ms, g.closed_ms)
        for sy in out.syncs:
            self.batcher.add("book_syncs", rows.book_sync(sy.market, sy.symbol, sy.time_ms, sy.snapshot_time_ms,
                                                          sy.last_update_id, sy.reason, sy.buffered), sy.time_ms)
            if sy.reason != "start":
                gaps = closed.get((sy.market, sy.symbol))
                gap = gaps.pop(0) if gaps else None
                missed = "" if gap is None else f", missed update ids {gap.first_missing}..{gap.last_missing}"
                ids = {} if gap is None else {"from_id": gap.first_missing, "to_id": gap.last_missing}
                log.warning("%s %s: book resynced after a %s from the snapshot at update id %d (%d buffered diffs%s)",
                            sy.market, sy.symbol, sy.reason, sy.last_update_id, sy.buffered, missed, extra={
                                "event": "book_resync", "market": sy.market, "symbol": sy.symbol, "stream": "book",
                                "reason": sy.reason, "last_update_id": sy.last_update_id, "buffered": sy.buffered,
                                **ids})
        self.start_syncs += sum(1 for sy in out.syncs if sy.reason == "start")
        for left in closed.values():  # closed by no resync of this turn: a line of their own
            for g in left:
                log.warning("%s %s: book missed update ids %d..%d; resynced", g.market, g.symbol, g.first_missing,
                            g.last_missing, extra=self._gap_context(g.market, g.symbol, g.first_missing,
                                                                    g.last_missing, "resynced"))
        for market, symbol in out.requests:
            self.request_queue.put(SnapshotRequest(market, symbol))
        for g, asks in out.unsynced:  # once per book and unsynced spell; its resync closes the row
            self.batcher.add("stream_gaps", rows.stream_gap(g.market, g.symbol, "book", g.first_missing,
                                                            g.last_missing, g.from_ms, g.to_ms, g.detected_ms),
                             g.detected_ms)
            log.warning("%s %s: book not synced for %d s (%d snapshot(s) asked for, none usable); asking again "
                        "with backoff up to %d s; recorded as an open book gap (update ids %d..%d)", g.market,
                        g.symbol, UNSYNCED_PROBLEM_MS // 1000, asks, RESYNC_MAX_WAIT_MS // 1000, g.first_missing,
                        g.last_missing,
                        extra={**self._gap_context(g.market, g.symbol, g.first_missing, g.last_missing, "open"),
                               "event": "book_unsynced", "snapshot_requests": asks})
        for d in out.drift:
            if d.mismatches:
                log.warning("%s %s: book drifted from the snapshot at update id %d: %d level(s) differ "
                            "(%d left out as changed since); resyncing", d.market, d.symbol, d.last_update_id,
                            d.mismatches, d.excluded, extra={
                                "event": "book_drift", "market": d.market, "symbol": d.symbol, "stream": "book",
                                "last_update_id": d.last_update_id, "mismatches": d.mismatches,
                                "excluded": d.excluded})

    def _gap_row(self, market: Market, symbol: str, first: int, last: int, from_ms: int, to_ms: int,
                 detected_ms: int, closed_ms: int | None) -> None:
        how = "open" if closed_ms is None else "resynced"
        row = rows.stream_gap(market, symbol, "book", first, last, from_ms, to_ms, detected_ms, how, closed_ms)
        if closed_ms is None:
            self.batcher.add("stream_gaps", row, detected_ms)
        else:
            self.resynced_gaps[market] = self.resynced_gaps.get(market, 0) + 1
            # A closing row: it updates the gap's open row if one was stored (a book unsynced
            # past UNSYNCED_PROBLEM_MS), else stands alone; in either order the row ends closed.
            self.delivery.send(Batch("stream_gaps", 1, row, array("q", [detected_ms]).tobytes(), kind="close"))
        if closed_ms is None:  # a resynced one has its line from the resync
            log.warning("%s %s: book missed update ids %d..%d; not resynced before stopping", market, symbol, first,
                        last, extra=self._gap_context(market, symbol, first, last, how))

    @staticmethod
    def _gap_context(market: Market, symbol: str, first: int, last: int, how: str) -> dict[str, Any]:
        return {"event": "gap", "market": market, "symbol": symbol, "stream": "book", "from_id": first,
                "to_id": last, "missing": last - first + 1, "closed_how": how}

    # -- the loop -------------------------------------------------------------------------

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        last_status = last_tick = 0.0
        draining = False
        while not draining:
            # What is there already is taken right here; only an empty queue is waited on in a
            # thread (a thread hop per turn cost a tenth of the worker's CPU at full rate).
            if self.delivery.paused:
                # Over its share of --max-buffer-mb: no input taken until the writer makes room,
                # so this process does not grow; the producers keep back what the queue cannot
                # hold (bounded, counted as Feed.lost) and the stored data has it all.
                items = []
                await asyncio.sleep(TICK_S)
            else:
                items = self._take_ready()
                if items:
                    await asyncio.sleep(0)  # the loop's other work (signals, the recompute task) still runs
                else:
                    items = await loop.run_in_executor(None, self._take)
            for item in items:
                if isinstance(item, str) and item == DRAIN:
                    draining = True
                    break
                self.handle(item)
            now = time.monotonic()
            # The clock and the outputs once per tick, not per turn: many small batches (more
            # shards) would otherwise cost a tick each.
            if now - last_tick >= TICK_S or not items:
                last_tick = now
                self.tick()
            if now - last_status >= STATUS_PERIOD_S:
                last_status = now
                self.report()
                self._maybe_recompute()
            if not items and (self.ctx.orphaned or self.ctx.stopping.is_set()):
                break  # no supervisor to send DRAIN, or told to stop by a signal: finish what we have
        await self.finish()

    def _maybe_recompute(self) -> None:
        """Once per market, when its first bar has started and settled: fill the bars missed
        since the last stored one (see ``recompute``)."""
        if self.dsn is None:
            return
        wall_ms = time.time() * 1000
        for market, start in self.engine.start_ms.items():
            if market not in self.recomputing and wall_ms >= start + SETTLE_S * 1000:
                self.recomputing[market] = asyncio.ensure_future(self._recompute(market, start))

    async def _recompute(self, market: Market, first_bar_ms: int) -> None:
        from ingestor.features.recompute import missed_span, recompute

        try:
            span = await missed_span(self.dsn or "", market, self.fs.bar_seconds, first_bar_ms,
                                     self.owed_from.get(market))
            if span is None:  # the predecessor's last bar ends where this worker's first begins
                self.recomputed[market] = {"from_ms": first_bar_ms, "to_ms": first_bar_ms, "ok": True}
            else:
                ok = await recompute(self.settings, self.dsn or "", span)
                self.recomputed[market] = {"from_ms": span.from_ms, "to_ms": span.to_ms, "ok": ok}
        except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            log.warning("%s: could not look for bars missed before this worker: %s", market, exc)

    async def finish(self) -> None:
        pending = [t for t in self.recomputing.values() if not t.done()]
        if pending:  # a fill in progress is given its time: its rows are the missing ones
            await asyncio.wait(pending, timeout=RECOMPUTE_STOP_WAIT_S)
        self.tick()
        for g in self.engine.open_gaps():
            self._gap_row(g.market, g.symbol, g.first_missing, g.last_missing, g.from_ms, g.to_ms,
                          g.detected_ms, None)
        self.batcher.flush(force=True)
        await self.delivery.wait_acked(ACK_WAIT_S)
        self.report()
        c = {m: self.engine.counters[m] for m in self.engine.start_ms}
        log.info("stopped: %s", ", ".join(f"{m} {x.bars} bars, {x.trades} trades, {x.diffs} diffs"
                                          for m, x in c.items()) or "no input")

    def report(self) -> None:
        from ingestor import metrics as M

        if self.totals is None:
            self.totals = M.Totals()
        if self.start_syncs:  # one line a second, however many books a start builds
            log.info("%d book(s) built from their first snapshot", self.start_syncs)
            self.start_syncs = 0
        t, w, eng = self.totals, self.ctx.name, self.engine
        wall = time.time()
        markets: dict[str, Any] = {}
        for m in eng.start_ms:
            c = eng.counters[m]
            for kind, n in (("aggTrade", c.trades), ("depthUpdate", c.diffs), ("forceOrder", c.liquidations),
                            ("snapshot", c.snapshots)):
                t.set(M.FEATURE_EVENTS.labels(w, m, kind), n)
            for reason, n in c.resyncs.items():
                t.set(M.BOOK_SYNCS.labels(w, m, reason), n)
            t.set(M.BOOK_SNAPSHOT_REQUESTS.labels(w, m, "first"), c.snapshot_requests - c.snapshot_retries)
            t.set(M.BOOK_SNAPSHOT_REQUESTS.labels(w, m, "retry"), c.snapshot_retries)
            for result, n in (("ok", c.drift_ok), ("mismatch", c.drift_mismatch), ("skipped", c.drift_skipped)):
                t.set(M.DRIFT_CHECKS.labels(w, m, result), n)
            t.set(M.DRIFT_LEVELS.labels(w, m), c.drift_levels)
            t.set(M.FEATURE_LATE.labels(w, m), c.late)
            t.set(M.FEATURE_BARS.labels(w, m), c.bars)
            states = eng.book_states(m)
            for state, n in states.items():
                M.BOOKS.labels(w, m, state).set(n)
            data = eng.data_ms.get(m)
            lag = None if data is None else round(wall - data / 1000, 3)
            if lag is not None:
                M.FEATURE_INPUT_LAG.labels(w, m).set(lag)
            markets[m] = {"books": states, "unsynced_books": eng.unsynced_books(m),
                          "snapshot_requests": c.snapshot_requests, "bars": c.bars, "input_lag_s": lag, "late": c.late,
                          "resyncs": dict(c.resyncs), "drift_mismatches": c.drift_mismatch,
                          "drift_checks": c.drift_ok + c.drift_mismatch}
        for (m, kind), n in self.rejected.items():
            t.set(M.FEATURE_REJECTED.labels(w, m, kind), n)
        for m, n in self.resynced_gaps.items():
            t.set(M.GAPS_CLOSED.labels(w, m, "book", "resynced"), n)
        for (m, kind), n in self.lost.items():
            t.set(M.FEATURE_LOST.labels(w, m, kind), n)
        for table, n in self.batcher.sent_rows.items():
            t.set(M.ROWS_SENT.labels(w, table), n)
        try:
            depth = self.in_queue.qsize()
        except NotImplementedError:  # macOS
            depth = -1
        M.QUEUE_DEPTH.labels(w, "feature_in").set(depth)
        M.BUFFER_BYTES.labels(w).set(self.delivery.pending_bytes)
        M.BACKPRESSURE.labels(w).set(int(self.delivery.paused))
        self.status_queue.put({
            "worker": w, "kind": "features", "time": wall, "markets": markets, "queue_depth": depth,
            "waiting_bars": eng.waiting_bars(), "rejected": sum(self.rejected.values()),
            "lost": sum(self.lost.values()),
            "recomputed": self.recomputed,
            # The supervisor hands this to the next worker if this one dies: the bars are
            # owed from the chain's first bar until this worker's have been stored.
            "bar_starts": {m: self.owed_from.get(m, ms) for m, ms in eng.start_ms.items()},
            "pending_rows": self.batcher.pending_rows(), **self.delivery.status(),
        })


def main(settings: Settings, name: str, tick_sizes: dict[tuple[Market, str], float], in_queue: Any,
         link: WriterLink, request_queue: Any, status_queue: Any, dsn: str | None = None,
         predecessor: dict[str, int] | None = None) -> None:
    async def body(ctx: ChildContext) -> None:
        worker = FeatureWorker(ctx, tick_sizes, in_queue, link, request_queue, status_queue, dsn, predecessor)
        tune_gc()
        await worker.run()
        ctx.release_queues(status_queue, request_queue, *((link.queue,) if ctx.orphaned else ()))

    # Like the writer, it takes no stop event: it stops on DRAIN, after the producers.
    run_child(settings, name, None, body)

