"""Sequence checks on Binance streams, as pure state.

- aggTrade: ids ``a`` are consecutive per symbol;
- Spot diff depth: each event's ``U`` is the previous event's ``u`` + 1;
- Futures diff depth: each event's ``pu`` equals the previous event's ``u``.

``check`` says whether to keep the event and returns the gap it reveals, if any. An
event at or behind the last one seen (a replay after a reconnect) is not kept: storing
it again would duplicate a row.
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


class SequenceTracker:
    """Last id and event time per (stream kind, symbol) for one market."""

    def __init__(self) -> None:
        self.last: dict[str, tuple[int, int]] = {}  # key -> (last id, event ms)

    def trade(self, symbol: str, a: int, e_ms: int) -> tuple[bool, Gap | None]:
        key = "t" + symbol
        prev = self.last.get(key)
        self.last[key] = (a, e_ms) if prev is None or a > prev[0] else prev
        if prev is None:
            return True, None
        if a <= prev[0]:
            return False, None
        if a == prev[0] + 1:
            return True, None
        return True, Gap(symbol, "aggTrade", prev[0] + 1, a - 1, prev[1], e_ms)

    def depth(self, symbol: str, first: int, final: int, prev_final: int | None, e_ms: int) -> tuple[bool, Gap | None]:
        """``prev_final`` is Futures' ``pu`` (None on Spot)."""
        key = "d" + symbol
        prev = self.last.get(key)
        if prev is not None and final <= prev[0]:
            return False, None
        self.last[key] = (final, e_ms)
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
