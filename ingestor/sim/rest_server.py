"""The simulated exchange's REST API (aiohttp), one app per market.

Endpoints, parameters, weights and error bodies follow Binance's REST documentation
(Spot ``/api/v3``, USD-M ``/fapi/v1``). Every reply carries ``X-MBX-USED-WEIGHT-1M``.
Past the per-minute weight budget a request gets 429 with ``Retry-After``; a client
that keeps sending after 429s gets 418 and a ban, whose length doubles on repeat, as
Binance's "LIMITS" section describes ("IP bans ... scale in duration for repeat
offenders, from 2 minutes to 3 days").
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any

import orjson
from aiohttp import web

from ingestor.binance.rest_limits import (
    AGG_TRADES_WEIGHT,
    DEPTH_DEFAULT_LIMIT,
    FUTURES_DEPTH_LIMITS,
    PREFIX,
    depth_weight,
)
from ingestor.sim.faults import Fault
from ingestor.sim.model import MarketModel

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

class ApiError(Exception):
    def __init__(self, status: int, code: int, msg: str) -> None:
        super().__init__(msg)
        self.status, self.code, self.msg = status, code, msg


def _json(body: bytes, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=body, status=status, content_type="application/json", headers=headers)


@dataclass
class WeightBudget:
    """Fixed one-minute windows, as Binance counts ``X-MBX-USED-WEIGHT-1M``."""

    limit: int
    strikes_before_ban: int = 5
    ban_s: float = 120.0
    window: int = -1
    used: int = 0
    strikes: int = 0
    banned_until: float = 0.0
    bans: int = 0
    counts: dict[str, int] = field(default_factory=dict)

    def charge(self, weight: int, now: float) -> tuple[int, float]:
        """Returns (status, retry_after_s): 200 admitted, 429 over budget, 418 banned."""
        if now < self.banned_until:
            return 418, self.banned_until - now
        minute = int(now // 60)
        if minute != self.window:
            self.window, self.used = minute, 0
        if self.used + weight > self.limit:
            self.strikes += 1
            self.counts["429"] = self.counts.get("429", 0) + 1
            if self.strikes > self.strikes_before_ban:
                self.bans += 1
                self.banned_until = now + self.ban_s * 2 ** (self.bans - 1)
                self.strikes = 0
                self.counts["418"] = self.counts.get("418", 0) + 1
                return 418, self.banned_until - now
            return 429, (minute + 1) * 60 - now
        self.strikes = 0
        self.used += weight
        return 200, 0.0


_STALE = web.RequestKey("stale", bool)  # fault rest_stale: this depth reply is to be stale


class RestApi:
    """Routes of one market over its model; faults are injected from the admin side."""

    def __init__(self, model: MarketModel, budget: WeightBudget, exchange_info: Callable[[], bytes],
                 snapshot_override: Callable[[str], bytes | None] | None = None) -> None:
        self.model = model
        self.market = model.market
        self.budget = budget
        self.exchange_info = exchange_info
        self.snapshot_override = snapshot_override
        self.pending: list[Fault] = []  # REST faults with requests left to affect
        self.requests: dict[str, int] = {}
        self.served: dict[str, int] = {}  # 200 replies: what a client can have stored

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware])
        p = PREFIX[self.market]
        r = app.router
        r.add_get(f"{p}/ping", self._ping)
        r.add_get(f"{p}/time", self._time)
        r.add_get(f"{p}/exchangeInfo", self._exchange_info)
        r.add_get(f"{p}/depth", self._depth)
        r.add_get(f"{p}/aggTrades", self._agg_trades)
        r.add_get(f"{p}/ticker/24hr", self._ticker)
        if self.market == "futures":
            r.add_get(f"{p}/openInterest", self._open_interest)
            r.add_get(f"{p}/premiumIndex", self._premium_index)
        return app

    async def _ping(self, request: web.Request) -> web.Response:
        return _json(b"{}")

    async def _time(self, request: web.Request) -> web.Response:
        return _json(orjson.dumps({"serverTime": int(time.time() * 1000)}))

    async def _exchange_info(self, request: web.Request) -> web.Response:
        return _json(self.exchange_info())

    def _weight(self, request: web.Request) -> int:
        path = request.path.rsplit("/", 1)[-1]
        q = request.query
        spot = self.market == "spot"
        if path == "depth":
            default = DEPTH_DEFAULT_LIMIT[self.market]  # absent or empty: the default
            try:
                limit = int(q.get("limit") or default)
            except ValueError:
                limit = default
            return depth_weight(self.market, limit)
        if path == "aggTrades":
            return AGG_TRADES_WEIGHT[self.market]
        if path == "exchangeInfo":
            return 20 if spot else 1
        if path == "24hr":
            if spot:
                return 2 if "symbol" in q else 80
            return 1 if "symbol" in q else 40
        if path == "premiumIndex":
            return 1 if "symbol" in q else 10
        return 1

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        self.requests[request.path] = self.requests.get(request.path, 0) + 1
        fault = self._take_fault()
        if fault is not None:
            if fault.kind == "rest_slow":
                await asyncio.sleep(fault.delay / 1000)
            elif fault.kind == "rest_5xx":
                return _json(orjson.dumps({"code": -1001, "msg": "Internal error; unable to "
                                           "process your request. Please try again."}), 503)
            elif fault.kind == "rest_429":
                return self._too_many(429, fault.duration or 30.0)
            elif fault.kind == "rest_bad_body":
                return _json(b'["not", "what", "you", "asked", "for"]')
            elif fault.kind == "rest_stale":
                request[_STALE] = True
        status, retry = self.budget.charge(self._weight(request), time.time())
        if status != 200:
            return self._too_many(status, retry)
        headers = {"X-MBX-USED-WEIGHT-1M": str(self.budget.used)}
        try:
            resp = await handler(request)
        except ApiError as exc:
            return _json(orjson.dumps({"code": exc.code, "msg": exc.msg}), exc.status, headers)
        resp.headers.update(headers)
        if resp.status == 200:
            self.served[request.path] = self.served.get(request.path, 0) + 1
        return resp

    def _take_fault(self) -> Fault | None:
        if not self.pending:
            return None
        fault = self.pending[0]
        left = fault.count - 1
        if left:
            self.pending[0] = replace(fault, count=left)
        else:
            self.pending.pop(0)
        return fault

    def _too_many(self, status: int, retry_after: float) -> web.Response:
        limit = self.budget.limit
        if status == 418:
            until = int((time.time() + retry_after) * 1000)
            msg = f"Way too much request weight used; IP banned until {until}. Please use " \
                  "WebSocket Streams for live updates to avoid bans."
        else:
            msg = f"Too much request weight used; current limit is {limit} request weight " \
                  "per 1 MINUTE. Please use WebSocket Streams for live updates to avoid polling the API."
        return _json(orjson.dumps({"code": -1003, "msg": msg}), status, {
            "Retry-After": str(max(1, int(retry_after + 0.999))),
            "X-MBX-USED-WEIGHT-1M": str(self.budget.used),
        })

    # ---- handlers -------------------------------------------------------------------

    def _symbol(self, request: web.Request) -> str:
        symbol = request.query.get("symbol")
        if not symbol:
            raise ApiError(400, -1102, "Mandatory parameter 'symbol' was not sent, was empty/null, "
                           "or malformed.")
        if symbol not in self.model.books:
            raise ApiError(400, -1121, "Invalid symbol.")
        return symbol

    def _int(self, request: web.Request, name: str, default: int | None = None) -> int | None:
        raw = request.query.get(name)
        if raw is None or raw == "":
            return default
        try:
            return int(raw)
        except ValueError:
            raise ApiError(400, -1100, f"Illegal characters found in parameter '{name}'; legal "
                           "range is '^[0-9]{1,20}$'.") from None

    async def _depth(self, request: web.Request) -> web.Response:
        symbol = self._symbol(request)
        spot = self.market == "spot"
        limit = self._int(request, "limit", DEPTH_DEFAULT_LIMIT[self.market])
        assert limit is not None
        if spot:
            if limit < 1:
                raise ApiError(400, -1130, "Data sent for parameter 'limit' is not valid.")
            limit = min(limit, 5000)  # documented: larger values are truncated to 5000
        elif limit not in FUTURES_DEPTH_LIMITS:
            raise ApiError(400, -1130, "Data sent for parameter 'limit' is not valid.")
        if self.snapshot_override is not None:
            body = self.snapshot_override(symbol)
            if body is not None:
                return _json(body)
        body = self.model.depth_snapshot(symbol, limit)
        if request.get(_STALE):  # older than every diff sent: no book can sync from it
            body = orjson.dumps({**orjson.loads(body), "lastUpdateId": 1})
        return _json(body)

    async def _agg_trades(self, request: web.Request) -> web.Response:
        symbol = self._symbol(request)
        limit = self._int(request, "limit", 500)
        assert limit is not None
        if not 1 <= limit <= 1000:
            raise ApiError(400, -1130, "Data sent for parameter 'limit' is not valid.")
        from_id = self._int(request, "fromId")
        start = self._int(request, "startTime")
        end = self._int(request, "endTime")
        if start is not None and end is not None and end - start >= 3_600_000:
            raise ApiError(400, -1127, "More than 1 hours between startTime and endTime.")
        return _json(self.model.agg_trades(symbol, from_id, start, end, limit))

    async def _open_interest(self, request: web.Request) -> web.Response:
        return _json(self.model.open_interest(self._symbol(request)))

    async def _premium_index(self, request: web.Request) -> web.Response:
        symbols = [self._symbol(request)] if "symbol" in request.query else list(self.model.books)
        items = []
        for s in symbols:
            p, i, est, r, nxt = self.model.mark_fields(self.model.books[s])
            items.append({"symbol": s, "markPrice": p, "indexPrice": i, "estimatedSettlePrice": est,
                          "lastFundingRate": r, "interestRate": "0.00010000",
                          "nextFundingTime": nxt, "time": self.model.t})
        return _json(orjson.dumps(items[0] if "symbol" in request.query else items))

    async def _ticker(self, request: web.Request) -> web.Response:
        symbols = [self._symbol(request)] if "symbol" in request.query else list(self.model.books)
        items = [self._ticker_item(s) for s in symbols]
        return _json(orjson.dumps(items[0] if "symbol" in request.query else items))

    def _ticker_item(self, symbol: str) -> dict[str, Any]:
        m = self.model
        book = m.books[symbol]
        s = book.spec
        last = book.trades[-1] if book.trades else None
        mid_ticks = (book.best_bid + book.best_ask) // 2
        price = m.px(s, last[1] if last else mid_ticks)
        qv = m.quote_volume_24h(symbol)
        return {
            "symbol": symbol, "priceChange": "0", "priceChangePercent": "0",
            "weightedAvgPrice": price, "lastPrice": price,
            "lastQty": m.qty(s, last[2]) if last else "0",
            "openPrice": m.px(s, s.start_ticks), "highPrice": price, "lowPrice": price,
            "volume": f"{qv / max(m.mid(symbol), 1e-12):.3f}", "quoteVolume": f"{qv:.2f}",
            "openTime": m.t - 86_400_000, "closeTime": m.t,
            "firstId": book.trades[0][0] if book.trades else -1,
            "lastId": last[0] if last else -1, "count": len(book.trades),
        }

