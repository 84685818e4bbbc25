"""``exchangeInfo`` bodies for the simulated symbols, shaped like the real captures."""

from __future__ import annotations

import time

import orjson

from ingestor.binance.streams import Market
from ingestor.sim.encode import fixed
from ingestor.sim.universe import SymbolSpec


def _spot_symbol(s: SymbolSpec, status: str) -> dict[str, object]:
    tick = fixed(10 ** (8 - s.price_dp), 8)
    step = fixed(10 ** (8 - s.qty_dp), 8)
    return {
        "symbol": s.symbol, "status": status, "baseAsset": s.base, "baseAssetPrecision": 8,
        "quoteAsset": s.quote, "quotePrecision": 8, "quoteAssetPrecision": 8,
        "orderTypes": ["LIMIT", "LIMIT_MAKER", "MARKET", "STOP_LOSS_LIMIT", "TAKE_PROFIT_LIMIT"],
        "isSpotTradingAllowed": True, "isMarginTradingAllowed": True,
        "filters": [
            {"filterType": "PRICE_FILTER", "minPrice": tick, "maxPrice": "1000000.00000000",
             "tickSize": tick},
            {"filterType": "LOT_SIZE", "minQty": step, "maxQty": "9000000.00000000",
             "stepSize": step},
        ],
        "permissions": ["SPOT"],
    }


def _futures_symbol(s: SymbolSpec, status: str) -> dict[str, object]:
    tick = fixed(1, s.price_dp)
    step = fixed(1, s.qty_dp)
    return {
        "symbol": s.symbol, "pair": s.symbol, "contractType": "PERPETUAL",
        "deliveryDate": 4133404800000, "onboardDate": 1569398400000, "status": status,
        "baseAsset": s.base, "quoteAsset": s.quote, "marginAsset": s.quote,
        "pricePrecision": s.price_dp, "quantityPrecision": s.qty_dp,
        "baseAssetPrecision": 8, "quotePrecision": 8, "underlyingType": "COIN",
        "filters": [
            {"minPrice": tick, "maxPrice": "1000000", "filterType": "PRICE_FILTER",
             "tickSize": tick},
            {"stepSize": step, "filterType": "LOT_SIZE", "maxQty": "1000000", "minQty": step},
        ],
        "orderTypes": ["LIMIT", "MARKET", "STOP", "STOP_MARKET", "TAKE_PROFIT",
                       "TAKE_PROFIT_MARKET", "TRAILING_STOP_MARKET"],
        "timeInForce": ["GTC", "IOC", "FOK", "GTX"],
    }


def exchange_info(
    market: Market, symbols: tuple[SymbolSpec, ...], weight_limit: int, halted: tuple[str, ...] = ()
) -> bytes:
    """Every simulated symbol as TRADING, plus ``halted`` ones listed with status BREAK
    (they have no streams), so clients can practise filtering by status. ``weight_limit``
    is the per-minute budget the REST server enforces."""
    now = int(time.time() * 1000)
    if market == "spot":
        limits = [{"rateLimitType": "REQUEST_WEIGHT", "interval": "MINUTE", "intervalNum": 1,
                   "limit": weight_limit}]
        body: dict[str, object] = {"timezone": "UTC", "serverTime": now, "rateLimits": limits,
                                   "exchangeFilters": []}
        make = _spot_symbol
    else:
        limits = [{"rateLimitType": "REQUEST_WEIGHT", "interval": "MINUTE", "intervalNum": 1,
                   "limit": weight_limit}]
        body = {"timezone": "UTC", "serverTime": now, "futuresType": "U_MARGINED",
                "rateLimits": limits, "exchangeFilters": [], "assets": []}
        make = _futures_symbol
    items = [make(s, "TRADING") for s in symbols]
    items += [make(SymbolSpec(h, h[:-4], "USDT", 2, 2, 100, 0.0), "BREAK") for h in halted]
    body["symbols"] = items
    return orjson.dumps(body)
