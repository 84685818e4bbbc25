"""Bars and indicators (FEATURES.md 4.1-4.8) against values worked out by hand."""

from __future__ import annotations

import math
import random
from typing import Any

import numpy as np
import pytest

from ingestor.feature_spec import FEATURE_COLUMNS, FeatureSettings
from ingestor.features.bars import Bar, BarBuilder, Liquidation, Trade
from ingestor.features.indicators import FeatureState, footprint

NAN = math.nan


def arr(*xs: float) -> np.ndarray:
    return np.array(xs, dtype=np.float64)


def mk(
    i: int,
    o: float,
    h: float,
    lo: float,
    c: float,
    buy: float = 0.0,
    sell: float = 0.0,
    *,
    liq_long: float = 0.0,
    liq_short: float = 0.0,
    fp_ask: tuple[float, ...] = (),
    fp_bid: tuple[float, ...] = (),
    quote: float = 0.0,
) -> Bar:
    """Bar number ``i`` of 60 s; the footprint buckets default to none."""
    return Bar(
        i * 60_000, (i + 1) * 60_000, o, h, lo, c,
        volume=buy + sell, buy_volume=buy, sell_volume=sell, trades=1 if buy + sell else 0,
        quote_volume=quote, liq_long_notional=liq_long, liq_short_notional=liq_short,
        fp_ask=arr(*fp_ask), fp_bid=arr(*fp_bid),
    )  # fmt: skip


def nan(x: Any) -> bool:
    return isinstance(x, float) and math.isnan(x)


# ----------------------------------------------------------------------------------------------
# Bars


def test_bar_fields_late_trade_and_clock_close_with_delay() -> None:
    b = BarBuilder(tick_size=0.1)  # 60 s bars, 1500 ms delay
    assert b.add_trade(1_000, 100.0, 1.0, False) == []  # market buy
    assert b.add_trade(20_000, 101.0, 2.0, True) == []  # market sell
    assert b.add_trade(59_000, 99.5, 0.5, False) == []  # market buy
    assert b.add_trade(61_000, 100.5, 1.0, False) == []  # next bar; watermark 61000 < 60000 + 1500
    assert b.add_trade(59_999, 100.2, 1.0, True) == []  # late, still counted in bar 0 (sell)
    assert b.on_clock(61_499) == []
    (bar,) = b.on_clock(61_500)  # 60000 + 1500: bar 0 closes
    assert (bar.start_ms, bar.end_ms) == (0, 60_000)
    # open = first by time (T=1000), close = last by time (the late T=59999 one)
    assert (bar.open, bar.high, bar.low, bar.close) == (100.0, 101.0, 99.5, 100.2)
    assert bar.buy_volume == 1.5  # 1 + 0.5
    assert bar.sell_volume == 3.0  # 2 + 1
    assert bar.volume == 4.5
    assert bar.trades == 4
    # quote = 100*1 + 101*2 + 99.5*0.5 + 100.2*1 = 100 + 202 + 49.75 + 100.2
    assert bar.quote_volume == pytest.approx(451.95)
    # k = max(1, round(100 * 1 / 1e4 / 0.1)) = max(1, round(0.1)) = 1: buckets of one tick 0.1,
    # from tick 995 (99.5) to tick 1010 (101.0): 16 buckets
    assert bar.fp_bucket == pytest.approx(0.1)
    assert bar.fp_first == 995 and bar.fp_ask.size == 16
    assert bar.fp_ask[0] == 0.5 and bar.fp_ask[1000 - 995] == 1.0 and bar.fp_ask.sum() == 1.5
    assert bar.fp_bid[1002 - 995] == 1.0 and bar.fp_bid[1010 - 995] == 2.0 and bar.fp_bid.sum() == 3.0
    # a trade for the closed bar is now dropped and counted
    assert b.add_trade(59_999, 100.0, 1.0, False) == [] and b.late_dropped == 1


