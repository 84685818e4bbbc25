"""The simulator's REST API against Binance's REST documentation, over real sockets.

Spot ``/api/v3`` and USD-M ``/fapi/v1``: exchangeInfo, depth, aggTrades, openInterest,
premiumIndex, ticker/24hr, request weights (``X-MBX-USED-WEIGHT-1M``, 429, 418 bans)
and the REST faults injected from the admin endpoint.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from decimal import Decimal
from typing import Any

import aiohttp
import orjson
import pytest

from ingestor.sim.model import ModelParams
from ingestor.sim.server import SimConfig, Simulator
from ingestor.sim.universe import build_universe

from .conftest import Client, connect

pytestmark = pytest.mark.timeout(60)

PREFIX = {"spot": "/api/v3", "futures": "/fapi/v1"}
MARKETS = ("spot", "futures")
TIMEOUT = aiohttp.ClientTimeout(total=5)
WEIGHT = "X-MBX-USED-WEIGHT-1M"

SPOT_AGG_EVENT = {"e", "E", "s", "a", "p", "q", "f", "l", "T", "m", "M"}
FUTURES_AGG_EVENT = {"e", "E", "s", "a", "p", "q", "f", "l", "T", "m"}
SPOT_AGG_REST = {"a", "p", "q", "f", "l", "T", "m", "M"}
FUTURES_AGG_REST = {"a", "p", "q", "f", "l", "T", "m"}


class Rest:
    """One aiohttp session against one market's REST endpoint."""

    def __init__(self, session: aiohttp.ClientSession, base: str, market: str) -> None:
        self.session, self.base, self.prefix = session, base, PREFIX[market]

    async def get(self, endpoint: str, **params: Any) -> tuple[int, Any, dict[str, str]]:
        url = self.base + self.prefix + "/" + endpoint
        async with self.session.get(url, params={k: str(v) for k, v in params.items()}) as r:
            raw = await r.read()
            body = orjson.loads(raw) if r.content_type == "application/json" else raw
            return r.status, body, dict(r.headers)


@asynccontextmanager
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        yield s


def rest(s: aiohttp.ClientSession, sim: Simulator, market: str) -> Rest:
    return Rest(s, sim.urls[f"{market}_rest"], market)


async def admin_post(s: aiohttp.ClientSession, sim: Simulator, path: str, body: Any = None) -> Any:
    async with s.post(sim.urls["admin"] + path, data=orjson.dumps(body)) as r:
        assert r.status == 200, await r.text()
        return orjson.loads(await r.read())


async def admin_get(s: aiohttp.ClientSession, sim: Simulator, path: str, **params: str) -> Any:
    async with s.get(sim.urls["admin"] + path, params=params) as r:
        assert r.status == 200
        return orjson.loads(await r.read())


def agg_ws_url(sim: Simulator, market: str, streams: list[str]) -> str:
    """aggTrade lives under ``/market`` on USD-M; spot has one path family."""
    base = sim.urls[f"{market}_ws"] + ("/market" if market == "futures" else "")
    if len(streams) == 1:
        return f"{base}/ws/{streams[0]}"
    return f"{base}/stream?streams=" + "/".join(streams)


async def clear_of_minute_edge(margin: float) -> None:
    """Weight is counted in fixed wall-clock minutes: start a budget test far enough
    from a minute boundary that the window cannot roll over under it."""
    left = 60 - time.time() % 60
    if left < margin:
        await asyncio.sleep(left + 0.05)


def decimals(s: str) -> int:
    return len(s.partition(".")[2])


