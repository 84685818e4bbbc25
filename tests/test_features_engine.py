"""The feature engine: which book a bar sees, waiting for a syncing book, gaps and resyncs,
drift checks, bad input, and rows that do not depend on how the input was interleaved.

Handmade inputs use one USD-M symbol ``X`` (tick 0.1), 1 s bars from t = 1000 ms and two
levels for the imbalance, so each expected value is worked out by hand next to the assert.
"""

from __future__ import annotations

import math
import random
from typing import Any

import pytest

from ingestor.feature_spec import FEATURE_COLUMNS, FeatureSettings
from ingestor.features.engine import DIFF_WAIT_MS, SYNCED, SYNCING, FeatureEngine, FeatureRow
from ingestor.sim.offline import Item, generate

S = FeatureSettings(bar_seconds=1, window=4, obi_levels=2)
TICKS: dict[Any, float] = {("futures", "X"): 0.1, ("spot", "X"): 0.1}


def engine(market: str = "futures", **kw: Any) -> FeatureEngine:
    return FeatureEngine(S, TICKS, start_ms={market: 1000}, **kw)  # type: ignore[dict-item]


def diff(U: int, u: int, pu: int | None, E: int, b: Any = (), a: Any = ()) -> dict[str, Any]:  # noqa: N803
    ev: dict[str, Any] = {"e": "depthUpdate", "E": E, "T": E, "s": "X", "U": U, "u": u,
                          "b": [list(x) for x in b], "a": [list(x) for x in a]}
    if pu is not None:
        ev["pu"] = pu
    return ev


def trade(t: int, p: str = "10.0", q: str = "1", m: bool = False, a: int = 1) -> dict[str, Any]:
    return {"e": "aggTrade", "E": t, "s": "X", "a": a, "p": p, "q": q, "f": a, "l": a, "T": t, "m": m}


SNAP = {"lastUpdateId": 100, "bids": [["10.0", "1"], ["9.9", "1"]], "asks": [["10.1", "1"], ["10.2", "1"]]}
# The three diffs after SNAP: A bridges it (U <= 100 <= u), B is inside bar [1000, 2000),
# C is the first one past its end (E = 2050) and changes the best ask.
A = diff(95, 105, 90, 1100, b=[("10.0", "3")])
B = diff(106, 110, 105, 1900, b=[("9.9", "5")])
C = diff(111, 115, 110, 2050, a=[("10.1", "4")])


def rows(eng: FeatureEngine) -> list[FeatureRow]:
    return eng.outbox.take().rows


def test_a_bar_sees_the_book_at_its_end_not_after_later_diffs() -> None:
    eng = engine()
    eng.snapshot("futures", "X", 900, SNAP)
    eng.depth("futures", [A, B, C])
    eng.trades("futures", [trade(1200), trade(3600, a=2)])  # 3600 >= 2000 + 1500: bar 1000 closes
    (r,) = rows(eng)
    assert r.bar.start_ms == 1000 and r.row["trades"] == 1
    # At 2000 (before C): bids 10.0 x 3, 9.9 x 5; asks 10.1 x 1, 10.2 x 1 -> (8 - 2) / 10.
    assert r.row["obi"] == pytest.approx(0.6)
    # C's ask (10.1 x 4) would have given (8 - 5) / 13.
    assert eng.symbols[("futures", "X")].sync.book.best_ask() == 10.1  # type: ignore[union-attr]


def test_a_bar_waits_for_a_syncing_book_and_gets_the_buffered_cut() -> None:
    eng = engine()
    eng.depth("futures", [A, B, C])  # no book yet: buffered, a snapshot is asked for
    assert eng.outbox.requests == [("futures", "X")]
    eng.trades("futures", [trade(1200), trade(3600, a=2)])
    eng.clock("futures", 3700)
    assert not eng.outbox.rows and eng.waiting_bars() == 1  # waits: the snapshot will decide it
    eng.snapshot("futures", "X", 900, SNAP)
    out = eng.outbox.take()
    (r,) = out.rows
    assert r.row["obi"] == pytest.approx(0.6)  # the same as when the snapshot came first
    (sync,) = out.syncs
    assert (sync.reason, sync.last_update_id, sync.buffered, sync.snapshot_time_ms) == ("start", 100, 3, 900)


