"""The feature worker's NumpyBook: vectorised diffs, Binance's sync rules for both markets,
the drift check, no drift against the simulator over thousands of updates, and real
captures (never crossed; best bid/ask equal the recorded bookTicker at the same update id).
"""

from __future__ import annotations

import asyncio
import random
from typing import Any

import numpy as np
import orjson
import pytest

from ingestor.binance.depth_sync import DepthGap, DepthSync, LocalBook
from ingestor.features.book import NumpyBook, drift, level_prices, new_sync, parse_levels
from ingestor.sim.captures import CapturedSnapshot, event_type, read_capture, snapshot_events
from ingestor.sim.model import ModelParams
from ingestor.sim.server import SimConfig, Simulator

from .conftest import CAPTURE_SETS, REALDATA, connect, get_json, post_json


def levels(book: NumpyBook) -> tuple[list[tuple[float, float]], list[tuple[float, float]]]:
    """Both sides as [(price, qty)] best first, plain floats for readable asserts."""
    (bp, bq), (ap, aq) = book.bids(), book.asks()
    return list(zip(bp.tolist(), bq.tolist(), strict=True)), list(zip(ap.tolist(), aq.tolist(), strict=True))


# ---- NumpyBook.apply on handmade diffs -------------------------------------------------


def test_apply_inserts_updates_and_deletes_in_one_diff() -> None:
    book = NumpyBook(1)
    assert book.best_bid() is None and book.best_ask() is None and book.mid() is None
    assert not book.crossed()
    book.apply([["100.00", "1.5"], ["99.50", "2"], ["99.90", "0.25"]],
               [["100.10", "3"], ["101.00", "1"]])
    assert levels(book) == ([(100.0, 1.5), (99.9, 0.25), (99.5, 2.0)], [(100.1, 3.0), (101.0, 1.0)])
    assert book.best_bid() == 100.0 and book.best_ask() == 100.1
    assert book.mid() == pytest.approx(100.05)
    # One diff: update 100.00, delete 99.90, insert 99.95 and 98.00, delete an absent level
    # (ignored); asks: delete the best, insert a new best, update the far one.
    book.apply([["99.90", "0.00000000"], ["100.00", "4"], ["99.95", "1"], ["98.00", "7"], ["97.00", "0"]],
               [["100.10", "0"], ["100.05", "0.5"], ["101.00", "2.5"]])
    assert levels(book) == ([(100.0, 4.0), (99.95, 1.0), (99.5, 2.0), (98.0, 7.0)],
                            [(100.05, 0.5), (101.0, 2.5)])
    assert book.depth() == (4, 2)
    assert not book.crossed()
    book.apply([], [])  # an empty side is fine
    assert book.depth() == (4, 2)
    # Emptying a side.
    book.apply([], [["100.05", "0"], ["101.00", "0"]])
    assert book.best_ask() is None and book.mid() is None and book.depth() == (4, 0)


def test_same_price_spelt_differently_is_one_level_and_last_duplicate_wins() -> None:
    book = NumpyBook()
    book.apply([["0.10", "1"]], [])
    book.apply([["0.10000000", "2"]], [])
    assert levels(book)[0] == [(0.1, 2.0)]
    book.apply([["0.2", "1"], ["0.20", "3"]], [])  # a price twice in one diff: the last wins
    assert levels(book)[0] == [(0.2, 3.0), (0.1, 2.0)]
    book.apply([["0.2", "5"], ["0.2", "0"]], [])
    assert levels(book)[0] == [(0.1, 2.0)]


def test_crossed_and_read_only_views() -> None:
    book = NumpyBook()
    book.apply([["10", "1"]], [["10", "1"]])
    assert book.crossed()
    p, q = book.bids()
    with pytest.raises(ValueError):
        q[0] = 5.0
    assert p.dtype == np.float64 and q.dtype == np.float64


