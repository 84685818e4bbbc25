"""The feature engine: a synced book, bars and the indicators for every (market, symbol).

Pure state: no I/O, no wall clock. The feature worker (live) and ``ingestor features
replay`` (stored rows) drive the same engine with the same events and get the same rows.
What comes in are calls (events, snapshots, clock ticks); what goes out collects in
:class:`Outbox` (feature rows, snapshot requests, book syncs, book gaps, drift checks),
which the caller drains.

The rows depend on what the messages say, not on when they arrived:

- bars are by trade time (:class:`BarBuilder`); a market's bars start at the first bar
  boundary at or after ``start_ms`` (the live worker's first event, a replay's ``--from``),
  so neither begins with a bar it saw only part of;
- the book a bar sees (FEATURES.md 4.5, 4.6) is the book *at the bar's end in exchange
  time*: the state after every applied diff whose event time ``E`` is before the end. It
  is read ("cut") just before the first diff at or past the end is applied, which is the
  same place in the diff sequence however diffs were batched, buffered or interleaved
  with trades. The first diff applied after a (re)sync cuts nothing but "unknown" for
  the ends it passes (the snapshot may postdate them), unless it follows the snapshot
  exactly (``U`` is its ``lastUpdateId + 1``, or on USD-M ``pu`` is its ``lastUpdateId``);
- a bar that closes before any diff has passed its end waits ``DIFF_WAIT_MS`` more for
  one (live, a diff can trail the trades: another connection, another worker); then it
  takes the current book when the book is synced and has applied a diff since its
  snapshot (no later diff has come, so the current book *is* the book at the end); while
  a snapshot is awaited the bar waits (at most ``max_book_wait_ms`` of clock), since the
  buffered diffs will decide it;
- books are built only from snapshots the caller offers, and ``accept_snapshot`` lets a
  replay build them from exactly the snapshots the live worker used (``book_syncs``).

A message later than the close delay is the one thing live and replay may see
differently: live has closed its bar and drops it (counted), a replay reads it in order.
"""

from __future__ import annotations

import math
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ingestor.binance.depth_sync import DepthGap, DepthSync
from ingestor.binance.streams import Market
from ingestor.feature_spec import FeatureSettings
from ingestor.features.bars import Bar, BarBuilder, Liquidation
from ingestor.features.book import F64, NumpyBook, changed_prices, drift, level_prices, new_sync
from ingestor.features.indicators import BookSide, FeatureState

IDLE, SYNCING, SYNCED = "idle", "syncing", "synced"
_BAD = (KeyError, TypeError, ValueError, IndexError, AttributeError)
# Diffs whose changed levels are kept per book, to check a snapshot the book has moved past
# (about 3 s of a 100 ms stream: snapshots and diffs reach the worker well within that).
RECENT_DIFFS = 32
MAX_PENDING_CHECKS = 2  # snapshots ahead of the book kept for a check
MAX_HELD = 4  # snapshots offered before any diff, kept to try in order (the newest kept)
REQUEST_TIMEOUT_MS = 30_000  # ask again for a snapshot that has not come by then
# A book that does not sync asks again after a wait that doubles from the first to the
# last (each drawn between half and all of it, so books refused together spread out): a
# snapshot that is always older than the diffs (a lagging REST server) costs a few
# requests a minute, not the whole weight budget (issue 16 item 12: 118 in 32 s).
# tests/test_resync_backoff.py counts the snapshots served.
RESYNC_FIRST_WAIT_MS = 1_000
RESYNC_MAX_WAIT_MS = 60_000
# A book unsynced this long is a problem: listed in the worker's status (/health turns it
# into a problem) and recorded as an open book gap until it syncs.
UNSYNCED_PROBLEM_MS = 60_000
MAX_BOOK_WAIT_MS = 15_000  # a bar waits this long past its close for a syncing book
DIFF_WAIT_MS = 2_000  # a bar waits this long past its close for a diff past its end
# Diffs buffered while a snapshot is awaited: the last this much event time is kept (twice the
# time after which the snapshot is asked for again; see SymbolState._trim_pending).
PENDING_KEEP_MS = 60_000


@dataclass(frozen=True, slots=True)
class BookView:
    """The book at a bar's end: each side best first, the levels the indicators read."""

    bids: BookSide
    asks: BookSide


