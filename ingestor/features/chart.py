"""The ``ingestor report`` figure: one symbol's bars and indicators in panels sharing a UTC time axis.

Pure drawing: rows in, a file out. It uses matplotlib's object API (``Figure`` and its Agg
canvas), never ``pyplot``, so no display and no global backend state are involved.

NULL values are NaN in the arrays, which matplotlib leaves as gaps; bars missing from the table
(the worker was down) get a NaN row too, so a line does not bridge them as if nothing happened.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from matplotlib import dates as mdates
from matplotlib import ticker, transforms
from matplotlib.axes import Axes
from matplotlib.figure import Figure

FloatArray = npt.NDArray[np.float64]

FIGSIZE = (14.0, 12.0)  # inches; at 100 dpi a 1400 x 1200 image
DPI = 100
_PLOTTED = (
    "open", "high", "low", "close", "cvd", "panic_index", "absorption", "obi",
    "buy_wall_price", "sell_wall_price", "liq_long_notional", "liq_short_notional", "cascade_exhaustion",
    "signal", "stop_price", "take_profit",
)  # fmt: skip

UP, DOWN = "#15803d", "#b91c1c"  # green / red, dark enough to read on white
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class Series:
    """The plotted columns as float arrays (NaN for NULL and for missing bars), and bar start times."""

    time: npt.NDArray[np.datetime64]
    values: dict[str, FloatArray]
    bar_seconds: int
    n_bars: int  # rows from the table, not counting the inserted gaps

    def __getitem__(self, col: str) -> FloatArray:
        return self.values[col]


def series(recs: Sequence[Any], bar_seconds: int) -> Series:
    """Arrays from the rows (oldest first); a NaN row goes in wherever bars are missing."""
    ms = np.array([(r["bar_time"] - _EPOCH) // timedelta(milliseconds=1) for r in recs], np.int64)
    values = {c: np.array([math.nan if r[c] is None else float(r[c]) for r in recs], np.float64)
              for c in _PLOTTED}
    bar_ms = bar_seconds * 1000
    holes = np.flatnonzero(np.diff(ms) > bar_ms) + 1
    if holes.size:
        ms = np.insert(ms, holes, ms[holes - 1] + bar_ms)
        values = {c: np.insert(v, holes, math.nan) for c, v in values.items()}
    return Series(ms.astype("datetime64[ms]"), values, bar_seconds, len(recs))


def _compact(x: float, _pos: Any = None) -> str:
    """Tick label of a notional: 1.2M, 350k; the sign is the panel's side, not a value."""
    x = abs(x)
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if x >= div:
            return f"{x / div:.3g}{unit}"
    return f"{x:.3g}"


def _legend(ax: Axes) -> None:
    # Outside on the right: over the lines it would hide the newest bars, where the eye goes first.
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False, borderaxespad=0)


