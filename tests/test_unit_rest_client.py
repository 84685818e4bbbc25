"""Unit tests of ``ingestor.binance.rest_client``: ``WeightBudget`` with explicit times, and
``_retry_after_s``."""

from __future__ import annotations

from typing import Any

import pytest

from ingestor.binance.rest_client import RestClient, WeightBudget, _retry_after_s


def test_fresh_budget_goes_now() -> None:
    b = WeightBudget(limit=1200)
    assert b.wait_s(1, now=1_000_000.0) == 0.0
    assert (b.window, b.used) == (16_666, 0)  # 1_000_000 // 60


def test_spend_within_the_window_then_wait_for_the_next() -> None:
    b = WeightBudget(limit=1200)
    b.spend(1000, now=600.0)  # window 10: [600, 660)
    assert b.used == 1000
    assert b.wait_s(200, now=620.0) == 0.0  # exactly up to the limit is fine
    # 1000 + 201 > 1200: wait for 660 s, plus a 50 ms margin.
    assert b.wait_s(201, now=620.0) == pytest.approx(40.05)
    assert b.wait_s(201, now=659.5) == pytest.approx(0.55)
    b.spend(150, now=630.0)
    assert b.used == 1150
    assert b.wait_s(50, now=631.0) == 0.0
    assert b.wait_s(51, now=631.0) == pytest.approx(29.05)


def test_window_rolls_over_at_minute_boundaries() -> None:
    b = WeightBudget(limit=100)
    b.spend(100, now=659.999)
    assert (b.window, b.used) == (10, 100)
    assert b.wait_s(1, now=659.999) == pytest.approx(0.051)
    assert b.wait_s(1, now=660.0) == 0.0  # new window, count reset
    assert (b.window, b.used) == (11, 0)
    b.spend(40, now=661.0)
    b.spend(40, now=719.0)
    assert b.used == 80  # same window [660, 720)
    b.spend(40, now=720.0)
    assert (b.window, b.used) == (12, 40)


def test_waiting_the_returned_time_is_enough() -> None:
    b = WeightBudget(limit=10)
    b.spend(8, now=125.0)
    delay = b.wait_s(5, now=125.0)
    assert delay == pytest.approx(55.05)
    assert b.wait_s(5, now=125.0 + delay) == 0.0


def test_a_request_larger_than_the_limit_goes_when_nothing_is_used() -> None:
    b = WeightBudget(limit=10)
    assert b.wait_s(50, now=0.0) == 0.0
    b.spend(50, now=0.0)
    assert b.used == 50
    assert b.wait_s(1, now=30.0) == pytest.approx(30.05)
    # Used but within the limit: the large request still waits for an empty window.
    b2 = WeightBudget(limit=10)
    b2.spend(1, now=0.0)
    assert b2.wait_s(50, now=1.0) == pytest.approx(59.05)
    assert b2.wait_s(50, now=60.0) == 0.0


def test_header_corrects_the_count_upward_only() -> None:
    b = WeightBudget(limit=1200)
    b.spend(10, now=5.0)
    b.observe("900", now=6.0)  # other clients on the IP
    assert b.used == 900
    assert b.wait_s(301, now=6.0) == pytest.approx(54.05)
    b.observe("20", now=7.0)  # lower than ours: ours stands
    assert b.used == 900
    b.spend(5, now=8.0)
    assert b.used == 905


@pytest.mark.parametrize("header", [None, "", "lots", "1.5"])
def test_missing_or_bad_header_changes_nothing(header: Any) -> None:
    b = WeightBudget(limit=1200)
    b.spend(10, now=5.0)
    b.observe(header, now=6.0)
    assert (b.window, b.used) == (0, 10)


def test_header_in_a_new_window() -> None:
    b = WeightBudget(limit=1200)
    b.spend(1000, now=50.0)
    b.observe("30", now=61.0)  # the reply arrives in the next window: the old count is gone
    assert (b.window, b.used) == (1, 30)


def test_block_after_429_until_retry_after() -> None:
    b = WeightBudget(limit=1200)
    b.block(30.0, now=100.0)
    assert b.blocked_until == 130.0
    assert b.wait_s(1, now=100.0) == 30.0
    assert b.wait_s(1, now=125.5) == 4.5
    assert b.wait_s(1, now=130.0) == 0.0
    assert b.wait_s(1, now=131.0) == 0.0


def test_block_never_shortens() -> None:
    b = WeightBudget(limit=1200)
    b.block(120.0, now=0.0)
    b.block(10.0, now=5.0)  # a later, shorter Retry-After
    assert b.blocked_until == 120.0
    b.block(200.0, now=10.0)
    assert b.blocked_until == 210.0


def test_block_wins_over_an_empty_window() -> None:
    b = WeightBudget(limit=1200)
    b.spend(1200, now=10.0)
    b.block(100.0, now=10.0)
    # At 70 s the window is new (count 0), but the block lasts until 110 s.
    assert b.wait_s(1, now=70.0) == 40.0
    assert b.wait_s(1, now=110.0) == 0.0


def test_client_budgets_are_a_share_of_each_limit() -> None:
    client = RestClient(None, {"spot": "https://api.binance.com", "futures": "https://fapi.binance.com"},  # type: ignore[arg-type]
                        weight_share=0.5)
    assert client.budgets["spot"].limit == 3000  # 6000 per minute
    assert client.budgets["futures"].limit == 1200  # 2400 per minute
    assert RestClient(None, {"futures": "x"}, weight_share=0.25).budgets["futures"].limit == 600  # type: ignore[arg-type]


@pytest.mark.parametrize(("value", "seconds"), [
    (None, 60.0),
    ("", 60.0),
    ("5", 5.0),
    (" 7 ", 7.0),
    ("2.5", 2.5),
    ("120", 120.0),
    ("0", 1.0),  # at least a second
    ("0.2", 1.0),
    ("-3", 1.0),
    ("soon", 60.0),
    ("Wed, 21 Oct 2015 07:28:00 GMT", 60.0),  # HTTP-date form: not what Binance sends
])
def test_retry_after(value: str | None, seconds: float) -> None:
    assert _retry_after_s(value) == seconds