def test_parse_levels_is_exact_for_binance_prices() -> None:
    """float64 prices compare as the decimal strings do: distinct -> distinct, order kept."""
    rng = random.Random(3)
    ticks = sorted({rng.randrange(1, 10**15) for _ in range(20_000)})  # up to 9,999,999.99999999
    strings = [[f"{t // 10**8}.{t % 10**8:08d}", "1"] for t in ticks]
    prices, _ = parse_levels(strings)
    assert np.all(np.diff(prices) > 0)  # strictly increasing: no two prices collapse
    assert [round(p * 1e8) for p in prices.tolist()] == ticks


def test_random_diffs_match_the_string_keyed_reference_book() -> None:
    """Thousands of random diffs: NumpyBook equals DepthSync's LocalBook after every one."""
    rng = random.Random(11)
    ref, book = LocalBook(0), NumpyBook(0)
    for _ in range(3000):
        diff: list[list[list[str]]] = [[], []]
        for side in (0, 1):
            base = 10_000 if side == 0 else 10_050
            for tick in rng.sample(range(base - 60, base + 60), rng.randrange(0, 12)):
                qty = "0" if rng.random() < 0.35 else f"{rng.randrange(1, 10**6) / 1000:.3f}"
                diff[side].append([f"{tick / 100:.2f}", qty])
        ref.apply(diff[0], diff[1])
        book.apply(diff[0], diff[1])
        want_b = sorted(((float(p), float(q)) for p, q in ref.bids.items()), reverse=True)
        want_a = sorted((float(p), float(q)) for p, q in ref.asks.items())
        assert levels(book) == (want_b, want_a)


def test_top_reads_the_best_levels_as_the_sorted_book_has_them(monkeypatch: pytest.MonkeyPatch) -> None:
    """``top(n)`` keeps a short ordered list of each side's best levels; random diffs that
    drift the price (so the list runs short and is refilled, or grows long and is
    trimmed): after every one it reads what the sorted sides begin with."""
    import ingestor.features.book as book_module

    monkeypatch.setattr(book_module, "TOP_KEEP", 4)  # lists of 4 to 16 levels: refills and trims happen
    rng = random.Random(12)
    book = NumpyBook(0)
    book.apply([[f"{t / 100:.2f}", "1"] for t in range(9_900, 10_000)],
               [[f"{t / 100:.2f}", "1"] for t in range(10_001, 10_100)])
    assert book.top(3) == (([99.99, 99.98, 99.97], [1.0, 1.0, 1.0]), ([100.01, 100.02, 100.03], [1.0, 1.0, 1.0]))
    mid = 10_000
    for i in range(3000):
        mid += rng.choice((-3, -1, 0, 1, 3)) + (1 if i < 1000 else -1 if i < 2000 else 0)  # up, down, about
        diff: list[list[list[str]]] = [[], []]
        for side, sign in ((0, -1), (1, 1)):
            for _ in range(rng.randrange(0, 10)):
                tick = mid + sign * rng.choice((1, 1, 2, 3, 5, 8, 13, 40, 90))
                qty = "0" if rng.random() < 0.45 else f"{rng.randrange(1, 10**4) / 100:.2f}"
                diff[side].append([f"{tick / 100:.2f}", qty])
        book.apply(diff[0], diff[1])
        n = rng.choice((1, 3, 5))
        (bp, bq), (ap, aq) = book.bids(), book.asks()
        want = ((bp[:n].tolist(), bq[:n].tolist()), (ap[:n].tolist(), aq[:n].tolist()))
        assert book.top(n) == want, i
        assert book.best_bid() == (bp[0] if bp.size else None) and book.best_ask() == (ap[0] if ap.size else None)
    assert book.top(40) == ((book.bids()[0][:40].tolist(), book.bids()[1][:40].tolist()),
                            (book.asks()[0][:40].tolist(), book.asks()[1][:40].tolist()))


def test_a_level_that_does_not_parse_breaks_the_book() -> None:
    book = NumpyBook(1)
    book.apply([["10", "1"]], [["11", "1"]])
    assert book.changed == ((), ()) and not book.broken
    book.apply([["10", "2"]], [["11.5", "1"], ["11", "0"]])
    assert level_prices(book.changed) == ["10", "11.5", "11"]
    with pytest.raises(ValueError):
        book.apply([["9", "1"]], [["12", "one"]])
    assert book.broken and level_prices(book.changed) == ["10", "11.5", "11"]
    with pytest.raises(ValueError, match="rebuild"):
        book.bids()


