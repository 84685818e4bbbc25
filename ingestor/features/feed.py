"""What crosses into and out of the feature worker: the messages and the socket side's buffer.

- :class:`Feed`: a socket worker's ``aggTrade``, ``depthUpdate`` or ``forceOrder`` payloads of
  one market, the very bytes that are stored, joined into one JSON array, so the feature
  worker parses a whole batch with one ``orjson.loads`` and sees exactly the stored rows
  (only events the sequence check kept: nothing twice).
- :class:`Snapshot`: every REST depth snapshot the REST worker fetched (periodic or asked
  for), with the time it is stored under.
- :class:`SnapshotRequest`: the feature worker asking the REST worker for a snapshot to
  (re)build a book; :class:`TradeGapRequest`: a socket worker asking it to fetch the
  trades a lost connection missed.
- ``DRAIN``: the supervisor's last item on the feature queue at shutdown, after every
  producer has stopped.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ingestor.binance.streams import Market

DRAIN = "drain"
FEED_KINDS = ("aggTrade", "depthUpdate", "forceOrder")


@dataclass(frozen=True, slots=True)
class Feed:
    market: Market
    kind: str  # one of FEED_KINDS
    count: int
    data: bytes  # b"[" + b",".join(payloads) + b"]"


@dataclass(frozen=True, slots=True)
class Snapshot:
    market: Market
    symbol: str
    time_ms: int  # depth_snapshots.time of the stored row
    body: bytes


@dataclass(frozen=True, slots=True)
class SnapshotRequest:
    market: Market
    symbol: str


@dataclass(frozen=True, slots=True)
class TradeGapRequest:
    """A socket worker asking the REST worker to fetch the trades ``from_id..to_id`` it never
    got; the rest is the key of the gap's stream_gaps row, which the backfill closes."""

    market: Market
    symbol: str
    from_id: int
    to_id: int
    from_ms: int
    to_ms: int
    detected_ms: int


class MarketFeed:
    """One market's payloads on their way to the feature worker. The frame handler appends to
    the lists (one append per kept message); ``flush`` hands each non-empty one on."""

    __slots__ = ("market", "sink", "trades", "depth", "force_orders", "sent")

    def __init__(self, market: Market, sink: Callable[[Feed], None]) -> None:
        self.market = market
        self.sink = sink
        self.trades: list[bytes] = []
        self.depth: list[bytes] = []
        self.force_orders: list[bytes] = []
        self.sent = 0

    def flush(self) -> None:
        for kind, parts in (("aggTrade", self.trades), ("depthUpdate", self.depth),
                            ("forceOrder", self.force_orders)):
            if parts:
                self.sink(Feed(self.market, kind, len(parts), b"[" + b",".join(parts) + b"]"))
                self.sent += len(parts)
                parts.clear()

    def pending(self) -> int:
        return len(self.trades) + len(self.depth) + len(self.force_orders)
