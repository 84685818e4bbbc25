"""The sizing benchmark's arithmetic: the per-day extrapolation, the rates it rests on, and
the two ways it reads real captures (aggTrades from a trade stream, slower diffs from faster
ones), each on a case worked out by hand."""

from __future__ import annotations

import pytest

from benchmarks import sizing as z
from ingestor.config import Settings


def test_per_day_multiplies_rate_by_a_day_by_symbols_and_by_row_size() -> None:
    day = z.per_day({"agg_trades/spot": 2.0, "mark_prices/futures": 1.0, "features/spot": 0.5},
                    {"agg_trades/spot": 300.0, "mark_prices/futures": 250.0}, symbols=3)
    # 2/s x 86,400 s x 3 symbols = 518,400 rows; x 300 B = 155,520,000 B.
    assert day["agg_trades/spot"] == {"rows": 518_400, "bytes": 155_520_000}
    assert day["mark_prices/futures"] == {"rows": 259_200, "bytes": 64_800_000}
    assert day["features/spot"] == {"rows": 129_600, "bytes": None}  # no size measured: none made up
    assert z.day_total(day, ("spot", "futures")) == 155_520_000 + 64_800_000
    assert z.day_total(day, ("futures",)) == 64_800_000


def test_symbol_rates_follow_the_settings() -> None:
    rates = z.symbol_rates({"spot": 16.0, "futures": 30.0}, Settings(), bar_seconds=60)
    assert rates == pytest.approx({
        "agg_trades/spot": 16.0, "agg_trades/futures": 30.0,
        "depth_updates/spot": 10.0, "depth_updates/futures": 2.0,  # 100 ms, 500 ms
        "depth_snapshots/spot": 1 / 300, "depth_snapshots/futures": 1 / 300,
        "features/spot": 1 / 60, "features/futures": 1 / 60,
        "mark_prices/futures": 1.0, "open_interest/futures": 1 / 60,
    })
    slow = Settings(spot_depth_speed="1000ms", snapshot_interval_s=0, open_interest_interval_s=0)
    rates = z.symbol_rates({"spot": 1.0, "futures": 1.0}, slow, bar_seconds=60, features=False)
    assert rates["depth_updates/spot"] == 1.0
    assert not any(k.startswith(("depth_snapshots", "open_interest", "features")) for k in rates)


def test_count_agg_trades_merges_runs_of_one_time_side_and_price() -> None:
    trades = [
        {"T": 1, "m": True, "p": "10.0"},
        {"T": 1, "m": True, "p": "10.0"},  # the same taker order's next fill: same aggTrade
        {"T": 1, "m": True, "p": "10.1"},  # next price level: a new aggTrade
        {"T": 1, "m": False, "p": "10.1"},  # the other side: another order
        {"T": 2, "m": False, "p": "10.1"},  # a later time: another order
        {"T": 1, "m": True, "p": "10.0"},  # not consecutive with the first run
    ]
    assert z.count_agg_trades(trades) == 5
    assert z.count_agg_trades([]) == 0


def test_merge_diffs_keeps_each_level_once_with_its_last_quantity() -> None:
    diffs = [
        {"e": "depthUpdate", "E": 1000, "T": 999, "s": "X", "U": 10, "u": 12, "pu": 9,
         "b": [["1.0", "5"], ["0.9", "1"]], "a": [["1.1", "2"]]},
        {"e": "depthUpdate", "E": 1400, "T": 1399, "s": "X", "U": 13, "u": 15, "pu": 12,
         "b": [["1.0", "0"]], "a": [["1.2", "3"]]},
        {"e": "depthUpdate", "E": 1500, "T": 1500, "s": "X", "U": 16, "u": 16, "pu": 15,
         "b": [], "a": [["1.1", "4"]]},
    ]
    merged = z.merge_diffs(diffs, 500)
    assert merged == [
        {"e": "depthUpdate", "E": 1400, "T": 1399, "s": "X", "U": 10, "u": 15, "pu": 9,
         "b": [["1.0", "0"], ["0.9", "1"]], "a": [["1.1", "2"], ["1.2", "3"]]},
        {"e": "depthUpdate", "E": 1500, "T": 1500, "s": "X", "U": 16, "u": 16, "pu": 15,
         "b": [], "a": [["1.1", "4"]]},
    ]
    assert list(merged[0]) == list(diffs[0])  # the exchange's key order: the payload's size is the point
    assert z.merge_diffs([], 500) == []


def test_speed_ms() -> None:
    assert z.speed_ms("100ms") == 100
    with pytest.raises(ValueError):
        z.speed_ms("1s")