def test_empty_bars_close_with_previous_close() -> None:
    b = BarBuilder(tick_size=0.1, bar_seconds=60, bar_close_delay_ms=1500)
    b.add_trade(61_000, 100.5, 1.0, False)
    assert b.on_clock(121_499) == []
    bars = b.on_clock(241_500)  # closes [60000,120000), [120000,180000) and [180000,240000)
    assert [x.start_ms for x in bars] == [60_000, 120_000, 180_000]
    for empty in bars[1:]:
        assert (empty.open, empty.high, empty.low, empty.close) == (100.5, 100.5, 100.5, 100.5)
        assert (empty.volume, empty.buy_volume, empty.sell_volume, empty.trades) == (0.0, 0.0, 0.0, 0)
        assert empty.fp_ask.size == 0


def test_trade_closes_bars_too_and_bar_seconds_validated() -> None:
    b = BarBuilder(tick_size=1.0, bar_seconds=5, bar_close_delay_ms=0)
    b.add_trade(0, 10.0, 1.0, False)
    bars = b.add_trade(12_000, 11.0, 1.0, False)  # passes 5000 and 10000: two bars close
    assert [(x.start_ms, x.close, x.volume) for x in bars] == [(0, 10.0, 1.0), (5_000, 10.0, 0.0)]
    for bad in (0, 7, 30, 120):
        with pytest.raises(ValueError):
            BarBuilder(tick_size=1.0, bar_seconds=bad)
        with pytest.raises(ValueError):
            FeatureSettings(bar_seconds=bad)
    with pytest.raises(ValueError):
        FeatureSettings(window=0)
    s = FeatureSettings(bar_seconds=5, bar_close_delay_ms=200, footprint_bps=2)
    fb = BarBuilder.from_settings(s, tick_size=0.01)
    assert (fb.bar_ms, fb.delay_ms, fb.footprint_bps, fb.tick_size) == (5_000, 200, 2.0, 0.01)


def test_footprint_bucket_size_fixed_at_open() -> None:
    # tick 0.01, footprint_bps 10: k = round(100.00 * 10 / 1e4 / 0.01) = round(10) = 10 ticks = 0.10
    b = BarBuilder(tick_size=0.01, footprint_bps=10)
    b.add_trade(0, 100.00, 1.0, False)  # tick 10000 -> bucket 1000
    b.add_trade(1, 100.09, 2.0, False)  # tick 10009 -> bucket 1000
    b.add_trade(2, 100.10, 3.0, True)  # tick 10010 -> bucket 1001
    b.add_trade(3, 100.35, 4.0, True)  # tick 10035 -> bucket 1003 (open is still 100.00)
    (bar,) = b.on_clock(61_500)
    assert bar.fp_bucket == pytest.approx(0.10)
    assert bar.fp_first == 1000
    assert bar.fp_ask.tolist() == [3.0, 0.0, 0.0, 0.0]
    assert bar.fp_bid.tolist() == [0.0, 3.0, 0.0, 4.0]


def test_liquidations_per_side() -> None:
    b = BarBuilder(tick_size=0.1)
    b.add_trade(1_000, 100.0, 1.0, False)
    assert b.add_liquidation(Liquidation.from_payload({"o": {"T": 2_000, "S": "SELL", "ap": "100", "z": "2",
                                                                "q": "9"}})) == []  # fmt: skip
    # z = 0: the quantity is o.q
    b.add_liquidation(Liquidation.from_payload({"o": {"T": 3_000, "S": "BUY", "ap": "101", "z": "0", "q": "3"}}))
    b.add_liquidation(Liquidation(4_000, "SELL", 50.0, 1.0))
    (bar,) = b.on_clock(61_500)
    assert bar.liq_long_notional == 250.0  # SELL = long liquidated: 100*2 + 50*1
    assert bar.liq_short_notional == 303.0  # BUY = short liquidated: 101*3
    b.add_liquidation(Liquidation(5_000, "SELL", 1.0, 1.0))  # its bar has closed
    assert b.late_dropped == 1


