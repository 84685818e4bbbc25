"""Sequence checks on Binance streams, as pure state.

- aggTrade: ids ``a`` are consecutive per symbol;
- Spot diff depth: each event's ``U`` is the previous event's ``u`` + 1;
- Futures diff depth: each event's ``pu`` equals the previous event's ``u``;
- mark prices and liquidations carry no id: an event is new when its event time ``E`` is
  later than the last one kept for its symbol (Binance sends at most one a second per
  symbol on the all-market streams).

Each check says whether to keep the event (and returns the gap it reveals, if any). An
event at or behind the last one seen (the overlap of a rotated connection) is not kept:
storing it again would duplicate a row. ``positions``/``seed`` carry the state over to a
restarted worker, so that it sees the gap its predecessor's death left.

An event that jumps implausibly far ahead (far more ids than the event time elapsed can
hold, or an event time minutes ahead of the local clock) raises ``Implausible`` and moves
nothing: obeyed, one bogus id would make every later real event "stale" and send an
absurd range to the backfill. A real jump is told from a bogus one by the next event of
the symbol: if it carries on from the rejected one, the jump was real and is taken then,
with the rejected event inside the gap it reports (backfilled or recorded like any gap).
So a bogus frame costs itself, a real jump costs nothing. Tests:
tests/test_unit_sequence.py (``implausible``), tests/chaos/test_connection_faults.py.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Gap:
    symbol: str
    stream: str  # "aggTrade" | "depth"
    from_id: int  # first missing id
    to_id: int  # last missing id
    from_ms: int  # event time before the hole
    to_ms: int  # event time after it


class Implausible(Exception):  # noqa: N818 - a verdict on an event, not a failure of ours
    """An event the tracker refuses to follow; ``reason`` is the rejection counter's label."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


# The kinds of stream a tracker follows, by the table their rows go to.
KIND_OF_TABLE = {"agg_trades": "t", "depth_updates": "d", "mark_prices": "m", "force_orders": "f"}

Positions = dict[str, dict[str, tuple[int, int]]]  # kind -> symbol -> (last id or E, event ms)

# How far ahead an event may jump. Aggregate trade ids: the busiest symbols (BTCUSDT
# perpetual in a crash) make a few thousand a second; 10,000 a second of event time is
# several times that, and the floor of 100,000 covers a burst within a few milliseconds.
# Depth update ids: USD-M's are one counter for the whole venue and run fast (the
# 2024-08-08 BTCUSDT capture in ../shared/realdata: up to 276,498 between two events of
# one symbol, about 740 a millisecond); 10,000 a millisecond and a floor of 10 million are
# more than ten times that. A bogus id (2**62) is billions of times over either bound.
TRADE_FLOOR = 100_000
TRADE_PER_MS = 10
DEPTH_FLOOR = 10_000_000
DEPTH_PER_MS = 10_000
# An event time further ahead of the local clock than this is not believed (an NTP-synced
# host is within a second of Binance; minutes is a broken frame or a broken clock, and a
# broken clock shows as every event confirming the one before: those are taken).
AHEAD_MS = 5 * 60_000


def wall_ms() -> int:
    return int(time.time() * 1000)