@dataclass(frozen=True, slots=True)
class FeatureRow:
    market: Market
    symbol: str
    bar: Bar
    row: dict[str, Any]


@dataclass(frozen=True, slots=True)
class SyncRecord:
    """A book built from a snapshot: a ``book_syncs`` row."""

    market: Market
    symbol: str
    time_ms: int  # engine clock when it synced
    snapshot_time_ms: int  # the snapshot's stored time (depth_snapshots.time)
    last_update_id: int
    reason: str  # start | gap | drift
    buffered: int  # diffs applied from the buffer


@dataclass(frozen=True, slots=True)
class BookGap:
    """Diffs the book never got, and when the resync closed it: a ``stream_gaps`` row."""

    market: Market
    symbol: str
    first_missing: int
    last_missing: int
    from_ms: int  # event time of the last diff applied before the hole
    to_ms: int  # event time of the diff that revealed it
    detected_ms: int
    closed_ms: int | None  # None: not resynced (yet)


@dataclass(frozen=True, slots=True)
class DriftCheck:
    market: Market
    symbol: str
    last_update_id: int
    mismatches: int
    excluded: int  # levels left out because diffs after the snapshot changed them


@dataclass
class Outbox:
    rows: list[FeatureRow] = field(default_factory=list)
    requests: list[tuple[Market, str]] = field(default_factory=list)
    syncs: list[SyncRecord] = field(default_factory=list)
    gaps: list[BookGap] = field(default_factory=list)
    drift: list[DriftCheck] = field(default_factory=list)
    # Books unsynced for UNSYNCED_PROBLEM_MS, once each: their gap, open (closed by the
    # resync, like any book gap, with the same key).
    unsynced: list[tuple[BookGap, int]] = field(default_factory=list)  # (gap, snapshots asked for)

    def take(self) -> Outbox:
        """Everything collected so far; the outbox starts empty again."""
        out = Outbox(self.rows, self.requests, self.syncs, self.gaps, self.drift, self.unsynced)
        self.rows, self.requests, self.syncs, self.gaps, self.drift, self.unsynced = [], [], [], [], [], []
        return out


@dataclass
class Counters:
    """Running totals per market, read by the worker's metrics and status."""

    trades: int = 0
    diffs: int = 0
    liquidations: int = 0
    snapshots: int = 0
    bars: int = 0
    late: int = 0
    resyncs: dict[str, int] = field(default_factory=dict)  # reason -> count
    drift_ok: int = 0
    drift_mismatch: int = 0
    drift_levels: int = 0
    drift_skipped: int = 0
    unknown_symbol: int = 0
    snapshot_requests: int = 0  # snapshots asked for (first asks and retries)
    snapshot_retries: int = 0  # of those, asked again because the book still did not sync


AcceptSnapshot = Callable[[Market, str, int, int], bool]  # (market, symbol, lastUpdateId, stored time)


def _accept_any(market: Market, symbol: str, last_update_id: int, time_ms: int) -> bool:
    return True


