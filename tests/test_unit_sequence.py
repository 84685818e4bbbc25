"""Unit tests of ``ingestor.binance.sequence.SequenceTracker``."""

from __future__ import annotations

import pytest

from ingestor.binance.sequence import Gap, Implausible, SequenceTracker

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


# -- implausible jumps: one bogus id or time costs one event --------------------------

NOW = 1_700_000_000_000


def at(now: int = NOW) -> SequenceTracker:
    return SequenceTracker(now_ms=lambda: now)


def rejected(call: object, reason: str = "implausible_id") -> None:
    with pytest.raises(Implausible) as err:
        call()  # type: ignore[operator]
    assert err.value.reason == reason


def test_a_bogus_trade_id_is_rejected_and_does_not_pin_the_stream() -> None:
    t = at()
    t.trade("BTCUSDT", 100, NOW - 1000)
    rejected(lambda: t.trade("BTCUSDT", 2**62, NOW - 999))
    assert t.positions()["t"]["BTCUSDT"] == (100, NOW - 1000)  # a restarted worker is not handed the pin
    assert t.trade("BTCUSDT", 101, NOW - 998) == (True, None)  # the real trades carry on, no gap
    assert t.trade("BTCUSDT", 102, NOW - 997) == (True, None)


def test_two_bogus_ids_in_a_row_that_do_not_follow_each_other_are_both_rejected() -> None:
    t = at()
    t.trade("BTCUSDT", 100, NOW)
    rejected(lambda: t.trade("BTCUSDT", 2**62, NOW))
    rejected(lambda: t.trade("BTCUSDT", 2**40, NOW))  # behind the first: no confirmation
    rejected(lambda: t.trade("BTCUSDT", 2**62 + 10**9, NOW))  # too far past the one before
    assert t.trade("BTCUSDT", 101, NOW) == (True, None)


def test_a_jump_the_elapsed_time_can_hold_is_an_ordinary_gap() -> None:
    t = at()
    t.trade("BTCUSDT", 100, NOW - 200_000)
    # 200 s at up to 10,000 trades a second: 1,000,000 missing ids is plausible (a long outage).
    assert t.trade("BTCUSDT", 1_000_101, NOW) == (True, Gap("BTCUSDT", "aggTrade", 101, 1_000_100, NOW - 200_000,
                                                             NOW))
    # Under the floor of 100,000 ids, whatever the time.
    assert t.trade("BTCUSDT", 1_090_000, NOW)[0]


def test_a_real_jump_is_taken_when_the_next_trade_carries_on_from_it() -> None:
    t = at()
    t.trade("BTCUSDT", 100, NOW)
    rejected(lambda: t.trade("BTCUSDT", 5_000_000, NOW + 5))
    # The next one follows the rejected one: the jump was real. The gap holds the rejected id,
    # so the backfill fetches it: nothing is lost.
    assert t.trade("BTCUSDT", 5_000_001, NOW + 6) == (True, Gap("BTCUSDT", "aggTrade", 101, 5_000_000, NOW, NOW + 6))
    assert t.trade("BTCUSDT", 5_000_002, NOW + 7) == (True, None)


def test_a_doubted_trade_is_forgotten_once_the_stream_moves_on() -> None:
    t = at()
    t.trade("BTCUSDT", 100, NOW)
    rejected(lambda: t.trade("BTCUSDT", 5_000_000, NOW))
    assert t.trade("BTCUSDT", 101, NOW) == (True, None)
    # Follows the old doubt, but a trade was kept since: measured from 101 again.
    rejected(lambda: t.trade("BTCUSDT", 5_000_001, NOW))


def test_a_trade_jump_with_an_event_time_far_ahead_of_the_clock_is_rejected() -> None:
    t = at()
    t.trade("BTCUSDT", 100, NOW)
    # The ids fit the event time elapsed, but that time is eleven days in the future.
    rejected(lambda: t.trade("BTCUSDT", 10**9, NOW + 10**9))
    assert t.trade("BTCUSDT", 101, NOW + 1) == (True, None)


