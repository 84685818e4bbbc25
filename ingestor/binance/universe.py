"""Which symbols to record: a list, the top N by 24 h quote volume, or every TRADING one."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import orjson

from ingestor.binance.rest_client import RestClient
from ingestor.binance.rest_limits import EXCHANGE_INFO_WEIGHT, TICKER_ALL_WEIGHT
from ingestor.binance.streams import Market

log = logging.getLogger(__name__)


class UniverseError(ValueError):
    """The requested symbols do not exist (or nothing is left to record)."""


@dataclass(frozen=True)
class Universe:
    symbols: dict[Market, tuple[str, ...]]
    # Trades per day from the 24 h ticker: the expected load used to balance shards.
    trades_per_day: dict[tuple[Market, str], float]
    # Each chosen symbol's exchangeInfo entry (JSON) and PRICE_FILTER tickSize (its decimal
    # string): the indicators count price moves in ticks.
    info: dict[tuple[Market, str], bytes] = field(default_factory=dict)
    tick_sizes: dict[tuple[Market, str], str] = field(default_factory=dict)

    def count(self) -> int:
        return sum(len(s) for s in self.symbols.values())


def choose_symbols(
    markets: Sequence[Market],
    trading: Mapping[Market, Sequence[str]],
    tickers: Mapping[Market, Sequence[Mapping[str, Any]]],
    symbols: Sequence[str] = (),
    top: int = 0,
) -> Universe:
    """Pure selection from exchange info (TRADING symbols) and 24 h tickers."""
    load: dict[tuple[Market, str], float] = {}
    volume: dict[tuple[Market, str], float] = {}
    for m in markets:
        for t in tickers.get(m, ()):
            try:
                load[(m, t["symbol"])] = float(t.get("count", 0) or 0)
                volume[(m, t["symbol"])] = float(t.get("quoteVolume", 0) or 0)
            except (KeyError, TypeError, ValueError):
                continue
    chosen: dict[Market, tuple[str, ...]] = {}
    if symbols:
        wanted = list(dict.fromkeys(s.upper() for s in symbols))  # a repeat would subscribe twice
        unknown = [s for s in wanted if not any(s in trading.get(m, ()) for m in markets)]
        if unknown:
            raise UniverseError(
                f"unknown symbol(s): {', '.join(unknown)} (not TRADING on {' or '.join(markets)})"
            )
        for m in markets:
            have = set(trading.get(m, ()))
            chosen[m] = tuple(s for s in wanted if s in have)
            missing = [s for s in wanted if s not in have]
            if missing:
                log.warning("%s: not listed there, recorded on the other market only: %s", m, ", ".join(missing))
    else:
        for m in markets:
            listed = list(trading.get(m, ()))
            if top:
                listed.sort(key=lambda s, m=m: -volume.get((m, s), 0.0))  # type: ignore[misc]
                listed = listed[:top]
            chosen[m] = tuple(listed)
    if not any(chosen.values()):
        raise UniverseError("no symbols to record")
    return Universe(chosen, {k: v for k, v in load.items() if k[1] in chosen.get(k[0], ())})


def trading_symbols(exchange_info: Mapping[str, Any]) -> list[str]:
    return [s["symbol"] for s in exchange_info.get("symbols", ()) if s.get("status") == "TRADING"]


def tick_size(entry: Mapping[str, Any]) -> str | None:
    """A symbol entry's PRICE_FILTER ``tickSize`` (a decimal string), or None if it has none."""
    for f in entry.get("filters", ()):
        if f.get("filterType") == "PRICE_FILTER":
            tick = f.get("tickSize")
            return str(tick) if tick is not None and float(tick) > 0 else None
    return None


def with_symbol_info(universe: Universe, infos: Mapping[Market, Mapping[str, Any]]) -> Universe:
    """The universe with each chosen symbol's exchangeInfo entry and tick size attached."""
    info: dict[tuple[Market, str], bytes] = {}
    ticks: dict[tuple[Market, str], str] = {}
    for market, symbols in universe.symbols.items():
        by_name = {e.get("symbol"): e for e in infos.get(market, {}).get("symbols", ())}
        for sym in symbols:
            entry = by_name.get(sym)
            if entry is None:
                continue
            info[(market, sym)] = orjson.dumps(entry)
            tick = tick_size(entry)
            if tick is not None:
                ticks[(market, sym)] = tick
    return replace(universe, info=info, tick_sizes=ticks)


async def resolve_universe(client: RestClient, markets: Sequence[Market], symbols: Sequence[str] = (),
                           top: int = 0) -> Universe:
    trading: dict[Market, list[str]] = {}
    tickers: dict[Market, list[dict[str, Any]]] = {}
    infos: dict[Market, dict[str, Any]] = {}
    for m in markets:
        infos[m] = orjson.loads(await client.get(m, "exchangeInfo", weight=EXCHANGE_INFO_WEIGHT[m]))
        trading[m] = trading_symbols(infos[m])
        tickers[m] = orjson.loads(await client.get(m, "ticker/24hr", weight=TICKER_ALL_WEIGHT[m]))
    return with_symbol_info(choose_symbols(markets, trading, tickers, symbols, top), infos)