class SymbolState:
    """One (market, symbol): its book sync, bar builder, indicator state and cuts."""

    def __init__(self, engine: FeatureEngine, market: Market, symbol: str, tick_size: float) -> None:
        self.engine = engine
        self.market = market
        self.symbol = symbol
        s = engine.settings
        self.bar_ms = s.bar_seconds * 1000
        self.sync: DepthSync[NumpyBook] = new_sync(market, self._before_apply)
        self.counters = engine.counters[market]
        self.bars = BarBuilder.from_settings(s, tick_size)
        self.features = FeatureState(tick_size, s)
        self.status = IDLE
        self.reason = "start"
        self.requested_ms = 0
        self.snapshot_time_ms = 0
        self.fresh = False  # synced, no diff applied since the snapshot
        self.decided_end = -(2**62)  # bar ends up to here have their book decided
        self.cuts: deque[tuple[int, BookView | None]] = deque()  # (bar end, book then), increasing
        self.waiting: deque[Bar] = deque()  # closed bars waiting for their book
        self.recent: deque[tuple[int, list[Any]]] = deque(maxlen=RECENT_DIFFS)  # (u, prices it changed)
        self.synced_lid = 0
        self.checks: list[dict[str, Any]] = []  # snapshots ahead of the book, to check when it gets there
        self.last_e = 0
        self.open_gap: BookGap | None = None
        self.held: list[tuple[dict[str, Any], int]] = []  # snapshots offered before any diff, as they came
        # Asking for snapshots (engine clock): the asks since the book was last synced, the
        # earliest time of the next one, whether one is owed, since when the book is unsynced.
        self.asks = 0
        self.ask_after_ms = 0
        self.ask_owed = False
        self.unsynced_ms: int | None = None
        self.unsynced_reported = False

    # -- the book ---------------------------------------------------------------------------

    def _view(self) -> BookView | None:
        """The levels 4.5 and 4.6 read: the best ``obi_levels`` and every level inside the
        wall band around the mid (read-only arrays the book never changes: no copies).
        None (unknown) when the book's last diff failed half way."""
        book = self.sync.book
        assert book is not None
        if book.broken:
            return None
        s = self.engine.settings
        (bp, bq), (ap, aq) = book.bids(), book.asks()
        if bp.size == 0 or ap.size == 0:
            return BookView((bp, bq), (ap, aq))
        mid = (float(bp[0]) + float(ap[0])) / 2.0
        nb = max(s.obi_levels, int(np.searchsorted(-bp, -mid * (1 - s.wall_band_pct / 100), side="right")))
        na = max(s.obi_levels, int(np.searchsorted(ap, mid * (1 + s.wall_band_pct / 100), side="right")))
        return BookView((bp[:nb], bq[:nb]), (ap[:na], aq[:na]))

    def _decide_until(self, end: int, view: BookView | None) -> None:
        """Record ``view`` as the book at every undecided bar end up to ``end``."""
        first = max(self.decided_end + self.bar_ms, self.engine.first_end(self.market))
        for e in range(first, end + 1, self.bar_ms):
            self.cuts.append((e, view))
        if end > self.decided_end:
            self.decided_end = end
        if not self.bars.started:
            # No trade yet, so no bar takes these cuts (``_resolve`` drops those before the
            # first bar): keep the ends a first trade could still fall before, as long as a
            # trade later than the close delay is taken at all (the book wait to spare);
            # else a symbol whose book moves but which does not trade keeps a book per bar.
            # A first trade older than that gets "unknown" (``decided_end``) for those ends.
            eng = self.engine
            oldest = eng.now(self.market) - eng.settings.bar_close_delay_ms - eng.max_book_wait_ms
            cuts = self.cuts
            while cuts and cuts[0][0] < oldest:
                cuts.popleft()

    def _before_apply(self, ev: dict[str, Any]) -> None:
        """DepthSync is about to apply ``ev``: cut the book for the bar ends it passes."""
        book = self.sync.book
        assert book is not None
        end = ev["E"] - ev["E"] % self.bar_ms  # the latest bar end at or before E
        if end > self.decided_end:
            lid = book.last_update_id
            if self.fresh and ev["U"] != lid + 1 and ev.get("pu") != lid:
                self._decide_until(end, None)
            else:
                self._decide_until(end, self._view())
        self.fresh = False
        # The diff applied before this one (NumpyBook keeps its levels): this one's are
        # book.changed once it is applied. Its prices are kept, not its level lists (see
        # NumpyBook.changed): level_prices, inline.
        bids, asks = book.changed
        self.recent.append((book.last_update_id, [lv[0] for side in (bids, asks) for lv in side]))
        self.last_e = ev["E"]

    def on_diff(self, ev: dict[str, Any]) -> None:
        # What the sync rules read, checked before the event is buffered or applied (a bad
        # level is caught where it is parsed: see NumpyBook on a diff that fails half way).
        if not (isinstance(ev["E"], int) and isinstance(ev["U"], int) and isinstance(ev["u"], int)
                and isinstance(ev["b"], list) and isinstance(ev["a"], list)
                and (self.market == "spot" or isinstance(ev["pu"], int))):
            raise TypeError("E, U, u, pu, b or a")
        self.counters.diffs += 1
        sync = self.sync
        try:
            sync.on_event(ev)  # buffered while there is no book
        except DepthGap as gap:
            self._gap(gap, ev)
            return
        if sync.book is None:
            self._try_held()
            if sync.book is None:
                self._trim_pending(ev["E"])
        if self.checks and sync.book is not None:
            self._run_checks()
        if self.waiting:
            self._resolve()

    def _try_held(self) -> None:
        """Diffs are buffering: build the book from the first snapshot that came before them
        and reaches them, or ask. The first, not the latest: a replay is offered every stored
        snapshot of the span, and must build from the one ``book_syncs`` names, which is the
        first the live worker found bridging (it tried them in the same order)."""
        held, self.held = self.held, []
        for snapshot, time_ms in held:
            if not self._install(snapshot, time_ms, ask_again=False):
                break  # synced, or reset by a gap among the buffered diffs: the rest are moot
        if not self.sync.synced and self.status != SYNCING:
            self._request()

    def _trim_pending(self, e_ms: int) -> None:
        """Let go of buffered diffs older than ``PENDING_KEEP_MS`` before the newest (at ``e_ms``),
        once the oldest is twice that old. A snapshot is fetched after it is asked for, so it
        needs only the diffs from about then on; one older than the buffer is refused and asked
        for again, as one older than the first buffered diff always was (DepthSync). Without
        this a snapshot that never comes (REST down) grows the buffer by every diff, for good."""
        pending = self.sync.pending
        if pending and pending[0]["E"] < e_ms - 2 * PENDING_KEEP_MS:
            keep_from = e_ms - PENDING_KEEP_MS
            i = 0
            while pending[i]["E"] < keep_from:  # the last one (at e_ms) stops it
                i += 1
            del pending[:i]

    def _gap(self, gap: DepthGap, ev: dict[str, Any]) -> None:
        eng = self.engine
        # The state at the ends between the last diff and this one is unknown.
        end = ev["E"] - ev["E"] % self.bar_ms
        if end > self.decided_end:
            self._decide_until(end, None)
        if self.open_gap is None:  # a second gap while resyncing is the same hole, wider
            self.open_gap = BookGap(self.market, self.symbol, gap.first_missing, gap.last_missing,
                                    self.last_e, ev["E"], eng.now(self.market), None)
        self._reset("gap")
        self.sync.on_event(ev)  # the first diff of the new sync: buffered
        self._try_held()
        self._resolve()

    def _reset(self, reason: str) -> None:
        """Forget the book; the next diff is buffered and asks for a snapshot."""
        self.sync.reset()
        self.status = IDLE
        self.reason = reason
        self.checks.clear()
        self.recent.clear()
        self.fresh = False
        self.held = []

    def _request(self) -> None:
        """The book needs a snapshot: ask now, or once the backoff since the last ask is over."""
        eng = self.engine
        now = eng.now(self.market)
        self.status = SYNCING
        if self.unsynced_ms is None:
            self.unsynced_ms = now
        eng.attention.add(self)
        if now < self.ask_after_ms:
            self.ask_owed = True  # asked by the clock (tick) when the wait is over
            return
        self._ask(now)

    def _ask(self, now: int) -> None:
        eng = self.engine
        c = eng.counters[self.market]
        c.snapshot_requests += 1
        if self.asks:
            c.snapshot_retries += 1
        wait = min(RESYNC_MAX_WAIT_MS, RESYNC_FIRST_WAIT_MS * 2 ** min(self.asks, 16))
        self.asks += 1
        self.ask_after_ms = now + int(wait * (0.5 + 0.5 * eng.rng.random()))
        self.ask_owed = False
        self.requested_ms = now
        eng.outbox.requests.append((self.market, self.symbol))

    def _synced(self) -> None:
        """Synced: the next resync asks at once, and starts a new backoff."""
        self.asks = 0
        self.ask_after_ms = 0
        self.ask_owed = False
        self.unsynced_ms = None
        self.unsynced_reported = False

    def _report_unsynced(self, now: int) -> None:
        """Once per unsynced spell, past UNSYNCED_PROBLEM_MS: the book's gap, recorded open."""
        if self.unsynced_reported or self.unsynced_ms is None or now - self.unsynced_ms < UNSYNCED_PROBLEM_MS:
            return
        self.unsynced_reported = True
        if self.open_gap is None:  # never synced (or lost without a gap): the diffs it could not use
            pending = self.sync.pending
            first = int(pending[0]["U"]) if pending else self.synced_lid + 1
            last = int(pending[-1]["u"]) if pending else first
            self.open_gap = BookGap(self.market, self.symbol, first, last, self.unsynced_ms, now, now, None)
        self.engine.outbox.unsynced.append((self.open_gap, self.asks))

    def on_snapshot(self, snapshot: dict[str, Any], time_ms: int) -> None:
        eng = self.engine
        lid = int(snapshot["lastUpdateId"])
        if self.sync.synced:
            self._queue_check(snapshot)
        elif eng.accept_snapshot(self.market, self.symbol, lid, time_ms):
            if self.sync.pending:
                self._install(snapshot, time_ms)
            else:
                # With no diff buffered there is no telling whether the stream reaches back to
                # it (a snapshot taken before the subscription would look like a gap): keep it
                # for the first diff, which shows whether it bridges.
                self.held.append((snapshot, time_ms))
                if len(self.held) > MAX_HELD:
                    del self.held[0]

    def _install(self, snapshot: dict[str, Any], time_ms: int, ask_again: bool = True) -> bool:
        """Build the book from ``snapshot`` and the buffered diffs. True only when the snapshot
        is older than the buffered diffs (refused; asked for again if ``ask_again``)."""
        eng = self.engine
        lid = int(snapshot["lastUpdateId"])
        applied = self.sync.applied
        self.fresh = True
        self.synced_lid = lid
        try:
            ok = self.sync.on_snapshot(snapshot)
        except _BAD:  # a bad level in the snapshot or a buffered diff: start again
            self.fresh = False
            self._reset(self.reason)
            raise
        except DepthGap as gap:  # a hole among the buffered diffs: the next ones ask again
            self.fresh = False
            if self.open_gap is None:
                self.open_gap = BookGap(self.market, self.symbol, gap.first_missing, gap.last_missing,
                                        self.last_e, self.last_e, eng.now(self.market), None)
            self._reset("gap")
            return False
        if not ok:  # older than the buffered diffs: ask for a newer one
            self.fresh = False
            if ask_again:
                self._request()
            return True
        self.status = SYNCED
        self._synced()
        self.snapshot_time_ms = time_ms
        c = eng.counters[self.market]
        c.resyncs[self.reason] = c.resyncs.get(self.reason, 0) + 1
        now = max(eng.now(self.market), time_ms)  # a snapshot may come before any event
        eng.outbox.syncs.append(SyncRecord(self.market, self.symbol, now, time_ms, lid, self.reason,
                                           self.sync.applied - applied))
        if self.open_gap is not None:
            g = self.open_gap
            eng.outbox.gaps.append(BookGap(g.market, g.symbol, g.first_missing, g.last_missing, g.from_ms,
                                           g.to_ms, g.detected_ms, now))
            self.open_gap = None
        self._resolve()
        return False

    # -- drift ------------------------------------------------------------------------------

    def _queue_check(self, snapshot: dict[str, Any]) -> None:
        book = self.sync.book
        assert book is not None
        if int(snapshot["lastUpdateId"]) > book.last_update_id:
            self.checks.append(snapshot)  # the book gets there later
            if len(self.checks) > MAX_PENDING_CHECKS:
                del self.checks[0]
                self.engine.counters[self.market].drift_skipped += 1
        else:
            self._check(snapshot)

    def _run_checks(self) -> None:
        book = self.sync.book
        assert book is not None
        ready = [s for s in self.checks if int(s["lastUpdateId"]) <= book.last_update_id]
        if ready:
            self.checks = [s for s in self.checks if int(s["lastUpdateId"]) > book.last_update_id]
            for s in ready:
                if self.sync.book is not None:  # a mismatch resyncs and drops the rest
                    self._check(s)

    def _check(self, snapshot: dict[str, Any]) -> None:
        """Compare the book with a snapshot at or behind it (FEATURES.md, "no drift")."""
        eng = self.engine
        book = self.sync.book
        assert book is not None
        c = eng.counters[self.market]
        if book.broken:  # its last diff failed half way: the next diff resyncs it
            c.drift_skipped += 1
            return
        lid = int(snapshot["lastUpdateId"])
        changed: F64 | None = None
        if lid != book.last_update_id:
            # Levels the diffs after the snapshot touched are left out; the diffs kept must
            # reach back to the snapshot (or to the sync), or it cannot be placed.
            later = [keys for u, keys in self.recent if u > lid]
            covered = lid >= self.synced_lid and (len(later) < len(self.recent) or
                                                  len(self.recent) < RECENT_DIFFS)
            if not covered:
                c.drift_skipped += 1
                return
            changed = changed_prices([*later, level_prices(book.changed)])
        mismatches = drift(book, snapshot, eng.snapshot_limit, changed)
        excluded = 0 if changed is None else int(np.unique(changed).size)
        eng.outbox.drift.append(DriftCheck(self.market, self.symbol, lid, mismatches, excluded))
        if mismatches:
            c.drift_mismatch += 1
            c.drift_levels += mismatches
            self._reset("drift")
        else:
            c.drift_ok += 1

    # -- bars -------------------------------------------------------------------------------

    def on_bars(self, bars: list[Bar]) -> None:
        if bars:
            self.waiting.extend(bars)
            self._resolve()

    def _resolve(self) -> None:
        """Emit the waiting bars, oldest first, as far as their book is decided."""
        eng = self.engine
        while self.waiting:
            bar = self.waiting[0]
            end = bar.end_ms
            cuts = self.cuts
            while cuts and cuts[0][0] < end:
                cuts.popleft()
            if cuts and cuts[0][0] == end:
                view = cuts.popleft()[1]
            elif end <= self.decided_end:
                view = None  # decided before this symbol's first bar: cannot happen, but safe
            elif self.status == SYNCED and not self.fresh and (
                    eng.now(self.market) - end >= eng.settings.bar_close_delay_ms + DIFF_WAIT_MS):
                view = self._view()  # no diff past the end has come: the book now is the book then
                self.decided_end = end
            elif eng.now(self.market) - end >= eng.max_book_wait_ms + eng.settings.bar_close_delay_ms:
                synced = self.status == SYNCED and self.snapshot_time_ms <= end
                view = self._view() if synced else None
                self.decided_end = end
            else:
                self.engine.attention.add(self)  # wait for the book; the clock looks again
                return
            self.waiting.popleft()
            if view is None:
                row = self.features.update(bar)
            else:
                row = self.features.update(bar, view.bids, view.asks)
            eng.outbox.rows.append(FeatureRow(self.market, self.symbol, bar, row))
            eng.counters[self.market].bars += 1

    def tick(self, now_ms: int) -> None:
        self.on_bars(self.bars.on_clock(now_ms))
        if self.waiting:
            self._resolve()
        if self.status == SYNCING:
            if self.ask_owed:
                if now_ms >= self.ask_after_ms:
                    self._ask(now_ms)
            elif now_ms - self.requested_ms >= REQUEST_TIMEOUT_MS:
                self._request()
            self._report_unsynced(now_ms)

    @property
    def needs_clock(self) -> bool:
        """Bars waiting for the book, or a snapshot awaited (to ask again)."""
        return bool(self.waiting) or self.status == SYNCING