def test_trade_from_payload() -> None:
    t = Trade.from_payload({"T": 5, "p": "1.5", "q": "2", "m": True, "a": 7})
    assert t == Trade(5, 1.5, 2.0, True, 7)
    b = BarBuilder(tick_size=0.1)
    b.add(t)
    (bar,) = b.on_clock(61_500)
    assert bar.sell_volume == 2.0 and bar.buy_volume == 0.0  # m true: market sell


# ----------------------------------------------------------------------------------------------
# Indicators


def run(bars: list[Bar], settings: FeatureSettings, tick: float = 0.5, books: list[Any] | None = None) -> list[dict]:
    st = FeatureState(tick, settings)
    out = []
    for i, bar in enumerate(bars):
        book = books[i] if books else None
        out.append(st.update(bar, *(book or (None, None))))
    return out


def test_row_has_exactly_the_feature_columns() -> None:
    (row,) = run([mk(0, 100, 101, 99, 100, 1, 1)], FeatureSettings())
    assert set(row) == set(FEATURE_COLUMNS) and len(FEATURE_COLUMNS) == len(set(FEATURE_COLUMNS))


def test_delta_cvd_divergences() -> None:
    bars = [
        mk(0, 11, 12, 10, 11, buy=5, sell=3),  # delta 2, cvd 2
        mk(1, 11, 11, 9, 10, buy=1, sell=2),  # delta -1, cvd 1
        mk(2, 10, 10, 8, 9, buy=4, sell=1),  # delta 3, cvd 4
        mk(3, 10, 13, 9.5, 12, buy=0, sell=2),  # delta -2, cvd 2
    ]
    rows = run(bars, FeatureSettings(div_bars=2))  # N = 2: at least 1 previous bar
    assert [r["delta"] for r in rows] == [2, -1, 3, -2]
    assert [r["cvd"] for r in rows] == [2, 1, 4, 2]
    # bar 1: low 9 < min(10) but cvd 1 > min(2)? no -> no bull div
    # bar 2: low 8 < min(10, 9) = 9 and cvd 4 > min(2, 1) = 1 -> bull div
    # bar 3: high 13 > max(11, 10) = 11 and cvd 2 < max(1, 4) = 4 -> bear div
    assert [r["bull_div"] for r in rows] == [False, False, True, False]
    assert [r["bear_div"] for r in rows] == [False, False, False, True]
    # short history: N = 6 needs 3 previous bars, so bar 2 (2 previous) cannot diverge;
    # bar 3: high 13 > max(12, 11, 10) = 12 and cvd 2 < max(2, 1, 4) = 4 -> bear div
    rows = run(bars, FeatureSettings(div_bars=6))
    assert [r["bull_div"] for r in rows] == [False] * 4
    assert [r["bear_div"] for r in rows] == [False, False, False, True]


# The panic / absorption sequence (W = 4: z needs at least 2 previous bars; tick 0.5)
PANIC_BARS = [
    mk(0, 100, 101, 99, 100, buy=6, sell=4),  # rv 0.02, volume 10
    mk(1, 100, 100.5, 99.5, 100, buy=10, sell=10),  # rv 0.01, volume 20
    mk(2, 100, 103, 97, 97, buy=5, sell=40),  # rv 0.06, volume 45, delta -35
    mk(3, 97, 97, 97, 97),  # flat and empty
]