def test_a_snapshot_newer_than_the_bar_end_leaves_its_book_unknown() -> None:
    eng = engine()
    late = {"lastUpdateId": 112, "bids": [["10.0", "3"], ["9.9", "5"]], "asks": [["10.1", "2"], ["10.2", "1"]]}
    eng.depth("futures", [A, B, C])
    eng.trades("futures", [trade(1200), trade(3600, a=2)])
    eng.snapshot("futures", "X", 2060, late)  # A, B are older (dropped); C spans 112: first applied
    (r,) = rows(eng)
    # The book at 2000 may hold part of C: unknown, so every book column is NULL.
    for col in ("obi", "buy_wall_price", "dist_to_sell_wall"):
        assert math.isnan(r.row[col]), col


def test_spot_snapshot_exactly_before_the_next_diff_is_known() -> None:
    eng = engine("spot")
    snap = {"lastUpdateId": 105, "bids": [["10.0", "3"], ["9.9", "1"]], "asks": [["10.1", "1"], ["10.2", "1"]]}
    eng.snapshot("spot", "X", 1950, snap)
    # The first diff starts at lastUpdateId + 1, past the bar end: the snapshot *is* the book then.
    eng.depth("spot", [diff(106, 110, None, 2050, a=[("10.1", "4")])])
    eng.trades("spot", [trade(1200), trade(3600, a=2)])
    (r,) = rows(eng)
    assert r.row["obi"] == pytest.approx((4 - 2) / 6)


def test_a_quiet_book_gives_its_current_state_once_no_diff_can_still_come() -> None:
    eng = engine()
    eng.snapshot("futures", "X", 900, SNAP)
    eng.depth("futures", [A, B])
    eng.trades("futures", [trade(1200)])
    eng.clock("futures", 3500)  # the bar closes; a diff before its end may still be on its way
    assert not rows(eng)
    eng.clock("futures", 2000 + 1500 + DIFF_WAIT_MS)  # none came: the book now is the book at 2000
    (r,) = rows(eng)
    assert r.row["obi"] == pytest.approx(0.6)
    eng.depth("futures", [diff(111, 112, 110, 1950, a=[("10.1", "9")])])  # later than that: not counted
    assert not eng.outbox.rows


def test_a_diff_trailing_the_trades_past_the_close_still_counts() -> None:
    # Live, the diffs can come on another connection and through another worker than the
    # trades: the bar's book is the book at its end in exchange time all the same.
    eng = engine()
    eng.snapshot("futures", "X", 900, SNAP)
    eng.depth("futures", [A, B])
    eng.trades("futures", [trade(1200), trade(3600, a=2)])  # the bar closes by trade time
    assert not rows(eng)
    eng.depth("futures", [diff(111, 112, 110, 1950, a=[("10.1", "9")]), diff(113, 114, 112, 2050)])
    (r,) = rows(eng)
    assert r.row["obi"] == pytest.approx((3 + 5 - 9 - 1) / (3 + 5 + 9 + 1))


def test_gap_resyncs_records_the_hole_and_leaves_bars_across_it_unknown() -> None:
    eng = engine()
    eng.snapshot("futures", "X", 900, SNAP)
    eng.depth("futures", [A, B])
    eng.trades("futures", [trade(1200)])
    eng.outbox.take()
    gap = diff(130, 140, 125, 2500, b=[("9.8", "2")])  # pu 125 != 110: ids 111..125 never came
    eng.depth("futures", [gap])
    st = eng.symbols[("futures", "X")]
    assert st.status == SYNCING and not st.sync.synced
    assert eng.outbox.requests[-1] == ("futures", "X")
    eng.trades("futures", [trade(3600, a=2)])
    eng.snapshot("futures", "X", 2600, {"lastUpdateId": 135, "bids": [["10.0", "3"], ["9.9", "5"]],
                                        "asks": [["10.1", "1"], ["10.2", "1"]]})
    assert st.status == SYNCED
    out = eng.outbox.take()
    (g,) = out.gaps
    assert (g.first_missing, g.last_missing, g.from_ms, g.to_ms, g.closed_ms) == (111, 125, 1900, 2500, 3600)
    assert [(s.reason, s.last_update_id, s.buffered) for s in out.syncs] == [("gap", 135, 1)]
    (r,) = out.rows
    assert r.bar.start_ms == 1000 and math.isnan(r.row["obi"])  # 111..125 may have changed it before 2000
    assert eng.counters["futures"].resyncs == {"start": 1, "gap": 1}