def _price(ax: Axes, s: Series, fig: Figure) -> None:
    t = s.time
    ax.fill_between(t, s["low"], s["high"], color="#94a3b8", alpha=0.35, linewidth=0, label="high-low")
    ax.plot(t, s["close"], color="#111827", linewidth=1.1, label="close")
    bar = np.timedelta64(s.bar_seconds, "s")
    # A wall as seen at a bar's close, drawn across that bar: a one-bar wall stays visible (a step
    # line would give it no width) and a pulled wall leaves a gap.
    for col, color, name in (("buy_wall_price", UP, "nearest bid wall"), ("sell_wall_price", DOWN, "nearest ask wall")):
        idx = np.flatnonzero(np.isfinite(s[col]))
        ax.hlines(s[col][idx], t[idx], t[idx] + bar, colors=color, linewidth=2.5, alpha=0.55, label=name)
    sig = s["signal"]
    # A trade plan drawn over the next bars: long enough to see, short enough not to cross the chart.
    span = max(5, len(t) // 30) * bar
    for side, marker, color, name, col in ((1, "^", UP, "long signal", "low"), (-1, "v", DOWN, "short signal", "high")):
        idx = np.flatnonzero(sig == side)
        if not idx.size:
            continue
        # Just beyond the bar's extreme, so the marker does not hide the price line.
        offset = transforms.offset_copy(ax.transData, fig=fig, y=-9 * side, units="points")
        ax.scatter(t[idx], s[col][idx], marker=marker, s=120, color=color, edgecolors="black",
                   linewidths=0.8, zorder=5, label=name, transform=offset)
    idx = np.flatnonzero(np.isin(sig, (1, -1)))
    if idx.size:
        ax.hlines(s["stop_price"][idx], t[idx], t[idx] + span, colors=DOWN, linestyles="--", linewidth=1.3,
                  label="stop")
        ax.hlines(s["take_profit"][idx], t[idx], t[idx] + span, colors=UP, linestyles="--", linewidth=1.3,
                  label="take profit")
        ax.vlines(t[idx], s["stop_price"][idx], s["take_profit"][idx], colors="#6b7280", linewidth=0.8,
                  alpha=0.7)
    ax.set_ylabel("price")
    ax.yaxis.set_major_formatter(ticker.StrMethodFormatter("{x:,.8g}"))
    _legend(ax)


def _cvd(ax: Axes, s: Series) -> None:
    ax.plot(s.time, s["cvd"], color="#2563eb", linewidth=1.2, label="CVD")
    ax.axhline(0, color="#9ca3af", linewidth=0.8)
    ax.set_ylabel("CVD")
    ax.yaxis.set_major_formatter(ticker.StrMethodFormatter("{x:,.6g}"))
    _legend(ax)


def _threshold_panel(ax: Axes, t: Any, y: FloatArray, level: float, color: str, label: str) -> None:
    ax.plot(t, y, color=color, linewidth=1.1, label=label)
    for lv, c in ((level, UP), (-level, DOWN)):
        ax.axhline(lv, color="#6b7280", linewidth=0.8, linestyle="--")
        beyond = y >= lv if lv > 0 else y <= lv
        ax.fill_between(t, y, lv, where=beyond, color=c, alpha=0.3, linewidth=0, interpolate=True)
    ax.axhline(0, color="#9ca3af", linewidth=0.6)
    ax.set_ylabel(label)
    ax.plot([], [], color="#6b7280", linewidth=0.8, linestyle="--", label=f"±{level:g}")
    _legend(ax)


def _obi(ax: Axes, s: Series) -> None:
    t, y = s.time, s["obi"]
    ax.fill_between(t, y, 0, where=y >= 0, color=UP, alpha=0.45, linewidth=0, interpolate=True, label="bids heavier")
    ax.fill_between(t, y, 0, where=y < 0, color=DOWN, alpha=0.45, linewidth=0, interpolate=True, label="asks heavier")
    ax.axhline(0, color="#4b5563", linewidth=0.8)
    ax.set_ylim(-1.05, 1.05)
    ax.set_ylabel("order book\nimbalance")
    _legend(ax)


def _liquidations(ax: Axes, s: Series) -> None:
    # Each bar's notional as a block one bar wide: a step fill, one polygon however many bars.
    t = np.append(s.time, s.time[-1] + np.timedelta64(s.bar_seconds, "s"))
    short = np.append(s["liq_short_notional"], math.nan)
    long_ = np.append(s["liq_long_notional"], math.nan)
    ax.fill_between(t, 0, np.nan_to_num(short, nan=0.0), step="post", color=UP, alpha=0.8, linewidth=0,
                    label="shorts liquidated")
    ax.fill_between(t, 0, -np.nan_to_num(long_, nan=0.0), step="post", color=DOWN, alpha=0.8, linewidth=0,
                    label="longs liquidated")
    ax.axhline(0, color="#4b5563", linewidth=0.8)
    ax.yaxis.set_major_formatter(ticker.FuncFormatter(_compact))
    ax.set_ylabel("liquidations\n(notional)")
    top = float(np.nanmax(np.abs(np.concatenate((short, long_))), initial=0.0))
    ax.set_ylim(-top * 1.1 or -1, top * 1.1 or 1)
    ex = ax.twinx()
    # The index line behind the bars: a twin axes is drawn on top unless told otherwise.
    ex.set_zorder(ax.get_zorder() - 1)
    ax.patch.set_visible(False)
    ex.plot(s.time, s["cascade_exhaustion"], color="#6b7280", linewidth=0.9, alpha=0.8,
            label="cascade exhaustion (right)")
    ex.set_ylim(-0.05, 1.05)
    ex.set_ylabel("exhaustion", color="#6b7280")
    ex.tick_params(axis="y", colors="#6b7280")
    handles, labels = ax.get_legend_handles_labels()
    h2, l2 = ex.get_legend_handles_labels()
    ax.legend(handles + h2, labels + l2, loc="upper left", bbox_to_anchor=(1.06, 1.0), fontsize=8, frameon=False,
              borderaxespad=0)


def supported_formats() -> set[str]:
    """File suffixes (without the dot) that :func:`render` can write."""
    return set(Figure().canvas.get_supported_filetypes())


def render(recs: Sequence[Any], market: str, symbol: str, bar_seconds: int, path: Path) -> None:
    """Draw the rows (oldest first, at least one) and save the figure to ``path`` (format by suffix)."""
    s = series(recs, bar_seconds)
    fig = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    axes = fig.subplots(6, 1, sharex=True, height_ratios=[3.2, 1.3, 1.2, 1.0, 1.0, 1.4])
    price, cvd, panic, absorption, obi, liq = axes
    _price(price, s, fig)
    _cvd(cvd, s)
    _threshold_panel(panic, s.time, s["panic_index"], 2.0, "#7c3aed", "panic index")
    _threshold_panel(absorption, s.time, s["absorption"], 1.0, "#ea580c", "absorption")
    _obi(obi, s)
    _liquidations(liq, s)
    for ax in axes:
        ax.grid(True, color="#e5e7eb", linewidth=0.6)
        ax.margins(x=0)
    first = recs[0]["bar_time"].astimezone(UTC)
    end = recs[-1]["bar_time"].astimezone(UTC) + timedelta(seconds=bar_seconds)
    liq.set_xlim(first, end)
    locator = mdates.AutoDateLocator(tz=UTC, minticks=6, maxticks=14)
    liq.xaxis.set_major_locator(locator)
    liq.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator, tz=UTC))
    liq.set_xlabel("time (UTC)")
    fig.suptitle(f"{market} {symbol}   {bar_seconds} s bars   {first:%Y-%m-%d %H:%M} to {end:%Y-%m-%d %H:%M} UTC"
                 f"   ({s.n_bars:,} bars)", fontsize=13, fontweight="bold")
    fig.savefig(path, dpi=DPI)
