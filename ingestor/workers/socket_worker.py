"""Socket worker process: picows connections of combined streams, parsed and encoded here.

Each connection reconnects with exponential backoff and jitter. Frames go through one
``FrameHandler`` per market; finished batches go to the writer through ``Delivery`` (kept
until acknowledged). On stop: close the sockets, hand over every pending row, wait for the
writer's acknowledgements, exit.

Zero loss around the connection:

- a stall (no data, no pong) is found within ``PING_IDLE_S + PING_REPLY_S`` and the
  connection replaced; a drop or a server close reconnects at once;
- what a lost connection missed: trade ids are asked from the REST worker (backfill),
  depth gaps are recorded (the feature worker resyncs its books), streams without ids
  (mark prices, liquidations) get a time gap;
- before the exchange's 24 h limit (``connection_max_age_s``), a connection is rotated
  make-before-break: the new one is opened and its frames held while the old one still
  delivers; once the new one has shown it works (a data frame, or for a quiet connection
  a pong), the old one is closed with the closing handshake (all the server sent on it
  before our close arrives) and the held frames follow. A message delivered by both is
  dropped the second time by the sequence checks. An old connection that does not close
  in time is aborted; a rotation that fails is tried again within minutes;
- each connection's task is owned by the worker: a failure of our own in it is logged
  and the connection starts over after a backoff (the sequence checks find what it missed);
  a task that ends otherwise ends the worker loudly.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

from picows import WSCloseCode, WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

from ingestor.binance.plan import Connection
from ingestor.binance.sequence import KIND_OF_TABLE, Gap, Positions
from ingestor.binance.streams import DEFAULT_LIMITS, Market
from ingestor.config import Settings
from ingestor.wire.batching import Batch, Batcher
from ingestor.wire.child import ChildContext, run_child
from ingestor.wire.delivery import Delivery, WriterLink
from ingestor.wire.feed import FEED_QUEUE_MAX, Feed, MarketFeed, TradeGapRequest, put_bounded
from ingestor.workers.frames import FrameHandler, closed_at_once

log = logging.getLogger(__name__)

FLUSH_PERIOD_S = 0.05
ACK_WAIT_S = 20.0  # at stop, how long to wait for the writer to acknowledge the last batches
STATUS_PERIOD_S = 1.0
POSITIONS_PERIOD_S = 2.0  # how often the sequence positions go to the supervisor (for a restart)
# Client pings when idle: a silent socket (a stall, a dead peer) is found within
# IDLE + REPLY seconds. Binance counts pings against the incoming-message limit, so
# only when idle, and well under it.
PING_IDLE_S = 3.0
PING_REPLY_S = 3.0
# A rotation's new connection must deliver a frame or answer a ping within this, or the
# rotation is retried (see rotation_retry_delay).
ROTATION_PROOF_TIMEOUT_S = 15.0
ROTATION_RETRY_S = 30.0
ROTATION_RETRY_MAX_S = 300.0
ROTATION_RETRY_MIN_S = 5.0
# The exchange closes a connection at 24 h ("A single connection ... is only valid for 24
# hours", both markets' WebSocket docs; DEFAULT_LIMITS): a rotation is due this much before
# it at the latest, whatever --connection-max-age-s says.
ROTATION_MARGIN_S = 300.0
# A connection we close (rotated out, or at stop) has this long for the closing handshake;
# then it is aborted: a peer that stopped reading would otherwise hold it open for good.
CLOSE_TIMEOUT_S = 5.0
# A connection task that failed on an error of ours starts over after this, doubling up to 30 s.
TASK_RESTART_S = 1.0
# Streams without ids, by the kind FrameHandler names their time gaps with.
_TIME_STREAMS = {"!markPrice@arr": "markPrice", "!forceOrder@arr": "forceOrder"}


class _Listener(WSListener):
    """One picows connection. While ``held`` is a list (a rotation's new connection), its
    frames wait there instead of going to the handler."""

    def __init__(self, conn: StreamConnection, held: list[bytes] | None = None) -> None:
        self.conn = conn
        self.held = held
        self.transport: WSTransport | None = None
        self.connected = False
        self.flowing = asyncio.Event()
        self.closed = asyncio.Event()
        self.close_reason = ""  # why it closed, for the reconnect's log line
        self.closing_reason = ""  # set when this side closes it (picows sends no close frame then)

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport
        self.connected = True
        self.conn.listeners.add(self)
        if self.conn.reading_paused:  # opened while over budget (a rotation): no data until there is room
            _pause(transport)

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type == WSMsgType.TEXT and frame.fin:
            payload = frame.get_payload_as_bytes()
            if self.held is not None:
                self.held.append(payload)
                self.flowing.set()
            else:
                self.conn.on_text(self, payload)
        elif frame.msg_type in (WSMsgType.TEXT, WSMsgType.CONTINUATION, WSMsgType.BINARY):
            self.conn.handler.reject("frame_type", b"")  # Binance sends whole text frames only
        elif frame.msg_type == WSMsgType.CLOSE:  # the server's close (or its answer to ours): nothing follows
            transport.disconnect()

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.close_reason = self.closing_reason or _close_reason(transport)
        self.connected = False
        self.transport = None
        self.conn.listeners.discard(self)
        self.closed.set()


def _pause(transport: WSTransport) -> None:
    # Not reading the socket: the kernel's receive buffer fills and TCP stops the sender.
    under = transport.underlying_transport
    if under.is_reading():
        under.pause_reading()


def _resume(transport: WSTransport) -> None:
    under = transport.underlying_transport
    if not under.is_closing() and not under.is_reading():
        under.resume_reading()


def _close_reason(transport: WSTransport) -> str:
    """From the close frames: the exchange's (a code and its reason), or picows's own (a ping
    not answered in time); none at all is a dropped connection."""
    handshake = transport.close_handshake
    for who, info in (("closed by the server", getattr(handshake, "recv", None)),
                      ("closed here", getattr(handshake, "sent", None))):
        if info is not None:
            return f"{who}: {int(info.code)} {info.reason}".rstrip()
    return "dropped, no close frame"


class StreamConnection:
    def __init__(self, conn: Connection, url: str, handler: FrameHandler, settings: Settings) -> None:
        self.spec = conn
        self.url = url
        self.handler = handler
        self.settings = settings
        self.listener: _Listener | None = None
        self.reconnects = 0
        self.connect_failures = 0
        self.rotations = 0
        self.rotation_failures = 0  # in a row, since the connection in service was opened
        self.rotate_at = 0.0  # monotonic time the connection in service is due for rotation
        self.cut_at = 0.0  # and when the exchange will close it (its 24 h lifetime)
        self.forced_closes = 0
        self.task_failures = 0
        self.last_message = 0.0
        self.time_kinds = {kind for prefix, kind in _TIME_STREAMS.items()
                           if any(st.startswith(prefix) for st in conn.streams)}
        # Back-pressure (the worker's Delivery over budget): every open connection of this
        # one, a rotation's new one included, stops reading; ``room`` is awaited before a
        # reconnect, so a connection lost while paused is reopened only once there is room.
        self.listeners: set[_Listener] = set()
        self.reading_paused = False
        self.room: Callable[[ChildContext], Awaitable[bool]] | None = None

    @property
    def connected(self) -> bool:
        return self.listener is not None and self.listener.connected

    def on_text(self, listener: _Listener, payload: bytes) -> None:
        self.last_message = time.monotonic()
        if len(payload) > self.settings.max_frame_bytes:
            self.handler.reject("oversize", payload)
            if listener.transport is not None:
                listener.closing_reason = f"a frame over max_frame_bytes ({len(payload)} bytes)"
                listener.transport.disconnect()
            return
        self.handler.on_frame(payload)

    def pause_reading(self) -> None:
        self.reading_paused = True
        for listener in self.listeners:
            if listener.transport is not None:
                _pause(listener.transport)

    def resume_reading(self) -> None:
        self.reading_paused = False
        for listener in self.listeners:
            if listener.transport is not None:
                _resume(listener.transport)

    async def wait_for_room(self, ctx: ChildContext) -> bool:
        """Before a (re)connect: until the worker takes data again (True) or stops (False).
        Reconnecting over budget would only read what cannot be kept."""
        if self.room is None or not self.reading_paused:
            return not ctx.should_stop()
        log.warning("%s %s: not reconnecting until the writer has made room (--max-buffer-mb)", self.spec.market,
                    self.spec.route, extra=self._context("reconnect_held"))
        return await self.room(ctx)

    async def _open(self, held: list[bytes] | None = None) -> _Listener:
        listener = _Listener(self, held)
        await asyncio.wait_for(ws_connect(
            lambda: listener, self.url,
            enable_auto_ping=True, auto_ping_idle_timeout=PING_IDLE_S, auto_ping_reply_timeout=PING_REPLY_S,
            max_frame_size=self.settings.max_frame_bytes + 1024, logger_name=f"ingestor.ws.{self.spec.market}",
        ), 15.0)
        return listener

    async def run_owned(self, ctx: ChildContext) -> None:
        """``run`` until the worker stops, whatever goes wrong in it. The connection's own faults
        are handled inside; an error of ours that escapes is logged with its traceback, the
        connection is aborted and all starts over after a backoff (the gap is found and recorded
        as for any reconnect). Test: tests/chaos/test_connection_faults.py
        (test_a_connection_task_that_fails_is_restarted)."""
        failures = 0
        while not ctx.should_stop():
            try:
                await self.run(ctx)
                return
            except Exception as exc:  # noqa: BLE001 - logged with its traceback, and owned: started over
                failures += 1
                self.task_failures += 1
                delay = min(30.0, TASK_RESTART_S * 2 ** (failures - 1))
                log.exception("%s %s: the connection task failed (%s); starting it over in %.0f s", self.spec.market,
                              self.spec.route, exc, delay, extra=self._context(
                                  "connection_task_failed", reason=repr(exc), failures=failures, delay_s=delay))
                listener, self.listener = self.listener, None
                if listener is not None and listener.transport is not None:
                    listener.transport.disconnect(graceful=False)
                if self.time_kinds:
                    self.handler.connection_lost(self.time_kinds)
                await _sleep_unless_stopping(ctx, delay)

    async def run(self, ctx: ChildContext) -> None:
        attempt = 0
        while not ctx.should_stop():
            if not await self.wait_for_room(ctx):
                return
            try:
                self.listener = await self._open()
            except Exception as exc:  # noqa: BLE001 - DNS, TCP, TLS, handshake: all mean "try again"
                attempt += 1
                self.connect_failures += 1
                delay = min(30.0, 0.5 * 2 ** min(attempt, 6)) * random.uniform(0.5, 1.0)
                log.warning("%s %s: connect failed (%s); retrying in %.1f s", self.spec.market, self.spec.route,
                            exc, delay, extra=self._context("connect_failed", reason=str(exc) or type(exc).__name__,
                                                            attempt=attempt, delay_s=round(delay, 2)))
                await _sleep_unless_stopping(ctx, delay)
                continue
            if attempt:  # back after failed connects (a plain reconnect has had its line)
                log.info("%s %s: connected (%d streams) after %d failed attempt(s)", self.spec.market,
                         self.spec.route, len(self.spec.streams), attempt,
                         extra=self._context("connected", attempt=attempt))
            attempt = 0
            self._in_service()
            while True:  # this connection, and the ones that replace it by rotation
                outcome = await self._serve(ctx)
                if outcome != "rotate":
                    break
                await self._rotate(ctx)
            if outcome == "stop":
                return
            self.reconnects += 1
            if self.time_kinds:
                self.handler.connection_lost(self.time_kinds)
            delay = random.uniform(0.1, 0.5)
            reason = self.listener.close_reason if self.listener is not None else ""
            log.warning("%s %s: disconnected (%s); reconnecting in %.1f s", self.spec.market, self.spec.route,
                        reason, delay, extra=self._context("reconnect", reason=reason, reconnects=self.reconnects,
                                                           delay_s=round(delay, 2)))
            await _sleep_unless_stopping(ctx, delay)

    async def _serve(self, ctx: ChildContext) -> str:
        """Until the connection is lost ("lost"), the worker stops ("stop") or it is due for
        rotation ("rotate")."""
        listener = self.listener
        assert listener is not None
        stop = asyncio.ensure_future(ctx.stopping.wait())
        lost = asyncio.ensure_future(listener.closed.wait())
        try:
            rotating = self.settings.connection_max_age_s > 0
            timeout = max(0.0, self.rotate_at - time.monotonic()) if rotating else None
            await asyncio.wait((stop, lost), timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            lost.cancel()
        if ctx.should_stop():
            await self._close(listener, "stopping")
            return "stop"
        return "lost" if listener.closed.is_set() else "rotate"

    async def _rotate(self, ctx: ChildContext) -> None:
        """Make-before-break. Either the new connection serves after this, or the old one still
        does (or has been lost meanwhile: ``_serve`` then sees it) and the rotation is due again
        after a backoff. Tests: tests/chaos/test_connections.py (rotation), and
        tests/chaos/test_connection_faults.py (an old connection that will not close, a quiet one)."""
        old = self.listener
        assert old is not None
        held: list[bytes] = []
        try:
            new = await self._open(held)
        except Exception as exc:  # noqa: BLE001 - the old connection still serves: try again later
            self._rotation_failed(f"connect: {str(exc) or type(exc).__name__}")
            return
        switched = False
        try:
            if not await self._proven(new, ctx):
                if not ctx.should_stop():
                    self._rotation_failed(f"the new connection closed ({new.close_reason})" if new.closed.is_set()
                                          else f"the new connection neither delivered nor answered a ping in "
                                               f"{ROTATION_PROOF_TIMEOUT_S:.0f} s")
                return
            # Everything the old one was sent before our close arrives and is handled; then the
            # new one's frames, held since it opened (they overlap the old one's last ones: the
            # sequence checks drop those).
            await self._close(old, "rotated")
            self.listener = new
            for payload in held:
                self.on_text(new, payload)
            new.held = None
            switched = True
        finally:
            if not switched and new.transport is not None:  # it must not hold frames for good
                new.transport.disconnect(graceful=False)
        self.rotations += 1
        self._in_service()
        log.info("%s %s: connection rotated (make-before-break, %d frames held)", self.spec.market,
                 self.spec.route, len(held), extra=self._context("rotation", held_frames=len(held),
                                                                 rotations=self.rotations))

    def _in_service(self) -> None:
        """A new connection serves: its rotation is due at the configured age, and before the
        exchange's cut at the latest."""
        now = time.monotonic()
        lifetime = DEFAULT_LIMITS[self.spec.market].max_lifetime_s
        self.rotation_failures = 0
        self.cut_at = now + lifetime
        self.rotate_at = now + min(self.settings.connection_max_age_s, lifetime - ROTATION_MARGIN_S)

    def _rotation_failed(self, reason: str) -> None:
        self.rotation_failures += 1
        delay = rotation_retry_delay(self.rotation_failures, self.cut_at - time.monotonic())
        self.rotate_at = time.monotonic() + delay
        log.warning("%s %s: rotation failed (%s); keeping the old connection, trying again in %.0f s",
                    self.spec.market, self.spec.route, reason, delay,
                    extra=self._context("rotation_failed", reason=reason, attempt=self.rotation_failures,
                                        delay_s=delay))

    async def _proven(self, new: _Listener, ctx: ChildContext) -> bool:
        """Whether a rotation's new connection works: it delivered a frame, or answered a ping
        (a quiet connection, e.g. liquidations only, may have nothing to send for minutes)."""
        if new.transport is None:
            return False
        flowing = asyncio.ensure_future(new.flowing.wait())
        pong = asyncio.ensure_future(new.transport.measure_roundtrip_time(1))
        others = (asyncio.ensure_future(ctx.stopping.wait()), asyncio.ensure_future(new.closed.wait()))
        try:
            await asyncio.wait((flowing, pong, *others), timeout=ROTATION_PROOF_TIMEOUT_S,
                               return_when=asyncio.FIRST_COMPLETED)
            answered = pong.done() and not pong.cancelled() and pong.exception() is None
            return new.connected and (flowing.done() or answered)
        finally:
            for waiter in (flowing, pong, *others):
                waiter.cancel()

    async def _close(self, listener: _Listener, why: str) -> None:
        """Close a connection with the closing handshake, so that what the server sent before
        our close still arrives; one that has not closed within CLOSE_TIMEOUT_S is aborted (a
        peer that stopped reading: not even our close frame can leave, and a graceful close
        would wait for the send buffer for good). Test: tests/chaos/test_connection_faults.py
        (test_a_rotation_whose_old_connection_will_not_close_loses_nothing)."""
        transport = listener.transport
        if transport is None or listener.closed.is_set():
            return
        listener.closing_reason = why
        transport.send_close(WSCloseCode.OK, why.encode())
        try:
            await asyncio.wait_for(listener.closed.wait(), CLOSE_TIMEOUT_S)
            return
        except TimeoutError:
            pass
        self.forced_closes += 1
        log.warning("%s %s: the %s connection did not close within %.0f s; aborted", self.spec.market,
                    self.spec.route, why, CLOSE_TIMEOUT_S, extra=self._context("close_forced", reason=why))
        if listener.transport is not None:
            listener.transport.disconnect(graceful=False)
        # An abort closes at once: still open after this is a fault of ours, for run_owned.
        await asyncio.wait_for(listener.closed.wait(), CLOSE_TIMEOUT_S)

    def _context(self, event: str, **fields: Any) -> dict[str, Any]:
        """A log line's fields: the event and which connection."""
        return {"event": event, "market": self.spec.market, "route": self.spec.route,
                "streams": len(self.spec.streams), **fields}


def rotation_retry_delay(failures: int, cut_in_s: float) -> float:
    """Seconds until a failed rotation is tried again: 30 s, doubling up to 5 min, and at
    most half the time left before the exchange's cut (never under 5 s), so that attempts
    go on until the cut. With the default age (23.5 h) that is eight attempts or more.
    Test: tests/chaos/test_connection_faults.py (test_a_failed_rotation_is_retried_before_the_cut)."""
    backoff = min(ROTATION_RETRY_MAX_S, ROTATION_RETRY_S * 2 ** min(failures - 1, 16))
    return max(ROTATION_RETRY_MIN_S, min(backoff, cut_in_s / 2))


async def _sleep_unless_stopping(ctx: ChildContext, delay: float) -> None:
    try:
        await asyncio.wait_for(ctx.stopping.wait(), delay)
    except TimeoutError:
        pass


class SocketWorker:
    def __init__(self, ctx: ChildContext, connections: list[Connection], symbols: dict[Market, list[str]],
                 link: WriterLink, status_queue: Any, feature_queue: Any = None, request_queue: Any = None,
                 positions: dict[Market, Positions] | None = None) -> None:
        self.ctx = ctx
        self.settings = s = ctx.settings
        self.delivery = Delivery(ctx.name, link)
        self.status_queue = status_queue
        self.batcher = Batcher(self._send, batch_rows=s.batch_rows, batch_age_s=s.batch_age_ms / 1000,
                               producer=ctx.name)
        markets = {c.market for c in connections}
        # The feature worker's copy of what is stored, handed on every flush period.
        self.feature_queue = feature_queue
        self.feeds = {m: MarketFeed(m, self._to_features) for m in markets} if feature_queue is not None else {}
        self.last_drop_log = 0.0
        self.handlers = {
            m: FrameHandler(m, self.batcher, symbols=frozenset(symbols.get(m, ())), on_gap=self._on_gap,
                            feed=self.feeds.get(m))
            for m in markets
        }
        self.conns = [StreamConnection(c, c.url(s.ws_url(c.market)), self.handlers[c.market], s)
                      for c in connections]
        self.reading_paused = False
        for c in self.conns:
            c.room = self._room
        self.request_queue = request_queue
        self.backfills_asked = 0
        if positions:  # a predecessor died: carry on from where its sequences stood
            for m, h in self.handlers.items():
                if positions.get(m):
                    h.seed(positions[m], {k for c in self.conns if c.spec.market == m for k in c.time_kinds})
                    # Safe from the start: this worker's reports carry them until its own
                    # batches are acknowledged, so a successor never starts blind
                    # (tests/chaos/test_restarts.py).
                    for kind, state in positions[m].items():
                        self.delivery.safe.setdefault(kind, {})[m] = dict(state)
            log.info("carrying on from the sequence positions of the worker this one replaces")
        self.totals: Any = None  # metrics.Totals, created on the first report (after import)
        self._last_status: tuple[int, float] | None = None

    def _to_features(self, feed: Feed) -> bool:
        """Hand a Feed to the feature worker unless it is FEED_QUEUE_MAX items behind: the
        recording never waits for the indicators, and the worker's memory stays bounded.
        (qsize counts what every producer put and the worker has not taken yet.)"""
        if self.ctx.should_stop():  # the last Feeds at a stop: the worker drains them all
            self.feature_queue.put(feed)
            return True
        if put_bounded(self.feature_queue, feed, FEED_QUEUE_MAX):
            return True
        now = time.monotonic()
        if now - self.last_drop_log >= 10.0:
            self.last_drop_log = now
            log.warning("the feature worker is %d batches behind: %s %s messages not handed to it (stored all "
                        "the same; `ingestor features replay` computes their bars from the database)",
                        FEED_QUEUE_MAX, feed.market, feed.kind)
        return False

    def _send(self, batch: Batch) -> None:
        # A batch of one table holds every row of it received so far: the sequence positions
        # of that kind, taken now, are safe once the batch is acknowledged. Those are what a
        # successor carries on from (a dict copy per batch, not per message).
        kind = KIND_OF_TABLE.get(batch.table)
        mark = None if kind is None else (kind, {m: h.seq.positions(kind)[kind] for m, h in self.handlers.items()})
        self.delivery.send(batch, mark)
        if self.delivery.paused and not self.reading_paused:
            self._apply_backpressure()  # at once: the frames already read are the overshoot

    def _apply_backpressure(self) -> None:
        """Sockets read while the writer's unacknowledged batches are within budget, and
        not while over it (tests/chaos/test_stalled_writer.py)."""
        if self.delivery.paused and not self.reading_paused:
            self.reading_paused = True
            for c in self.conns:
                c.pause_reading()
        elif self.reading_paused and not self.delivery.paused:
            self.reading_paused = False
            for c in self.conns:
                c.resume_reading()

    async def _room(self, ctx: ChildContext) -> bool:
        ok = await self.delivery.wait_for_room(ctx.should_stop)
        self._apply_backpressure()
        return ok

    def safe_positions(self) -> dict[Market, Positions]:
        """Per market, the sequence positions of data the writer has acknowledged."""
        out: dict[Market, Positions] = {}
        for kind, by_market in self.delivery.safe_marks().items():
            for m, state in by_market.items():
                out.setdefault(m, {})[kind] = state
        return out

    def _on_gap(self, market: Market, gap: Gap, detected_ms: int) -> None:
        # As FrameHandler records it; a trade gap's backfill logs its own line when it closes it.
        how = "unrecoverable" if closed_at_once(gap.stream) else "open"
        log.warning("%s %s %s: gap, ids %d..%d missing (%s)", market, gap.symbol, gap.stream, gap.from_id,
                    gap.to_id, "a backfill follows" if how == "open" else how, extra={
                        "event": "gap", "market": market, "symbol": gap.symbol, "stream": gap.stream,
                        "from_id": gap.from_id, "to_id": gap.to_id, "missing": gap.to_id - gap.from_id + 1,
                        "from_ms": gap.from_ms, "to_ms": gap.to_ms, "closed_how": how})
        if gap.stream == "aggTrade" and self.request_queue is not None:
            self.request_queue.put(TradeGapRequest(market, gap.symbol, gap.from_id, gap.to_id, gap.from_ms,
                                                   gap.to_ms, detected_ms))
            self.backfills_asked += 1

    async def run(self) -> None:
        tasks = [asyncio.ensure_future(c.run_owned(self.ctx)) for c in self.conns]
        last_status = last_positions = 0.0
        while not self.ctx.should_stop():
            await asyncio.sleep(FLUSH_PERIOD_S)
            if any(t.done() for t in tasks):  # they end only at stop: anything else is a fault of ours
                break
            self.batcher.flush()
            self.delivery.poll()
            self._apply_backpressure()
            for feed in self.feeds.values():
                feed.flush()
            now = time.monotonic()
            if now - last_status >= STATUS_PERIOD_S:
                last_status = now
                self.report(positions=now - last_positions >= POSITIONS_PERIOD_S)
                if now - last_positions >= POSITIONS_PERIOD_S:
                    last_positions = now
        ended = [t for t in tasks if t.done()] if not self.ctx.should_stop() else []
        self.ctx.stopping.set()  # the other connections close too
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        for h in self.handlers.values():
            h.close_time_gaps()
        self.batcher.flush(force=True)
        for feed in self.feeds.values():
            feed.flush()
        await self.delivery.wait_acked(ACK_WAIT_S)
        self.report()
        # What is held is handed over above; then a task's failure ends the worker loudly (a
        # non-zero exit: the supervisor starts another, which carries on from the positions).
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        if ended:
            raise RuntimeError(f"{len(ended)} connection task(s) ended while the worker was running")

    def report(self, positions: bool = False) -> None:
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
            for stream, n in h.gaps.items():
                self.totals.set(M.GAPS.labels(w, m, stream), n)
                if closed_at_once(stream):  # recorded closed when found: detected is closed
                    self.totals.set(M.GAPS_CLOSED.labels(w, m, stream, "unrecoverable"), n)
            reconnects = sum(c.reconnects for c in self.conns if c.spec.market == m)
            self.totals.set(M.RECONNECTS.labels(w, m), reconnects)
            self.totals.set(M.CONNECT_FAILURES.labels(w, m),
                            sum(c.connect_failures for c in self.conns if c.spec.market == m))
            self.totals.set(M.ROTATIONS.labels(w, m), sum(c.rotations for c in self.conns if c.spec.market == m))
            M.CONNECTED.labels(w, m).set(sum(len(c.spec.streams) for c in self.conns
                                             if c.spec.market == m and c.connected))
        for table, n in self.batcher.sent_rows.items():
            self.totals.set(M.ROWS_SENT.labels(w, table), n)
        M.BUFFER_BYTES.labels(w).set(self.delivery.pending_bytes)
        M.BACKPRESSURE.labels(w).set(int(self.delivery.paused))
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
            "gaps": sum(sum(h.gaps.values()) for h in self.handlers.values()),
            "pending_rows": self.batcher.pending_rows(), "unacked_batches": len(self.delivery.pending),
            "rotations": sum(c.rotations for c in self.conns), "backfills_asked": self.backfills_asked,
            "forced_closes": sum(c.forced_closes for c in self.conns),
            "task_failures": sum(c.task_failures for c in self.conns),
            "feature_dropped": sum(f.dropped for f in self.feeds.values()),
            **self.delivery.status(),
            **({"positions": self.safe_positions()} if positions else {}),
        })



def main(settings: Settings, name: str, connections: list[Connection], symbols: dict[Market, list[str]],
         link: WriterLink, status_queue: Any, stop_event: Any, feature_queue: Any = None,
         request_queue: Any = None, positions: dict[Market, Positions] | None = None) -> None:
    """Process entry point (spawned by the supervisor)."""

    async def body(ctx: ChildContext) -> None:
        await SocketWorker(ctx, connections, symbols, link, status_queue, feature_queue, request_queue,
                           positions).run()
        queues = (link.queue, feature_queue) if ctx.orphaned else ()
        ctx.release_queues(status_queue, *(q for q in queues if q is not None))

    run_child(settings, name, stop_event, body)
