"""Binance REST request weights and per-minute limits (the "LIMITS" sections and each
endpoint's documented weight), shared by the client and the simulator."""

from __future__ import annotations

from ingestor.binance.streams import Market

# REQUEST_WEIGHT per minute per IP.
WEIGHT_LIMIT: dict[Market, int] = {"spot": 6000, "futures": 2400}
PREFIX: dict[Market, str] = {"spot": "/api/v3", "futures": "/fapi/v1"}
FUTURES_DEPTH_LIMITS = (5, 10, 20, 50, 100, 500, 1000)
DEPTH_DEFAULT_LIMIT: dict[Market, int] = {"spot": 100, "futures": 500}
OPEN_INTEREST_WEIGHT = 1
AGG_TRADES_WEIGHT: dict[Market, int] = {"spot": 4, "futures": 20}
EXCHANGE_INFO_WEIGHT: dict[Market, int] = {"spot": 20, "futures": 1}
TICKER_ALL_WEIGHT: dict[Market, int] = {"spot": 80, "futures": 40}


def depth_weight(market: Market, limit: int) -> int:
    if market == "spot":  # 1-100: 5, 101-500: 25, 501-1000: 50, 1001-5000: 250
        return 5 if limit <= 100 else 25 if limit <= 500 else 50 if limit <= 1000 else 250
    return 2 if limit <= 50 else 5 if limit <= 100 else 10 if limit <= 500 else 20