def test_a_bogus_spot_depth_id_is_rejected() -> None:
    t = at()
    t.depth("BTCUSDT", 100, 160, None, NOW)
    rejected(lambda: t.depth("BTCUSDT", 2**62 - 5, 2**62, None, NOW + 100))
    rejected(lambda: t.depth("BTCUSDT", 170, 165, None, NOW + 100))  # U after u: no Binance event
    assert t.positions()["d"]["BTCUSDT"] == (160, NOW)
    assert t.depth("BTCUSDT", 161, 170, None, NOW + 200) == (True, None)


def test_a_bogus_futures_depth_id_is_rejected() -> None:
    t = at()
    t.depth("BTCUSDT", 100, 160, 90, NOW)
    rejected(lambda: t.depth("BTCUSDT", 161, 2**62, 160, NOW + 100))
    rejected(lambda: t.depth("BTCUSDT", 161, 170, 2**62, NOW + 100))  # pu after the event's own u
    assert t.depth("BTCUSDT", 161, 170, 160, NOW + 200) == (True, None)


def test_a_real_depth_jump_is_taken_when_the_next_event_carries_on_from_it() -> None:
    t = at()
    t.depth("BTCUSDT", 100, 160, 90, NOW)
    # USD-M ids run up to ~740 a millisecond; 50 million in 1 ms is not believed at once.
    rejected(lambda: t.depth("BTCUSDT", 50_000_000, 50_000_100, 49_999_000, NOW + 1))
    assert t.depth("BTCUSDT", 50_000_101, 50_000_200, 50_000_100, NOW + 2) == (
        True, Gap("BTCUSDT", "depth", 161, 50_000_100, NOW, NOW + 2))
    # Over an hour, the same jump is an ordinary gap.
    t.depth("ETHUSDT", 100, 160, 90, NOW - 3_600_000)
    assert t.depth("ETHUSDT", 50_000_000, 50_000_100, 49_999_000, NOW) == (
        True, Gap("ETHUSDT", "depth", 161, 49_999_000, NOW - 3_600_000, NOW))


def test_an_event_time_far_ahead_does_not_pin_a_stream_without_ids() -> None:
    t = at()
    assert t.by_time("m", "BTCUSDT", NOW - 1000)
    rejected(lambda: t.by_time("m", "BTCUSDT", NOW + 10**9), "implausible_time")
    assert t.by_time("m", "BTCUSDT", NOW)  # the next real mark price is kept
    rejected(lambda: t.by_time("f", "ETHUSDT", 2**62), "implausible_time")  # a first event too
    assert t.by_time("f", "ETHUSDT", NOW)
    assert t.positions()["f"]["ETHUSDT"] == (NOW, NOW)


def test_a_clock_minutes_behind_costs_the_first_event_then_the_stream_is_followed() -> None:
    t = at(NOW - 10 * 60_000)  # this host's clock is 10 minutes slow
    rejected(lambda: t.by_time("m", "BTCUSDT", NOW), "implausible_time")
    assert t.by_time("m", "BTCUSDT", NOW + 1000)  # carries on from the doubted one: believed
    assert t.by_time("m", "BTCUSDT", NOW + 2000)
    assert t.by_time("m", "BTCUSDT", NOW + 2000) is False  # still a duplicate check


def test_a_first_event_minutes_ahead_of_the_clock_is_not_followed() -> None:
    # Nothing to measure its id by: its time is checked, so it does not become the position.
    t = at()
    rejected(lambda: t.trade("BTCUSDT", 2**62, NOW + 10**9))
    assert t.trade("BTCUSDT", 100, NOW) == (True, None)
    rejected(lambda: t.depth("BTCUSDT", 2**62 - 1, 2**62, None, NOW + 10**9))
    assert t.depth("BTCUSDT", 100, 160, None, NOW) == (True, None)
    assert t.positions() == {"t": {"BTCUSDT": (100, NOW)}, "d": {"BTCUSDT": (160, NOW)}, "m": {}, "f": {}}
