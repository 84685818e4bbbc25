"""The order-flow indicators of FEATURES.md, sections 4.1 to 4.8, one row per closed bar.

Pure: no I/O and no clock. :class:`FeatureState` holds the rolling history of one
(market, symbol); :meth:`FeatureState.update` takes a closed :class:`~ingestor.features.bars.Bar`
and the order book as it stood at the bar's close, and returns the ``features`` row. Live and
replay call it with the same inputs and get the same rows.

Choices where FEATURES.md leaves room (each one is also stated where it is coded):

* Rolling statistics (``vol_z``, ``volu_z``, ``absorption``'s mean volume) use the **population**
  standard deviation (``numpy.std``, ``ddof=0``): the previous ``W`` bars are the whole reference
  set the current bar is compared with, not a sample used to estimate a wider population, and it
  is numpy's default. NaN with fewer than ``W/2`` previous bars, a standard deviation of 0 or (for
  ``absorption``) a mean volume of 0.
* Divergences compare with the previous ``N`` bars under the same rule: with fewer than ``N/2``
  previous bars they are False.
* ``ret`` is NaN on the first bar (no previous close).
* ``liq_intensity`` is the EMA with ``alpha = 1 - 0.5 ** (1 / H)`` (the weight of a bar halves every
  ``H`` bars), seeded with the first bar's ``liq_notional``: ``pandas.Series.ewm(halflife=H,
  adjust=False).mean()``.
* Walls: ``mid = (best bid + best ask) / 2``; the band holds bids at ``>= mid * (1 - pct/100)`` and
  asks at ``<= mid * (1 + pct/100)``; a side needs ``wall_min_levels = 5`` levels in its band to
  have walls at all. The book is only seen at bar closes, so "stood without interruption" means:
  the price was a wall (any wall of that side, not only the nearest) at every bar close since it
  was first seen; its age is ``this bar's end - the end of the first bar at whose close it was a
  wall`` (0 at first sight, resolution ``bar_seconds``). A close at which it is not a wall, or the
  book is not synced, ends the run.
* Signal windows ("last 5 bars", "last 3 bars") include the current bar; a NaN never satisfies a
  condition. ``stop_buffer_bps`` is applied multiplicatively: long stop = ``min(lowest low,
  buy_wall_price) * (1 - bps / 1e4)``, short stop = ``max(highest high, sell_wall_price) * (1 + bps
  / 1e4)``; ``take_profit = close + rr * (close - stop)`` (long) / ``close - rr * (stop - close)``.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

import numpy as np
import numpy.typing as npt

from ingestor.feature_spec import BAR_COLUMNS, FeatureSettings
from ingestor.features.bars import Bar

FloatArray = npt.NDArray[np.float64]
BookSide = tuple[FloatArray, FloatArray]  # (prices, quantities), best first

NAN = math.nan

def _window(history: deque[float], min_n: float) -> FloatArray | None:
    """The previous bars' values as an array, or None with fewer than ``min_n`` (or none)."""
    n = len(history)
    if n == 0 or n < min_n:
        return None
    return np.fromiter(history, np.float64, n)


def _z(x: float, a: FloatArray | None) -> float:
    """``(x - mean) / std`` against the window ``a`` (population std); NaN without one or with std 0."""
    if a is None:
        return NAN
    sd = float(a.std())
    if sd == 0.0:
        return NAN
    return (x - float(a.mean())) / sd


def _longest_run(mask: npt.NDArray[np.bool_]) -> int:
    """Length of the longest run of True in ``mask``."""
    if not mask.any():
        return 0
    # Edges of the runs: +1 where a run starts, -1 just after it ends.
    d = np.diff(np.concatenate(([0], mask.astype(np.int8), [0])))
    return int((np.flatnonzero(d == -1) - np.flatnonzero(d == 1)).max())


def footprint(bar: Bar, ratio: float, min_vol_frac: float) -> tuple[int, int, int, int]:
    """4.7 diagonal comparison: ``(buy_imb, sell_imb, stacked_buy, stacked_sell)``.

    Buy imbalance at ``i``: ``ask[i] >= min_vol`` and ``ask[i] >= R * bid[i-1]``; sell imbalance:
    ``bid[i] >= min_vol`` and ``bid[i] >= R * ask[i+1]``. Outside the traded range the neighbour is
    0, which counts as an imbalance.
    """
    ask, bid = bar.fp_ask, bar.fp_bid
    if ask.size == 0:
        return 0, 0, 0, 0
    min_vol = min_vol_frac * bar.volume
    bid_below = np.concatenate(([0.0], bid[:-1]))
    ask_above = np.concatenate((ask[1:], [0.0]))
    buy = (ask >= min_vol) & (ask >= ratio * bid_below)
    sell = (bid >= min_vol) & (bid >= ratio * ask_above)
    # A bucket with no volume is never an imbalance (matters only when min_vol is 0).
    buy &= ask > 0
    sell &= bid > 0
    return int(buy.sum()), int(sell.sum()), _longest_run(buy), _longest_run(sell)


