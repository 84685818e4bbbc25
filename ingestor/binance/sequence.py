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
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Gap:
    symbol: str
    stream: str  # "aggTrade" | "depth"
    from_id: int  # first missing id
    to_id: int  # last missing id
    from_ms: int  # event time before the hole
    to_ms: int  # event time after it


# The kinds of stream a tracker follows, by the table their rows go to.
KIND_OF_TABLE = {"agg_trades": "t", "depth_updates": "d", "mark_prices": "m", "force_orders": "f"}

Positions = dict[str, dict[str, tuple[int, int]]]  # kind -> symbol -> (last id or E, event ms)


class SequenceTracker:
    """Last id and event time per symbol, for each kind of stream, for one market."""

    def __init__(self) -> None:
        self._t: dict[str, tuple[int, int]] = {}
        self._d: dict[str, tuple[int, int]] = {}
        self._by = {"t": self._t, "d": self._d, "m": {}, "f": {}}

    def positions(self, kind: str | None = None) -> Positions:
        """A copy of the state (of one kind, or all): cheap, one dict copy per kind."""
        return {k: dict(v) for k, v in self._by.items() if kind is None or k == kind}

    def seed(self, positions: Positions) -> None:
        for kind, state in positions.items():
            self._by[kind].update(state)

    def by_time(self, kind: str, symbol: str, e_ms: int) -> bool:
        """Keep an event of a stream without ids (``kind`` m: mark price, f: liquidation)?"""
        last = self._by[kind]
        prev = last.get(symbol)
        if prev is not None and e_ms <= prev[0]:
            return False
        last[symbol] = (e_ms, e_ms)
        return True

    def trade(self, symbol: str, a: int, e_ms: int) -> tuple[bool, Gap | None]:
        last = self._t
        prev = last.get(symbol)
        if prev is None:
            last[symbol] = (a, e_ms)
            return True, None
        last_a = prev[0]
        if a == last_a + 1:  # the usual case first
            last[symbol] = (a, e_ms)
            return True, None
        if a <= last_a:
            return False, None
        last[symbol] = (a, e_ms)
        return True, Gap(symbol, "aggTrade", last_a + 1, a - 1, prev[1], e_ms)

    def depth(self, symbol: str, first: int, final: int, prev_final: int | None, e_ms: int) -> tuple[bool, Gap | None]:
        """``prev_final`` is Futures' ``pu`` (None on Spot)."""
        last = self._d
        prev = last.get(symbol)
        if prev is not None and final <= prev[0]:
            return False, None
        last[symbol] = (final, e_ms)
        if prev is None:
            return True, None
        if prev_final is not None:
            if prev_final == prev[0]:
                return True, None
            # The events between the last one seen and this one ended at ``pu``.
            return True, Gap(symbol, "depth", prev[0] + 1, max(prev_final, prev[0] + 1), prev[1], e_ms)
        if first <= prev[0] + 1:
            return True, None
        return True, Gap(symbol, "depth", prev[0] + 1, first - 1, prev[1], e_ms)
