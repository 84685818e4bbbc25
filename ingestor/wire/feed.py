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
from typing import Any

from ingestor.binance.streams import Market

DRAIN = "drain"
FEED_KINDS = ("aggTrade", "depthUpdate", "forceOrder")


@dataclass(frozen=True, slots=True)
class Feed:
    market: Market
    kind: str  # one of FEED_KINDS
    count: int
    data: bytes  # b"[" + b",".join(payloads) + b"]"
    lost: int = 0  # messages of this market and kind dropped just before these (the queue was full)


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


# Feature input waiting, items over all producers: about 4 s of a 100k msg/s feed on one
# shard (a Feed is one market and kind per 50 ms), tens of MB at most.
FEED_QUEUE_MAX = 256


def put_bounded(q: Any, item: Any, limit: int) -> bool:
    """Put ``item`` on the multiprocessing queue ``q`` unless ``limit`` items wait there (put by
    any process, not yet taken); False: refused. Never blocks."""
    if q.qsize() >= limit:
        return False
    q.put(item)
    return True


class MarketFeed:
    """One market's payloads on their way to the feature worker. The frame handler appends to
    the lists (one append per kept message); ``flush`` hands each non-empty one on.

    The sink may refuse a Feed (False: the feature worker is too far behind and its queue is
    full): recording must never wait for the indicators. What it refused is counted, per
    kind, and told to the worker with the next Feed that gets through (``Feed.lost``), so the
    worker knows its bars lack those messages; the stored data has them all."""

    __slots__ = ("market", "sink", "trades", "depth", "force_orders", "sent", "lost", "dropped")

    def __init__(self, market: Market, sink: Callable[[Feed], bool | None]) -> None:
        self.market = market
        self.sink = sink
        self.trades: list[bytes] = []
        self.depth: list[bytes] = []
        self.force_orders: list[bytes] = []
        self.sent = 0
        self.lost: dict[str, int] = {}  # kind -> refused since the last Feed that got through
        self.dropped = 0  # refused in all

    def flush(self) -> None:
        for kind, parts in (("aggTrade", self.trades), ("depthUpdate", self.depth),
                            ("forceOrder", self.force_orders)):
            if parts:
                feed = Feed(self.market, kind, len(parts), b",".join(parts).join((b"[", b"]")),
                            self.lost.get(kind, 0))
                if self.sink(feed) is False:
                    self.lost[kind] = self.lost.get(kind, 0) + len(parts)
                    self.dropped += len(parts)
                else:
                    self.lost.pop(kind, None)
                    self.sent += len(parts)
                parts.clear()

    def pending(self) -> int:
        return len(self.trades) + len(self.depth) + len(self.force_orders)