# ---- sync: Binance's rules through DepthSync(book_factory=NumpyBook) ---------------------


def _ev(U: int, u: int, pu: int | None = None, b: Any = None, a: Any = None) -> dict[str, Any]:  # noqa: N803
    ev: dict[str, Any] = {"e": "depthUpdate", "s": "X", "U": U, "u": u, "b": b or [], "a": a or []}
    if pu is not None:
        ev["pu"] = pu
    return ev


def test_spot_sync_buffers_drops_stale_detects_gap_and_resyncs() -> None:
    sync = new_sync("spot")
    assert isinstance(sync, DepthSync)
    # Diffs arrive while the snapshot request is in flight: they are buffered.
    assert not sync.on_event(_ev(95, 100, b=[["10.0", "9"]]))  # stale: u <= lastUpdateId 103
    assert not sync.on_event(_ev(101, 105, b=[["10.0", "7"]], a=[["10.5", "2"]]))  # bridges 103
    assert not sync.on_event(_ev(106, 110, b=[["9.5", "1"], ["9.8", "0"]], a=[["10.4", "1"]]))
    assert not sync.synced
    snap = {"lastUpdateId": 103, "bids": [["10.0", "3"], ["9.8", "4"]], "asks": [["10.5", "6"], ["11.0", "1"]]}
    assert sync.on_snapshot(snap)
    book = sync.book
    assert isinstance(book, NumpyBook)
    # Snapshot, then 101-105 (10.0 -> 7, ask 10.5 -> 2), then 106-110 (9.5 in, 9.8 out, ask 10.4 in);
    # 95-100 was dropped (it would have set 10.0 to 9 before the snapshot).
    assert levels(book) == ([(10.0, 7.0), (9.5, 1.0)], [(10.4, 1.0), (10.5, 2.0), (11.0, 1.0)])
    assert book.last_update_id == 110 and sync.applied == 2
    assert not sync.on_event(_ev(100, 108, b=[["10.0", "1"]]))  # old: ignored
    assert sync.on_event(_ev(111, 111, a=[["10.4", "0"]]))
    assert book.best_ask() == 10.5
    with pytest.raises(DepthGap):
        sync.on_event(_ev(113, 115))  # 112 is missing
    # Resync: forget, buffer, new snapshot. A snapshot older than the buffer is refused.
    sync.reset()
    assert not sync.synced and sync.book is None
    sync.on_event(_ev(116, 120, b=[["9.0", "2"]]))
    sync.on_event(_ev(121, 121, a=[["12.0", "3"]]))
    assert not sync.on_snapshot({"lastUpdateId": 114, "bids": [], "asks": []})  # 115 missing: fetch again
    assert sync.on_snapshot({"lastUpdateId": 118, "bids": [["9.0", "1"], ["8.0", "1"]], "asks": [["10.9", "5"]]})
    assert sync.book is not None and sync.book is not book
    assert levels(sync.book) == ([(9.0, 2.0), (8.0, 1.0)], [(10.9, 5.0), (12.0, 3.0)])
    assert sync.book.last_update_id == 121


