"""A producer's end of the channel to the writer: nothing is let go before it is safe.

Every batch gets the producer's name, an incarnation (one per process start) and a
sequence number, goes on the writer's queue, and is kept here until the writer
acknowledges it on this producer's ack queue: committed, or written to the writer's disk
spool. When the supervisor starts a new writer (``writer_epoch`` moves), the batches still
kept are sent again, since the writer that died may have held them. One it had committed
after all comes back as a duplicate, which the tables' unique keys turn away.

Memory is bounded by back-pressure, never by letting batches go: once the unacknowledged
bytes reach the producer's budget (its share of ``--max-buffer-mb``, ``WriterLink.budget``)
``paused`` turns True and the producer takes no more data (a socket worker stops reading
its sockets, the REST worker skips its periodic jobs and holds backfills, the feature
worker stops taking input) until the writer's acks bring them under ``RESUME_FRACTION`` of
it. A batch stays kept until it is acknowledged, whatever the budget
(tests/test_delivery.py ``test_over_budget_pauses_and_keeps_every_batch``).

What the budget counts: every batch not acknowledged yet, wherever it is. The queue's
feeder thread holds references to the same ``Batch`` objects (it pickles one at a time as
it writes the pipe), and a resend to a new writer puts the same objects on the queue
again: shared, not copied (``test_resend_to_a_new_writer_shares_the_batches_memory``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from ingestor.wire.batching import Batch
from ingestor.wire.channel import Sender

log = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 512 * 1024 * 1024
# Taking data again only once this fraction of the budget is left in use: a producer that
# resumed at the budget itself would pause again on its next batch, flapping per batch.
RESUME_FRACTION = 0.75


@dataclass(frozen=True)
class WriterLink:
    """What a producer process is given to reach the writer: the writer's queue, this
    producer's ack queue, the writer epoch (a shared counter the supervisor moves on each
    writer start) and the producer's budget of unacknowledged bytes. Without the ack queue
    and the epoch, batches are sent and forgotten."""

    queue: Any
    acks: Any = None
    epoch: Any = None
    budget: int = DEFAULT_MAX_BYTES


class Delivery:
    def __init__(self, name: str, link: WriterLink) -> None:
        self.name = name
        # A batch pipe of its own (wire/channel.py), or any queue (tests, tools).
        self.out_queue = Sender(link.queue) if isinstance(link.queue, Connection) else link.queue
        self.ack_queue = link.acks
        self.writer_epoch = writer_epoch = link.epoch
        self.max_bytes = link.budget
        self.resume_bytes = int(link.budget * RESUME_FRACTION)
        # Unique per process start: acks meant for a previous incarnation are ignored.
        self.incarnation = (time.time_ns() << 16 | os.getpid() & 0xFFFF) & (2**63 - 1)
        self.seq = 0
        self.pending: dict[int, Batch] = {}  # seq -> batch, oldest first
        self.pending_bytes = 0
        self.epoch = writer_epoch.value if writer_epoch is not None else 0
        self.resent = 0
        self.paused = False  # over budget: take no more data until under resume_bytes
        self.pauses = 0
        self.paused_since = 0.0
        # Per batch, what the producer's state was when it was sent (``send(mark=...)``);
        # once it and every batch before it are acknowledged, the mark is safe: what it
        # describes is in the database (or the writer's spool).
        self.marks: dict[int, tuple[str, Any]] = {}
        self.safe: dict[str, Any] = {}

    def send(self, batch: Batch, mark: tuple[str, Any] | None = None) -> None:
        """Send ``batch`` (kept until acknowledged, even past the budget: ``paused`` is the
        caller's signal to take no more); ``mark`` is (key, state) to learn as safe once it
        is acknowledged."""
        self.seq += 1
        batch.producer, batch.incarnation, batch.seq = self.name, self.incarnation, self.seq
        if mark is not None:
            self.marks[self.seq] = mark
        if self.ack_queue is not None:
            self.pending[self.seq] = batch
            self.pending_bytes += batch.nbytes
            self._update_pause()
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
        self._update_pause()
        epoch = self.writer_epoch.value if self.writer_epoch is not None else 0
        if epoch != self.epoch:
            self.epoch = epoch
            if self.pending:
                log.warning("a new writer started: sending again the %d batch(es) it has not acknowledged",
                            len(self.pending))
                for batch in self.pending.values():
                    self.out_queue.put(batch)  # the same objects: their memory is shared, not doubled
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

    async def wait_for_room(self, should_stop: Callable[[], bool], period_s: float = 0.05) -> bool:
        """Until the producer may take data again (True), or it is told to stop (False)."""
        while self.paused:
            if should_stop():
                return False
            await asyncio.sleep(period_s)
            self.poll()
        return True

    async def wait_acked(self, timeout_s: float, period_s: float = 0.05) -> bool:
        """At shutdown: until every batch is acknowledged (True) or the time is up."""
        deadline = time.monotonic() + timeout_s
        while True:
            self.poll()
            if not self.pending:
                return True
            if time.monotonic() >= deadline:
                if isinstance(self.out_queue, Sender) and not self.out_queue.flush(5.0):
                    log.error("%d batch(es) not even written to the writer's pipe", self.out_queue.qsize())
                log.error("stopping with %d batch(es) the writer never acknowledged (%d rows)",
                          len(self.pending), sum(b.rows for b in self.pending.values()))
                return False
            await asyncio.sleep(period_s)

    def status(self) -> dict[str, Any]:
        """For the producer's status line (/health)."""
        return {"buffer_bytes": self.pending_bytes, "buffer_budget_bytes": self.max_bytes,
                "backpressure": self.paused, "backpressure_pauses": self.pauses}

    def _update_pause(self) -> None:
        if not self.paused and self.pending_bytes >= self.max_bytes:
            self.paused = True
            self.pauses += 1
            self.paused_since = time.monotonic()
            log.warning("the writer has not acknowledged %.1f MB (this producer's budget, --max-buffer-mb): taking "
                        "no more data until it has", self.pending_bytes / 2**20, extra={
                            "event": "backpressure_on", "producer": self.name, "buffer_bytes": self.pending_bytes,
                            "budget_bytes": self.max_bytes, "batches": len(self.pending)})
        elif self.paused and self.pending_bytes <= self.resume_bytes:
            self.paused = False
            waited = time.monotonic() - self.paused_since
            log.info("the writer caught up after %.1f s: taking data again", waited, extra={
                "event": "backpressure_off", "producer": self.name, "buffer_bytes": self.pending_bytes,
                "paused_s": round(waited, 1)})
