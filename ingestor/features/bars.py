"""Time bars from trades and liquidations (FEATURES.md, "Bars" and the inputs of 4.4 and 4.7).

Pure: no I/O, no wall clock. The same :class:`BarBuilder` runs live (fed from the streams, ticked
by the feature worker's clock) and on replay (fed from stored rows, ticked by the replay's clock or
not at all), so the same input gives the same bars.

Closing rule. A bar covers ``[start, start + bar_seconds)`` by trade time. The builder keeps a
*watermark*, the largest trade time or clock tick seen so far; the bar closes once
``watermark >= end + bar_close_delay_ms``. Until then a late trade (or liquidation) whose time
falls in that bar is still counted in it; one that arrives after its bar closed is dropped and
counted in :attr:`BarBuilder.late_dropped`. Bars are emitted in time order, with no gaps: a bar
without trades closes with ``open = high = low = close =`` the previous close and volumes 0.

The first bar is the one holding the first trade; liquidations seen before any trade are dropped
(there is no price yet to open a bar with) and counted in ``late_dropped`` too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from ingestor.feature_spec import VALID_BAR_SECONDS, FeatureSettings

FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True, slots=True)
class Trade:
    """One ``aggTrade``: ``T`` time (ms), ``p`` price, ``q`` quantity, ``m`` buyer is maker, ``a`` id."""

    time_ms: int
    price: float
    qty: float
    buyer_is_maker: bool
    agg_id: int = 0

    @classmethod
    def from_payload(cls, d: dict[str, Any]) -> Trade:
        """From the exchange's ``aggTrade`` payload (prices and quantities are strings there)."""
        return cls(int(d["T"]), float(d["p"]), float(d["q"]), bool(d["m"]), int(d.get("a", 0)))


@dataclass(frozen=True, slots=True)
class Liquidation:
    """One ``forceOrder`` event; ``side`` SELL is a long liquidated, BUY a short."""

    time_ms: int
    side: str
    avg_price: float
    qty: float

    @property
    def notional(self) -> float:
        return self.avg_price * self.qty

    @classmethod
    def from_payload(cls, d: dict[str, Any]) -> Liquidation:
        """From a ``forceOrder`` payload (the event, with its order under ``o``, or the order itself).

        Quantity is ``o.z`` (filled accumulated), or ``o.q`` when ``o.z`` is 0.
        """
        o = d.get("o", d)
        qty = float(o.get("z", 0) or 0)
        if qty == 0.0:
            qty = float(o["q"])
        return cls(int(o["T"]), str(o["S"]), float(o["ap"]), qty)


@dataclass(slots=True)
class Bar:
    """One closed bar. Footprint: bucket ``fp_first + j`` covers prices
    ``[(fp_first + j) * fp_bucket, (fp_first + j + 1) * fp_bucket)``; ``fp_ask[j]`` is market-buy
    volume, ``fp_bid[j]`` market-sell volume. Buckets are contiguous (empty ones in between are 0).
    The bucket grid is anchored at price 0 (bucket ``b`` holds whole-tick prices ``b*k .. b*k + k-1``
    ticks), not at the open, so it does not shift with the first trade's position inside a bucket."""

    start_ms: int
    end_ms: int
    open: float
    high: float
    low: float
    close: float
    volume: float = 0.0
    buy_volume: float = 0.0
    sell_volume: float = 0.0
    trades: int = 0
    quote_volume: float = 0.0
    liq_long_notional: float = 0.0
    liq_short_notional: float = 0.0
    fp_bucket: float = 0.0
    fp_first: int = 0
    fp_ask: FloatArray = field(default_factory=lambda: np.zeros(0))
    fp_bid: FloatArray = field(default_factory=lambda: np.zeros(0))


class _Acc:
    """A bar being built."""

    __slots__ = (
        "open", "open_t", "high", "low", "close", "close_t", "buy", "sell", "trades", "quote",
        "liq_long", "liq_short", "fp", "cells",
    )  # fmt: skip

    def __init__(self) -> None:
        self.open = math.nan
        self.open_t = 2**62
        self.close_t = -(2**62)
        self.high = -math.inf
        self.low = math.inf
        self.close = math.nan
        self.buy = 0.0
        self.sell = 0.0
        self.trades = 0
        self.quote = 0.0
        self.liq_long = 0.0
        self.liq_short = 0.0
        # Footprint by price in whole ticks -> [ask_vol, bid_vol]; grouped into buckets at close,
        # once the open (which fixes the bucket size) is known even if trades came out of order.
        self.fp: dict[int, list[float]] = {}
        # Price -> its tick's cell in ``fp`` (the same list object): ``round(price / tick)``
        # once per price and bar, not once per trade.
        self.cells: dict[float, list[float]] = {}