def test_futures_sync_uses_pu_detects_gap_and_resyncs() -> None:
    sync = new_sync("futures")
    sync.on_event(_ev(90, 99, 80, b=[["1.0", "9"]]))  # u < lastUpdateId 110: stale
    sync.on_event(_ev(103, 120, 99, b=[["1.0", "2"]], a=[["1.2", "5"]]))  # U <= 110 <= u: first applied
    sync.on_event(_ev(125, 130, 120, b=[["1.0", "0"], ["0.9", "4"]]))  # U jumps: fine, pu chains
    assert sync.on_snapshot({"lastUpdateId": 110, "bids": [["1.0", "1"], ["0.8", "3"]], "asks": [["1.1", "1"]]})
    book = sync.book
    assert book is not None
    assert levels(book) == ([(0.9, 4.0), (0.8, 3.0)], [(1.1, 1.0), (1.2, 5.0)])
    assert book.last_update_id == 130 and sync.applied == 2
    with pytest.raises(DepthGap):
        sync.on_event(_ev(140, 150, 135))  # pu should be 130
    sync.reset()
    sync.on_event(_ev(160, 170, 150, a=[["1.1", "0"]]))
    sync.on_event(_ev(171, 175, 170, b=[["0.95", "1"]]))
    assert sync.on_snapshot({"lastUpdateId": 165, "bids": [["0.9", "4"]], "asks": [["1.1", "2"], ["1.3", "1"]]})
    assert sync.book is not None
    assert levels(sync.book) == ([(0.95, 1.0), (0.9, 4.0)], [(1.3, 1.0)])
    # A snapshot older than the first buffered event cannot be bridged: fetch another.
    late = new_sync("futures")
    late.on_event(_ev(300, 310, 290))
    assert not late.on_snapshot({"lastUpdateId": 250, "bids": [], "asks": []})
    assert not late.synced and len(late.pending) == 1
    assert late.on_snapshot({"lastUpdateId": 305, "bids": [], "asks": []})  # U 300 <= 305 <= u 310
    assert late.book is not None and late.book.last_update_id == 310
    # A snapshot taken between two events (its lastUpdateId is the next event's pu) follows
    # it exactly, though U > lastUpdateId: applied, not refetched.
    between = new_sync("futures")
    between.on_event(_ev(300, 310, 290, b=[["1.0", "7"]]))
    assert between.on_snapshot({"lastUpdateId": 290, "bids": [["1.0", "1"]], "asks": []})
    assert between.book is not None and between.book.last_update_id == 310
    assert levels(between.book)[0] == [(1.0, 7.0)]
    # A hole inside the buffer still shows as a gap once the book is installed.
    holed = new_sync("futures")
    holed.on_event(_ev(300, 310, 290))
    holed.on_event(_ev(320, 330, 315))
    with pytest.raises(DepthGap):
        holed.on_snapshot({"lastUpdateId": 305, "bids": [], "asks": []})


# ---- drift -------------------------------------------------------------------------------


def test_drift_counts_mismatching_levels_in_the_snapshot_range() -> None:
    book = NumpyBook(7)
    book.apply([["10", "1"], ["9", "2"], ["8", "3"], ["7", "4"]], [["11", "1"], ["12", "2"], ["13", "3"]])
    same = {"lastUpdateId": 7, "bids": [["10", "1"], ["9", "2"]], "asks": [["11", "1"], ["12.0", "2.000"]]}
    assert drift(book, same) == 0  # 8, 7 and 13 lie beyond the snapshot's depth
    assert drift(book, same, limit=2) == 0  # a full depth-2 snapshot: the same
    assert drift(book, same, limit=5) == 3  # fewer levels than the limit: it is the whole book
    qty = {"lastUpdateId": 7, "bids": [["10", "1.5"], ["9", "2"]], "asks": [["11", "1"], ["12", "2"]]}
    assert drift(book, qty) == 1
    # Missing in the book (9.5), missing in the snapshot (9), one quantity wrong (12).
    mixed = {"lastUpdateId": 7, "bids": [["10", "1"], ["9.5", "1"], ["8", "3"]], "asks": [["11", "1"], ["12", "3"]]}
    assert drift(book, mixed) == 3
    empty_side = {"lastUpdateId": 7, "bids": [["10", "1"]], "asks": []}
    assert drift(book, empty_side) == 3  # an empty side covers the whole side
    with pytest.raises(ValueError, match="lastUpdateId"):
        drift(book, {**same, "lastUpdateId": 8})