class FeatureEngine:
    """Every (market, symbol) of the feed. ``tick_sizes`` (exchange info's PRICE_FILTER) says
    which symbols exist; events of others are counted and skipped."""

    def __init__(
        self,
        settings: FeatureSettings,
        tick_sizes: dict[tuple[Market, str], float],
        *,
        snapshot_limit: int | None = None,
        start_ms: dict[Market, int] | None = None,
        accept_snapshot: AcceptSnapshot = _accept_any,
        max_book_wait_ms: int = MAX_BOOK_WAIT_MS,
        start_margin_ms: int = 0,
    ) -> None:
        self.settings = settings
        # Added to the first event's time before its bar boundary is taken. A worker that
        # replaces a dead one sets it: events of the bars around its first one may have gone
        # to its predecessor (the feeds of a market come over several connections, skewed),
        # so it starts clear of them and the bars in between are recomputed from storage.
        self.start_margin_ms = start_margin_ms
        self.tick_sizes = dict(tick_sizes)
        self.snapshot_limit = snapshot_limit
        self.accept_snapshot = accept_snapshot
        self.max_book_wait_ms = max_book_wait_ms
        self.rng = random.Random(0)  # the backoff's jitter (seeded: a replay asks nothing anyway)
        self.bar_ms = settings.bar_seconds * 1000
        self.symbols: dict[tuple[Market, str], SymbolState] = {}
        self._builders: dict[Market, dict[str, BarBuilder]] = {}  # per market, symbol -> its bars
        self.attention: set[SymbolState] = set()  # symbols the clock must visit before the next bar
        self.outbox = Outbox()
        self.counters: dict[Market, Counters] = {"spot": Counters(), "futures": Counters()}
        self.start_ms: dict[Market, int] = {}
        self._clock: dict[Market, int] = {}
        self.data_ms: dict[Market, int] = {}  # latest event time seen in the data (not from ticks)
        self._ticked: dict[Market, int] = {}
        for market, ms in (start_ms or {}).items():
            self.set_start(market, ms)

    # -- time -------------------------------------------------------------------------------

    def set_start(self, market: Market, ms: int) -> None:
        """Bars of ``market`` start at the first bar boundary at or after ``ms`` (plus the
        start margin)."""
        ms += self.start_margin_ms
        self.start_ms[market] = -(-ms // self.bar_ms) * self.bar_ms

    def first_end(self, market: Market) -> int:
        return self.start_ms.get(market, 0) + self.bar_ms

    def now(self, market: Market) -> int:
        return self._clock.get(market, 0)

    def _seen(self, market: Market, ms: int) -> None:
        if market not in self.start_ms:
            self.set_start(market, ms)
        if ms > self._clock.get(market, 0):
            self._clock[market] = ms
        if ms > self.data_ms.get(market, 0):
            self.data_ms[market] = ms

    def clock(self, market: Market, now_ms: int) -> None:
        """Exchange time has reached ``now_ms``: close the bars that are due (cheap to call
        often: the symbols are visited once per bar, and when books are awaited)."""
        if market not in self.start_ms:
            self.set_start(market, now_ms)
        now = self._clock[market] = max(now_ms, self._clock.get(market, 0))
        due = (now - self.settings.bar_close_delay_ms) // self.bar_ms
        if due > self._ticked.get(market, -(2**62)):
            self._ticked[market] = due
            visit: list[SymbolState] = [st for (m, _), st in self.symbols.items() if m == market]
        else:
            visit = [st for st in self.attention if st.market == market]
        for st in visit:
            st.tick(now)
            if not st.needs_clock:
                self.attention.discard(st)

    # -- input ------------------------------------------------------------------------------

    def _state(self, market: Market, symbol: str) -> SymbolState | None:
        st = self.symbols.get((market, symbol))
        if st is None:
            tick = self.tick_sizes.get((market, symbol))
            if tick is None:
                self.counters[market].unknown_symbol += 1
                return None
            st = self.symbols[(market, symbol)] = SymbolState(self, market, symbol, tick)
            self._builders.setdefault(market, {})[symbol] = st.bars
        return st

    # Each input method returns how many events it could not use (a field missing or of the
    # wrong type): they are skipped, the rest of the batch is not. The socket worker has
    # checked the fields it stores; these are the ones only the indicators read.

    def trades(self, market: Market, events: list[dict[str, Any]]) -> int:
        """``aggTrade`` payloads, in arrival order. The hot loop of the worker: per trade the
        checks and the bar builder; clock and counters move once per batch.

        A trade that passes the checks on their fast side (an ``int`` time, a ``bool`` maker
        flag, a positive finite price and notional) and falls in its builder's trade window
        (``BarBuilder.fast_lo``/``fast_hi``: the bar being built, no bar to close) is added
        here inline, exactly as ``BarBuilder.add_trade``'s first branch adds it; every other
        one goes the full way below (``tests/test_features_engine.py`` holds the two to the
        same bars)."""
        symbols = self.symbols
        builders = self._builders.setdefault(market, {})
        get = builders.get
        start = self.start_ms.get(market)
        inf = math.inf
        newest = 0
        bad = slow = n = late = 0  # slow: good trades that went the full way; n: those of known symbols
        for ev in events:
            try:
                t, symbol = ev["T"], ev["s"]
                price, qty, maker = float(ev["p"]), float(ev["q"]), ev["m"]
            except _BAD:
                bad += 1
                continue
            pq = price * qty
            if t.__class__ is int and (maker is True or maker is False) and 0.0 < price and 0.0 < pq < inf:
                b = get(symbol)
                if b is not None and b.fast_lo <= t < b.fast_hi:
                    if t > newest:
                        newest = t
                    acc = b.fast_acc
                    if t < acc.open_t:
                        acc.open, acc.open_t = price, t
                    if t >= acc.close_t:
                        acc.close, acc.close_t = price, t
                    if price > acc.high:
                        acc.high = price
                    elif price < acc.low:
                        acc.low = price
                    acc.trades += 1
                    acc.quote += pq
                    cell = acc.cells.get(price) or b._cell(acc, price)
                    if maker:
                        acc.sell += qty
                        cell[1] += qty
                    else:
                        acc.buy += qty
                        cell[0] += qty
                    continue
            if not isinstance(t, int) or not isinstance(maker, bool):  # T or m
                bad += 1
                continue
            if not (0.0 < price < inf and 0.0 < qty < inf):  # p or q (NaN fails too)
                bad += 1
                continue
            slow += 1
            if t > newest:
                newest = t
            if start is None:  # the market's first event: its first whole bar follows it
                self.set_start(market, t)
                start = self.start_ms[market]
            st = symbols.get((market, symbol)) or self._state(market, symbol)
            if st is None:
                continue
            n += 1
            if t < start:
                continue  # before the first whole bar
            builder = st.bars
            dropped = builder.late_dropped
            bars = builder.add_trade(t, price, qty, maker)
            late += builder.late_dropped - dropped
            if bars:
                st.on_bars(bars)
        if newest:
            self._seen(market, newest)
        c = self.counters[market]
        c.trades += len(events) - bad - slow + n  # the inline ones, and the known ones of the rest
        c.late += late
        return bad

    def depth(self, market: Market, events: list[dict[str, Any]]) -> int:
        """``depthUpdate`` payloads, in arrival order. A diff with a bad level leaves the book
        broken (see ``NumpyBook``), and the next one shows the hole: a gap and a resync."""
        bad = 0
        symbols = self.symbols
        for ev in events:
            try:
                self._seen(market, ev["E"])
                symbol = ev["s"]
                st = symbols.get((market, symbol)) or self._state(market, symbol)
                if st is not None:
                    st.on_diff(ev)
            except _BAD:
                bad += 1
        return bad

    def force_orders(self, market: Market, events: list[dict[str, Any]]) -> int:
        """``forceOrder`` payloads (the event, with the order under ``o``)."""
        c = self.counters[market]
        bad = 0
        for ev in events:
            try:
                self._seen(market, ev["E"])
                st = self._state(market, ev["o"]["s"])
                liq = Liquidation.from_payload(ev) if st is not None else None
            except _BAD:
                bad += 1
                continue
            if st is None or liq is None:
                continue
            c.liquidations += 1
            if liq.time_ms < self.start_ms[market]:
                continue
            late = st.bars.late_dropped
            st.bars.add_liquidation(liq)
            c.late += st.bars.late_dropped - late
        return bad

    def snapshot(self, market: Market, symbol: str, time_ms: int, snapshot: dict[str, Any]) -> None:
        """A REST depth snapshot (requested or periodic) and its stored time."""
        st = self._state(market, symbol)
        if st is None:
            return
        self.counters[market].snapshots += 1
        st.on_snapshot(snapshot, time_ms)

    # -- output -----------------------------------------------------------------------------

    def finish(self, market: Market, until_ms: int) -> None:
        """End of input (a replay's ``--to``): close every bar that ends by ``until_ms`` and
        decide their books with what is known."""
        self.clock(market, until_ms + self.settings.bar_close_delay_ms + self.max_book_wait_ms)

    def open_gaps(self) -> list[BookGap]:
        """Book gaps not resynced yet (recorded as open when the worker stops)."""
        return [st.open_gap for st in self.symbols.values() if st.open_gap is not None]

    def book_states(self, market: Market) -> dict[str, int]:
        out = {IDLE: 0, SYNCING: 0, SYNCED: 0}
        for (m, _), st in self.symbols.items():
            if m == market:
                out[st.status] += 1
        return out

    def unsynced_books(self, market: Market) -> list[str]:
        """Symbols of ``market`` whose book has been unsynced for UNSYNCED_PROBLEM_MS or more."""
        return sorted(s for (m, s), st in self.symbols.items() if m == market and st.unsynced_reported)

    def waiting_bars(self) -> int:
        return sum(len(st.waiting) for st in self.symbols.values())


def nan_to_none(v: Any) -> Any:
    """For JSON and display: NaN (undefined, NULL in the table) as None."""
    return None if isinstance(v, float) and math.isnan(v) else v
