"""A producer's end of the channel to the writer: nothing is let go before it is safe.

Every batch gets the producer's name, an incarnation (one per process start) and a
sequence number, goes on the writer's queue, and is kept here until the writer
acknowledges it on this producer's ack queue: committed, or written to the writer's disk
spool. When the supervisor starts a new writer (``writer_epoch`` moves), the batches still
kept are sent again, since the writer that died may have held them. One it had committed
after all comes back as a duplicate, which the tables' unique keys turn away.

Memory is bounded: past ``max_bytes`` of unacknowledged batches (the writer dead for long)
the oldest are no longer kept for a resend, loudly: logged and counted by table (they
are lost only if the writer had not taken them).
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import time
from dataclasses import dataclass
from typing import Any

from ingestor.wire.batching import Batch

log = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 512 * 1024 * 1024


@dataclass(frozen=True)
class WriterLink:
    """What a producer process is given to reach the writer: the writer's queue, this
    producer's ack queue and the writer epoch (a shared counter the supervisor moves on
    each writer start). Without the last two, batches are sent and forgotten."""

    queue: Any
    acks: Any = None
    epoch: Any = None


class Delivery:
    def __init__(self, name: str, link: WriterLink, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.name = name
        self.out_queue = link.queue
        self.ack_queue = link.acks
        self.writer_epoch = writer_epoch = link.epoch
        self.max_bytes = max_bytes
        # Unique per process start: acks meant for a previous incarnation are ignored.
        self.incarnation = (time.time_ns() << 16 | os.getpid() & 0xFFFF) & (2**63 - 1)
        self.seq = 0
        self.pending: dict[int, Batch] = {}  # seq -> batch, oldest first
        self.pending_bytes = 0
        self.epoch = writer_epoch.value if writer_epoch is not None else 0
        self.resent = 0
        # Per batch, what the producer's state was when it was sent (``send(mark=...)``);
        # once it and every batch before it are acknowledged, the mark is safe: what it
        # describes is in the database (or the writer's spool).
        self.marks: dict[int, tuple[str, Any]] = {}
        self.safe: dict[str, Any] = {}
        self.released: dict[str, int] = {}  # table -> rows let go unacknowledged past max_bytes

    def send(self, batch: Batch, mark: tuple[str, Any] | None = None) -> None:
        """Send ``batch``; ``mark`` is (key, state) to learn as safe once it is acknowledged."""
        self.seq += 1
        batch.producer, batch.incarnation, batch.seq = self.name, self.incarnation, self.seq
        if mark is not None:
            self.marks[self.seq] = mark
        if self.ack_queue is not None:
            self.pending[self.seq] = batch
            self.pending_bytes += batch.nbytes
            if self.pending_bytes > self.max_bytes:
                self._release_oldest()
        self.out_queue.put(batch)

    def poll(self) -> None:
        """Take the writer's acknowledgements; send everything kept again to a new writer."""
        if self.ack_queue is None:
            return
        while True:
            try:
                incarnation, seqs = self.ack_queue.get_nowait()
            except queue.Empty:
                break
            if incarnation != self.incarnation:
                continue
            for seq in seqs:
                batch = self.pending.pop(seq, None)
                if batch is not None:
                    self.pending_bytes -= batch.nbytes
        epoch = self.writer_epoch.value if self.writer_epoch is not None else 0
        if epoch != self.epoch:
            self.epoch = epoch
            if self.pending:
                log.warning("a new writer started: sending again the %d batch(es) it has not acknowledged",
                            len(self.pending))
                for batch in self.pending.values():
                    self.out_queue.put(batch)
                self.resent += len(self.pending)

    def safe_marks(self) -> dict[str, Any]:
        """For each mark key, the newest state whose batch, and every batch before it, the
        writer has acknowledged."""
        if self.marks:
            first_unacked = next(iter(self.pending), self.seq + 1)
            for seq in [s for s in self.marks if s < first_unacked]:
                key, state = self.marks.pop(seq)
                self.safe[key] = state
        return self.safe

    async def wait_acked(self, timeout_s: float, period_s: float = 0.05) -> bool:
        """At shutdown: until every batch is acknowledged (True) or the time is up."""
        deadline = time.monotonic() + timeout_s
        while True:
            self.poll()
            if not self.pending:
                return True
            if time.monotonic() >= deadline:
                log.error("stopping with %d batch(es) the writer never acknowledged (%d rows)",
                          len(self.pending), sum(b.rows for b in self.pending.values()))
                return False
            await asyncio.sleep(period_s)

    def _release_oldest(self) -> None:
        while self.pending_bytes > self.max_bytes and self.pending:
            seq = next(iter(self.pending))
            batch = self.pending.pop(seq)
            self.pending_bytes -= batch.nbytes
            self.released[batch.table] = self.released.get(batch.table, 0) + batch.rows
            log.error("%s: %d rows no longer kept for a resend: the writer has not acknowledged %d MB of "
                      "batches (lost if it never took them)", batch.table, batch.rows, self.max_bytes // 2**20)
