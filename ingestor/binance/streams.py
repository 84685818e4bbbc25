"""Binance stream names: parsing, validation and USD-M routing, as pure functions.

Stream names follow Binance's public WebSocket documentation:

- Spot (``wss://stream.binance.com:9443``): ``<symbol>@aggTrade``, ``<symbol>@depth``
  (1000 ms) and ``<symbol>@depth@100ms``.
- USD-M Futures (``wss://fstream.binance.com``): ``<symbol>@aggTrade``, ``<symbol>@depth``
  (250 ms), ``<symbol>@depth@500ms``, ``<symbol>@depth@100ms``,
  ``<symbol>@markPrice[@1s]`` (3 s default), ``!markPrice@arr[@1s]``,
  ``<symbol>@forceOrder`` and ``!forceOrder@arr``.

Since 2026 USD-M routes streams by path: high-frequency book data (diff depth, book
ticker) lives under ``/public``, the rest (trades, mark prices, liquidations) under
``/market``. A connection on the legacy unrouted paths (``/ws``, ``/stream``) only
receives ``/public`` streams; a ``/market`` stream subscribed there is accepted but
never delivers ("fails silently rather than erroring", Binance's market-data streams
guide). Spot has no routing.

Symbols in stream names are lower case; the ``s`` field of events is upper case.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Market = Literal["spot", "futures"]
Route = Literal["public", "market", "legacy", "spot"]
MARKETS: tuple[Market, ...] = ("spot", "futures")

# Diff-depth update speeds in milliseconds, keyed by the stream-name suffix ("" = no
# suffix). Spot documents 1000 ms and 100 ms; USD-M documents 250 ms (default), 500 ms
# and 100 ms.
DEPTH_SPEEDS: dict[Market, dict[str, int]] = {
    "spot": {"": 1000, "100ms": 100},
    "futures": {"": 250, "500ms": 500, "100ms": 100},
}
# Mark price: 3 s by default, 1 s with the @1s suffix (USD-M only).
MARK_PRICE_SPEEDS: dict[str, int] = {"": 3000, "1s": 1000}


@dataclass(frozen=True, slots=True)
class MarketLimits:
    """Per-connection limits from each market's "WebSocket Limits" section."""

    max_streams: int
    max_incoming_per_s: int
    ping_interval_s: float
    pong_timeout_s: float
    max_lifetime_s: float


# Spot: ping every 20 s, disconnect if no pong within a minute, 5 incoming messages/s
# (pings, pongs and JSON requests all count), 1024 streams.
# USD-M: ping every 3 minutes, pong within 10 minutes, 10 incoming messages/s, 200
# streams per connection (the 2026 figure). Both: a connection lives 24 hours.
DEFAULT_LIMITS: dict[Market, MarketLimits] = {
    "spot": MarketLimits(1024, 5, 20.0, 60.0, 86400.0),
    "futures": MarketLimits(200, 10, 180.0, 600.0, 86400.0),
}


class StreamNameError(ValueError):
    """A stream name the market does not offer."""


@dataclass(frozen=True, slots=True)
class StreamSpec:
    """One parsed stream name.

    ``kind`` is the event family (``aggTrade``, ``depth``, ``markPrice``,
    ``forceOrder``); ``symbol`` is upper case, or ``None`` for all-market streams
    (``!markPrice@arr``, ``!forceOrder@arr``); ``speed_ms`` is the push interval
    where the stream has one.
    """

    name: str
    market: Market
    kind: str
    symbol: str | None
    speed_ms: int | None
    route: Route


_KIND_ROUTE: dict[str, Route] = {
    "depth": "public",
    "aggTrade": "market",
    "markPrice": "market",
    "forceOrder": "market",
}


def parse_stream(name: str, market: Market) -> StreamSpec:
    """Parse a stream name as the given market documents it.

    Raises StreamNameError for anything the market does not serve, including upper
    case symbols (Binance requires lower case).
    """
    parts = name.split("@")
    head, rest = parts[0], parts[1:]
    if not rest or not head:
        raise StreamNameError(f"invalid stream name {name!r}")
    kind = rest[0]
    suffix = rest[1] if len(rest) > 1 else ""
    if len(rest) > 2:
        raise StreamNameError(f"invalid stream name {name!r}")
    if head.startswith("!"):
        return _parse_all_market(name, market, head, kind, suffix)
    if head != head.lower() or not head.isalnum():
        raise StreamNameError(f"invalid symbol in stream name {name!r} (must be lower case)")
    symbol = head.upper()
    speed: int | None
    if kind == "aggTrade" and not suffix:
        speed = None
    elif kind == "depth":
        speeds = DEPTH_SPEEDS[market]
        if suffix not in speeds:
            raise StreamNameError(f"{market} has no diff-depth speed {suffix!r} ({name!r})")
        speed = speeds[suffix]
    elif kind == "markPrice" and market == "futures" and suffix in MARK_PRICE_SPEEDS:
        speed = MARK_PRICE_SPEEDS[suffix]
    elif kind == "forceOrder" and market == "futures" and not suffix:
        speed = 1000
    else:
        raise StreamNameError(f"{market} has no stream {name!r}")
    return StreamSpec(name, market, kind, symbol, speed, _route(market, kind))


def _parse_all_market(name: str, market: Market, head: str, kind: str, suffix: str) -> StreamSpec:
    if market != "futures":
        raise StreamNameError(f"spot has no stream {name!r}")
    if head == "!markPrice" and kind == "arr" and suffix in MARK_PRICE_SPEEDS:
        return StreamSpec(name, market, "markPrice", None, MARK_PRICE_SPEEDS[suffix], "market")
    if head == "!forceOrder" and kind == "arr" and not suffix:
        return StreamSpec(name, market, "forceOrder", None, 1000, "market")
    raise StreamNameError(f"futures has no stream {name!r}")


def _route(market: Market, kind: str) -> Route:
    return "spot" if market == "spot" else _KIND_ROUTE[kind]


def delivers_on(spec: StreamSpec, path_route: Route) -> bool:
    """Whether a connection opened on ``path_route`` receives this stream's events.

    Legacy unrouted USD-M paths only carry ``/public`` streams (see module docstring).
    """
    if spec.market == "spot":
        return True
    if path_route == "legacy":
        return spec.route == "public"
    return spec.route == path_route


def split_ws_path(path: str, market: Market) -> tuple[Route, str, str] | None:
    """Split a WebSocket request path into (route, "ws"|"stream", remainder).

    ``/ws/btcusdt@aggTrade`` -> ("spot", "ws", "btcusdt@aggTrade") on spot;
    ``/market/stream?streams=a/b`` -> ("market", "stream", "streams=a/b") on futures.
    Returns None for a path the market does not serve.
    """
    route: Route
    if market == "spot":
        route = "spot"
    else:
        route = "legacy"
        for prefix in ("public", "market"):
            if path.startswith(f"/{prefix}/"):
                route = prefix  # type: ignore[assignment]
                path = path[len(prefix) + 1 :]
                break
    if path == "/ws" or path.startswith("/ws/") or path.startswith("/ws?"):
        return route, "ws", path[4:]
    if path.startswith("/stream"):
        query = path.partition("?")[2]
        return route, "stream", query
    return None