def test_panic_index() -> None:
    rows = run(PANIC_BARS, FeatureSettings(window=4))
    assert nan(rows[0]["ret"]) and rows[1]["ret"] == 0.0
    assert rows[2]["ret"] == pytest.approx(math.log(0.97))
    assert [r["rv"] for r in rows] == pytest.approx([0.02, 0.01, 0.06, 0.0])
    # bars 0 and 1 have fewer than W/2 = 2 previous bars
    for r in rows[:2]:
        assert nan(r["vol_z"]) and nan(r["volu_z"]) and nan(r["panic_index"])
    # bar 2: rv history [0.02, 0.01]: mean 0.015, population std 0.005 -> (0.06 - 0.015) / 0.005 = 9
    #        volume history [10, 20]: mean 15, std 5 -> (45 - 15) / 5 = 6
    #        panic = sign(ln 0.97) * sqrt(9 * 6) = -sqrt(54)
    assert rows[2]["vol_z"] == pytest.approx(9.0)
    assert rows[2]["volu_z"] == pytest.approx(6.0)
    assert rows[2]["panic_index"] == pytest.approx(-math.sqrt(54))
    # bar 3: rv history [0.02, 0.01, 0.06]: mean 0.03, var (1 + 4 + 9)e-4 / 3 -> z = -0.03 / sqrt(14e-4/3)
    #        volume history [10, 20, 45]: mean 25, var (225 + 25 + 400) / 3 -> z = -25 / sqrt(650/3)
    #        flat bar: ret 0 -> panic 0
    assert rows[3]["vol_z"] == pytest.approx(-0.03 / math.sqrt(14e-4 / 3))
    assert rows[3]["volu_z"] == pytest.approx(-25 / math.sqrt(650 / 3))
    assert rows[3]["panic_index"] == 0.0


def test_zero_std_is_nan_and_window_uses_previous_w_bars() -> None:
    same = [mk(i, 100, 101, 99, 100, buy=5, sell=5) for i in range(3)]
    (_, _, r2) = run(same, FeatureSettings(window=4))
    assert nan(r2["vol_z"]) and nan(r2["volu_z"]) and nan(r2["panic_index"])  # std 0
    # absorption only needs the mean: delta 0 -> 0
    assert r2["absorption"] == 0.0
    # W = 2: only the previous 2 bars count. Volumes 10, 20, 30, 60: bar 3 against [20, 30]:
    # mean 25, std 5 -> (60 - 25) / 5 = 7 (with bar 0 included it would differ)
    vols = [mk(i, 100, 101, 99, 100, buy=v) for i, v in enumerate((10, 20, 30, 60))]
    assert run(vols, FeatureSettings(window=2))[3]["volu_z"] == pytest.approx(7.0)


def test_absorption() -> None:
    rows = run(PANIC_BARS + [mk(4, 97, 97.5, 96.5, 97, buy=2, sell=32)], FeatureSettings(window=4), tick=0.5)
    assert nan(rows[0]["absorption"]) and nan(rows[1]["absorption"])  # < W/2 previous bars
    # bar 2: delta -35, mean volume of [10, 20] = 15, |97 - 100| / 0.5 = 6 ticks -> (-35/15) / 7
    assert rows[2]["absorption"] == pytest.approx(-35 / 15 / 7)
    # bar 3: delta 0 -> 0
    assert rows[3]["absorption"] == 0.0
    # bar 4: delta -30, mean of [10, 20, 45, 0] = 18.75, no move -> -30 / 18.75 / 1 = -1.6 (absorbed selling)
    assert rows[4]["absorption"] == pytest.approx(-1.6)
    # mean volume 0 -> NaN
    zero = [mk(i, 100, 100, 100, 100) for i in range(3)]
    assert nan(run(zero, FeatureSettings(window=4))[2]["absorption"])