def test_drift_check_leaves_out_levels_changed_since_and_resyncs_on_a_mismatch() -> None:
    eng = engine()
    eng.snapshot("futures", "X", 900, SNAP)
    eng.depth("futures", [A, B, C])
    # A snapshot at 112, inside C (111..115): C's level 10.1 may hold anything, the rest must agree.
    inside = {"lastUpdateId": 112, "bids": [["10.0", "3"], ["9.9", "5"]], "asks": [["10.1", "7"], ["10.2", "1"]]}
    eng.snapshot("futures", "X", 2040, inside)
    # One at exactly the book's update id: compared level for level.
    exact = {"lastUpdateId": 115, "bids": [["10.0", "3"], ["9.9", "5"]], "asks": [["10.1", "4"], ["10.2", "1"]]}
    eng.snapshot("futures", "X", 2060, exact)
    # One ahead of the book: checked once the book gets there.
    ahead = {"lastUpdateId": 120, "bids": [["10.0", "3"], ["9.9", "5"]], "asks": [["10.1", "4"], ["10.2", "2"]]}
    eng.snapshot("futures", "X", 2100, ahead)
    out = eng.outbox.take()
    assert [(d.last_update_id, d.mismatches, d.excluded) for d in out.drift] == [(112, 0, 1), (115, 0, 0)]
    eng.depth("futures", [diff(116, 120, 115, 2150, a=[("10.2", "2")])])
    out = eng.outbox.take()
    assert [(d.last_update_id, d.mismatches) for d in out.drift] == [(120, 0)]
    # A snapshot that disagrees on a level no diff touched since: drift, and the book is rebuilt.
    wrong = {"lastUpdateId": 118, "bids": [["10.0", "3"], ["9.9", "6"]], "asks": [["10.1", "4"], ["10.2", "2"]]}
    eng.snapshot("futures", "X", 2140, wrong)
    out = eng.outbox.take()
    assert [(d.last_update_id, d.mismatches, d.excluded) for d in out.drift] == [(118, 1, 1)]
    assert not eng.symbols[("futures", "X")].sync.synced
    assert eng.counters["futures"].drift_mismatch == 1 and eng.counters["futures"].drift_levels == 1
    # The next diff is buffered and asks for a snapshot to rebuild from.
    assert not out.requests
    eng.depth("futures", [diff(121, 125, 120, 2200)])
    assert eng.outbox.take().requests == [("futures", "X")]
    eng.snapshot("futures", "X", 2210, {"lastUpdateId": 123, "bids": [["10.0", "3"]], "asks": [["10.2", "2"]]})
    (sync,) = eng.outbox.take().syncs
    assert (sync.reason, sync.last_update_id, sync.buffered) == ("drift", 123, 1)


def test_a_snapshot_before_any_diff_is_kept_until_a_diff_shows_it_bridges() -> None:
    # Before the first diff it is unknown whether the stream reaches back to the snapshot.
    eng = engine()
    eng.snapshot("futures", "X", 900, SNAP)
    assert not eng.outbox.requests and not eng.symbols[("futures", "X")].sync.synced
    eng.depth("futures", [A])  # U 95 <= 100 <= u 105: it bridges, no request needed
    out = eng.outbox.take()
    assert not out.requests and [(s.last_update_id, s.buffered) for s in out.syncs] == [(100, 1)]
    # One taken before the stream began (its diffs start after it) is dropped, not a gap.
    eng = engine()
    eng.snapshot("futures", "X", 900, SNAP)
    eng.depth("futures", [diff(130, 140, 125, 1100)])
    out = eng.outbox.take()
    assert out.requests == [("futures", "X")] and not out.syncs and not out.gaps
    assert not eng.open_gaps()


