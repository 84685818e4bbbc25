"""The simulator as one object: models, WebSocket and REST endpoints, admin, faults.

``async with Simulator(SimConfig(...)) as sim:`` starts everything on loopback and
exposes ``sim.urls`` (the same JSON object ``ingestor simulate`` prints).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from ingestor.binance.rest_limits import WEIGHT_LIMIT
from ingestor.binance.streams import DEFAULT_LIMITS, MARKETS, Market, MarketLimits
from ingestor.sim.exchange_info import exchange_info
from ingestor.sim.faults import Fault, FaultSpecError
from ingestor.sim.hub import Hub
from ingestor.sim.model import STEP_MS, MarketModel, ModelParams
from ingestor.sim.replay import Replay
from ingestor.sim.rest_server import RestApi, WeightBudget
from ingestor.sim.tape import MarketTape, TapeClock, TapeMarket, load_or_record
from ingestor.sim.universe import build_universe
from ingestor.sim.ws_server import WsServer

log = logging.getLogger(__name__)

MAX_CATCHUP_MS = 10 * STEP_MS


@dataclass(frozen=True)
class SimConfig:
    host: str = "127.0.0.1"
    port: int = 0  # 0: every endpoint on a free port; else P..P+4 in the order of `urls`
    markets: tuple[Market, ...] = MARKETS
    symbols: tuple[str, ...] | None = None
    n_symbols: int = 5
    seed: int = 1
    model: ModelParams = field(default_factory=ModelParams)
    limits: dict[Market, MarketLimits] = field(default_factory=lambda: dict(DEFAULT_LIMITS))
    faults: tuple[Fault, ...] = ()
    replay: tuple[str, ...] = ()
    speed: float = 1.0
    halted: tuple[str, ...] = ()
    weight_limit: dict[Market, int] = field(default_factory=lambda: dict(WEIGHT_LIMIT))
    ban_s: float = 120.0
    reuse_port: bool = False
    ws_only: bool = False  # extra --workers processes serve WebSocket only
    ws_ports: dict[Market, int] | None = None  # set for those extra processes
    record: bool = False  # keep every delivered payload (Hub.record), for exact comparisons
    # A pre-recorded market (ingestor/sim/tape.py) instead of the live model: model seconds
    # to record (0: live model), the offered rate in msgs/s over both markets (0: as
    # recorded), where recordings are cached, and the depth speed each market records.
    tape_seconds: float = 0.0
    tape_rate: float = 0.0
    tape_cache: str | None = None
    tape_depth_speeds: dict[Market, str] = field(default_factory=lambda: {"spot": "100ms", "futures": "500ms"})


@dataclass
class MarketRuntime:
    model: MarketModel
    hub: Hub
    ws: WsServer
    rest: RestApi


def record_tapes(config: SimConfig) -> dict[Market, MarketTape]:
    """The tapes ``config`` plays: from its cache when recorded before, else recorded now."""
    return load_or_record(config.markets, build_universe(config.symbols, config.n_symbols), config.seed,
                          config.model, config.tape_seconds, config.tape_depth_speeds,
                          Path(config.tape_cache) if config.tape_cache else None)


class Simulator:
    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.markets: dict[Market, MarketRuntime] = {}
        self.urls: dict[str, str] = {}
        self.paused_at: int | None = None  # model time the clock stops at
        self.model_lag_ms = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._runners: list[web.AppRunner] = []
        self.replay: Replay | None = Replay.load(config.replay, config.speed) if config.replay else None
        self.started_at = 0.0

    async def __aenter__(self) -> Simulator:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ---- lifecycle ------------------------------------------------------------------

    def _port(self, i: int) -> int:
        return self.config.port + i if self.config.port else 0

    async def start(self, start_ms: int | None = None) -> None:
        cfg = self.config
        self.started_at = time.monotonic()
        start_ms = start_ms if start_ms is not None else int(time.time() * 1000)
        markets = self.replay.markets if self.replay else cfg.markets
        tapes = self._tapes(markets) if cfg.tape_seconds else {}
        for i, market in enumerate(MARKETS):
            if market not in markets:
                continue
            if self.replay:
                universe = self.replay.universe(market)
            else:
                universe = build_universe(cfg.symbols, cfg.n_symbols)
            hub = Hub(market, record=self.config.record)
            if market in tapes:
                model: MarketModel = TapeMarket(tapes[market], universe, cfg.seed, cfg.model, self.tape_clock,
                                                partial(bool, hub.subs), start_ms)
            else:
                model = MarketModel(market, universe, cfg.seed, cfg.model, start_ms)
            model.wants, model.emit = hub.wants, hub.emit
            ws = WsServer(hub, cfg.limits[market], self._extra_streams(market))
            budget = WeightBudget(cfg.weight_limit[market], ban_s=cfg.ban_s)
            rest = RestApi(model, budget, partial(exchange_info, market, universe, budget.limit, cfg.halted),
                           self.replay.snapshot_for(market) if self.replay else None)
            self.markets[market] = MarketRuntime(model, hub, ws, rest)
            want = cfg.ws_ports[market] if cfg.ws_ports else self._port(i)
            port = await ws.start(cfg.host, want, cfg.reuse_port)
            self.urls[f"{market}_ws"] = f"ws://{cfg.host}:{port}"
        if not cfg.ws_only:
            for i, market in enumerate(MARKETS):
                if market in self.markets:
                    port = await self._serve(self.markets[market].rest.app(), self._port(2 + i))
                    self.urls[f"{market}_rest"] = f"http://{cfg.host}:{port}"
            port = await self._serve(self._admin_app(), self._port(4))
            self.urls["admin"] = f"http://{cfg.host}:{port}"
        self._spawn(self._housekeeping())
        if self.replay:
            self._spawn(self.replay.run({m: rt.hub for m, rt in self.markets.items()}))
        else:
            self._spawn(self._clock())
        for fault in cfg.faults:
            self._spawn(self._scheduled(fault))

    def _tapes(self, markets: tuple[Market, ...]) -> dict[Market, MarketTape]:
        cfg = self.config
        tapes = record_tapes(cfg)
        recorded = sum(t.rate for t in tapes.values())
        # One speed for every market, so their event times stay aligned with each other.
        speed = cfg.tape_rate / recorded if cfg.tape_rate and recorded else 1.0
        self.tape_clock = TapeClock({m: speed for m in tapes})
        log.info("tape: %s msgs/s recorded, played at x%.3f (%s msgs/s) for %.1f s", f"{recorded:,.0f}", speed,
                 f"{recorded * speed:,.0f}", cfg.tape_seconds / speed)
        return tapes

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for rt in self.markets.values():
            await rt.ws.close()
        for runner in self._runners:
            await runner.cleanup()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("simulator task failed", exc_info=task.exception())

    async def _serve(self, app: web.Application, port: int) -> int:
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, self.config.host, port, reuse_port=self.config.reuse_port or None)
        await site.start()
        self._runners.append(runner)
        server = site._server
        assert server is not None
        return int(server.sockets[0].getsockname()[1])  # type: ignore[union-attr,attr-defined]

    def _extra_streams(self, market: Market) -> Any:
        if self.replay is None:
            return lambda name: None
        return lambda name: self.replay.stream_spec(market, name)  # type: ignore[union-attr,attr-defined]

    # ---- the clock ------------------------------------------------------------------

    async def _clock(self) -> None:
        """Advance every model to wall time in whole 10 ms steps, then flush the hubs."""
        models = [(rt.model, rt.hub) for rt in self.markets.values()]
        while True:
            now = int(time.time() * 1000)
            target = now if self.paused_at is None else min(now, self.paused_at)
            behind = False
            for model, hub in models:
                # Catch up a bounded slice per pass: a model slower than real time must
                # not starve accepts, the admin API and signal handling.
                model.advance_to(min(target, model.t + MAX_CATCHUP_MS))
                hub.flush()
                behind |= model.t + STEP_MS <= target
            self.model_lag_ms = max(0, target - models[0][0].t) if models else 0
            if not models or (self.paused_at is not None and models[0][0].t >= self.paused_at):
                await asyncio.sleep(0.01)  # paused: idle instead of spinning on a 0 s sleep
                continue
            if behind:
                await asyncio.sleep(0)
                continue
            await asyncio.sleep(max(0.0, (models[0][0].t + STEP_MS - time.time() * 1000) / 1000))

    async def _housekeeping(self) -> None:
        while True:
            now = time.monotonic()
            for rt in self.markets.values():
                rt.ws.housekeeping(now)
            await asyncio.sleep(0.25)

    # ---- faults ---------------------------------------------------------------------

    async def _scheduled(self, fault: Fault) -> None:
        await asyncio.sleep(max(0.0, self.started_at + fault.at_s - time.monotonic()))
        while True:
            self.apply_fault(fault)
            if fault.every_s is None:
                return
            await asyncio.sleep(fault.every_s)

    def apply_fault(self, fault: Fault) -> int:
        """Apply now; returns how many connections, streams or requests it targets."""
        hit = 0
        for market, rt in self.markets.items():
            if fault.market not in (None, market):
                continue
            low = fault.symbol.lower() + "@" if fault.symbol else None
            conns = [c for c in rt.ws.conns
                     if low is None or any(n.startswith(low) for n in c.subs)]
            kind = fault.kind
            if kind == "drop":
                for c in conns:
                    if c.transport is not None:
                        c.transport.disconnect(graceful=False)
                hit += len(conns)
            elif kind == "stall":
                for c in conns:
                    c.stalled = True
                    c.stalled_until = time.monotonic() + fault.duration if fault.duration else 0.0
                hit += len(conns)
            elif kind in ("gap", "skip_trades"):
                names = rt.hub.streams_matching("depth" if kind == "gap" else "aggTrade",
                                                fault.symbol)
                for name in names:
                    rt.hub.skip[name] = fault.count
                hit += len(names)
            elif kind in ("malformed", "non_json", "unknown_event"):
                for c in conns:
                    rt.hub.send_raw((c,), _bad_frame(kind, c, int(time.time() * 1000)))
                rt.hub.flush()
                hit += len(conns)
            elif kind == "hold_close":
                for c in conns:
                    c.hold_close()
                hit += len(conns)
            elif kind == "bogus_id":
                now_ms = int(time.time() * 1000)
                for c in conns:
                    for frame in c.bogus_frames(now_ms, fault.symbol):
                        rt.hub.send_raw((c,), frame)
                rt.hub.flush()
                hit += len(conns)
            else:
                rt.rest.pending.append(fault)
                hit += fault.count
        log.info("fault %s applied to %d target(s)", fault.kind, hit)
        return hit

    # ---- admin ------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {"paused": self.paused_at is not None, "markets": {},
                               "model_lag_ms": self.model_lag_ms}
        for market, rt in self.markets.items():
            out["markets"][market] = {
                "model_time": rt.model.t,
                "regime": "panic" if rt.model.panic else "calm",
                "streams": {n: {"sent": c, "last_id": last} for n, (c, last) in rt.hub.sent.items()},
                "skipped": dict(rt.hub.skipped),
                "ws": rt.ws.stats(),
                "rest": {"requests": dict(rt.rest.requests), "served": dict(rt.rest.served),
                         "used_weight": rt.rest.budget.used,
                         "rejected": dict(rt.rest.budget.counts)},
            }
            if isinstance(rt.model, TapeMarket):
                out["markets"][market]["tape"] = rt.model.stats()
        if self.replay:
            out["replay"] = self.replay.stats()
        return out

    def _admin_app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/stats", self._stats)
        app.router.add_post("/faults", self._post_fault)
        app.router.add_post("/pause", self._pause)
        app.router.add_post("/resume", self._resume)
        app.router.add_get("/book", self._book)
        return app

    async def _stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.stats(), dumps=_dumps)

    async def _post_fault(self, request: web.Request) -> web.Response:
        try:
            body = orjson.loads(await request.read())
            items = body if isinstance(body, list) else [body]
            faults = [Fault.from_dict(x) for x in items]
        except (orjson.JSONDecodeError, FaultSpecError, TypeError) as exc:
            return web.json_response({"error": str(exc)}, status=400)
        hits = [self.apply_fault(f) for f in faults]
        return web.json_response({"applied": len(faults), "targets": hits})

    async def pause(self) -> int | None:
        """Stop the clock at the next whole second of model time, when every diff stream
        has pushed everything, so a client's book can be compared with ``/book``.
        Returns the pause time, or None if the model did not get there within 5 s."""
        t = max(rt.model.t for rt in self.markets.values())
        paused_at = self.paused_at = (t // 1000 + 1) * 1000
        deadline = time.monotonic() + 5
        while any(rt.model.t < paused_at for rt in self.markets.values()):
            if time.monotonic() > deadline:
                return None
            await asyncio.sleep(0.01)
        return paused_at

    async def _pause(self, request: web.Request) -> web.Response:
        paused_at = await self.pause()
        if paused_at is None:
            return web.json_response({"error": "model did not reach the pause point"}, status=500)
        return web.json_response({"paused_at": paused_at})

    async def _resume(self, request: web.Request) -> web.Response:
        self.paused_at = None
        return web.json_response({"paused": False})

    async def _book(self, request: web.Request) -> web.Response:
        market = request.query.get("market", "futures")
        symbol = request.query.get("symbol", "")
        rt = self.markets.get(market)  # type: ignore[call-overload]
        if rt is None or symbol not in rt.model.books:
            return web.json_response({"error": "unknown market or symbol"}, status=404)
        return web.Response(body=rt.model.depth_snapshot(symbol, 10**9),
                            content_type="application/json")


def _dumps(obj: Any) -> str:
    return orjson.dumps(obj).decode()


def _bad_frame(kind: str, conn: Any, now_ms: int) -> bytes:
    if kind == "malformed":
        return b'{"e":"aggTrade","E":' + str(now_ms).encode() + b',"s":"BTCUS'
    if kind == "non_json":
        return b"<html><body>502 Bad Gateway</body></html>"
    event = b'{"e":"mysteryEvent","E":' + str(now_ms).encode() + b',"s":"BTCUSDT"}'
    if conn.combined and conn.subs:
        return b'{"stream":"' + next(iter(conn.subs)).encode() + b'","data":' + event + b"}"
    return event