def test_cascade_exhaustion() -> None:
    s = FeatureSettings(liq_half_life=1, cascade_bars=3)
    assert s.liq_alpha == 0.5  # 1 - 0.5 ** (1 / 1)
    assert FeatureSettings().liq_alpha == pytest.approx(1 - 0.5 ** (1 / 3))  # about 0.2063
    bars = [
        mk(0, 100, 100, 100, 100),
        mk(1, 100, 100, 100, 100, liq_long=60, liq_short=40),
        mk(2, 100, 100, 100, 100),
        mk(3, 100, 100, 100, 100),
        mk(4, 100, 100, 100, 100),
    ]
    rows = run(bars, s)
    assert [r["liq_notional"] for r in rows] == [0, 100, 0, 0, 0]
    assert (rows[1]["liq_long_notional"], rows[1]["liq_short_notional"]) == (60, 40)
    # EMA seeded with the first value 0; then 0.5*100 + 0.5*0 = 50, 25, 12.5, 6.25
    assert [r["liq_intensity"] for r in rows] == [0, 50, 25, 12.5, 6.25]
    # peak over the last K = 3 bars: 0 (-> NaN), 50, 50, 50, 25
    # exhaustion: -, (50-50)/50 = 0, (50-25)/50 = 0.5, (50-12.5)/50 = 0.75, (25-6.25)/25 = 0.75
    assert nan(rows[0]["cascade_exhaustion"])
    assert [r["cascade_exhaustion"] for r in rows[1:]] == [0.0, 0.5, 0.75, 0.75]
    # the EMA is seeded with the first bar's value: a cascade at the start is at its height
    (r0,) = run([mk(0, 100, 100, 100, 100, liq_long=80)], s)
    assert r0["liq_intensity"] == 80 and r0["cascade_exhaustion"] == 0.0


BIDS = (arr(100.0, 99.9, 99.8), arr(3, 2, 1))
ASKS = (arr(100.1, 100.2), arr(1, 1))


def test_obi() -> None:
    bar = mk(0, 100, 100, 100, 100)
    # best 2 levels: B = 3 + 2 = 5, A = 1 + 1 = 2 -> (5 - 2) / 7
    assert FeatureState(0.1, FeatureSettings(obi_levels=2)).update(bar, BIDS, ASKS)["obi"] == pytest.approx(3 / 7)
    # best 10 levels (all there are): B = 6, A = 2 -> 4 / 8
    assert FeatureState(0.1).update(bar, BIDS, ASKS)["obi"] == 0.5
    # book not synced
    assert nan(FeatureState(0.1).update(bar, None, None)["obi"])


# mid = (99.9 + 100.1) / 2 = 100; band 2 %: bids >= 98, asks <= 102
WALL_BIDS = (arr(99.9, 99.8, 99.7, 99.6, 99.5, 97.0), arr(1, 1, 10, 1, 1, 100))  # 97.0 is outside the band
WALL_ASKS = (arr(100.1, 100.2, 100.3, 100.4, 100.5), arr(2, 2, 2, 2, 20))


def test_walls() -> None:
    st = FeatureState(0.1)
    r = st.update(mk(0, 100, 100, 100, 100), WALL_BIDS, WALL_ASKS)
    # bids in band: [1, 1, 10, 1, 1], median 1 -> walls >= 5: 99.7 (10); dist 100 * (100 - 99.7) / 100 = 0.3
    assert (r["buy_wall_price"], r["buy_wall_qty"]) == (99.7, 10.0)
    assert r["dist_to_buy_wall"] == pytest.approx(0.3)
    # asks in band: [2, 2, 2, 2, 20], median 2 -> walls >= 10: 100.5 (20); dist 100 * 0.5 / 100 = 0.5
    assert (r["sell_wall_price"], r["sell_wall_qty"]) == (100.5, 20.0)
    assert r["dist_to_sell_wall"] == pytest.approx(0.5)
    assert r["buy_wall_age_s"] == 0.0 and r["sell_wall_age_s"] == 0.0  # first seen at this close


def test_no_wall() -> None:
    st = FeatureState(0.1)
    flat_bids = (arr(99.9, 99.8, 99.7, 99.6, 99.5), arr(3, 3, 3, 3, 3))  # median 3, nothing >= 15
    four_asks = (arr(100.1, 100.2, 100.3, 100.4, 103.0), arr(1, 1, 1, 50, 1))  # only 4 levels in band
    r = st.update(mk(0, 100, 100, 100, 100), flat_bids, four_asks)
    for k in ("buy_wall_price", "buy_wall_qty", "dist_to_buy_wall", "buy_wall_age_s",
              "sell_wall_price", "sell_wall_qty", "dist_to_sell_wall", "sell_wall_age_s"):  # fmt: skip
        assert nan(r[k]), k
    r = FeatureState(0.1).update(mk(0, 100, 100, 100, 100), None, None)
    assert nan(r["buy_wall_price"]) and nan(r["sell_wall_age_s"])


