"""Streams dealt to socket workers and packed into connections, as pure functions.

Each stream has an expected load in messages per second: aggTrade from the symbol's
24 h trade count, diff depth from its update speed, the all-market arrays from their
period. Streams go to shards largest first, each to the least-loaded shard (LPT), so
shards come out within one stream's load of each other. Inside a shard, streams are
packed into combined-stream connections per endpoint, within the market's
streams-per-connection limit.
"""

from __future__ import annotations

from dataclasses import dataclass

from ingestor.binance.streams import DEFAULT_LIMITS, Market, Route, parse_stream
from ingestor.binance.universe import Universe

# Fewer streams per connection than Binance allows: a reconnect then disturbs less, and
# the URL stays short. Spot allows 1024, USD-M 200.
STREAMS_PER_CONNECTION = 200
ALL_MARKET_STREAMS: dict[Market, tuple[str, ...]] = {"spot": (), "futures": ("!markPrice@arr@1s", "!forceOrder@arr")}


@dataclass(frozen=True)
class Connection:
    market: Market
    route: Route
    streams: tuple[str, ...]

    def url(self, base: str) -> str:
        prefix = f"/{self.route}" if self.route in ("public", "market") else ""
        return f"{base.rstrip('/')}{prefix}/stream?streams={'/'.join(self.streams)}"


@dataclass(frozen=True)
class StreamLoad:
    market: Market
    name: str
    msgs_per_s: float


def stream_loads(universe: Universe, depth_suffix: dict[Market, str]) -> list[StreamLoad]:
    out = []
    for market, symbols in universe.symbols.items():
        depth_ms = _speed_ms(depth_suffix[market], market)
        for sym in symbols:
            low = sym.lower()
            trades = universe.trades_per_day.get((market, sym), 0.0) / 86_400
            out.append(StreamLoad(market, f"{low}@aggTrade", max(trades, 0.1)))
            out.append(StreamLoad(market, f"{low}{depth_suffix[market]}", 1000 / depth_ms))
        if symbols:
            for name in ALL_MARKET_STREAMS[market]:
                # One array a second of every symbol, and liquidation bursts.
                out.append(StreamLoad(market, name, 1.0 if "markPrice" in name else 0.5))
    return out


def _speed_ms(suffix: str, market: Market) -> int:
    spec = parse_stream("btcusdt" + suffix, market)
    return spec.speed_ms or 1000


def deal(loads: list[StreamLoad], shards: int) -> list[list[StreamLoad]]:
    """Largest first to the least-loaded shard; ties by shard number, so it is stable."""
    out: list[list[StreamLoad]] = [[] for _ in range(shards)]
    totals = [0.0] * shards
    for item in sorted(loads, key=lambda s: (-s.msgs_per_s, s.market, s.name)):
        i = min(range(shards), key=lambda k: (totals[k], k))
        out[i].append(item)
        totals[i] += item.msgs_per_s
    return out


def pack(items: list[StreamLoad], limit: int = STREAMS_PER_CONNECTION) -> list[Connection]:
    groups: dict[tuple[Market, Route], list[str]] = {}
    for it in items:
        route = parse_stream(it.name, it.market).route
        groups.setdefault((it.market, route), []).append(it.name)
    conns: list[Connection] = []
    for (market, route), names in sorted(groups.items()):
        cap = min(limit, DEFAULT_LIMITS[market].max_streams)
        names.sort()
        conns.extend(Connection(market, route, tuple(names[i : i + cap])) for i in range(0, len(names), cap))
    return conns


def plan(universe: Universe, depth_suffix: dict[Market, str], shards: int,
         limit: int = STREAMS_PER_CONNECTION) -> list[list[Connection]]:
    """Connections per shard. A shard may be empty when there are fewer streams than shards."""
    return [pack(items, limit) for items in deal(stream_loads(universe, depth_suffix), shards)]