def test_snapshots_before_any_diff_are_tried_in_the_order_they_came() -> None:
    # Live, the first snapshot that bridges builds the book and book_syncs names it; a replay
    # is offered the later stored snapshots as well, and must build from the same one (a
    # later one replacing it gave the replay a deeper book than live: walls differed).
    later = {"lastUpdateId": 104, "bids": [["10.0", "1"], ["9.9", "1"], ["9.8", "2"]],
             "asks": [["10.1", "1"], ["10.2", "1"]]}
    eng = engine()
    eng.snapshot("futures", "X", 900, SNAP)
    eng.snapshot("futures", "X", 950, later)
    eng.depth("futures", [A])
    out = eng.outbox.take()
    assert not out.requests and [(s.snapshot_time_ms, s.last_update_id) for s in out.syncs] == [(900, 100)]
    book = eng.symbols[("futures", "X")].sync.book
    assert book is not None and book.bid_floor == 9.9  # SNAP's levels, not the later one's
    # The first one older than the diffs is passed over for the next, with no request.
    eng = engine()
    eng.snapshot("futures", "X", 800, {**SNAP, "lastUpdateId": 80})
    eng.snapshot("futures", "X", 900, SNAP)
    eng.depth("futures", [A])
    out = eng.outbox.take()
    assert not out.requests and [(s.snapshot_time_ms, s.last_update_id) for s in out.syncs] == [(900, 100)]
    # None of them reaches the diffs: one request.
    eng = engine()
    eng.snapshot("futures", "X", 800, {**SNAP, "lastUpdateId": 80})
    eng.snapshot("futures", "X", 850, {**SNAP, "lastUpdateId": 85})
    eng.depth("futures", [A])
    out = eng.outbox.take()
    assert out.requests == [("futures", "X")] and not out.syncs


def test_bad_events_are_counted_and_skipped_and_trades_before_the_start_ignored() -> None:
    eng = engine()
    bad_trades = [trade(1200, p="NaN"), {**trade(1300), "T": "1300"}, {"e": "aggTrade"}, trade(1400, q="-1")]
    assert eng.trades("futures", [trade(500), *bad_trades, trade(1500, p="10.5", a=3)]) == 4
    assert eng.depth("futures", [{"e": "depthUpdate", "E": 1600, "s": "X"}]) == 1
    assert eng.force_orders("futures", [{"e": "forceOrder", "E": 1700, "o": {"s": "X"}}]) == 1
    eng.clock("futures", 3600)
    eng.finish("futures", 2000)
    (r,) = rows(eng)
    # Only the trade at 1500: the one at 500 precedes the first whole bar.
    assert (r.bar.start_ms, r.row["trades"], r.row["open"], r.row["volume"]) == (1000, 1, 10.5, 1.0)
    assert eng.trades("futures", [{**trade(1600), "s": "NOPE"}]) == 0
    assert eng.counters["futures"].unknown_symbol == 1


# ---- the rows do not depend on how the input was interleaved ------------------------------


def _equal(a: dict[str, Any], b: dict[str, Any]) -> bool:
    for col in FEATURE_COLUMNS:
        x, y = a[col], b[col]
        if isinstance(x, float) and isinstance(y, float) and math.isnan(x) and math.isnan(y):
            continue
        if x != y:
            return False
    return True


def _run(ticks: dict[Any, float], items: list[tuple[int, Item]], start: int, batch: int = 1) -> dict[Any, Any]:
    """Feed ``(arrival ms, item)`` in arrival order, consecutive items of one kind in batches of
    up to ``batch``, ticking the clock with the arrival time, as the worker does."""
    eng = FeatureEngine(FeatureSettings(bar_seconds=1, window=10), ticks, snapshot_limit=1000,
                        start_ms={m: start for m, _ in ticks})
    market = next(iter(ticks))[0]
    out: dict[Any, Any] = {}
    i = 0
    while i < len(items):
        at, it = items[i]
        if it.kind == "snapshot":
            eng.snapshot(market, it.symbol, it.time_ms, it.payload)
            i += 1
        else:
            j = i
            while j < len(items) and j - i < batch and items[j][1].kind == it.kind:
                j += 1
            evs = [x.payload for _, x in items[i:j]]
            {"aggTrade": eng.trades, "depthUpdate": eng.depth, "forceOrder": eng.force_orders}[it.kind](market, evs)
            i = j
        eng.clock(market, at)
        for fr in eng.outbox.take().rows:
            out[(fr.symbol, fr.bar.start_ms)] = fr.row
    return out


