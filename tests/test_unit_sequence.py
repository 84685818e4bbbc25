"""Unit tests of ``ingestor.binance.sequence.SequenceTracker``."""

from __future__ import annotations

from ingestor.binance.sequence import Gap, SequenceTracker

# -- aggTrade -------------------------------------------------------------------------


def test_first_trade_is_kept_without_gap() -> None:
    t = SequenceTracker()
    assert t.trade("BTCUSDT", 500, 1_000) == (True, None)


def test_consecutive_trades() -> None:
    t = SequenceTracker()
    for i, a in enumerate(range(10, 20)):
        assert t.trade("BTCUSDT", a, 1_000 + i) == (True, None)
    assert t.positions()["t"]["BTCUSDT"] == (19, 1_009)


def test_trade_gap_range() -> None:
    t = SequenceTracker()
    t.trade("BTCUSDT", 100, 5_000)
    keep, gap = t.trade("BTCUSDT", 105, 5_900)
    assert keep
    # 101, 102, 103, 104 are missing; the hole lies between the events at 5000 and 5900 ms.
    assert gap == Gap("BTCUSDT", "aggTrade", 101, 104, 5_000, 5_900)
    assert t.trade("BTCUSDT", 106, 6_000) == (True, None)


def test_trade_gap_of_one() -> None:
    t = SequenceTracker()
    t.trade("ETHUSDT", 7, 1)
    assert t.trade("ETHUSDT", 9, 2) == (True, Gap("ETHUSDT", "aggTrade", 8, 8, 1, 2))


def test_stale_trades_are_not_kept() -> None:
    t = SequenceTracker()
    t.trade("BTCUSDT", 100, 5_000)
    t.trade("BTCUSDT", 101, 5_001)
    assert t.trade("BTCUSDT", 101, 5_001) == (False, None)  # repeat
    assert t.trade("BTCUSDT", 50, 4_000) == (False, None)  # replay after a reconnect
    assert t.positions()["t"]["BTCUSDT"] == (101, 5_001)  # unchanged
    assert t.trade("BTCUSDT", 102, 5_002) == (True, None)  # no gap invented by the stale ones


def test_trade_gap_after_stale_is_measured_from_the_newest() -> None:
    t = SequenceTracker()
    t.trade("BTCUSDT", 10, 100)
    t.trade("BTCUSDT", 8, 90)
    assert t.trade("BTCUSDT", 13, 130) == (True, Gap("BTCUSDT", "aggTrade", 11, 12, 100, 130))


# -- Spot diff depth (U == last u + 1) ------------------------------------------------

def test_spot_depth_chain() -> None:
    t = SequenceTracker()
    assert t.depth("BTCUSDT", 157, 160, None, 1_000) == (True, None)
    assert t.depth("BTCUSDT", 161, 161, None, 1_100) == (True, None)
    assert t.depth("BTCUSDT", 162, 170, None, 1_200) == (True, None)
    assert t.positions()["d"]["BTCUSDT"] == (170, 1_200)


def test_spot_depth_overlap_is_allowed() -> None:
    # After a snapshot or reconnect the first event may straddle the last seen id.
    t = SequenceTracker()
    t.depth("BTCUSDT", 100, 160, None, 1_000)
    assert t.depth("BTCUSDT", 150, 175, None, 1_100) == (True, None)
    assert t.positions()["d"]["BTCUSDT"] == (175, 1_100)


def test_spot_depth_gap_range() -> None:
    t = SequenceTracker()
    t.depth("BTCUSDT", 157, 160, None, 1_000)
    keep, gap = t.depth("BTCUSDT", 166, 170, None, 1_300)
    assert keep
    assert gap == Gap("BTCUSDT", "depth", 161, 165, 1_000, 1_300)
    assert t.depth("BTCUSDT", 171, 171, None, 1_400) == (True, None)


def test_spot_depth_stale() -> None:
    t = SequenceTracker()
    t.depth("BTCUSDT", 157, 160, None, 1_000)
    assert t.depth("BTCUSDT", 157, 160, None, 1_000) == (False, None)  # the same event again
    assert t.depth("BTCUSDT", 150, 155, None, 900) == (False, None)  # older
    assert t.positions()["d"]["BTCUSDT"] == (160, 1_000)
    assert t.depth("BTCUSDT", 161, 162, None, 1_100) == (True, None)


# -- Futures diff depth (pu == last u) -------------------------------------------------

def test_futures_depth_pu_chain() -> None:
    t = SequenceTracker()
    # U is not last u + 1 on USD-M; only pu links the events.
    assert t.depth("BTCUSDT", 390497796, 390497878, 390497794, 1_000) == (True, None)
    assert t.depth("BTCUSDT", 390497890, 390497900, 390497878, 1_250) == (True, None)
    assert t.depth("BTCUSDT", 390497950, 390497999, 390497900, 1_500) == (True, None)


def test_futures_depth_gap_range() -> None:
    t = SequenceTracker()
    t.depth("BTCUSDT", 100, 160, 90, 1_000)
    # Missing: the event(s) after u=160 that ended at pu=180.
    keep, gap = t.depth("BTCUSDT", 185, 200, 180, 1_500)
    assert keep
    assert gap == Gap("BTCUSDT", "depth", 161, 180, 1_000, 1_500)
    assert t.depth("BTCUSDT", 203, 210, 200, 1_750) == (True, None)


def test_futures_depth_broken_chain_still_reports_a_gap() -> None:
    t = SequenceTracker()
    t.depth("BTCUSDT", 100, 160, 90, 1_000)
    # pu behind the last u but u ahead: the chain is broken; the report is at least one id wide.
    assert t.depth("BTCUSDT", 150, 170, 155, 1_100) == (True, Gap("BTCUSDT", "depth", 161, 161, 1_000, 1_100))


def test_futures_depth_stale() -> None:
    t = SequenceTracker()
    t.depth("BTCUSDT", 100, 160, 90, 1_000)
    assert t.depth("BTCUSDT", 95, 160, 90, 1_000) == (False, None)
    assert t.depth("BTCUSDT", 50, 99, 40, 500) == (False, None)
    assert t.depth("BTCUSDT", 161, 170, 160, 1_250) == (True, None)


# -- independence ---------------------------------------------------------------------

def test_symbols_and_streams_are_independent() -> None:
    t = SequenceTracker()
    assert t.trade("BTCUSDT", 100, 1) == (True, None)
    assert t.trade("ETHUSDT", 5, 2) == (True, None)  # first ETH trade: no gap from BTC's 100
    assert t.trade("ETHUSDT", 6, 3) == (True, None)
    assert t.trade("BTCUSDT", 101, 4) == (True, None)
    assert t.trade("ETHUSDT", 8, 5) == (True, Gap("ETHUSDT", "aggTrade", 7, 7, 3, 5))
    # Depth ids of a symbol do not interact with its trade ids.
    assert t.depth("BTCUSDT", 1, 2, None, 6) == (True, None)
    assert t.depth("BTCUSDT", 3, 4, None, 7) == (True, None)
    assert t.trade("BTCUSDT", 102, 8) == (True, None)
    assert t.depth("ETHUSDT", 1000, 1010, 990, 9) == (True, None)
    assert t.depth("BTCUSDT", 10, 12, None, 10) == (True, Gap("BTCUSDT", "depth", 5, 9, 7, 10))


def test_trackers_do_not_share_state() -> None:
    a, b = SequenceTracker(), SequenceTracker()
    a.trade("BTCUSDT", 1, 1)
    assert b.trade("BTCUSDT", 5, 1) == (True, None)
    assert a.trade("BTCUSDT", 2, 2) == (True, None)
