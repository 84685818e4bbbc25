"""``features`` rows: FeatureState's output COPYs into the table on both backends and reads
back equal, NaN as NULL."""

from __future__ import annotations

import math
import random

import asyncpg
import numpy as np

from ingestor.feature_spec import FEATURE_COLUMNS, FeatureSettings
from ingestor.features.bars import BarBuilder
from ingestor.features.indicators import FeatureState
from ingestor.wire import rows
from ingestor.wire.copy_binary import copy_file


def feature_rows(n_trades: int = 4000) -> list[dict]:
    s = FeatureSettings(bar_seconds=1, window=6, div_bars=4, cascade_bars=3)
    bb = BarBuilder.from_settings(s, 0.1)
    fs = FeatureState(0.1, s)
    rnd = random.Random(5)
    bids = (np.array([99.9, 99.8, 99.7, 99.6, 99.5, 99.4]), np.array([1.0, 2.0, 30.0, 1.0, 1.5, 2.0]))
    asks = (np.array([100.0, 100.1, 100.2, 100.3, 100.4, 100.5]), np.array([2.0, 1.0, 1.0, 40.0, 1.0, 1.0]))
    out = []
    price, t = 100.0, 1_700_000_000_000
    for _ in range(n_trades):
        t += rnd.randint(1, 20)
        price = round(price + rnd.choice((-0.1, 0, 0.1)), 1)
        for bar in bb.add_trade(t, price, rnd.uniform(0.01, 2), rnd.random() < 0.5):
            out.append((bar.start_ms, fs.update(bar, bids, asks)))
    return out


async def test_features_rows_round_trip(db_dsn: str) -> None:
    made = feature_rows()
    assert len(made) > 30
    data = b"".join(rows.features("futures", "BTCUSDT", start, 1, row) for start, row in made)
    conn = await asyncpg.connect(db_dsn)
    try:
        await conn.copy_to_table("features", source=memoryview(copy_file(data)), columns=rows.TABLES["features"],
                                 format="binary")
        stored = await conn.fetch("SELECT *, (extract(epoch from bar_time) * 1000)::bigint AS ms FROM features "
                                  "ORDER BY bar_time")
    finally:
        await conn.close()
    assert [r["ms"] for r in stored] == [start for start, _ in made]
    nulls = 0
    for rec, (_, row) in zip(stored, made, strict=True):
        assert rec["market"] == "futures" and rec["symbol"] == "BTCUSDT" and rec["bar_seconds"] == 1
        for col in FEATURE_COLUMNS:
            want = row[col]
            if isinstance(want, float) and math.isnan(want):
                assert rec[col] is None, col
                nulls += 1
            else:
                assert rec[col] == want, (col, rec[col], want)
    assert nulls > 0  # the short-history NaNs really went through as NULL