@pytest.mark.parametrize("market", ["spot", "futures"])
def test_rows_do_not_depend_on_arrival_order_batching_or_snapshot_timing(market: str) -> None:
    ticks, items = generate(market, 45.0, n_symbols=3)  # type: ignore[arg-type]
    start = items[0].time_ms + 2000
    reference = _run(ticks, [(it.time_ms, it) for it in items], start)
    assert len(reference) >= 3 * 40
    assert sum(not math.isnan(r["obi"]) for r in reference.values()) > 0.9 * len(reference)
    if market == "futures":
        assert sum(r["liq_notional"] > 0 for r in reference.values()) >= 3
    rnd = random.Random(7)
    for trial in range(3):
        # Each stream (trades, diffs, liquidations per symbol) is late by its own jitter, within
        # the close delay, keeping its own order; snapshots are late by up to 3 s, so books
        # are often still syncing when their bars close.
        arrivals = []
        lag: dict[tuple[str, str], int] = {}
        last: dict[tuple[str, str], int] = {}
        for it in items:
            key = (it.kind, it.symbol)
            if it.kind == "snapshot":
                at = it.time_ms + rnd.randrange(0, 3000)
            else:
                lag[key] = max(0, min(300, lag.get(key, 0) + rnd.randrange(-40, 41)))
                at = max(it.time_ms + lag[key], last.get(key, 0))  # a stream never overtakes itself
                last[key] = at
            arrivals.append((at, it))
        arrivals.sort(key=lambda x: x[0])  # stable: a stream keeps its order
        got = _run(ticks, arrivals, start, batch=rnd.choice((1, 7, 50)))
        assert got.keys() == reference.keys(), f"trial {trial}"
        bad = [k for k in reference if not _equal(reference[k], got[k])]
        assert not bad, f"trial {trial}: {len(bad)} rows differ, first {bad[:3]}"


def test_usdm_event_right_after_the_snapshot_makes_its_book_known() -> None:
    # lastUpdateId 110 is B's u: C (pu 110) follows the snapshot exactly, so at 2000 the
    # book is the snapshot's, though C's U (111) is past it.
    eng = engine()
    snap = {"lastUpdateId": 110, "bids": [["10.0", "3"], ["9.9", "5"]], "asks": [["10.1", "1"], ["10.2", "1"]]}
    eng.depth("futures", [C])
    eng.snapshot("futures", "X", 1990, snap)
    eng.trades("futures", [trade(1200), trade(3600, a=2)])
    (r,) = rows(eng)
    assert r.row["obi"] == pytest.approx(0.6)


def test_a_start_margin_moves_the_first_bar_clear_of_the_first_event() -> None:
    # A worker replacing a dead one: its first event at 1200 may belong to a bar whose other
    # events its predecessor took, so with a 4.5 s margin bars start at 6000, not 2000.
    eng = FeatureEngine(S, TICKS, start_margin_ms=4500)  # type: ignore[arg-type]
    eng.trades("futures", [trade(1200)])
    assert eng.start_ms["futures"] == 6000
    plain = FeatureEngine(S, TICKS)  # type: ignore[arg-type]
    plain.trades("futures", [trade(1200)])
    assert plain.start_ms["futures"] == 2000


# ---- the trade window: the inline path and the full one give the same bars ------------------


def _bars_equal(a: Any, b: Any) -> bool:
    for f in a.__slots__:
        x, y = getattr(a, f), getattr(b, f)
        if hasattr(x, "shape"):
            if x.shape != y.shape or not (x == y).all():
                return False
        elif not (x == y or (isinstance(x, float) and math.isnan(x) and math.isnan(y))):
            return False
    return True