def test_wall_age() -> None:
    st = FeatureState(0.1)
    two = (arr(99.9, 99.8, 99.7, 99.6, 99.5), arr(1, 10, 10, 1, 1))  # walls at 99.8 (nearest) and 99.7
    ages = []
    for i, book in enumerate([(WALL_BIDS, WALL_ASKS), (WALL_BIDS, WALL_ASKS), (two, WALL_ASKS),
                              (WALL_BIDS, WALL_ASKS), (None, None), (WALL_BIDS, WALL_ASKS)]):  # fmt: skip
        r = st.update(mk(i, 100, 100, 100, 100), *book)
        ages.append((r["buy_wall_price"], r["buy_wall_age_s"], r["sell_wall_age_s"]))
    # bar ends 60, 120, ... s; 99.7 first a wall at the close of bar 0 (60 s)
    assert ages[0] == (99.7, 0.0, 0.0)
    assert ages[1] == (99.7, 60.0, 60.0)
    # bar 2: a new nearer wall at 99.8 (age 0); 99.7 is still a wall, so its run goes on
    assert ages[2] == (99.8, 0.0, 120.0)
    # bar 3: 99.8 gone, nearest is 99.7 again, standing since 60 s: 240 - 60 = 180
    assert ages[3] == (99.7, 180.0, 180.0)
    # bar 4: book not synced -> NaN, and the run is interrupted
    assert nan(ages[4][0]) and nan(ages[4][1]) and nan(ages[4][2])
    assert ages[5] == (99.7, 0.0, 0.0)


def test_footprint_diagonal() -> None:
    # ask [5, 0, 9, 4], bid [1, 3, 2, 0]: volume 24, min_vol = 0.24, R = 3
    bar = mk(0, 100, 100, 100, 100, buy=18, sell=6, fp_ask=(5, 0, 9, 4), fp_bid=(1, 3, 2, 0))
    # buy  i0: 5 >= 3 * 0 (nothing below: counts)  yes | i1: 0 < min_vol  no
    #      i2: 9 >= 3 * bid[1] = 9  yes               | i3: 4 >= 3 * bid[2] = 6  no
    # sell i0: 1 >= 3 * ask[1] = 0 (zero on the diagonal)  yes | i1: 3 >= 3 * 9  no
    #      i2: 2 >= 3 * ask[3] = 12  no                      | i3: 0 < min_vol  no
    assert footprint(bar, 3.0, 0.01) == (2, 1, 1, 1)
    r = FeatureState(0.1).update(bar)
    assert (r["fp_buy_imb"], r["fp_sell_imb"], r["fp_stacked_buy"], r["fp_stacked_sell"]) == (2, 1, 1, 1)
    assert r["fp_imbalance"] == pytest.approx(1 / 3)  # (2 - 1) / (2 + 1)
    # min_vol: 1 % of 200 = 2: ask 1.5 at the top is under it
    bar = mk(0, 100, 100, 100, 100, buy=101.5, sell=98.5, fp_ask=(100, 1.5), fp_bid=(98.5, 0))
    # buy i0: 100 >= 0 yes; i1: 1.5 < 2 no | sell i0: 98.5 >= 3 * 1.5 yes; i1: 0 no
    assert footprint(bar, 3.0, 0.01) == (1, 1, 1, 1)


def test_footprint_stacked_and_empty() -> None:
    # ask [4, 4, 0, 4, 4, 4], no sells: runs of buy imbalances 2 and 3 -> stacked 3, count 5
    bar = mk(0, 100, 100, 100, 100, buy=20, fp_ask=(4, 4, 0, 4, 4, 4), fp_bid=(0,) * 6)
    r = FeatureState(0.1).update(bar)
    assert (r["fp_buy_imb"], r["fp_sell_imb"], r["fp_stacked_buy"], r["fp_stacked_sell"]) == (5, 0, 3, 0)
    assert r["fp_imbalance"] == 1.0  # (5 - 0) / 5
    # empty bar: no buckets, both counts 0 -> fp_imbalance NaN
    r = FeatureState(0.1).update(mk(0, 100, 100, 100, 100))
    assert (r["fp_buy_imb"], r["fp_sell_imb"], r["fp_stacked_buy"], r["fp_stacked_sell"]) == (0, 0, 0, 0)
    assert nan(r["fp_imbalance"])


