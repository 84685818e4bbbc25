"""The simulated exchange's WebSocket endpoints (picows server), one per market.

Paths, requests, replies and limits follow Binance's WebSocket stream documentation:
raw ``/ws/<stream>[/<stream>...]`` and combined ``/stream?streams=a/b`` connections;
``SUBSCRIBE``/``UNSUBSCRIBE``/``LIST_SUBSCRIPTIONS``/``SET_PROPERTY``/``GET_PROPERTY``
with ``{"result":..,"id":..}`` replies and the documented error objects; USD-M's
routed ``/public`` and ``/market`` paths (legacy paths deliver only ``/public``
streams). Limits per connection: streams, incoming messages per second (ping, pong and
JSON frames all count; over the limit the connection is closed with 1008), a server
ping every ``ping_interval_s`` with a pong deadline, and a maximum lifetime.

Two things Binance's table of error messages does not cover are answered here as
``{"code": 2, "msg": "Invalid request: ..."}``: an unknown stream name in
``SUBSCRIBE`` and a subscription that would exceed the stream limit. An unknown stream
in the connection URL is refused with HTTP 400 before the upgrade.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs

import orjson
from picows import (
    WSCloseCode,
    WSFrame,
    WSListener,
    WSMsgType,
    WSTransport,
    WSUpgradeRequest,
    WSUpgradeResponse,
    WSUpgradeResponseWithListener,
    ws_create_server,
)

from ingestor.binance.streams import (
    MarketLimits,
    Route,
    StreamNameError,
    StreamSpec,
    delivers_on,
    parse_stream,
    split_ws_path,
)
from ingestor.sim import encode as enc
from ingestor.sim.hub import Hub

log = logging.getLogger(__name__)

# A client that lets this much pile up unread is cut off, as a real venue does with
# slow consumers, instead of the simulator growing without bound.
MAX_PENDING_BYTES = 64 * 1024 * 1024
BOGUS_ID = 2**62  # the ``bogus_id`` fault's id: a corrupt frame, far past any real one
BOGUS_AHEAD_MS = 10**9  # and its event time for streams without ids: eleven days ahead
# The ``hold_close`` fault's ping flood: the client answers each with a pong that this side
# no longer reads, until the kernel's buffers both ways are full (loopback: a few MB) and
# the rest waits in the client's own send buffer, where its close frame queues behind it.
HOLD_CLOSE_BYTES = 16 * 1024 * 1024

_METHODS = ("SUBSCRIBE", "UNSUBSCRIBE", "LIST_SUBSCRIPTIONS", "SET_PROPERTY", "GET_PROPERTY")


def _error(code: int, msg: str, req_id: Any) -> bytes:
    return orjson.dumps({"error": {"code": code, "msg": msg}, "id": req_id})


class Connection(WSListener):
    """One client connection. The hub queues frames into ``out``; ``flush`` writes them."""

    def __init__(self, server: WsServer, route: Route, combined: bool, streams: list[StreamSpec]):
        self.server = server
        self.route = route
        self.combined = combined
        self.initial = streams
        self.subs: dict[str, StreamSpec] = {}
        self.out: list[bytes] = []
        self.stalled = False
        self.stalled_until = 0.0
        self.transport: WSTransport | None = None
        self.opened = time.monotonic()
        self.last_ping = self.opened
        self.unanswered_since: float | None = None
        self.incoming: deque[float] = deque()
        self.peer = ""
        self.closing = False  # a close frame was sent: ignore what the client still sends
        self.unread = False  # the hold_close fault: nothing the client sends is read any more

    # picows callbacks ---------------------------------------------------------------

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport
        peer = transport.underlying_transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if peer else "?"
        self.server.conns.add(self)
        self._subscribe(self.initial)

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.server.conns.discard(self)
        self.server.hub.unsubscribe(self, list(self.subs))
        self.server.closed_total += 1

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if self.closing:
            return
        msg_type = frame.msg_type
        if msg_type == WSMsgType.CLOSE:
            transport.send_close(frame.get_close_code())
            transport.disconnect()
            return
        if not self._count_incoming():
            return
        if msg_type == WSMsgType.PING:
            if not self.stalled:
                transport.send_pong(frame.get_payload_as_bytes())
        elif msg_type == WSMsgType.PONG:
            self.unanswered_since = None
        elif msg_type == WSMsgType.TEXT:
            reply = self._request(frame.get_payload_as_bytes())
            if reply is not None and not self.stalled:
                self.server.hub.send_raw((self,), reply)
                self.server.hub.flush()

    # ---------------------------------------------------------------------------------

    def _count_incoming(self) -> bool:
        now = time.monotonic()
        q = self.incoming
        q.append(now)
        while q and q[0] <= now - 1.0:
            q.popleft()
        if len(q) > self.server.limits.max_incoming_per_s:
            self.server.rate_limited_total += 1
            self.close(WSCloseCode.POLICY_VIOLATION, b"Too many requests")
            return False
        return True

    def close(self, code: WSCloseCode, reason: bytes = b"") -> None:
        if self.transport is not None and not self.transport.is_disconnected and not self.closing:
            self.closing = True
            self.flush()
            self.transport.send_close(code, reason)
            self.transport.disconnect()

    def flush(self) -> None:
        if not self.out:
            return
        data = b"".join(self.out)
        self.out.clear()
        t = self.transport
        if t is None or t.is_disconnected:
            return
        under = t.underlying_transport
        under.write(data)
        if under.get_write_buffer_size() > MAX_PENDING_BYTES:
            log.warning("closing slow consumer %s: %d bytes unread", self.peer,
                        under.get_write_buffer_size())
            self.server.slow_closed_total += 1
            t.disconnect(graceful=False)

    def hold_close(self) -> None:
        """The ``hold_close`` fault: stop reading the client and flood it with pings, so that its
        send buffer fills with pongs nobody reads. Data keeps flowing to it, but a close it
        starts cannot complete: a graceful close waits for the buffer to drain, and the
        closing handshake's frame never reaches this side."""
        t = self.transport
        if t is None or t.is_disconnected:
            return
        self.unread = True
        t.underlying_transport.pause_reading()
        ping = b"\0" * 125  # the largest control frame payload
        for _ in range(HOLD_CLOSE_BYTES // (len(ping) + 2)):
            t.send_ping(ping)

    def bogus_frames(self, now_ms: int, symbol: str | None = None) -> list[bytes]:
        """The ``bogus_id`` fault: one event per kind of stream this connection receives (of
        ``symbol``'s streams, if given), with an absurd id (``BOGUS_ID`` as the trade's ``a``,
        the diff's ``u``), or for streams without ids an event time ``BOGUS_AHEAD_MS`` ahead.
        The model's own sequence is untouched: the next real events follow as usual."""
        hub = self.server.hub
        futures = self.server.market == "futures"
        # A symbol the client keeps (it filters the all-market arrays by its universe).
        known = next((spec.symbol for spec in self.subs.values() if spec.symbol), "BTCUSDT")
        out: dict[str, bytes] = {}
        for name, spec in self.subs.items():
            if spec.kind in out or self not in hub.subs.get(name, ()) or symbol not in (None, spec.symbol):
                continue
            s = spec.symbol or known
            if spec.kind == "aggTrade":
                trade = enc.agg_trade_futures if futures else enc.agg_trade_spot
                payload = trade(now_ms, s, BOGUS_ID, "1.00", "1", BOGUS_ID, BOGUS_ID, now_ms - 1, True)
            elif spec.kind == "depth":
                payload = (enc.depth_update_futures(now_ms, now_ms - 1, s, BOGUS_ID - 5, BOGUS_ID, BOGUS_ID - 6, [], [])
                           if futures else enc.depth_update_spot(now_ms, s, BOGUS_ID - 5, BOGUS_ID, [], []))
            elif spec.kind == "markPrice":
                item = enc.mark_price(now_ms + BOGUS_AHEAD_MS, s, "1.00", "1.00", "1.00", "0.0001", now_ms)
                payload = enc.mark_price_array([item]) if spec.symbol is None else item.encode()
            elif spec.kind == "forceOrder":
                payload = enc.force_order(now_ms + BOGUS_AHEAD_MS, s, "SELL", "1", "1.00", "1.00", now_ms)
            else:
                continue
            out[spec.kind] = enc.envelope(name, payload) if self.combined else payload
        return list(out.values())

    def _subscribe(self, specs: list[StreamSpec]) -> None:
        for spec in specs:
            self.subs[spec.name] = spec
        # A /market stream on a legacy USD-M path is accepted but never delivers.
        self.server.hub.subscribe(self, [s.name for s in specs if delivers_on(s, self.route)])

    def _request(self, raw: bytes) -> bytes | None:
        try:
            req = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            return _error(3, f"Invalid JSON: {exc}", None)
        if not isinstance(req, dict):
            return _error(3, "Invalid JSON: expected an object", None)
        req_id = req.get("id")
        if not self._valid_id(req_id):
            return _error(2, "Invalid request: request ID must be an unsigned integer", None)
        unknown = set(req) - {"method", "params", "id"}
        if unknown:
            return _error(2, f"Invalid request: unknown field `{sorted(unknown)[0]}`", req_id)
        method = req.get("method")
        if method not in _METHODS:
            return _error(
                2,
                f"Invalid request: unknown variant `{method}`, expected one of "
                + ", ".join(f"`{m}`" for m in _METHODS) + " at line 1 column 28",
                req_id,
            )
        params = req.get("params", [])
        if not isinstance(params, list):
            return _error(2, "Invalid request: invalid type: params must be an array", req_id)
        if method == "LIST_SUBSCRIPTIONS":
            return orjson.dumps({"result": list(self.subs), "id": req_id})
        if method in ("SET_PROPERTY", "GET_PROPERTY"):
            return self._property(method, params, req_id)
        return self._change_subscriptions(method, params, req_id)

    def _valid_id(self, req_id: Any) -> bool:
        if isinstance(req_id, bool):
            return False
        if self.server.market == "futures":
            return isinstance(req_id, int) and req_id >= 0
        # Spot accepts a 64-bit integer, an alphanumeric string of up to 36 chars, or null.
        if req_id is None or (isinstance(req_id, int) and -(2**63) <= req_id < 2**63):
            return True
        return isinstance(req_id, str) and len(req_id) <= 36 and req_id.replace("-", "").isalnum()

    def _property(self, method: str, params: list[Any], req_id: Any) -> bytes:
        if not params or not isinstance(params[0], str):
            return _error(2, "Invalid request: property name must be a string", req_id)
        if params[0] != "combined":
            return _error(0, "Unknown property", req_id)
        if method == "GET_PROPERTY":
            return orjson.dumps({"result": self.combined, "id": req_id})
        if len(params) < 2 or not isinstance(params[1], bool):
            return _error(1, "Invalid value type: expected Boolean", req_id)
        self.combined = params[1]
        return orjson.dumps({"result": None, "id": req_id})

    def _change_subscriptions(self, method: str, params: list[Any], req_id: Any) -> bytes:
        specs = []
        for name in params:
            if not isinstance(name, str):
                return _error(2, "Invalid request: stream names must be strings", req_id)
            try:
                specs.append(self.server.parse(name))
            except StreamNameError as exc:
                return _error(2, f"Invalid request: {exc}", req_id)
        if method == "UNSUBSCRIBE":
            names = [s.name for s in specs if s.name in self.subs]
            for n in names:
                del self.subs[n]
            self.server.hub.unsubscribe(self, names)
            return orjson.dumps({"result": None, "id": req_id})
        new = list({s.name: s for s in specs if s.name not in self.subs}.values())
        limit = self.server.limits.max_streams
        if len(self.subs) + len(new) > limit:
            return _error(2, f"Invalid request: too many streams (at most {limit} per connection)",
                          req_id)
        self._subscribe(new)
        return orjson.dumps({"result": None, "id": req_id})


class WsServer:
    """The WebSocket endpoint of one market."""

    def __init__(
        self, hub: Hub, limits: MarketLimits, extra_streams: Callable[[str], StreamSpec | None]
    ) -> None:
        self.hub = hub
        self.market = hub.market
        self.limits = limits
        self.extra_streams = extra_streams
        self.conns: set[Connection] = set()
        self.server: asyncio.Server | None = None
        self.closed_total = 0
        self.rate_limited_total = 0
        self.slow_closed_total = 0
        self.lifetime_closed_total = 0
        self.pong_timeout_total = 0

    def parse(self, name: str) -> StreamSpec:
        extra = self.extra_streams(name)
        return extra if extra is not None else parse_stream(name, self.market)

    def _listener(self, request: WSUpgradeRequest) -> Any:
        path = request.path.decode("latin-1")
        split = split_ws_path(path, self.market)
        if split is None:
            return None  # picows answers 404
        route, kind, rest = split
        if kind == "ws":
            combined = False
            names = [n for n in rest.partition("?")[0].split("/") if n]
        else:
            combined = True
            names = [n for n in parse_qs(rest).get("streams", [""])[0].split("/") if n]
        names = list(dict.fromkeys(names))  # a repeated name is one subscription
        try:
            specs = [self.parse(n) for n in names]
        except StreamNameError as exc:
            return _refuse(400, {"code": -1100, "msg": str(exc)})
        if len(specs) > self.limits.max_streams:
            return _refuse(400, {"code": -1100, "msg": f"too many streams: {len(specs)} "
                                 f"(at most {self.limits.max_streams} per connection)"})
        return Connection(self, route, combined, specs)

    async def start(self, host: str, port: int, reuse_port: bool = False) -> int:
        self.server = await ws_create_server(
            self._listener, host, port, enable_auto_pong=False, reuse_port=reuse_port or None,
            websocket_handshake_timeout=5,
        )
        return int(self.server.sockets[0].getsockname()[1])

    def housekeeping(self, now: float) -> None:
        """Server pings, pong deadlines, stalls and connection lifetime; called ~4x a second."""
        lim = self.limits
        for conn in list(self.conns):
            t = conn.transport
            if t is None:
                continue
            if conn.stalled and conn.stalled_until and now >= conn.stalled_until:
                conn.stalled = False
            if now - conn.opened >= lim.max_lifetime_s:
                self.lifetime_closed_total += 1
                conn.close(WSCloseCode.GOING_AWAY, b"connection lifetime reached")
                continue
            if conn.unread:  # its pongs are not read: no pings, no pong deadline
                continue
            if conn.unanswered_since is not None and now - conn.unanswered_since > lim.pong_timeout_s:
                self.pong_timeout_total += 1
                t.disconnect(graceful=False)
                continue
            if not conn.stalled and now - conn.last_ping >= lim.ping_interval_s:
                conn.last_ping = now
                if conn.unanswered_since is None:
                    conn.unanswered_since = now
                conn.flush()
                t.send_ping(str(int(now * 1000)).encode())

    async def close(self) -> None:
        for conn in list(self.conns):
            conn.close(WSCloseCode.GOING_AWAY, b"server shutting down")
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    def stats(self) -> dict[str, Any]:
        return {
            "connections": len(self.conns),
            "closed_total": self.closed_total,
            "rate_limited_total": self.rate_limited_total,
            "slow_consumer_closed_total": self.slow_closed_total,
            "lifetime_closed_total": self.lifetime_closed_total,
            "pong_timeout_total": self.pong_timeout_total,
        }


def _refuse(status: int, body: dict[str, Any]) -> WSUpgradeResponseWithListener:
    resp = WSUpgradeResponse.create_error_response(
        status, orjson.dumps(body), {"Content-Type": "application/json"})
    return WSUpgradeResponseWithListener(resp, None)
