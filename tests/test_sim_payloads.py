"""Every stream's payload against Binance's documented field list, order and types.

Field orders are those of Binance's public API documentation (Spot "WebSocket
Streams", USD-M "Websocket Market Streams" and REST market-data pages). Types are also
checked against the documentation examples kept in tests/data/binance_docs (see its
NOTICE) and, where present, against real captures.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from ingestor.sim.model import ModelParams
from ingestor.sim.server import SimConfig, Simulator

from .conftest import DOCS_DATA, REALDATA, connect, get_json

DOC_FIELDS: dict[str, list[str]] = {
    "spot aggTrade": ["e", "E", "s", "a", "p", "q", "f", "l", "T", "m", "M"],
    "futures aggTrade": ["e", "E", "s", "a", "p", "q", "f", "l", "T", "m"],
    "spot depthUpdate": ["e", "E", "s", "U", "u", "b", "a"],
    "futures depthUpdate": ["e", "E", "T", "s", "U", "u", "pu", "b", "a"],
    "futures markPriceUpdate": ["e", "E", "s", "p", "i", "P", "r", "T"],
    "futures forceOrder": ["e", "E", "o"],
    "forceOrder.o": ["s", "S", "o", "f", "q", "p", "ap", "X", "l", "z", "T"],
    "spot rest depth": ["lastUpdateId", "bids", "asks"],
    "futures rest depth": ["lastUpdateId", "E", "T", "bids", "asks"],
    "spot rest aggTrade": ["a", "p", "q", "f", "l", "T", "m", "M"],
    "futures rest aggTrade": ["a", "p", "q", "f", "l", "T", "m"],
    "openInterest": ["openInterest", "symbol", "time"],
}
DECIMALS = {"p", "q", "i", "P", "r", "ap", "l", "z", "openInterest"}


def _doc(name: str) -> Any:
    return json.loads((DOCS_DATA / name).read_text())


def _check_types(ours: dict[str, Any], ref: dict[str, Any]) -> None:
    for key in ours.keys() & ref.keys():
        assert type(ours[key]) is type(ref[key]), (key, ours[key], ref[key])


def _check_decimals(obj: dict[str, Any], keys: set[str]) -> None:
    for key in keys & obj.keys():
        if key in ("l",) and isinstance(obj[key], int):
            continue  # aggTrade "l" is the last trade id, not a decimal
        value = obj[key]
        assert isinstance(value, str) and value.replace(".", "", 1).lstrip("-").isdigit(), (key, value)


async def _collect(client: Any, wanted: set[str], timeout: float = 8.0) -> dict[str, Any]:
    got: dict[str, Any] = {}
    deadline = asyncio.get_running_loop().time() + timeout
    while wanted - got.keys():
        left = deadline - asyncio.get_running_loop().time()
        assert left > 0, f"no event on {sorted(wanted - got.keys())}"
        msg = await client.recv(left)
        got.setdefault(msg["stream"], msg["data"])
    return got


@pytest.fixture
async def busy() -> Any:
    params = ModelParams(rate=400, cascade_every_s=0.5)
    async with Simulator(SimConfig(n_symbols=2, seed=3, model=params)) as sim:
        yield sim


async def test_spot_stream_payloads(busy: Simulator) -> None:
    c = await connect(busy.urls["spot_ws"] + "/stream?streams=btcusdt@aggTrade/btcusdt@depth@100ms")
    got = await _collect(c, {"btcusdt@aggTrade", "btcusdt@depth@100ms"})
    trade, depth = got["btcusdt@aggTrade"], got["btcusdt@depth@100ms"]
    assert list(trade) == DOC_FIELDS["spot aggTrade"]
    assert list(depth) == DOC_FIELDS["spot depthUpdate"]
    assert trade["e"] == "aggTrade" and trade["s"] == "BTCUSDT" and trade["M"] is True
    assert isinstance(trade["m"], bool) and trade["T"] <= trade["E"] and trade["f"] <= trade["l"]
    _check_decimals(trade, DECIMALS)
    assert all(isinstance(p, str) and isinstance(q, str) for p, q in depth["b"] + depth["a"])
    assert all(len(p.split(".")[1]) == 8 for p, _q in depth["b"] + depth["a"])  # spot: 8 decimals
    real = REALDATA / "bmoscon_cryptofeed__sample_data-BINANCE.ws.1.0"
    if real.exists():
        for line in real.read_text().splitlines()[1:]:
            data = json.loads(line.split(": ", 1)[1])["data"]
            if data.get("e") == "aggTrade":
                assert list(data) == list(trade)  # the real spot order is the documented one
                _check_types(trade, data)
                break


async def test_futures_stream_payloads(busy: Simulator) -> None:
    pub = await connect(busy.urls["futures_ws"] + "/public/stream?streams=btcusdt@depth@100ms")
    mkt = await connect(busy.urls["futures_ws"] + "/market/stream?streams=btcusdt@aggTrade/"
                        "btcusdt@markPrice@1s/!markPrice@arr@1s/!forceOrder@arr")
    depth = (await _collect(pub, {"btcusdt@depth@100ms"}))["btcusdt@depth@100ms"]
    got = await _collect(mkt, {"btcusdt@aggTrade", "btcusdt@markPrice@1s", "!markPrice@arr@1s",
                               "!forceOrder@arr"}, timeout=15)
    trade, mark, arr, force = (got["btcusdt@aggTrade"], got["btcusdt@markPrice@1s"],
                               got["!markPrice@arr@1s"], got["!forceOrder@arr"])
    assert list(trade) == DOC_FIELDS["futures aggTrade"]
    assert list(depth) == DOC_FIELDS["futures depthUpdate"]
    assert list(mark) == DOC_FIELDS["futures markPriceUpdate"]
    assert list(force) == DOC_FIELDS["futures forceOrder"]
    assert list(force["o"]) == DOC_FIELDS["forceOrder.o"]
    assert isinstance(arr, list) and {m["s"] for m in arr} == {"BTCUSDT", "ETHUSDT"}
    assert all(list(m) == DOC_FIELDS["futures markPriceUpdate"] for m in arr)
    _check_types(trade, _doc("agg_trade_stream.json"))
    _check_types(depth, _doc("depth_update_stream.json"))
    _check_types(mark, _doc("mark_price_stream.json"))
    _check_types(force, _doc("liquidation_stream.json"))
    _check_types(force["o"], _doc("liquidation_stream.json")["o"])
    for obj in (trade, mark, force["o"]):
        _check_decimals(obj, DECIMALS)
    assert force["o"]["o"] == "LIMIT" and force["o"]["f"] == "IOC" and force["o"]["X"] == "FILLED"
    assert force["o"]["S"] in ("BUY", "SELL")
    assert depth["pu"] < depth["U"] <= depth["u"] and depth["T"] <= depth["E"]


async def test_rest_payloads(busy: Simulator) -> None:
    for market, prefix in (("spot", "/api/v3"), ("futures", "/fapi/v1")):
        base = busy.urls[f"{market}_rest"] + prefix
        _, depth, _h = await get_json(base + "/depth", symbol="BTCUSDT", limit=5)
        assert list(depth) == DOC_FIELDS[f"{market} rest depth"]
        await asyncio.sleep(0.3)
        _, trades, _h = await get_json(base + "/aggTrades", symbol="BTCUSDT", limit=3)
        assert trades and all(list(t) == DOC_FIELDS[f"{market} rest aggTrade"] for t in trades)
        if market == "futures":
            _check_types(depth, _doc("http_futures_market_depth.json"))
            _check_types(trades[0], _doc("http_futures_market_agg_trades.json")[0])
            _, oi, _h = await get_json(base + "/openInterest", symbol="BTCUSDT")
            assert list(oi) == DOC_FIELDS["openInterest"]
            _check_types(oi, _doc("http_futures_market_open_interest.json"))
            _check_decimals(oi, DECIMALS)
            _, prem, _h = await get_json(base + "/premiumIndex", symbol="BTCUSDT")
            ref = _doc("http_futures_market_premium_index.json")
            assert set(ref) <= set(prem)
            _check_types(prem, ref)
