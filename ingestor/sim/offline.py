"""The simulator's market model stepped in-process, without sockets: every trade, diff and
liquidation of a few symbols in generation order, plus REST snapshots taken along the way.
The feature engine's tests and benchmarks feed on it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from ingestor.binance.streams import Market
from ingestor.sim.model import MarketModel, ModelParams
from ingestor.sim.universe import build_universe

START_MS = 1_700_000_000_000


@dataclass(frozen=True)
class Item:
    """One message as the exchange produced it: ``kind`` aggTrade | depthUpdate | forceOrder |
    snapshot; ``time_ms`` when it was produced (for a snapshot, the time it is stored under)."""

    kind: str
    time_ms: int
    symbol: str
    payload: dict[str, Any]


Ticks = dict[tuple[Market, str], float]


def generate(market: Market, seconds: float, n_symbols: int = 3, *, seed: int = 3, rate: float = 300.0,
             snapshot_every_ms: int = 10_000, depth_suffix: str = "@depth@100ms") -> tuple[Ticks, list[Item]]:
    """(tick sizes, items in generation order). A snapshot of every symbol is taken at the
    first step and then every ``snapshot_every_ms``; panics and cascades come often."""
    specs = build_universe(None, n_symbols)
    params = ModelParams(rate=rate, cascade_every_s=4.0, panic_every_s=20.0)
    model = MarketModel(market, specs, seed=seed, params=params, start_ms=START_MS)
    streams = {s.lower + "@aggTrade" for s in specs} | {s.lower + depth_suffix for s in specs} | {"!forceOrder@arr"}
    items: list[Item] = []

    def emit(name: str, payload: bytes, seq: int) -> None:
        ev = orjson.loads(payload)
        if name.endswith("@aggTrade"):
            items.append(Item("aggTrade", ev["E"], ev["s"], ev))
        elif "@depth" in name:
            items.append(Item("depthUpdate", ev["E"], ev["s"], ev))
        else:
            items.append(Item("forceOrder", ev["E"], ev["o"]["s"], ev))

    model.wants = lambda name: name in streams
    model.emit = emit
    end = model.t + int(seconds * 1000)
    next_snapshot = model.t + 10
    while model.t < end:
        model.advance_to(model.t + 10)
        if model.t >= next_snapshot:
            next_snapshot += snapshot_every_ms
            for s in specs:
                body = orjson.loads(model.depth_snapshot(s.symbol, 1000))
                items.append(Item("snapshot", model.t, s.symbol, body))
    ticks = {(market, s.symbol): 10.0**-s.price_dp for s in specs}
    return ticks, items
