"""The socket worker's frame path, without I/O: parse, check sequence, encode, batch.

``FrameHandler`` takes WebSocket text frames (combined-stream envelopes or raw-stream
payloads), turns each known event into a COPY tuple for its table, and hands complete
batches to its ``Batcher``. Anything it cannot use is counted by reason and skipped: input never
raises out of here.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import orjson

from ingestor.binance.sequence import Gap, Implausible, Positions, SequenceTracker
from ingestor.binance.streams import Market
from ingestor.wire import rows
from ingestor.wire.batching import Batch, Batcher
from ingestor.wire.copy_binary import EncodeError
from ingestor.wire.feed import MarketFeed

log = logging.getLogger(__name__)

_ENVELOPE_HEAD = b'{"stream":"'
_DATA_KEY = b'","data":'


def split_envelope(frame: bytes) -> tuple[str, bytes] | None:
    """``{"stream":"<name>","data":<payload>}`` -> (name, payload bytes), cut, not re-serialized.

    Binance writes the stream name first and the payload last; anything else is None.
    """
    if not frame.startswith(_ENVELOPE_HEAD):
        return None
    end = frame.find(_DATA_KEY, len(_ENVELOPE_HEAD))
    if end < 0:
        return None
    body = frame.rstrip()
    if not body.endswith(b"}"):
        return None
    payload = body[end + len(_DATA_KEY) : -1].strip()
    if not payload or payload[:1] not in (b"{", b"["):
        return None
    try:
        name = frame[len(_ENVELOPE_HEAD) : end].decode()
    except UnicodeDecodeError:  # not from Binance: malformed, not fatal
        return None
    return name, payload


_HEAD_LEN = len(_ENVELOPE_HEAD)
_DATA_LEN = len(_DATA_KEY)
_CLOSE_BRACE = ord("}")
_OPENERS = frozenset(b"{[")
_CLOSERS = frozenset(b"}]")


def envelope_payload(frame: bytes) -> bytes | None:
    """``split_envelope(frame)[1]`` (None where that is None): the socket worker's per-frame cut.

    The same checks, ordered for Binance's frames (no whitespace around the payload, all
    ASCII): bytes compared as ints (no one-byte slices), nothing stripped that has no
    whitespace to strip, and the stream name decoded only in a frame that is not ASCII.
    """
    if not frame.startswith(_ENVELOPE_HEAD):
        return None
    end = frame.find(_DATA_KEY, _HEAD_LEN)
    if end < 0:
        return None
    if frame[-1] == _CLOSE_BRACE:
        payload = frame[end + _DATA_LEN : -1]
        if not payload or payload[0] not in _OPENERS or payload[-1] not in _CLOSERS:
            payload = payload.strip()
    else:
        body = frame.rstrip()
        if not body.endswith(b"}"):
            return None
        payload = body[end + _DATA_LEN : -1].strip()
    if not payload or payload[0] not in _OPENERS:
        return None
    if not frame.isascii():
        try:
            frame[_HEAD_LEN:end].decode()
        except UnicodeDecodeError:
            return None
    return payload


def closed_at_once(stream: str) -> bool:
    """Whether a gap in ``stream`` is recorded closed (unrecoverable) as soon as it is found.
    Trade gaps stay open for a backfill over REST (the socket worker asks); the diffs a depth
    gap misses, and what an id-less stream sent while its connection was down, can be
    fetched from nowhere (a book resumes from a new snapshot)."""
    return stream != "aggTrade"


class FrameHandler:
    def __init__(
        self,
        market: Market,
        out: Batcher | Callable[[Batch], None],
        *,
        symbols: frozenset[str] | None = None,
        batch_rows: int = 5000,
        batch_age_s: float = 0.2,
        on_gap: Callable[[Market, Gap, int], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        feed: MarketFeed | None = None,
    ) -> None:
        self.market = market
        self.feed = feed  # the feature worker's copy of kept trades, diffs and liquidations
        # A plain callable gets a Batcher of its own (tests, replays); the socket worker
        # passes the Batcher it shares between markets.
        self.batcher = out if isinstance(out, Batcher) else Batcher(out, batch_rows=batch_rows,
                                                                  batch_age_s=batch_age_s, clock=clock)
        batcher = self.batcher
        self._add = batcher.add
        self._add_parts = batcher.add_parts
        self.symbols = symbols  # None: keep every symbol (all-market arrays included)
        self.on_gap = on_gap
        self.clock = clock
        self.seq = SequenceTracker()
        self.messages: dict[str, int] = {}  # event type -> count
        self.rejected: dict[str, int] = {}  # reason -> count
        self.stale = 0  # events at or behind the last seen id: not stored twice
        # Gaps found, per stream (aggTrade, depth, markPrice, forceOrder): counters, not the
        # gaps themselves, which would grow for the life of the process.
        self.gaps: dict[str, int] = {}
        # Streams without ids (mark prices, liquidations): the latest event time seen, and
        # the time gaps a lost connection opened, written once the stream flows again.
        self.last_e: dict[str, int] = {}
        self.lost_since: dict[str, tuple[int | None, int]] = {}  # kind -> (last E before, detected ms)
        self.bytes_in = 0
        self.last_reject_log = 0.0

    # -- input ----------------------------------------------------------------------

    def on_frame(self, frame: bytes) -> None:
        """A combined-stream frame (the connection was opened on ``/stream``)."""
        self.bytes_in += len(frame)
        payload = envelope_payload(frame)
        if payload is None:
            self.reject("envelope", frame)
            return
        self._on_payload(payload, frame)

    def on_payload(self, payload: bytes) -> None:
        """A raw-stream message (``/ws`` connection, or a recorded message)."""
        self.bytes_in += len(payload)
        self._on_payload(payload, payload)

    def _on_payload(self, payload: bytes, frame: bytes) -> None:
        try:
            msg = orjson.loads(payload)
        except orjson.JSONDecodeError:
            self.reject("json", frame)
            return
        try:
            if isinstance(msg, list):
                self._on_array(msg)
                return
            kind = msg["e"]
            if kind == "aggTrade":
                self._agg_trade(msg, payload)
            elif kind == "depthUpdate":
                self._depth(msg, payload)
            elif kind == "forceOrder":
                self._force_order(msg, payload)
            elif kind == "markPriceUpdate":
                self._mark_price(msg, payload)
            else:
                self.reject("unknown_event", frame)
        except Implausible as exc:  # a bogus id or time: this event costs itself, nothing more
            self.reject(exc.reason, frame)
        except (KeyError, TypeError, ValueError, EncodeError, OverflowError):
            self.reject("fields", frame)

    def _on_array(self, items: list[Any]) -> None:
        # All-market arrays (``!markPrice@arr``): each element becomes its own row; its
        # bytes are re-serialized because cutting them out of the array would mean a
        # second JSON scanner. orjson writes the same values back.
        for item in items:
            if not isinstance(item, dict) or item.get("e") != "markPriceUpdate":
                self.reject("unknown_event", orjson.dumps(item))
                continue
            try:  # one bad element costs itself, not the rest of the array
                self._mark_price(item, orjson.dumps(item))
            except Implausible as exc:
                self.reject(exc.reason, orjson.dumps(item))
            except (KeyError, TypeError, ValueError, EncodeError, OverflowError):
                self.reject("fields", orjson.dumps(item))

    # -- events ---------------------------------------------------------------------

    def _count(self, kind: str) -> None:
        self.messages[kind] = self.messages.get(kind, 0) + 1

    def _wanted(self, symbol: str) -> bool:
        return self.symbols is None or symbol in self.symbols

    # aggTrade and depthUpdate are nearly every message: their paths are written out in full
    # (no helper calls, no star-args), since each Python call is a visible share of the cost
    # of a message.

    def _agg_trade(self, msg: dict[str, Any], payload: bytes) -> None:
        messages = self.messages
        messages["aggTrade"] = messages.get("aggTrade", 0) + 1
        row = rows.agg_trade_parts(self.market, msg, payload)  # encode first: bad fields keep no state
        e_ms = msg["E"]
        keep, gap = self.seq.trade(msg["s"], msg["a"], e_ms)
        if gap is not None:
            self._gap(gap)
        if keep:
            self._add_parts("agg_trades", row, e_ms)
            if self.feed is not None:
                self.feed.trades.append(payload)
        else:
            self.stale += 1

    def _depth(self, msg: dict[str, Any], payload: bytes) -> None:
        messages = self.messages
        messages["depthUpdate"] = messages.get("depthUpdate", 0) + 1
        row = rows.depth_update_parts(self.market, msg, payload)
        e_ms = msg["E"]
        pu = msg.get("pu")
        if pu is not None and not isinstance(pu, int):  # checked before it moves the sequence
            raise TypeError(f"pu: {pu!r}")
        keep, gap = self.seq.depth(msg["s"], msg["U"], msg["u"], pu, e_ms)
        if gap is not None:
            self._gap(gap)
        if keep:
            self._add_parts("depth_updates", row, e_ms)
            if self.feed is not None:
                self.feed.depth.append(payload)
        else:
            self.stale += 1

    def _force_order(self, msg: dict[str, Any], payload: bytes) -> None:
        self._count("forceOrder")
        symbol, e_ms = msg["o"]["s"], msg["E"]
        if self._wanted(symbol):
            row = rows.force_order(self.market, msg, payload)
            if self.seq.by_time("f", symbol, e_ms):
                self._flowing("forceOrder", e_ms)
                self._add("force_orders", row, e_ms)
                if self.feed is not None:
                    self.feed.force_orders.append(payload)
            else:
                self.stale += 1

    def _mark_price(self, msg: dict[str, Any], payload: bytes) -> None:
        self._count("markPriceUpdate")
        symbol, e_ms = msg["s"], msg["E"]
        if self._wanted(symbol):
            row = rows.mark_price(self.market, msg, payload)
            if self.seq.by_time("m", symbol, e_ms):
                self._flowing("markPrice", e_ms)
                self._add("mark_prices", row, e_ms)
            else:
                self.stale += 1

    def _flowing(self, kind: str, e_ms: int) -> None:
        """A new event of a stream without ids: close the time gap a lost connection opened."""
        if self.lost_since:
            lost = self.lost_since.pop(kind, None)
            if lost is not None:
                self._time_gap(kind, lost[0], e_ms, lost[1])
        if e_ms > self.last_e.get(kind, 0):
            self.last_e[kind] = e_ms

    def seed(self, positions: Positions, time_kinds: set[str]) -> None:
        """Carry on from a dead predecessor's sequence positions (those of data the writer
        had acknowledged): the first events show what its death lost (a trade gap to
        backfill, a depth gap); the id-less streams get a time gap from their last event."""
        self.seq.seed(positions)
        for kind, key in (("markPrice", "m"), ("forceOrder", "f")):
            seen = [e for e, _ in positions.get(key, {}).values()]
            if seen:
                self.last_e[kind] = max(seen)
        self.connection_lost(time_kinds)

    def connection_lost(self, kinds: set[str]) -> None:
        """A connection carrying these id-less streams went down: what they sent meanwhile is
        gone (no ids to find it by, no history to fetch it from). The gap is written, as
        unrecoverable, when the stream flows again (or at stop)."""
        now_ms = int(time.time() * 1000)
        for kind in kinds:
            self.lost_since.setdefault(kind, (self.last_e.get(kind), now_ms))

    def close_time_gaps(self) -> None:
        """At stop: the time gaps still open end now."""
        now_ms = int(time.time() * 1000)
        for kind, (since, detected) in self.lost_since.items():
            self._time_gap(kind, since, now_ms, detected)
        self.lost_since.clear()

    def _time_gap(self, kind: str, from_ms: int | None, to_ms: int, detected_ms: int) -> None:
        now_ms = int(time.time() * 1000)
        self.gaps[kind] = self.gaps.get(kind, 0) + 1
        self._add("stream_gaps", rows.stream_gap(self.market, "*", kind, None, None, from_ms, to_ms, detected_ms,
                                                 "unrecoverable", now_ms), now_ms)
        log.warning("%s %s: no events for %.1f s while the connection was down: recorded as a gap",
                    self.market, kind, (to_ms - (from_ms or detected_ms)) / 1000, extra={
                        "event": "gap", "market": self.market, "symbol": "*", "stream": kind,
                        "from_ms": from_ms or detected_ms, "to_ms": to_ms, "closed_how": "unrecoverable"})

    def _gap(self, gap: Gap) -> None:
        self.gaps[gap.stream] = self.gaps.get(gap.stream, 0) + 1
        now_ms = int(time.time() * 1000)
        how, closed = ("unrecoverable", now_ms) if closed_at_once(gap.stream) else ("open", None)
        self._add("stream_gaps", rows.stream_gap(
            self.market, gap.symbol, gap.stream, gap.from_id, gap.to_id, gap.from_ms, gap.to_ms, now_ms, how, closed,
        ), now_ms)
        if self.on_gap is not None:
            self.on_gap(self.market, gap, now_ms)

    def reject(self, reason: str, frame: bytes) -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + 1
        now = self.clock()
        if now - self.last_reject_log >= 10.0:  # a hostile stream must not flood the log
            self.last_reject_log = now
            log.warning("%s: skipped a frame (%s; %d so far): %r", self.market, reason,
                        sum(self.rejected.values()), frame[:200])


    def flush(self, force: bool = False) -> None:
        self.batcher.flush(force)