# Composite signal: W = 4, N = 2, tick 0.5. Bars 0-2 are PANIC_BARS (bar 2: panic -sqrt(54) <= -2).
# bar 3: delta -30, mean volume [10, 20, 45] = 25, no move -> absorption -1.2 <= -1
# bar 4: low 96 < min(97, 96.5) and cvd -35 > min(-33, -63) -> bull_div
#        fp ask [20, 10], bid [2, 0]: buy imb i0 (20 >= 0), i1 (10 >= 3*2); sell i0: 2 >= 3*10 no -> imbalance 1
LONG_BARS = PANIC_BARS[:3] + [
    mk(3, 97, 97.5, 96.5, 97, buy=2, sell=32),  # cvd 2 + 0 - 35 - 30 = -63
    mk(4, 97, 97.5, 96, 97.5, buy=30, sell=2, fp_ask=(20, 10), fp_bid=(2, 0), quote=3000),  # cvd -35
]
# mid (97.4 + 97.6) / 2 = 97.5; bids B = 14 > asks A = 5 -> obi > 0; wall 97.1 (10 >= 5 * 1): dist 0.4/97.5 %
LONG_BOOK = ((arr(97.4, 97.3, 97.2, 97.1, 97.0), arr(1, 1, 1, 10, 1)), (arr(97.6, 97.7, 97.8, 97.9, 98.0), arr(1) * 5))
# The mirror image: prices reflected, buys and sells swapped.
SHORT_BARS = [
    mk(0, 100, 101, 99, 100, buy=4, sell=6),
    mk(1, 100, 100.5, 99.5, 100, buy=10, sell=10),
    mk(2, 100, 103, 97, 103, buy=40, sell=5),  # panic +sqrt(54)
    mk(3, 103, 103.5, 102.5, 103, buy=32, sell=2),  # absorption +1.2
    mk(4, 103, 104, 102.5, 102.5, buy=2, sell=30, fp_ask=(0, 2), fp_bid=(10, 20), quote=3000),  # bear_div
]
SHORT_BOOK = ((arr(102.4, 102.3, 102.2, 102.1, 102.0), arr(1) * 5), (arr(102.6, 102.7, 102.8, 102.9, 103.0),
                                                                     arr(1, 1, 1, 10, 1)))  # fmt: skip
SIG = FeatureSettings(window=4, div_bars=2)


def test_signal_long() -> None:
    rows = run(LONG_BARS, SIG, books=[None] * 4 + [LONG_BOOK])
    r = rows[4]
    assert rows[2]["panic_index"] == pytest.approx(-math.sqrt(54))
    assert rows[3]["absorption"] == pytest.approx(-1.2)
    assert r["bull_div"] and r["obi"] == pytest.approx(9 / 19) and r["fp_imbalance"] == 1.0
    assert r["dist_to_buy_wall"] == pytest.approx(0.4 / 97.5 * 100)
    assert [x["signal"] for x in rows] == [0, 0, 0, 0, 1]
    # stop: min(lowest low of bars 2-4 = 96, wall 97.1) * (1 - 5/1e4) = 95.952
    # take profit: 97.5 + 2 * (97.5 - 95.952) = 100.596
    assert r["stop_price"] == pytest.approx(95.952)
    assert r["take_profit"] == pytest.approx(100.596)
    assert nan(rows[3]["stop_price"]) and nan(rows[3]["take_profit"])