class SequenceTracker:
    """Last id and event time per symbol, for each kind of stream, for one market."""

    def __init__(self, now_ms: Callable[[], int] = wall_ms) -> None:
        self._t: dict[str, tuple[int, int]] = {}
        self._d: dict[str, tuple[int, int]] = {}
        self._by = {"t": self._t, "d": self._d, "m": {}, "f": {}}
        self.now_ms = now_ms
        # (kind, symbol) -> (the position it was measured from, its id, its event ms): the
        # last implausible event, taken as the new position if the next one carries on from it.
        self._doubted: dict[tuple[str, str], tuple[tuple[int, int] | None, int, int]] = {}

    def positions(self, kind: str | None = None) -> Positions:
        """A copy of the state (of one kind, or all): cheap, one dict copy per kind."""
        return {k: dict(v) for k, v in self._by.items() if kind is None or k == kind}

    def seed(self, positions: Positions) -> None:
        for kind, state in positions.items():
            self._by[kind].update(state)

    def _confirmed(self, kind: str, symbol: str, prev: tuple[int, int] | None, new: int, e_ms: int,
                   floor: int, per_ms: int, detail: str) -> None:
        """An implausible event: returns if it carries on from the previous implausible one
        (measured from the same position: nothing kept in between), else raises."""
        doubted = self._doubted.get((kind, symbol))
        if doubted is not None and doubted[0] is prev and new > doubted[1] \
                and new - doubted[1] <= max(floor, per_ms * (e_ms - doubted[2])):
            del self._doubted[(kind, symbol)]
            return
        self._doubted[(kind, symbol)] = (prev, new, e_ms)
        raise Implausible("implausible_time" if kind in ("m", "f") else "implausible_id", detail)

    def _ahead(self, e_ms: int) -> bool:
        return e_ms > self.now_ms() + AHEAD_MS

    def by_time(self, kind: str, symbol: str, e_ms: int) -> bool:
        """Keep an event of a stream without ids (``kind`` m: mark price, f: liquidation)?"""
        last = self._by[kind]
        prev = last.get(symbol)
        if prev is not None and e_ms <= prev[0]:
            return False
        # The clock is read only for a step of minutes (or a symbol's first event).
        if (prev is None or e_ms - prev[0] > AHEAD_MS) and self._ahead(e_ms):
            self._confirmed(kind, symbol, prev, e_ms, e_ms, AHEAD_MS, 0,
                            f"{symbol} E={e_ms}: more than {AHEAD_MS // 1000} s ahead of the clock")
        last[symbol] = (e_ms, e_ms)
        return True

    def trade(self, symbol: str, a: int, e_ms: int) -> tuple[bool, Gap | None]:
        last = self._t
        prev = last.get(symbol)
        if prev is None:  # nothing to measure the id by; the time is checked (once a symbol)
            if self._ahead(e_ms):
                self._confirmed("t", symbol, prev, a, e_ms, TRADE_FLOOR, TRADE_PER_MS,
                                f"{symbol} a={a} E={e_ms}: the first event, minutes ahead of the clock")
            last[symbol] = (a, e_ms)
            return True, None
        last_a = prev[0]
        if a == last_a + 1:  # the usual case first
            last[symbol] = (a, e_ms)
            return True, None
        if a <= last_a:
            return False, None
        if a - last_a > TRADE_FLOOR and (a - last_a > TRADE_PER_MS * (e_ms - prev[1]) or self._ahead(e_ms)):
            self._confirmed("t", symbol, prev, a, e_ms, TRADE_FLOOR, TRADE_PER_MS,
                            f"{symbol} a={a}: {a - last_a} ids after a={last_a} in {e_ms - prev[1]} ms")
        last[symbol] = (a, e_ms)
        return True, Gap(symbol, "aggTrade", last_a + 1, a - 1, prev[1], e_ms)

    def depth(self, symbol: str, first: int, final: int, prev_final: int | None, e_ms: int) -> tuple[bool, Gap | None]:
        """``prev_final`` is Futures' ``pu`` (None on Spot)."""
        last = self._d
        prev = last.get(symbol)
        if prev is not None and final <= prev[0]:
            return False, None
        if first > final or (prev_final is not None and prev_final >= final):
            # An event's ids run U..u, after pu: anything else is no Binance event.
            raise Implausible("implausible_id", f"{symbol} U={first} u={final} pu={prev_final}")
        if prev is None:
            if self._ahead(e_ms):
                self._confirmed("d", symbol, prev, final, e_ms, DEPTH_FLOOR, DEPTH_PER_MS,
                                f"{symbol} u={final} E={e_ms}: the first event, minutes ahead of the clock")
            last[symbol] = (final, e_ms)
            return True, None
        if final - prev[0] > DEPTH_FLOOR and (final - prev[0] > DEPTH_PER_MS * (e_ms - prev[1])
                                              or self._ahead(e_ms)):
            self._confirmed("d", symbol, prev, final, e_ms, DEPTH_FLOOR, DEPTH_PER_MS,
                            f"{symbol} u={final}: {final - prev[0]} ids after u={prev[0]} in {e_ms - prev[1]} ms")
        last[symbol] = (final, e_ms)
        if prev_final is not None:
            if prev_final == prev[0]:
                return True, None
            # The events between the last one seen and this one ended at ``pu``.
            return True, Gap(symbol, "depth", prev[0] + 1, max(prev_final, prev[0] + 1), prev[1], e_ms)
        if first <= prev[0] + 1:
            return True, None
        return True, Gap(symbol, "depth", prev[0] + 1, first - 1, prev[1], e_ms)