class BarBuilder:
    """Bars for one (market, symbol). Feed :meth:`add_trade` / :meth:`add_liquidation` in arrival
    order and :meth:`on_clock` on a timer; each returns the bars that closed (oldest first)."""

    def __init__(
        self,
        tick_size: float,
        bar_seconds: int = 60,
        bar_close_delay_ms: int = 1500,
        footprint_bps: float = 1.0,
    ) -> None:
        if bar_seconds not in VALID_BAR_SECONDS:
            raise ValueError(f"bar_seconds must be one of {VALID_BAR_SECONDS}, not {bar_seconds}")
        if not tick_size > 0:
            raise ValueError(f"tick_size must be > 0, not {tick_size}")
        if bar_close_delay_ms < 0:
            raise ValueError("bar_close_delay_ms must be >= 0")
        self.tick_size = float(tick_size)
        self.bar_ms = bar_seconds * 1000
        self.delay_ms = int(bar_close_delay_ms)
        self.footprint_bps = float(footprint_bps)
        self._open: dict[int, _Acc] = {}  # bar start -> bar being built (start >= _next_start)
        self._next_start: int | None = None  # start of the next bar to close
        self._prev_close = math.nan
        self._watermark = -(2**62)  # trades taken in the window move it lazily (_advance)
        self.late_dropped = 0
        # The trade window: a trade with ``fast_lo <= time < fast_hi`` falls in the bar being
        # built at ``fast_lo`` (``fast_acc``, which has a trade already) and can close no bar,
        # so it only adds to ``fast_acc``: ``add_trade``'s first branch, and the loop of
        # ``FeatureEngine.trades``, which does the same inline. Such a trade does not move
        # ``_watermark`` either: its time is at most ``fast_acc.close_t``, which ``_advance``
        # takes in before it reads the watermark. Set by every other trade and moved by the
        # bars closing (``_set_window``); empty (lo > hi) until then.
        self.fast_lo = 2**62
        self.fast_hi = -(2**62)
        self.fast_acc = _Acc()

    @property
    def started(self) -> bool:
        """A trade has come: the first bar (the one holding it) is fixed."""
        return self._next_start is not None

    @classmethod
    def from_settings(cls, settings: FeatureSettings, tick_size: float) -> BarBuilder:
        return cls(tick_size, settings.bar_seconds, settings.bar_close_delay_ms, settings.footprint_bps)

    # -- input --------------------------------------------------------------------------------

    def _acc_for(self, time_ms: int) -> _Acc | None:
        start = time_ms - time_ms % self.bar_ms
        if self._next_start is None or start < self._next_start:
            return None
        acc = self._open.get(start)
        if acc is None:
            acc = self._open[start] = _Acc()
        return acc

    def add_trade(self, time_ms: int, price: float, qty: float, buyer_is_maker: bool) -> list[Bar]:
        """One trade (``T``, ``p``, ``q``, ``m``); returns the bars closed by its time."""
        if self.fast_lo <= time_ms < self.fast_hi:  # the common case: see the trade window
            acc = self.fast_acc
            if time_ms < acc.open_t:
                acc.open, acc.open_t = price, time_ms
            if time_ms >= acc.close_t:
                acc.close, acc.close_t = price, time_ms
            if price > acc.high:
                acc.high = price
            elif price < acc.low:  # high >= low: the window's bar has a trade
                acc.low = price
            acc.trades += 1
            acc.quote += price * qty
            cell = acc.cells.get(price) or self._cell(acc, price)
            if buyer_is_maker:
                acc.sell += qty
                cell[1] += qty
            else:
                acc.buy += qty
                cell[0] += qty
            return []
        if self._next_start is None:
            self._next_start = time_ms - time_ms % self.bar_ms
        into = self._acc_for(time_ms)
        if into is None:
            self.late_dropped += 1
        else:
            acc = into
            # open/close by trade time (ties: arrival order), so a late trade lands where it belongs.
            if time_ms < acc.open_t:
                acc.open, acc.open_t = price, time_ms
            if time_ms >= acc.close_t:
                acc.close, acc.close_t = price, time_ms
            if price > acc.high:
                acc.high = price
            if price < acc.low:
                acc.low = price
            acc.trades += 1
            acc.quote += price * qty
            cell = acc.cells.get(price) or self._cell(acc, price)
            if buyer_is_maker:  # m == true: the seller took the bid, a market sell
                acc.sell += qty
                cell[1] += qty
            else:  # m == false: the buyer took the ask, a market buy
                acc.buy += qty
                cell[0] += qty
        bars = self._advance(time_ms)
        if into is not None:
            self._set_window(time_ms - time_ms % self.bar_ms, into)
        return bars

    def _cell(self, acc: _Acc, price: float) -> list[float]:
        """The footprint cell of ``price``'s tick in ``acc`` (made on its first trade)."""
        # Whole ticks, so that bucket edges do not depend on float division noise.
        tick = round(price / self.tick_size)
        cell = acc.fp.get(tick)
        if cell is None:
            cell = acc.fp[tick] = [0.0, 0.0]
        acc.cells[price] = cell
        return cell

    def _set_window(self, start: int, acc: _Acc) -> None:
        """The trade window on the bar at ``start`` (``acc``, with a trade), as far as a
        trade can go without closing a bar; empty when that bar has closed."""
        ns = self._next_start
        if ns is None or start < ns or acc.trades == 0:
            self.fast_lo, self.fast_hi = 2**62, -(2**62)
        else:
            self.fast_lo, self.fast_hi, self.fast_acc = start, min(start + self.bar_ms,
                                                                   ns + self.bar_ms + self.delay_ms), acc

    def add(self, trade: Trade) -> list[Bar]:
        return self.add_trade(trade.time_ms, trade.price, trade.qty, trade.buyer_is_maker)

    def add_liquidation(self, liq: Liquidation) -> list[Bar]:
        """One liquidation, counted in the bar of its ``o.T``. It does not move the watermark
        (the all-market stream is throttled and may lag), so it never closes a bar by itself."""
        acc = self._acc_for(liq.time_ms)
        if acc is None:
            self.late_dropped += 1
        elif liq.side == "SELL":  # a long liquidated
            acc.liq_long += liq.notional
        else:
            acc.liq_short += liq.notional
        return []

    def on_clock(self, now_ms: int) -> list[Bar]:
        """A clock tick: closes the bars whose end plus the delay is at or before ``now_ms``."""
        return self._advance(now_ms)

    # -- output -------------------------------------------------------------------------------

    def _advance(self, time_ms: int) -> list[Bar]:
        wm = self._watermark
        if self.fast_acc.close_t > wm:  # trades taken in the window (see there)
            wm = self.fast_acc.close_t
        if time_ms > wm:
            wm = time_ms
        self._watermark = wm
        out: list[Bar] = []
        if self._next_start is None:
            return out
        while self._next_start + self.bar_ms + self.delay_ms <= wm:
            start = self._next_start
            out.append(self._close(start, self._open.pop(start, None)))
            self._next_start = start + self.bar_ms
        if out and self.fast_lo < self.fast_hi:  # the window's bar may have closed, its end moved
            self._set_window(self.fast_lo, self.fast_acc)
        return out

    def _close(self, start: int, acc: _Acc | None) -> Bar:
        end = start + self.bar_ms
        if acc is None or acc.trades == 0:
            p = self._prev_close
            bar = Bar(start, end, p, p, p, p)
            if acc is not None:
                bar.liq_long_notional = acc.liq_long
                bar.liq_short_notional = acc.liq_short
            return bar
        k = max(1, round(acc.open * self.footprint_bps / 1e4 / self.tick_size))
        ticks = np.fromiter(acc.fp, np.int64, len(acc.fp))
        vols = np.array(list(acc.fp.values()), np.float64).reshape(-1, 2)
        buckets = ticks // k
        first = int(buckets.min())
        n = int(buckets.max()) - first + 1
        ask = np.bincount(buckets - first, weights=vols[:, 0], minlength=n).astype(np.float64, copy=False)
        bid = np.bincount(buckets - first, weights=vols[:, 1], minlength=n).astype(np.float64, copy=False)
        self._prev_close = acc.close
        return Bar(
            start, end, acc.open, acc.high, acc.low, acc.close,
            volume=acc.buy + acc.sell, buy_volume=acc.buy, sell_volume=acc.sell, trades=acc.trades,
            quote_volume=acc.quote, liq_long_notional=acc.liq_long, liq_short_notional=acc.liq_short,
            fp_bucket=k * self.tick_size, fp_first=first, fp_ask=ask, fp_bid=bid,
        )  # fmt: skip
