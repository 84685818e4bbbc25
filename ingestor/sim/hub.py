"""Fan-out of one market's events to its WebSocket connections.

The hub owns the subscription index (stream name -> connections that receive it) and
the record of what was sent per stream, which the admin endpoint reports so tests can
compare what a client stored with what left the simulator.

Frames are built here (RFC 6455 server frames are unmasked: a 2-10 byte header and the
payload) and queued per connection; ``flush`` writes each connection's queue with one
transport write per model step. One write per message would cost a syscall each and
cap the simulator far below a client's parse rate.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from ingestor.binance.streams import Market
from ingestor.sim.encode import envelope


class Subscriber(Protocol):
    combined: bool
    stalled: bool
    out: list[bytes]

    def flush(self) -> None: ...


def frame_header(n: int) -> bytes:
    """A final, unmasked text frame's header for an ``n``-byte payload."""
    if n < 126:
        return bytes((0x81, n))
    if n < 65536:
        return b"\x81\x7e" + n.to_bytes(2, "big")
    return b"\x81\x7f" + n.to_bytes(8, "big")


def text_frame(payload: bytes) -> bytes:
    return frame_header(len(payload)) + payload


class Hub:
    def __init__(self, market: Market, record: bool = False) -> None:
        self.market = market
        # Every payload delivered, per stream, when recording: tests and the demo compare
        # what a recorder stored with exactly what was sent.
        self.record: dict[str, list[bytes]] | None = {} if record else None
        self.subs: dict[str, set[Subscriber]] = {}
        # stream -> [messages sent, last sequence id (a, u, or E), last event time]
        self.sent: dict[str, list[int]] = {}
        self.skip: dict[str, int] = {}  # stream -> events still to drop (gap faults)
        self.skipped: dict[str, int] = {}
        self._dirty: list[Subscriber] = []
        self._heads: dict[str, bytes] = {}  # stream -> b'{"stream":"<name>","data":'

    def wants(self, name: str) -> bool:
        return name in self.subs

    def subscribe(self, conn: Subscriber, names: Iterable[str]) -> None:
        for name in names:
            self.subs.setdefault(name, set()).add(conn)

    def unsubscribe(self, conn: Subscriber, names: Iterable[str]) -> None:
        for name in names:
            conns = self.subs.get(name)
            if conns is not None:
                conns.discard(conn)
                if not conns:
                    del self.subs[name]

    def emit(self, name: str, payload: bytes, seq: int) -> None:
        conns = self.subs.get(name)
        if not conns:
            return
        if self.skip:
            left = self.skip.get(name)
            if left:
                self.skip[name] = left - 1
                if left == 1:
                    del self.skip[name]
                self.skipped[name] = self.skipped.get(name, 0) + 1
                return
        raw = comb = None
        delivered = False
        for conn in conns:
            if conn.stalled:
                continue
            if conn.combined:
                if comb is None:  # the envelope built straight into the frame: one copy of the payload
                    head = self._heads.get(name)
                    if head is None:
                        head = self._heads[name] = envelope(name, b"")[:-1]
                    comb = b"".join((frame_header(len(head) + len(payload) + 1), head, payload, b"}"))
                frame = comb
            else:
                if raw is None:
                    raw = text_frame(payload)
                frame = raw
            if not conn.out:
                self._dirty.append(conn)
            conn.out.append(frame)
            delivered = True
        if delivered:
            if self.record is not None:
                self.record.setdefault(name, []).append(payload)
            rec = self.sent.get(name)
            if rec is None:
                self.sent[name] = [1, seq]
            else:
                rec[0] += 1
                rec[1] = seq

    def send_raw(self, conns: Iterable[Subscriber], payload: bytes) -> None:
        """Queue one frame to specific connections (fault injection, replies)."""
        frame = text_frame(payload)
        for conn in conns:
            if not conn.out:
                self._dirty.append(conn)
            conn.out.append(frame)

    def flush(self) -> None:
        dirty, self._dirty = self._dirty, []
        for conn in dirty:
            conn.flush()

    def streams_matching(self, kind: str | None, symbol: str | None) -> list[str]:
        """Subscribed stream names of an event kind, optionally for one symbol."""
        low = symbol.lower() if symbol else None
        out = []
        for name in self.subs:
            head, _, rest = name.partition("@")
            if kind and not rest.startswith(kind):
                continue
            if low and head != low:
                continue
            out.append(name)
        return out