def filters(sym: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {f["filterType"]: f for f in sym["filters"]}


# ---- 1. exchangeInfo -------------------------------------------------------------------


@pytest.mark.parametrize("market", MARKETS)
async def test_exchange_info_symbols_and_filters_match_payload_decimals(market: str) -> None:
    cfg = SimConfig(n_symbols=4, halted=("OLDUSDT",), model=ModelParams(rate=1500))
    universe = build_universe(None, 4)
    async with Simulator(cfg) as sim, session() as s:
        api = rest(s, sim, market)
        status, info, headers = await api.get("exchangeInfo")
        assert status == 200
        assert WEIGHT in headers
        by_symbol = {x["symbol"]: x for x in info["symbols"]}
        assert [x["symbol"] for x in info["symbols"]] == [u.symbol for u in universe] + ["OLDUSDT"]
        for u in universe:
            assert by_symbol[u.symbol]["status"] == "TRADING"
        assert by_symbol["OLDUSDT"]["status"] == "BREAK"
        weight_limits = [r for r in info["rateLimits"] if r["rateLimitType"] == "REQUEST_WEIGHT"]
        assert [(r["interval"], r["intervalNum"]) for r in weight_limits] == [("MINUTE", 1)]
        assert weight_limits[0]["limit"] == cfg.weight_limit[market]  # type: ignore[index]

        # Every price and quantity a client sees, on the streams and in REST, sits on
        # the grid the filters describe.
        seen: dict[str, tuple[set[str], set[str]]] = {u.symbol: (set(), set()) for u in universe}
        trades = await connect(agg_ws_url(sim, market, [f"{u.lower}@aggTrade" for u in universe]))
        depth_base = sim.urls[f"{market}_ws"] + ("/public" if market == "futures" else "")
        depth = await connect(depth_base + "/stream?streams="
                              + "/".join(f"{u.lower}@depth@100ms" for u in universe))
        try:
            async def drain(client: Client) -> None:
                loop = asyncio.get_running_loop()
                deadline = loop.time() + 1.5
                while loop.time() < deadline:
                    data = (await client.recv())["data"]
                    prices, qtys = seen[data["s"]]
                    if data["e"] == "aggTrade":
                        prices.add(data["p"])
                        qtys.add(data["q"])
                    else:
                        for p, q in data["b"] + data["a"]:
                            prices.add(p)
                            qtys.add(q)

            await asyncio.wait_for(asyncio.gather(drain(trades), drain(depth)), 10)
        finally:
            for c in (trades, depth):
                assert c.transport is not None
                c.transport.disconnect()
        for u in universe:
            status, snap, _ = await api.get("depth", symbol=u.symbol, limit=100)
            assert status == 200
            for p, q in snap["bids"] + snap["asks"]:
                seen[u.symbol][0].add(p)
                seen[u.symbol][1].add(q)

        for u in universe:
            f = filters(by_symbol[u.symbol])
            tick, step = f["PRICE_FILTER"]["tickSize"], f["LOT_SIZE"]["stepSize"]
            assert Decimal(tick) == Decimal(1).scaleb(-u.price_dp)
            assert Decimal(step) == Decimal(1).scaleb(-u.qty_dp)
            prices, qtys = seen[u.symbol]
            assert len(prices) > 10 and len(qtys) > 10, u.symbol
            for p in prices:
                assert Decimal(p) % Decimal(tick) == 0, (u.symbol, p, tick)
            for q in qtys:
                assert Decimal(q) % Decimal(step) == 0, (u.symbol, q, step)
            if market == "futures":
                # USD-M renders with the contract's precision: exactly the tick's decimals.
                assert {decimals(p) for p in prices} == {decimals(tick)}
                assert {decimals(q) for q in qtys} == {decimals(step)}
                assert by_symbol[u.symbol]["pricePrecision"] == u.price_dp
                assert by_symbol[u.symbol]["quantityPrecision"] == u.qty_dp
            else:
                # Spot renders everything with 8 decimals; the filters do too.
                assert {decimals(p) for p in prices} == {8}
                assert decimals(tick) == decimals(step) == 8
        # A halted symbol is listed but not served.
        status, body, _ = await api.get("depth", symbol="OLDUSDT")
        assert (status, body["code"]) == (400, -1121)


# ---- 2. depth --------------------------------------------------------------------------


def check_book_shape(snap: dict[str, Any], market: str) -> None:
    if market == "futures":
        assert list(snap) == ["lastUpdateId", "E", "T", "bids", "asks"]
        assert isinstance(snap["E"], int) and isinstance(snap["T"], int)
        assert snap["T"] <= snap["E"]
    else:
        assert list(snap) == ["lastUpdateId", "bids", "asks"]
    assert isinstance(snap["lastUpdateId"], int)
    bids = [Decimal(p) for p, _ in snap["bids"]]
    asks = [Decimal(p) for p, _ in snap["asks"]]
    assert all(a > b for a, b in zip(bids, bids[1:], strict=False)), "bids strictly descending"
    assert all(a < b for a, b in zip(asks, asks[1:], strict=False)), "asks strictly ascending"
    assert bids[0] < asks[0]
    assert all(Decimal(q) > 0 for _, q in snap["bids"] + snap["asks"])
    for level in snap["bids"] + snap["asks"]:
        assert len(level) == 2 and all(isinstance(x, str) for x in level)


async def test_spot_depth_limits() -> None:
    async with Simulator(SimConfig(n_symbols=2)) as sim, session() as s:
        api = rest(s, sim, "spot")
        status, snap, _ = await api.get("depth", symbol="BTCUSDT")
        assert status == 200
        check_book_shape(snap, "spot")
        assert len(snap["bids"]) == len(snap["asks"]) == 100  # documented default
        for limit in (1, 5, 99, 101, 777, 1000):
            status, snap, _ = await api.get("depth", symbol="ETHUSDT", limit=limit)
            assert status == 200
            check_book_shape(snap, "spot")
            assert len(snap["bids"]) == len(snap["asks"]) == limit, limit
        # The book holds ~1500 levels a side: limit 5000 gives all of them, exactly the
        # simulator's own book when the clock is stopped.
        await admin_post(s, sim, "/pause")
        status, snap, _ = await api.get("depth", symbol="BTCUSDT", limit=5000)
        own = await admin_get(s, sim, "/book", market="spot", symbol="BTCUSDT")
        assert status == 200
        assert snap == own
        assert 1000 < len(snap["bids"]) < 5000 and 1000 < len(snap["asks"]) < 5000
        check_book_shape(snap, "spot")
        for bad in (0, -1):
            status, body, _ = await api.get("depth", symbol="BTCUSDT", limit=bad)
            assert status == 400 and body["code"] == -1130, bad


async def test_spot_depth_over_5000_is_truncated() -> None:
    cfg = SimConfig(symbols=("BTCUSDT",), model=ModelParams(book_levels=6000))
    async with Simulator(cfg) as sim, session() as s:
        api = rest(s, sim, "spot")
        for limit in (5000, 6000, 100000):
            status, snap, headers = await api.get("depth", symbol="BTCUSDT", limit=limit)
            assert status == 200, limit
            assert len(snap["bids"]) == len(snap["asks"]) == 5000, limit
            check_book_shape(snap, "spot")


async def test_futures_depth_limits() -> None:
    async with Simulator(SimConfig(n_symbols=2)) as sim, session() as s:
        api = rest(s, sim, "futures")
        status, snap, _ = await api.get("depth", symbol="BTCUSDT")
        assert status == 200
        check_book_shape(snap, "futures")
        assert len(snap["bids"]) == len(snap["asks"]) == 500  # documented default
        for limit in (5, 10, 20, 50, 100, 500, 1000):
            status, snap, _ = await api.get("depth", symbol="ETHUSDT", limit=limit)
            assert status == 200
            check_book_shape(snap, "futures")
            assert len(snap["bids"]) == len(snap["asks"]) == limit, limit
        for bad in (0, 1, 7, 25, 200, 999, 5000):
            status, body, _ = await api.get("depth", symbol="BTCUSDT", limit=bad)
            assert status == 400, bad
            assert body["code"] == -1130 and isinstance(body["msg"], str)


@pytest.mark.parametrize("market", MARKETS)
async def test_depth_symbol_errors(market: str) -> None:
    async with Simulator(SimConfig(n_symbols=2)) as sim, session() as s:
        api = rest(s, sim, market)
        status, body, headers = await api.get("depth", symbol="NOPEUSDT")
        assert (status, body["code"]) == (400, -1121)
        assert WEIGHT in headers
        status, body, _ = await api.get("depth", symbol="btcusdt")
        assert (status, body["code"]) == (400, -1121)
        status, body, _ = await api.get("depth")
        assert (status, body["code"]) == (400, -1102)
        status, body, _ = await api.get("depth", symbol="")
        assert (status, body["code"]) == (400, -1102)
        status, body, _ = await api.get("aggTrades")
        assert (status, body["code"]) == (400, -1102)


# ---- 3. weights ------------------------------------------------------------------------

SPOT_WEIGHTS: list[tuple[str, dict[str, Any], int]] = [
    ("depth", {"symbol": "BTCUSDT"}, 5),
    ("depth", {"symbol": "BTCUSDT", "limit": 100}, 5),
    ("depth", {"symbol": "BTCUSDT", "limit": 101}, 25),
    ("depth", {"symbol": "BTCUSDT", "limit": 500}, 25),
    ("depth", {"symbol": "BTCUSDT", "limit": 501}, 50),
    ("depth", {"symbol": "BTCUSDT", "limit": 1000}, 50),
    ("depth", {"symbol": "BTCUSDT", "limit": 1001}, 250),
    ("depth", {"symbol": "BTCUSDT", "limit": 5000}, 250),
    ("aggTrades", {"symbol": "BTCUSDT"}, 4),
    ("exchangeInfo", {}, 20),
    ("ticker/24hr", {"symbol": "BTCUSDT"}, 2),
    ("ticker/24hr", {}, 80),
    ("ping", {}, 1),
]
FUTURES_WEIGHTS: list[tuple[str, dict[str, Any], int]] = [
    ("depth", {"symbol": "BTCUSDT", "limit": 5}, 2),
    ("depth", {"symbol": "BTCUSDT", "limit": 10}, 2),
    ("depth", {"symbol": "BTCUSDT", "limit": 20}, 2),
    ("depth", {"symbol": "BTCUSDT", "limit": 50}, 2),
    ("depth", {"symbol": "BTCUSDT", "limit": 100}, 5),
    ("depth", {"symbol": "BTCUSDT", "limit": 500}, 10),
    ("depth", {"symbol": "BTCUSDT"}, 10),  # default limit 500
    ("depth", {"symbol": "BTCUSDT", "limit": ""}, 10),  # empty: served as the default too
    ("depth", {"symbol": "BTCUSDT", "limit": 1000}, 20),
    ("aggTrades", {"symbol": "BTCUSDT"}, 20),
    ("exchangeInfo", {}, 1),
    ("openInterest", {"symbol": "BTCUSDT"}, 1),
    ("premiumIndex", {"symbol": "BTCUSDT"}, 1),
    ("premiumIndex", {}, 10),
    ("ticker/24hr", {"symbol": "BTCUSDT"}, 1),
    ("ticker/24hr", {}, 40),
    ("ping", {}, 1),
]


@pytest.mark.parametrize(("market", "cases"), [("spot", SPOT_WEIGHTS), ("futures", FUTURES_WEIGHTS)])
async def test_used_weight_header_grows_by_documented_weight(
    market: str, cases: list[tuple[str, dict[str, Any], int]]
) -> None:
    async with Simulator(SimConfig(n_symbols=2)) as sim, session() as s:
        api = rest(s, sim, market)
        status, _, headers = await api.get("time")
        assert status == 200
        used = int(headers[WEIGHT])
        for endpoint, params, weight in cases:
            before = time.time()
            status, _, headers = await api.get(endpoint, **params)
            after = time.time()
            assert status == 200, (endpoint, params)
            now_used = int(headers[WEIGHT])
            if int(before // 60) != int(after // 60) or now_used < used:
                # The one-minute window rolled over during this request.
                assert now_used == weight, (endpoint, params)
            else:
                assert now_used - used == weight, (endpoint, params, used, now_used)
            used = now_used
        # Rejected requests still carry the header.
        status, _, headers = await api.get("depth", symbol="NOPEUSDT")
        assert status == 400 and WEIGHT in headers


async def test_over_budget_429_then_418_ban() -> None:
    ban_s = 1.0
    cfg = SimConfig(n_symbols=2, weight_limit={"spot": 60, "futures": 60}, ban_s=ban_s)
    async with Simulator(cfg) as sim, session() as s:
        fut, spot = rest(s, sim, "futures"), rest(s, sim, "spot")
        await clear_of_minute_edge(8)
        for i in range(3):  # 3 x 20 = 60: exactly the budget
            status, _, headers = await fut.get("depth", symbol="BTCUSDT", limit=1000)
            assert status == 200
            assert int(headers[WEIGHT]) == 20 * (i + 1)
        # Over budget: 429 with -1003 and an integer Retry-After up to the window's end.
        for _ in range(5):
            status, body, headers = await fut.get("depth", symbol="BTCUSDT", limit=5)
            assert status == 429
            assert body["code"] == -1003
            assert re.fullmatch(r"\d+", headers["Retry-After"])
            assert 1 <= int(headers["Retry-After"]) <= 60
            assert int(headers[WEIGHT]) == 60
        # The budgets are per market: spot is unaffected.
        status, _, _ = await spot.get("ping")
        assert status == 200
        # Keep going after several 429s: banned.
        status, body, headers = await fut.get("ping")
        banned_at = asyncio.get_running_loop().time()
        assert status == 418
        assert body["code"] == -1003 and "banned until" in body["msg"]
        assert int(headers["Retry-After"]) == 1  # ceil(ban_s)
        # Everything is refused while the ban lasts, cheap requests included.
        loop = asyncio.get_running_loop()
        n = 0
        while loop.time() < banned_at + ban_s * 0.7:
            status, _, headers = await fut.get("ping")
            assert status == 418
            assert re.fullmatch(r"\d+", headers["Retry-After"])
            n += 1
            await asyncio.sleep(0.05)
        assert n >= 3
        await asyncio.sleep(max(0.0, banned_at + ban_s + 0.1 - loop.time()))
        # The ban is over; the minute's budget is still spent, so it is 429 again...
        status, _, _ = await fut.get("ping")
        assert status == 429
        for _ in range(4):
            status, _, _ = await fut.get("ping")
            assert status == 429
        # ...and a repeat offender's ban is longer.
        status, _, headers = await fut.get("ping")
        assert status == 418
        assert int(headers["Retry-After"]) == 2
        stats = await admin_get(s, sim, "/stats")
        assert stats["markets"]["futures"]["rest"]["rejected"]["418"] == 2
        assert "429" not in stats["markets"]["spot"]["rest"]["rejected"]


@pytest.mark.parametrize("market", MARKETS)
async def test_exchange_info_advertises_the_enforced_weight_limit(market: str) -> None:
    cfg = SimConfig(n_symbols=2, weight_limit={"spot": 60, "futures": 60})
    async with Simulator(cfg) as sim, session() as s:
        status, info, _ = await rest(s, sim, market).get("exchangeInfo")
        assert status == 200
        limits = [r for r in info["rateLimits"] if r["rateLimitType"] == "REQUEST_WEIGHT"]
        assert [(r["interval"], r["intervalNum"], r["limit"]) for r in limits] == [("MINUTE", 1, 60)]


# ---- 4. aggTrades ----------------------------------------------------------------------


async def collect_agg_trades(client: Client, n: int) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    while len(out) < n:
        out.append(await client.recv())
    return out


@pytest.mark.parametrize("market", MARKETS)
async def test_agg_trades_rest_equals_stream(market: str) -> None:
    async with Simulator(SimConfig(n_symbols=2)) as sim, session() as s:
        api = rest(s, sim, market)
        client = await connect(agg_ws_url(sim, market, ["btcusdt@aggTrade"]))
        try:
            events = await asyncio.wait_for(collect_agg_trades(client, 40), 10)
        finally:
            assert client.transport is not None
            client.transport.disconnect()
        event_keys = SPOT_AGG_EVENT if market == "spot" else FUTURES_AGG_EVENT
        rest_keys = SPOT_AGG_REST if market == "spot" else FUTURES_AGG_REST
        for ev in events:
            assert set(ev) == event_keys
            assert ev["e"] == "aggTrade" and ev["s"] == "BTCUSDT"
            assert ev["T"] <= ev["E"]
        ids = [ev["a"] for ev in events]
        assert ids == list(range(ids[0], ids[0] + len(ids)))

        status, items, headers = await api.get("aggTrades", symbol="BTCUSDT", fromId=ids[0],
                                               limit=len(ids))
        assert status == 200
        assert [x["a"] for x in items] == ids
        for item, ev in zip(items, events, strict=True):
            assert set(item) == rest_keys
            for k in rest_keys:
                assert item[k] == ev[k], (k, item, ev)
        for a, b in zip(items, items[1:], strict=False):
            assert b["f"] == a["l"] + 1
            assert a["f"] <= a["l"]
            assert a["T"] <= b["T"]

        # fromId pages chain: the next page starts right after the last id.
        status, page2, _ = await api.get("aggTrades", symbol="BTCUSDT", fromId=ids[-1] + 1, limit=5)
        assert status == 200
        assert [x["a"] for x in page2] == list(range(ids[-1] + 1, ids[-1] + 1 + len(page2)))

        # No cursor: the most recent trades, up to the default 500.
        status, recent, _ = await api.get("aggTrades", symbol="BTCUSDT")
        assert status == 200
        assert 0 < len(recent) <= 500
        assert recent[-1]["a"] >= ids[-1]
        assert [x["a"] for x in recent] == list(range(recent[0]["a"], recent[0]["a"] + len(recent)))


@pytest.mark.parametrize("market", MARKETS)
async def test_agg_trades_time_window(market: str) -> None:
    async with Simulator(SimConfig(n_symbols=2)) as sim, session() as s:
        api = rest(s, sim, market)
        await asyncio.sleep(1.0)  # let some trades happen
        status, items, _ = await api.get("aggTrades", symbol="BTCUSDT", limit=1000)
        assert status == 200
        times = sorted({x["T"] for x in items})
        assert len(times) >= 10
        start, end = times[2], times[-3]
        status, window, _ = await api.get("aggTrades", symbol="BTCUSDT", startTime=start,
                                          endTime=end, limit=1000)
        assert status == 200
        assert window and all(start <= x["T"] <= end for x in window)
        ids = [x["a"] for x in window]
        assert ids == list(range(ids[0], ids[0] + len(ids)))
        # Complete: the neighbours on either side fall outside the window.
        assert [x for x in items if start <= x["T"] <= end] == window
        _, before, _ = await api.get("aggTrades", symbol="BTCUSDT", fromId=ids[0] - 1, limit=1)
        _, after, _ = await api.get("aggTrades", symbol="BTCUSDT", fromId=ids[-1] + 1, limit=1)
        assert before[0]["T"] < start
        assert after[0]["T"] > end

        # startTime alone: the first `limit` trades from it, inclusive.
        status, head, _ = await api.get("aggTrades", symbol="BTCUSDT", startTime=start, limit=3)
        assert status == 200
        assert head == window[:3]
        # endTime alone: trades up to it, the latest `limit` of them.
        status, tail, _ = await api.get("aggTrades", symbol="BTCUSDT", endTime=end, limit=3)
        assert status == 200
        assert tail == window[-3:]

        # More than one hour between them: rejected.
        status, body, _ = await api.get("aggTrades", symbol="BTCUSDT", startTime=start,
                                        endTime=start + 3_600_001)
        assert status == 400 and body["code"] == -1127
        status, body, _ = await api.get("aggTrades", symbol="BTCUSDT", startTime=start - 7_200_000,
                                        endTime=end)
        assert status == 400 and body["code"] == -1127
        # limit: max 1000.
        status, body, _ = await api.get("aggTrades", symbol="BTCUSDT", limit=1001)
        assert status == 400 and isinstance(body["code"], int) and body["code"] < 0
        status, body, _ = await api.get("aggTrades", symbol="BTCUSDT", limit=0)
        assert status == 400
        status, body, _ = await api.get("aggTrades", symbol="BTCUSDT", fromId="abc")
        assert status == 400 and body["code"] == -1100


# ---- 5. openInterest, premiumIndex, ticker/24hr ----------------------------------------


async def test_open_interest_and_premium_index() -> None:
    universe = build_universe(None, 3)
    async with Simulator(SimConfig(n_symbols=3)) as sim, session() as s:
        api = rest(s, sim, "futures")
        for u in universe:
            status, oi, _ = await api.get("openInterest", symbol=u.symbol)
            assert status == 200
            assert list(oi) == ["openInterest", "symbol", "time"]
            assert oi["symbol"] == u.symbol
            assert isinstance(oi["openInterest"], str)
            assert re.fullmatch(r"\d+" + (rf"\.\d{{{u.qty_dp}}}" if u.qty_dp else ""),
                                oi["openInterest"])
            assert Decimal(oi["openInterest"]) > 0
            assert isinstance(oi["time"], int) and abs(oi["time"] - time.time() * 1000) < 10_000
        status, body, _ = await api.get("openInterest", symbol="NOPEUSDT")
        assert (status, body["code"]) == (400, -1121)
        status, body, _ = await api.get("openInterest")
        assert (status, body["code"]) == (400, -1102)
        # Spot has no such endpoint.
        status, _, _ = await rest(s, sim, "spot").get("openInterest", symbol="BTCUSDT")
        assert status == 404

        keys = ["symbol", "markPrice", "indexPrice", "estimatedSettlePrice", "lastFundingRate",
                "interestRate", "nextFundingTime", "time"]
        status, one, _ = await api.get("premiumIndex", symbol="ETHUSDT")
        assert status == 200
        assert isinstance(one, dict) and list(one) == keys and one["symbol"] == "ETHUSDT"
        for k in ("markPrice", "indexPrice", "estimatedSettlePrice", "lastFundingRate",
                  "interestRate"):
            assert isinstance(one[k], str)
            Decimal(one[k])
        assert one["nextFundingTime"] % (8 * 3600 * 1000) == 0
        assert one["nextFundingTime"] > one["time"]
        status, every, _ = await api.get("premiumIndex")
        assert status == 200
        assert isinstance(every, list)
        assert [x["symbol"] for x in every] == [u.symbol for u in universe]
        assert all(list(x) == keys for x in every)


@pytest.mark.parametrize("market", MARKETS)
async def test_ticker_quote_volume_ranks_universe_order(market: str) -> None:
    universe = [u.symbol for u in build_universe(None, 13)]
    async with Simulator(SimConfig(n_symbols=13, model=ModelParams(rate=1500))) as sim, session() as s:
        api = rest(s, sim, market)
        for _ in range(2):
            status, items, _ = await api.get("ticker/24hr")
            assert status == 200
            assert [x["symbol"] for x in items] == universe
            ranked = sorted(items, key=lambda x: Decimal(x["quoteVolume"]), reverse=True)
            assert [x["symbol"] for x in ranked] == universe
            assert ranked[0]["symbol"] == "BTCUSDT"
            for x in items:
                assert isinstance(x["quoteVolume"], str) and Decimal(x["quoteVolume"]) > 0
                assert isinstance(x["volume"], str) and isinstance(x["lastPrice"], str)
                assert isinstance(x["count"], int)
            await asyncio.sleep(0.5)
        status, one, _ = await api.get("ticker/24hr", symbol="ETHUSDT")
        assert status == 200 and isinstance(one, dict) and one["symbol"] == "ETHUSDT"
        assert one["closeTime"] - one["openTime"] == 86_400_000


# ---- 6. REST faults --------------------------------------------------------------------


async def test_fault_rest_5xx_counts_down() -> None:
    async with Simulator(SimConfig(n_symbols=2)) as sim, session() as s:
        fut, spot = rest(s, sim, "futures"), rest(s, sim, "spot")
        reply = await admin_post(s, sim, "/faults", {"kind": "rest_5xx", "market": "futures",
                                                     "count": 2})
        assert reply == {"applied": 1, "targets": [2]}
        status, _, _ = await spot.get("depth", symbol="BTCUSDT")
        assert status == 200  # the other market is untouched
        statuses = [(await fut.get("depth", symbol="BTCUSDT", limit=5))[0] for _ in range(3)]
        assert statuses == [503, 503, 200]
        status, _, _ = await fut.get("depth", symbol="BTCUSDT", limit=5)
        assert status == 200


async def test_fault_rest_429_has_retry_after() -> None:
    async with Simulator(SimConfig(n_symbols=2)) as sim, session() as s:
        fut = rest(s, sim, "futures")
        await admin_post(s, sim, "/faults", {"kind": "rest_429", "market": "futures"})
        status, body, headers = await fut.get("exchangeInfo")
        assert status == 429
        assert body["code"] == -1003
        assert re.fullmatch(r"\d+", headers["Retry-After"]) and int(headers["Retry-After"]) >= 1
        status, _, _ = await fut.get("exchangeInfo")
        assert status == 200


async def test_fault_rest_slow_delays_reply() -> None:
    async with Simulator(SimConfig(n_symbols=2)) as sim, session() as s:
        fut = rest(s, sim, "futures")
        await fut.get("ping")  # open the connection first
        await admin_post(s, sim, "/faults", {"kind": "rest_slow", "market": "futures", "delay": 300})
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        status, snap, _ = await fut.get("depth", symbol="BTCUSDT", limit=5)
        elapsed = loop.time() - t0
        assert status == 200 and len(snap["bids"]) == 5
        assert elapsed >= 0.3