def test_drift_ignores_levels_deeper_than_the_book_ever_saw() -> None:
    """The book knows bids >= its snapshot's lowest bid (8) and asks <= its highest (12);
    after the price fell, a later snapshot of the same depth reaches 7 and 6, which no diff
    touched since: those are not drift. Diffs inside the known range are checked."""
    book = NumpyBook(1)
    book.apply([["10", "1"], ["9", "1"], ["8", "1"]], [["11", "1"], ["12", "1"]])  # the snapshot
    assert (book.bid_floor, book.ask_ceiling) == (8.0, 12.0)
    book.apply([["10", "0"], ["9", "0"], ["7.5", "2"]], [["9.5", "1"]])  # the price falls
    book.last_update_id = 2
    later = {"lastUpdateId": 2, "bids": [["8", "1"], ["7.5", "2"], ["7", "5"], ["6", "5"]],
             "asks": [["9.5", "1"], ["11", "1"], ["12", "1"]]}
    assert drift(book, later, limit=4) == 0
    wrong = {**later, "bids": [["8", "1"], ["7.5", "3"], ["7", "5"], ["6", "5"]]}
    assert drift(book, wrong, limit=4) == 0  # 7.5 lies below what the book knows
    wrong = {**later, "bids": [["8", "2"], ["7.5", "2"], ["7", "5"], ["6", "5"]]}
    assert drift(book, wrong, limit=4) == 1
    empty = NumpyBook(3)
    empty.apply([], [])  # an empty snapshot: the whole book is known, and empty
    empty.apply([["5", "1"]], [])
    assert drift(empty, {"lastUpdateId": 3, "bids": [["5", "1"], ["4", "1"]], "asks": []}) == 1  # 4 is missing


# ---- no drift against the simulator over thousands of updates ---------------------------


def _in_range(book: NumpyBook, lo: float, hi: float) -> tuple[list[tuple[float, float]], list[tuple[float, float]]]:
    b, a = levels(book)
    return [x for x in b if x[0] >= lo], [x for x in a if x[0] <= hi]


@pytest.mark.parametrize("market", ["spot", "futures"])
async def test_no_drift_against_simulator_over_thousands_of_updates(market: str) -> None:
    n_symbols = 60
    config = SimConfig(n_symbols=n_symbols, seed=5, markets=(market,),  # type: ignore[arg-type]
                       model=ModelParams(rate=8000, panic_every_s=1e9),
                       weight_limit={"spot": 100_000, "futures": 100_000})
    async with Simulator(config) as sim:
        rest = sim.urls[f"{market}_rest"] + ("/api/v3/depth" if market == "spot" else "/fapi/v1/depth")
        admin = sim.urls["admin"]
        _, info, _h = await get_json(sim.urls[f"{market}_rest"] + (
            "/api/v3/exchangeInfo" if market == "spot" else "/fapi/v1/exchangeInfo"))
        symbols = [s["symbol"] for s in info["symbols"]][:n_symbols]
        streams = [f"{s.lower()}@depth@100ms" for s in symbols]
        route = "/stream?streams=" if market == "spot" else "/public/stream?streams="
        client = await connect(sim.urls[f"{market}_ws"] + route + "/".join(streams))
        syncs = {s: new_sync(market) for s in symbols}  # type: ignore[arg-type]
        by_stream = dict(zip(streams, symbols, strict=True))
        level_updates = 0

        async def one() -> None:
            nonlocal level_updates
            msg = await client.recv()
            ev = msg["data"]
            if syncs[by_stream[msg["stream"]]].on_event(ev):
                level_updates += len(ev["b"]) + len(ev["a"])

        async def pump(until: float) -> None:
            while asyncio.get_running_loop().time() < until:
                await one()

        # Subscribe first and let diffs buffer, then the snapshots: the documented order.
        loop = asyncio.get_running_loop()
        await pump(loop.time() + 0.3)
        first: dict[str, Any] = {}
        for s in symbols:
            status, first[s], _h = await get_json(rest, symbol=s, limit=1000)
            assert status == 200
            assert syncs[s].on_snapshot(first[s])
        await pump(loop.time() + 4.0)
        await post_json(admin + "/pause")
        applied = 0
        for s in symbols:
            _, own, _h = await get_json(admin + "/book", market=market, symbol=s)
            _, later, _h = await get_json(rest, symbol=s, limit=1000)
            assert later["lastUpdateId"] == own["lastUpdateId"]
            sync = syncs[s]
            while sync.book is not None and sync.book.last_update_id < own["lastUpdateId"]:
                await one()  # drain what was sent before the pause
            book = sync.book
            assert book is not None and book.last_update_id == own["lastUpdateId"]
            applied += sync.applied
            assert not book.crossed()
            # The later REST snapshot at the same update id: no drift in its range.
            assert drift(book, later, limit=1000) == 0
            # The simulator's whole book, level for level, over the range the first
            # snapshot covered (deeper levels never reached this client).
            lo = min(float(p) for p, _q in first[s]["bids"])
            hi = max(float(p) for p, _q in first[s]["asks"])
            want = NumpyBook(own["lastUpdateId"])
            want.apply(own["bids"], own["asks"])
            got_b, got_a = _in_range(book, lo, hi)
            assert (got_b, got_a) == _in_range(want, lo, hi)
            assert len(got_b) >= 500 and len(got_a) >= 500  # most of the book was compared
        print(f"{market}: {applied} diffs, {level_updates} level updates applied")
        assert applied >= 1500, applied
        assert level_updates >= 20_000, level_updates