def obi(bids: BookSide | None, asks: BookSide | None, levels: int) -> float:
    """4.5: ``(B - A) / (B + A)`` over the best ``levels`` levels; NaN without a (non-empty) book."""
    if bids is None or asks is None:
        return NAN
    b = float(bids[1][:levels].sum())
    a = float(asks[1][:levels].sum())
    return (b - a) / (b + a) if b + a > 0 else NAN


def walls(
    prices: FloatArray, qtys: FloatArray, limit: float, is_bid: bool, factor: float, min_levels: int
) -> npt.NDArray[np.intp]:
    """4.6: the indices of one side's walls, nearest the mid first. ``prices`` best first; ``limit``
    is the band's edge (bids: lowest price in the band, asks: highest)."""
    # Sorted best first, so the band is a prefix: find where it ends.
    if is_bid:
        n = int(np.searchsorted(-prices, -limit, side="right"))
    else:
        n = int(np.searchsorted(prices, limit, side="right"))
    if n < min_levels:
        return np.zeros(0, np.intp)
    q = qtys[:n]
    return np.flatnonzero((q >= factor * float(np.median(q))) & (q > 0))


class FeatureState:
    """Rolling state of one (market, symbol); one :meth:`update` per closed bar, in order."""

    def __init__(self, tick_size: float, settings: FeatureSettings | None = None) -> None:
        self.s = s = settings or FeatureSettings()
        self.tick_size = float(tick_size)
        w = s.window
        self._rv: deque[float] = deque(maxlen=w)
        self._vol: deque[float] = deque(maxlen=w)
        self._low: deque[float] = deque(maxlen=s.div_bars)
        self._high: deque[float] = deque(maxlen=s.div_bars)
        self._cvd_hist: deque[float] = deque(maxlen=s.div_bars)
        self._intensity: deque[float] = deque(maxlen=s.cascade_bars)
        recent = max(s.panic_bars, s.absorption_bars, s.div_trigger_bars, s.stop_bars)
        self._recent: deque[dict[str, Any]] = deque(maxlen=recent)  # rows incl. the current one
        self._prev_close = NAN
        self._cvd = 0.0
        self._liq_ema = NAN
        self._wall_since: tuple[dict[float, int], dict[float, int]] = ({}, {})  # bid, ask: price -> first seen

    def update(self, bar: Bar, bids: BookSide | None = None, asks: BookSide | None = None) -> dict[str, Any]:
        """The ``features`` row of ``bar``; ``bids``/``asks`` are the synced book at its close as
        ``(prices, qtys)`` best first (bids descending, asks ascending), or None while not synced."""
        s = self.s
        row: dict[str, Any] = {c: getattr(bar, c) for c in BAR_COLUMNS}

        # 4.1 order flow delta and divergences against the previous N bars.
        delta = bar.buy_volume - bar.sell_volume
        self._cvd += delta
        cvd = self._cvd
        bull = bear = False
        if len(self._low) >= s.div_bars / 2 and len(self._low) > 0:
            bull = bar.low < min(self._low) and cvd > min(self._cvd_hist)
            bear = bar.high > max(self._high) and cvd < max(self._cvd_hist)
        row.update(delta=delta, cvd=cvd, bull_div=bull, bear_div=bear)

        # 4.2 panic index.
        ret = math.log(bar.close / self._prev_close) if self._prev_close > 0 else NAN
        rv = (bar.high - bar.low) / bar.open if bar.open > 0 else NAN
        min_n = s.window / 2
        vols = _window(self._vol, min_n)
        vol_z = _z(rv, _window(self._rv, min_n))
        volu_z = _z(bar.volume, vols)
        panic = math.copysign(1.0, ret) * math.sqrt(max(vol_z, 0.0) * max(volu_z, 0.0)) if ret != 0 else 0.0
        if math.isnan(ret) or math.isnan(vol_z) or math.isnan(volu_z):
            panic = NAN
        row.update(ret=ret, rv=rv, vol_z=vol_z, volu_z=volu_z, panic_index=panic)

        # 4.3 absorption: delta in units of the mean volume of the previous W bars, per tick moved.
        absorption = NAN
        if vols is not None:
            mean_vol = float(vols.mean())
            if mean_vol > 0:
                absorption = (delta / mean_vol) / (1.0 + abs(bar.close - bar.open) / self.tick_size)
        row["absorption"] = absorption

        # 4.4 cascade exhaustion.
        liq = bar.liq_long_notional + bar.liq_short_notional
        a = s.liq_alpha
        self._liq_ema = liq if math.isnan(self._liq_ema) else a * liq + (1.0 - a) * self._liq_ema
        self._intensity.append(self._liq_ema)
        peak = max(self._intensity)
        row.update(
            liq_long_notional=bar.liq_long_notional, liq_short_notional=bar.liq_short_notional,
            liq_notional=liq, liq_intensity=self._liq_ema,
            cascade_exhaustion=(peak - self._liq_ema) / peak if peak > 0 else NAN,
        )  # fmt: skip

        # 4.5 and 4.6: the book at bar close.
        synced = bids is not None and asks is not None and bids[0].size > 0 and asks[0].size > 0
        row["obi"] = obi(bids, asks, s.obi_levels) if synced else NAN
        self._walls(row, bar.end_ms, bids if synced else None, asks if synced else None)

        # 4.7 footprint.
        fb, fs, stb, sts = footprint(bar, s.fp_ratio, s.fp_min_vol_frac)
        row.update(
            fp_buy_imb=fb, fp_sell_imb=fs, fp_imbalance=(fb - fs) / (fb + fs) if fb + fs else NAN,
            fp_stacked_buy=stb, fp_stacked_sell=sts,
        )  # fmt: skip

        # History for the next bars (after every use of "the previous bars").
        self._prev_close = bar.close
        self._rv.append(rv)
        self._vol.append(bar.volume)
        self._low.append(bar.low)
        self._high.append(bar.high)
        self._cvd_hist.append(cvd)
        self._recent.append(row)

        # 4.8 composite signal.
        self._signal(row, bar)
        return row

    def _walls(self, row: dict[str, Any], now_ms: int, bids: BookSide | None, asks: BookSide | None) -> None:
        s = self.s
        mid = (float(bids[0][0]) + float(asks[0][0])) / 2.0 if bids is not None and asks is not None else NAN
        for side, book, name in ((0, bids, "buy"), (1, asks, "sell")):
            price = qty = dist = age = NAN
            since = self._wall_since[side]
            if book is None:
                since.clear()
            else:
                prices, qtys = book
                if side == 0:
                    found = walls(prices, qtys, mid * (1 - s.wall_band_pct / 100), True, s.wall_factor,
                                  s.wall_min_levels)  # fmt: skip
                else:
                    found = walls(prices, qtys, mid * (1 + s.wall_band_pct / 100), False, s.wall_factor,
                                  s.wall_min_levels)  # fmt: skip
                keys = prices[found].tolist()
                now_since = {p: since.get(p, now_ms) for p in keys}
                since.clear()
                since.update(now_since)
                if keys:
                    price = keys[0]
                    qty = float(qtys[found[0]])
                    dist = 100 * (mid - price) / mid if side == 0 else 100 * (price - mid) / mid
                    age = (now_ms - now_since[price]) / 1000.0
            row[f"{name}_wall_price"] = price
            row[f"{name}_wall_qty"] = qty
            row[f"dist_to_{name}_wall"] = dist
            row[f"{name}_wall_age_s"] = age

    def _signal(self, row: dict[str, Any], bar: Bar) -> None:
        s = self.s
        recent = list(self._recent)
        last = recent[-s.panic_bars :]
        ab = recent[-s.absorption_bars :]
        dv = recent[-s.div_trigger_bars :]
        stops = recent[-s.stop_bars :]
        # NaN compares False, so a missing value never satisfies a condition.
        long_ok = (
            any(r["panic_index"] <= -s.panic_threshold for r in last)
            and row["dist_to_buy_wall"] < s.wall_dist_pct
            and any(r["absorption"] <= -s.absorption_threshold for r in ab)
            and row["obi"] > 0
            and (row["fp_imbalance"] > 0 or row["fp_stacked_buy"] >= s.stacked_min)
            and any(r["bull_div"] for r in dv)
        )
        short_ok = (
            any(r["panic_index"] >= s.panic_threshold for r in last)
            and row["dist_to_sell_wall"] < s.wall_dist_pct
            and any(r["absorption"] >= s.absorption_threshold for r in ab)
            and row["obi"] < 0
            and (row["fp_imbalance"] < 0 or row["fp_stacked_sell"] >= s.stacked_min)
            and any(r["bear_div"] for r in dv)
        )
        if bar.quote_volume < s.min_quote_volume:
            long_ok = short_ok = False
        signal, stop, tp = 0, NAN, NAN
        buf = s.stop_buffer_bps / 1e4
        if long_ok:
            signal = 1
            stop = min(min(r["low"] for r in stops), row["buy_wall_price"]) * (1 - buf)
            tp = bar.close + s.rr * (bar.close - stop)
        elif short_ok:
            signal = -1
            stop = max(max(r["high"] for r in stops), row["sell_wall_price"]) * (1 + buf)
            tp = bar.close - s.rr * (stop - bar.close)
        row.update(signal=signal, stop_price=stop, take_profit=tp)
