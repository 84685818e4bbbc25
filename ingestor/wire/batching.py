"""Per-table batches of encoded COPY tuples, handed on by size or by age."""

from __future__ import annotations

import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field

from ingestor.binance.streams import Market


@dataclass(frozen=True, slots=True)
class Backfill:
    """What a backfill batch fills: one trade gap (the key of its stream_gaps row) and
    the trade times it covers; ``complete`` False when REST could not give every id."""

    market: Market
    symbol: str
    from_id: int
    to_id: int
    from_ms: int | None
    to_ms: int | None
    detected_ms: int
    first_trade_ms: int
    last_trade_ms: int
    complete: bool


@dataclass(slots=True)
class Batch:
    """Encoded COPY tuples for one table, and each row's event time (for lag).

    ``producer``, ``incarnation`` (one per producer process start) and ``seq`` name the
    batch for the writer's acknowledgement; ``kind`` says how to store it: ``rows`` (COPY,
    duplicates skipped), ``close`` (stream_gaps rows that close a gap), ``backfill``
    (trades from REST: ``ids`` holds their ids, ``backfill`` the gap)."""

    table: str
    rows: int
    data: bytes
    event_ms: bytes  # array('q') of event times in Unix ms, one per row
    producer: str = ""
    incarnation: int = 0
    seq: int = 0
    kind: str = "rows"
    ids: bytes = b""
    backfill: Backfill | None = None

    @property
    def nbytes(self) -> int:
        return len(self.data) + len(self.event_ms) + len(self.ids)


@dataclass(slots=True)
class _Pending:
    parts: list[bytes] = field(default_factory=list)  # the rows' bytes, whole or in pieces
    event_ms: array = field(default_factory=lambda: array("q"))  # one per row: its length is the row count
    started: float = 0.0


# Gap rows go before every other batch: a data batch carries the sequence positions its
# producer reached (``Delivery`` marks), and once it is acknowledged a restarted producer
# carries on from there. A gap row found before those positions must already be safe by
# then, or the hole it records would be skipped by the successor and recorded nowhere
# (tests/test_safe_positions.py).
LEADING_TABLE = "stream_gaps"


class Batcher:
    def __init__(
        self,
        sink: Callable[[Batch], None],
        *,
        batch_rows: int = 5000,
        batch_age_s: float = 0.2,
        producer: str = "",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.sink = sink
        self.batch_rows = batch_rows
        self.batch_age_s = batch_age_s
        self.producer = producer
        self.clock = clock
        self.pending: dict[str, _Pending] = {}
        self.sent_rows: dict[str, int] = {}
        self.sent_batches = 0

    def add(self, table: str, row: bytes, event_ms: int) -> None:
        p = self.pending.get(table)
        if p is None or not p.event_ms:
            p = self._start(table)
        p.parts.append(row)
        times = p.event_ms
        times.append(event_ms)
        if len(times) >= self.batch_rows:
            self._emit(table, p)

    def add_parts(self, table: str, parts: tuple[bytes, ...], event_ms: int) -> None:
        """One row given as the pieces that make it (``rows.*_parts``): they are joined only
        with the whole batch, so a row's payload is copied once, not twice."""
        p = self.pending.get(table)
        if p is None or not p.event_ms:
            p = self._start(table)
        p.parts += parts
        times = p.event_ms
        times.append(event_ms)
        if len(times) >= self.batch_rows:
            self._emit(table, p)

    def flush(self, force: bool = False) -> None:
        """Hand over every batch older than the age limit (all of them if ``force``)."""
        now = self.clock()
        for table, p in list(self.pending.items()):
            if p.event_ms and (force or now - p.started >= self.batch_age_s):
                self._emit(table, p)

    def pending_rows(self) -> int:
        return sum(len(p.event_ms) for p in self.pending.values())

    def _start(self, table: str) -> _Pending:
        """The table's pending batch, empty so far: its age counts from now."""
        p = self.pending.get(table)
        if p is None:
            p = self.pending[table] = _Pending()
        p.started = self.clock()
        return p

    def _emit(self, table: str, p: _Pending) -> None:
        if table != LEADING_TABLE:
            lead = self.pending.get(LEADING_TABLE)
            if lead is not None and lead.event_ms:
                self._emit(LEADING_TABLE, lead)
        batch = Batch(table, len(p.event_ms), b"".join(p.parts), p.event_ms.tobytes(), self.producer)
        self.sent_rows[table] = self.sent_rows.get(table, 0) + batch.rows
        self.sent_batches += 1
        p.parts = []
        p.event_ms = array("q")
        self.sink(batch)