def test_signal_short_mirrors() -> None:
    rows = run(SHORT_BARS, SIG, books=[None] * 4 + [SHORT_BOOK])
    r = rows[4]
    assert rows[2]["panic_index"] == pytest.approx(math.sqrt(54))
    assert rows[3]["absorption"] == pytest.approx(1.2)  # delta 30 / mean 25
    assert r["bear_div"] and r["obi"] == pytest.approx(-9 / 19) and r["fp_imbalance"] == -1.0
    assert [x["signal"] for x in rows] == [0, 0, 0, 0, -1]
    # stop: max(highest high of bars 2-4 = 104, wall 102.9) * (1 + 5/1e4) = 104.052
    # take profit: 102.5 - 2 * (104.052 - 102.5) = 99.396
    assert r["stop_price"] == pytest.approx(104.052)
    assert r["take_profit"] == pytest.approx(99.396)


def test_signal_blocked() -> None:
    # liquidity filter: quote volume 3000 < 5000
    rows = run(LONG_BARS, FeatureSettings(window=4, div_bars=2, min_quote_volume=5000), books=[None] * 4 + [LONG_BOOK])
    assert rows[4]["signal"] == 0 and nan(rows[4]["stop_price"])
    # 3000 >= 3000: not blocked
    rows = run(LONG_BARS, FeatureSettings(window=4, div_bars=2, min_quote_volume=3000), books=[None] * 4 + [LONG_BOOK])
    assert rows[4]["signal"] == 1
    # book not synced: no obi, no wall -> no signal
    assert run(LONG_BARS, SIG)[4]["signal"] == 0
    # a stricter panic threshold: sqrt(54) = 7.35 < 8
    rows = run(LONG_BARS, FeatureSettings(window=4, div_bars=2, panic_threshold=8), books=[None] * 4 + [LONG_BOOK])
    assert rows[4]["signal"] == 0


# ----------------------------------------------------------------------------------------------
# Determinism and live = replay


def _trades(seed: int) -> list[Trade]:
    rng = random.Random(seed)
    t, p, out = 0, 100.0, []
    for i in range(3000):
        t += rng.choice((0, 5, 40, 300, 2_000, 20_000))
        p = round(max(1.0, p + rng.choice((-0.2, -0.1, 0, 0.1, 0.2))), 1)
        out.append(Trade(t, p, round(rng.uniform(0.01, 3), 3), rng.random() < 0.5, i))
    return out


def _rows(trades: list[Trade], clock_every: int | None) -> list[dict]:
    b = BarBuilder(tick_size=0.1, bar_seconds=15)
    st = FeatureState(0.1, FeatureSettings(bar_seconds=15, window=10, div_bars=4, cascade_bars=4))
    bars: list[Bar] = []
    for i, tr in enumerate(trades):
        bars += b.add(tr)
        if i % 7 == 0:
            bars += b.add_liquidation(Liquidation(tr.time_ms, "SELL" if i % 2 else "BUY", tr.price, 1.0))
        if clock_every and i % clock_every == 0:
            bars += b.on_clock(tr.time_ms + 100)
    bars += b.on_clock(trades[-1].time_ms + 60_000)
    book = (arr(99.9, 99.8, 99.7, 99.6, 99.5), arr(1, 9, 1, 1, 1)), (arr(100.0, 100.1, 100.2, 100.3, 100.4), arr(2) * 5)
    return [st.update(bar, *book) for bar in bars]


def _same(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(
        x.keys() == y.keys() and all(x[k] == y[k] or (nan(x[k]) and nan(y[k])) for k in x)
        for x, y in zip(a, b, strict=True)
    )


def test_deterministic_and_live_equals_replay() -> None:
    trades = _trades(1)
    first = _rows(trades, None)  # replay: trade times only
    assert len(first) > 100
    assert _same(first, _rows(trades, None))  # same input twice -> identical rows
    # live: clock ticks interleaved (a tick 100 ms after a trade never passes the 1500 ms delay
    # ahead of the next trade, so no trade is late) -> the same rows
    assert _same(first, _rows(trades, 3))
    assert any(r["trades"] == 0 for r in first)  # the input has empty bars