def test_trades_in_the_window_give_exactly_the_bars_of_the_full_way(monkeypatch: pytest.MonkeyPatch) -> None:
    """Random trades (out of order, late, across bar ends, prices off the tick grid, in
    batches of every size, with clock ticks between): ``FeatureEngine.trades``'s inline path
    and ``BarBuilder.add_trade``'s first branch make the same bars, bit for bit, as every
    trade going the full way (a builder whose trade window never opens)."""
    from ingestor.features.bars import BarBuilder

    rnd = random.Random(5)
    symbols = ("X", "Y", "Z")
    ticks = {("futures", s): 0.1 for s in symbols}
    events: list[dict[str, Any]] = []
    t = 1000
    for i in range(6000):
        # Steps and lags of whole 250 ms too, so that trades land on bar ends and close times.
        t += rnd.choice((0, 0, 1, 3, 20, 150, 250, 500))
        jitter = rnd.choice((0, 0, 0, -5, -250, -400, -1500, -1600))  # late within the delay, and past it
        price = f"{100 + rnd.randrange(-30, 30) / 10 + rnd.choice((0, 0, 0, 0.01, 0.04)):.2f}"
        events.append({**trade(t + jitter, p=price, q=f"{rnd.randrange(1, 500) / 100:.2f}", m=rnd.random() < 0.5,
                                a=i), "s": rnd.choice(symbols)})

    def run() -> tuple[list[Any], dict[str, int]]:
        eng = FeatureEngine(FeatureSettings(bar_seconds=1, window=4), ticks, start_ms={"futures": 1000})
        out, i, batch = [], 0, random.Random(9)
        while i < len(events):
            part = events[i:i + batch.choice((1, 2, 7, 50, 300))]
            eng.trades("futures", part)
            i += len(part)
            eng.clock("futures", part[-1]["T"])
            out += [fr.bar for fr in eng.outbox.take().rows]
        eng.finish("futures", t + 10_000)
        out += [fr.bar for fr in eng.outbox.take().rows]
        c = eng.counters["futures"]
        return out, {"trades": c.trades, "late": c.late, "bars": c.bars}

    fast, fast_counts = run()
    with monkeypatch.context() as m:
        def closed(self: BarBuilder, start: int, acc: Any) -> None:
            self.fast_lo, self.fast_hi = 2**62, -(2**62)

        m.setattr(BarBuilder, "_set_window", closed)
        full, full_counts = run()
    assert fast_counts == full_counts and fast_counts["late"] > 10
    assert len(fast) == len(full) > 3 * 100
    assert all(_bars_equal(a, b) for a, b in zip(fast, full, strict=True))
    # The builder on its own, trade by trade, likewise.
    for_builder = [(e["T"], float(e["p"]), float(e["q"]), e["m"]) for e in events if e["s"] == "X"]

    def built() -> list[Any]:
        b = BarBuilder(0.1, bar_seconds=1)
        out = [bar for x in for_builder for bar in b.add_trade(*x)]
        return out + b.on_clock(t + 10_000)

    one = built()
    with monkeypatch.context() as m:
        m.setattr(BarBuilder, "_set_window", closed)
        other = built()
    assert len(one) == len(other) > 100
    assert all(_bars_equal(a, b) for a, b in zip(one, other, strict=True))


def test_the_trade_window_ends_where_a_bar_closes() -> None:
    """1 s bars, 1.5 s delay: with bar 1000 open and trades in bar 3000, the window ends at
    3500, bar 1000's close: a trade at 3500 closes it (in a batch too), and one for it
    after that is late."""
    from ingestor.features.bars import BarBuilder

    b = BarBuilder(0.1, bar_seconds=1)
    assert b.add_trade(1000, 10.0, 1.0, False) == [] and b.add_trade(2000, 10.1, 1.0, False) == []
    assert b.add_trade(3000, 10.2, 1.0, False) == [] and (b.fast_lo, b.fast_hi) == (3000, 3500)
    assert b.add_trade(3499, 10.3, 1.0, False) == []
    (bar,) = b.add_trade(3500, 10.4, 1.0, False)
    assert bar.start_ms == 1000 and (b.fast_lo, b.fast_hi) == (3000, 4000)
    assert b.add_trade(1999, 10.0, 1.0, False) == [] and b.late_dropped == 1
    eng = engine()
    eng.trades("futures", [trade(1000), trade(2000), trade(3000), trade(3499), trade(3500), trade(1999)])
    assert eng.counters["futures"].late == 1
    eng.finish("futures", 3000)
    assert [(r.bar.start_ms, r.bar.trades) for r in rows(eng)] == [(1000, 1), (2000, 1)]


def test_a_diff_with_a_bad_level_breaks_the_book_until_the_gap_rebuilds_it() -> None:
    eng = engine()
    eng.snapshot("futures", "X", 900, SNAP)
    eng.depth("futures", [A, B])
    st = eng.symbols[("futures", "X")]
    book = st.sync.book
    assert book is not None
    # The bids apply, then an ask does not parse: counted, and the book is broken (half applied).
    bad = diff(111, 115, 110, 2050, b=[("9.8", "2")], a=[("10.1", "x")])
    assert eng.depth("futures", [bad]) == 1
    assert book.broken and book.last_update_id == 110
    assert st._view() is None  # its state is unknown: no bar takes it
    eng.snapshot("futures", "X", 2060, {"lastUpdateId": 110, **{k: SNAP[k] for k in ("bids", "asks")}})
    assert eng.counters["futures"].drift_skipped == 1 and not eng.outbox.drift
    # The next diff shows the hole (111..115 never applied): a gap, and a rebuild.
    eng.depth("futures", [diff(116, 120, 115, 2100)])
    out = eng.outbox.take()
    assert [(g.first_missing, g.last_missing) for g in out.gaps] == [] and out.requests == [("futures", "X")]
    assert [(g.first_missing, g.last_missing) for g in eng.open_gaps()] == [(111, 115)]
    assert st.sync.book is None
