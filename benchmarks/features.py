"""Indicator cost: the bar builder per trade and ``FeatureState.update`` per symbol-bar.

Issue 4 asks for the indicator cost per symbol-bar; issue 6 weighs it against a full
feed (a few hundred symbols closing a bar each minute is a few hundred updates a minute,
so even milliseconds per bar would be cheap; the per-trade builder cost is the one that
scales with the feed). Inputs are seeded and synthetic: a random walk of trades, and a
book of ``levels`` a side around the price with a few walls, so the wall search and
the footprint have real work to do.
"""

from __future__ import annotations

import random
import time
from typing import Any

import numpy as np

from benchmarks.report import metric
from ingestor.feature_spec import FeatureSettings
from ingestor.features.bars import Bar, BarBuilder
from ingestor.features.indicators import FeatureState

TICK = 0.1


def trades(n: int, seed: int = 3) -> list[tuple[int, float, float, bool]]:
    rnd = random.Random(seed)
    out = []
    t, ticks = 1_700_000_000_000, 1_000_000  # price 100,000.0
    for _ in range(n):
        t += rnd.randint(0, 12)  # about 170 trades/s: a busy perpetual
        ticks += rnd.choice((-1, 0, 0, 1))
        out.append((t, ticks * TICK, round(rnd.expovariate(20), 3) + 0.001, rnd.random() < 0.5))
    return out


def book(mid: float, levels: int, seed: int = 4) -> tuple[tuple[Any, Any], tuple[Any, Any]]:
    rng = np.random.default_rng(seed)
    steps = np.arange(1, levels + 1) * TICK
    qty = rng.exponential(1.0, (2, levels))
    qty[:, rng.integers(0, levels, (2, 4))] *= 20  # walls
    return (mid - steps, qty[0]), (mid + steps, qty[1])


def builder_cost(items: list[tuple[int, float, float, bool]], settings: FeatureSettings) -> tuple[float, list[Bar]]:
    bb = BarBuilder.from_settings(settings, TICK)
    bars: list[Bar] = []
    started = time.perf_counter()
    for t, p, q, m in items:
        bars += bb.add_trade(t, p, q, m)
    return (time.perf_counter() - started) / len(items) * 1e6, bars


def update_cost(bars: list[Bar], settings: FeatureSettings, levels: int) -> float:
    fs = FeatureState(TICK, settings)
    books = [book(b.close, levels) for b in bars]
    started = time.perf_counter()
    for b, (bids, asks) in zip(bars, books, strict=True):
        fs.update(b, bids, asks)
    return (time.perf_counter() - started) / len(bars) * 1e6


def run(quick: bool) -> dict[str, Any]:
    runs = 3 if quick else 5
    n = 100_000 if quick else 400_000
    items = trades(n)
    metrics: list[dict[str, Any]] = []
    for bar_seconds in (1, 60):
        settings = FeatureSettings(bar_seconds=bar_seconds)
        per_trade, bars = [], []
        for _ in range(runs):
            us, bars = builder_cost(items, settings)
            per_trade.append(us)
        metrics.append(metric(f"bar builder per trade, {bar_seconds} s bars", per_trade, "µs",
                              f"{n:,} trades, {len(bars):,} bars"))
        for levels in (100, 1000):
            per_bar = [update_cost(bars, settings, levels) for _ in range(runs)]
            metrics.append(metric(f"FeatureState.update per symbol-bar, {bar_seconds} s bars, {levels} levels a side",
                                  per_bar, "µs", f"{len(bars):,} bars; W=60, every indicator and the signal"))
    return {"suite": "features", "title": "indicator cost per trade and per symbol-bar",
            "params": {"runs": runs, "trades": n, "tick": TICK}, "metrics": metrics,
            "notes": ["Medians of the runs. One process, one core; the book at each bar close is a fresh "
                      "synthetic book (building it is outside the timing)."]}