# ---- real captures ---------------------------------------------------------------------

MAX_DIFFS = 2500  # per symbol after the sync: keeps the file to a few seconds


@pytest.mark.realdata
@pytest.mark.parametrize(("market", "files"), CAPTURE_SETS, ids=[f[0][:48] for _m, f in CAPTURE_SETS])
def test_real_capture_book_never_crosses_and_matches_book_ticker(market: str, files: list[str]) -> None:
    paths = [REALDATA / f for f in files]
    if not all(p.exists() for p in paths):
        pytest.skip("shared/realdata is not beside the checkout")
    caps = [read_capture(p) for p in paths]
    symbols = sorted({s.symbol for c in caps for s in c.snapshots})
    assert symbols
    syncs = {s: new_sync(market) for s in symbols}  # type: ignore[arg-type]
    tickers: dict[str, dict[int, dict[str, Any]]] = {s: {} for s in symbols}
    for c in caps:
        for f in c.frames:
            if f.stream and f.stream.endswith("@bookTicker") and event_type(f) == "bookTicker":
                t = orjson.loads(f.data)
                if t["s"] in tickers:
                    tickers[t["s"]][t["u"]] = t
    applied = {s: 0 for s in symbols}
    matched = {s: 0 for s in symbols}
    # Receive order: diffs that arrive while the snapshot is in flight are buffered
    # (the hftbacktest trap: the bridging diff comes before the snapshot response).
    for item in snapshot_events(*caps):
        if isinstance(item, CapturedSnapshot):
            sync = syncs[item.symbol]
            if not sync.synced:
                assert sync.on_snapshot(orjson.loads(item.body)), f"{item.symbol}: snapshot older than the diffs"
                book = sync.book
                assert book is not None and not book.crossed()
            continue
        if not item.stream or "@depth" not in item.stream:
            continue
        symbol = item.stream.split("@")[0].upper()
        sync = syncs.get(symbol)  # type: ignore[arg-type]
        if sync is None or applied[symbol] >= MAX_DIFFS:
            continue
        if not sync.on_event(orjson.loads(item.data)):  # raises DepthGap on any gap
            continue
        applied[symbol] += 1
        book = sync.book
        assert book is not None
        assert not book.crossed(), f"{symbol} crossed at u={book.last_update_id}"
        t = tickers[symbol].get(book.last_update_id)
        if t is not None:
            (bp, bq), (ap, aq) = book.bids(), book.asks()
            assert (bp[0], bq[0], ap[0], aq[0]) == (float(t["b"]), float(t["B"]), float(t["a"]), float(t["A"])), \
                f"{symbol} u={book.last_update_id}"
            matched[symbol] += 1
    assert sum(applied.values()) > 0
    for s in symbols:
        assert syncs[s].synced, f"{s}: never synced"
        if tickers[s]:
            assert matched[s] > 0, f"{s}: no bookTicker coincided with an applied diff"
