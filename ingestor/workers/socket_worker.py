"""Socket worker process: picows connections of combined streams, parsed and encoded here.

Each connection reconnects with exponential backoff and jitter. Frames go through one
``FrameHandler`` per market; finished batches go to the writer's queue whole (one
pickled object per batch, never per row). On stop: close the sockets, hand over every
pending row, exit (the queue's feeder thread is joined at exit, so nothing is left in
this process).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from typing import Any

from picows import WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

from ingestor.binance.plan import Connection
from ingestor.binance.sequence import Gap
from ingestor.binance.streams import Market
from ingestor.config import Settings
from ingestor.features.feed import MarketFeed
from ingestor.workers.batching import Batcher
from ingestor.workers.child import ChildContext, run_child
from ingestor.workers.delivery import Delivery, WriterLink
from ingestor.workers.frames import FrameHandler

log = logging.getLogger(__name__)

FLUSH_PERIOD_S = 0.05
ACK_WAIT_S = 20.0  # at stop, how long to wait for the writer to acknowledge the last batches
STATUS_PERIOD_S = 1.0
# Client pings when idle: a silent socket (a stall, a dead peer) is found within
# IDLE + REPLY seconds. Binance counts pings against the incoming-message limit, so
# only when idle.
PING_IDLE_S = 10.0
PING_REPLY_S = 10.0


class _Listener(WSListener):
    def __init__(self, conn: StreamConnection) -> None:
        self.conn = conn

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.conn.on_connected(transport)

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type == WSMsgType.TEXT and frame.fin:
            self.conn.on_text(frame.get_payload_as_bytes())
        elif frame.msg_type in (WSMsgType.TEXT, WSMsgType.CONTINUATION, WSMsgType.BINARY):
            self.conn.handler.reject("frame_type", b"")  # Binance sends whole text frames only

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.conn.on_disconnected()


class StreamConnection:
    def __init__(self, conn: Connection, url: str, handler: FrameHandler, settings: Settings) -> None:
        self.spec = conn
        self.url = url
        self.handler = handler
        self.settings = settings
        self.transport: WSTransport | None = None
        self.connected = False
        self.reconnects = 0
        self.last_message = 0.0
        self.disconnected = asyncio.Event()

    def on_connected(self, transport: WSTransport) -> None:
        self.transport = transport
        self.connected = True
        self.disconnected.clear()

    def on_text(self, payload: bytes) -> None:
        self.last_message = time.monotonic()
        if len(payload) > self.settings.max_frame_bytes:
            self.handler.reject("oversize", payload)
            if self.transport is not None:
                self.transport.disconnect()
            return
        self.handler.on_frame(payload)

    def on_disconnected(self) -> None:
        self.connected = False
        self.transport = None
        self.disconnected.set()

    async def run(self, ctx: ChildContext) -> None:
        attempt = 0
        while not ctx.should_stop():
            try:
                await asyncio.wait_for(ws_connect(
                    lambda: _Listener(self), self.url,
                    enable_auto_ping=True, auto_ping_idle_timeout=PING_IDLE_S,
                    auto_ping_reply_timeout=PING_REPLY_S,
                    max_frame_size=self.settings.max_frame_bytes + 1024,
                    logger_name=f"ingestor.ws.{self.spec.market}",
                ), 15.0)
            except Exception as exc:  # noqa: BLE001 - DNS, TCP, TLS, handshake: all mean "try again"
                attempt += 1
                delay = min(30.0, 0.5 * 2 ** min(attempt, 6)) * random.uniform(0.5, 1.0)
                log.warning("%s %s: connect failed (%s); retrying in %.1f s", self.spec.market, self.spec.route,
                            exc, delay)
                await _sleep_unless_stopping(ctx, delay)
                continue
            if attempt or self.reconnects:
                log.info("%s %s: connected (%d streams)", self.spec.market, self.spec.route,
                         len(self.spec.streams))
            attempt = 0
            stop = asyncio.ensure_future(ctx.stopping.wait())
            lost = asyncio.ensure_future(self.disconnected.wait())
            await asyncio.wait((stop, lost), return_when=asyncio.FIRST_COMPLETED)
            stop.cancel()
            lost.cancel()
            if ctx.should_stop():
                if self.transport is not None:
                    self.transport.disconnect()
                    await asyncio.wait_for(self.disconnected.wait(), 5.0)
                return
            self.reconnects += 1
            delay = random.uniform(0.1, 0.5)
            log.warning("%s %s: disconnected; reconnecting in %.1f s", self.spec.market, self.spec.route, delay)
            await _sleep_unless_stopping(ctx, delay)


async def _sleep_unless_stopping(ctx: ChildContext, delay: float) -> None:
    try:
        await asyncio.wait_for(ctx.stopping.wait(), delay)
    except TimeoutError:
        pass


class SocketWorker:
    def __init__(self, ctx: ChildContext, connections: list[Connection], symbols: dict[Market, list[str]],
                 link: WriterLink, status_queue: Any, feature_queue: Any = None) -> None:
        self.ctx = ctx
        self.settings = s = ctx.settings
        self.delivery = Delivery(ctx.name, link)
        self.status_queue = status_queue
        self.batcher = Batcher(self.delivery.send, batch_rows=s.batch_rows, batch_age_s=s.batch_age_ms / 1000,
                               producer=ctx.name)
        markets = {c.market for c in connections}
        # The feature worker's copy of what is stored, handed on every flush period.
        self.feeds = {m: MarketFeed(m, feature_queue.put) for m in markets} if feature_queue is not None else {}
        self.handlers = {
            m: FrameHandler(m, self.batcher, symbols=frozenset(symbols.get(m, ())), on_gap=self._on_gap,
                            feed=self.feeds.get(m))
            for m in markets
        }
        self.conns = [StreamConnection(c, c.url(s.ws_url(c.market)), self.handlers[c.market], s)
                      for c in connections]
        self.totals: Any = None  # metrics.Totals, created on the first report (after import)
        self._last_status: tuple[int, float] | None = None

    def _on_gap(self, market: Market, gap: Gap) -> None:
        log.warning("%s %s %s: gap, ids %d..%d missing", market, gap.symbol, gap.stream, gap.from_id, gap.to_id)

    async def run(self) -> None:
        tasks = [asyncio.ensure_future(c.run(self.ctx)) for c in self.conns]
        last_status = 0.0
        while not self.ctx.should_stop():
            await asyncio.sleep(FLUSH_PERIOD_S)
            self.batcher.flush()
            self.delivery.poll()
            for feed in self.feeds.values():
                feed.flush()
            now = time.monotonic()
            if now - last_status >= STATUS_PERIOD_S:
                last_status = now
                self.report()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.batcher.flush(force=True)
        for feed in self.feeds.values():
            feed.flush()
        await self.delivery.wait_acked(ACK_WAIT_S)
        self.report()

    def report(self) -> None:
        """Metrics as deltas since the last report, and a status line for /health."""
        from ingestor import metrics as M

        if self.totals is None:
            self.totals = M.Totals()
        w = self.ctx.name
        for m, h in self.handlers.items():
            for event, n in h.messages.items():
                self.totals.set(M.MESSAGES.labels(w, m, event), n)
            for reason, n in h.rejected.items():
                self.totals.set(M.REJECTED.labels(w, m, reason), n)
            self.totals.set(M.BYTES.labels(w, m), h.bytes_in)
            self.totals.set(M.STALE.labels(w, m), h.stale)
            for stream in ("aggTrade", "depth"):
                n = sum(1 for g in h.gaps if g.stream == stream)
                self.totals.set(M.GAPS.labels(w, m, stream), n)
            reconnects = sum(c.reconnects for c in self.conns if c.spec.market == m)
            self.totals.set(M.RECONNECTS.labels(w, m), reconnects)
            M.CONNECTED.labels(w, m).set(sum(len(c.spec.streams) for c in self.conns
                                             if c.spec.market == m and c.connected))
        for table, n in self.batcher.sent_rows.items():
            self.totals.set(M.ROWS_SENT.labels(w, table), n)
        now = time.monotonic()
        msgs = sum(sum(h.messages.values()) for h in self.handlers.values())
        prev = self._last_status
        rate = 0.0 if prev is None else (msgs - prev[0]) / max(now - prev[1], 1e-9)
        self._last_status = (msgs, now)
        last = max((c.last_message for c in self.conns), default=0.0)
        self.status_queue.put({
            "worker": self.ctx.name, "kind": "socket", "time": time.time(),
            "streams": sum(len(c.spec.streams) for c in self.conns),
            "connected_streams": sum(len(c.spec.streams) for c in self.conns if c.connected),
            "connections": len(self.conns), "connected": sum(1 for c in self.conns if c.connected),
            "messages": msgs, "msgs_per_s": round(rate, 1),
            "last_message_age_s": None if not last else round(now - last, 3),
            "reconnects": sum(c.reconnects for c in self.conns),
            "rejected": sum(sum(h.rejected.values()) for h in self.handlers.values()),
            "gaps": sum(len(h.gaps) for h in self.handlers.values()),
            "pending_rows": self.batcher.pending_rows(),
        })



def main(settings: Settings, name: str, connections: list[Connection], symbols: dict[Market, list[str]],
         link: WriterLink, status_queue: Any, stop_event: Any, feature_queue: Any = None) -> None:
    """Process entry point (spawned by the supervisor)."""

    async def body(ctx: ChildContext) -> None:
        await SocketWorker(ctx, connections, symbols, link, status_queue, feature_queue).run()
        queues = (link.queue, feature_queue) if ctx.orphaned else ()
        ctx.release_queues(status_queue, *(q for q in queues if q is not None))

    run_child(settings, name, stop_event, body)
