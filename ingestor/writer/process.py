"""Writer process: the only database client on the hot path, and nothing lost on its watch.

Batches arrive already encoded (COPY tuples) on one queue from every producer. A
dispatcher takes them in order, joins those of one table, and hands each group to one of
``--writer-connections`` connections (PostgreSQL's jsonb parsing limits one connection,
hence several). ``copier`` stores a group: COPY, duplicates skipped, refused rows isolated.

Nothing is acknowledged before it is safe: a producer keeps each batch until the writer
acks it (``Delivery``), and the writer acks a batch once it is committed or written to
its disk spool. A writer killed with batches in hand leaves them unacknowledged; the
producers send them again to the next one.

Spooling: when a COPY loses its connection (the database is down), or the database falls
behind for ``SPOOL_AFTER_S`` with every connection busy and the queue full (it is slow),
the writer waits for the groups in flight, spools those that failed, and from then on
appends every new batch to the spool (acking it) in the order taken. While the database
answers, the spool is replayed from its oldest batch, at the database's pace; once it is
empty, batches go straight to the database again. The spool survives the process: a
writer starting with one replays it first. Full spool: batches wait unacknowledged (the
producers hold them, bounded), and the status says so loudly.

Order: a backfill (trades fetched to fill a gap) is stored only after every batch taken
before it is committed, so it can see which of its trades came over the WebSocket after
all; the spool keeps the order, and its replay keeps the same rule.

Shutdown: the supervisor puts ``DRAIN`` on the queue after every producer has exited;
everything before it is committed or, if the database is away, spooled; then it exits.

Errors (``errors``, ``copier.store_group``): a group is committed (``Stored``: refused
rows isolated in ``rejected_rows``), or lost with its connection (``Lost``: spooled, or
stored again). Anything else stops the writer loudly (``WriterFailed``: logged once with
its context, exit code 1): nothing is acknowledged or removed from the spool without the
commit that holds it, and the supervisor's next writer gets every unacknowledged batch
again from its producer. The reader thread's errors end the writer the same way.

States (``state``): direct, spooling, replaying, draining, failed; every change goes
through ``state.step``.

Tests: tests/test_writer_process.py (a real writer process: an unreadable queue item, an
unhandled server error directly and during a spool replay, a spool directory refused),
tests/chaos/test_writer_faults.py and test_writer_and_database.py (the pipeline: refused
rows, an unhandled error, a wedged writer, a crash mid-replay, the database away, SIGTERM
while it is away, the writer killed).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import queue
import sys
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import asyncpg

from ingestor.config import Settings
from ingestor.wire.batching import Batch
from ingestor.wire.channel import FanIn, FanInEnds
from ingestor.wire.child import ChildContext, run_child
from ingestor.writer import copier
from ingestor.writer.errors import CONNECTION_TYPES, Kind, classify
from ingestor.writer.policy import SPOOL_AFTER_S, Behind
from ingestor.writer.spool import Spool, SpoolError
from ingestor.writer.state import Event, State, spooling, step
from ingestor.writer.stats import WriterStats

log = logging.getLogger(__name__)

DRAIN = "drain"
MAX_COPY_BYTES = 8 * 1024 * 1024  # batches of one table joined into one COPY up to this size
MEMORY_BATCHES = 64  # batches taken from the queue and waiting for a connection
PROBE_PERIOD_S = 1.0
FAILED_WAIT_S = 10.0  # a failed writer waits this long for its groups in flight, then exits
DRAIN_REPLAY_S = 60.0  # at shutdown, spooled batches replayed for at most this long (the rest waits on disk)
CONNECTION_ERRORS = (*CONNECTION_TYPES, asyncpg.exceptions.OperatorInterventionError)


class WriterFailed(Exception):
    """The writer stopped on an error it does not understand (already logged): exit 1."""


class _Stop(Exception):
    """Raised inside the dispatcher once the writer has failed: nothing more is done."""


class Writer:
    def __init__(self, ctx: ChildContext, dsn: str, in_queue: Any, status_queue: Any,
                 acks: dict[str, Any] | None = None, spool_dir: Path | None = None,
                 spool_max_bytes: int = 4 * 2**30) -> None:
        self.ctx = ctx
        self.dsn = dsn
        self.in_queue = in_queue
        self.status_queue = status_queue
        self.acks = acks or {}
        s = ctx.settings
        self.spool = Spool(spool_dir or (s.data_dir / "spool"), spool_max_bytes)
        self.stats = WriterStats()
        self.db_ok = False
        self.db_error = ""
        self.state = State.DIRECT
        self.in_spell = False  # between spooling's first batch and the spool replayed to its end
        self.fatal: BaseException | None = None
        # Where this spell of spooling started (time, counters): its log lines say what it did.
        self.spell = (time.monotonic(), 0, 0)
        self.full_logged = False  # "spool full" once per spell, not once a probe
        # Spooled since the last fsync: acknowledged only once the spool is synced.
        self.unsynced: list[Batch] = []
        self.conns: list[asyncpg.Connection | None] = [None] * s.writer_connections
        self.free: asyncio.Queue[int] = asyncio.Queue()
        for i in range(s.writer_connections):
            self.free.put_nowait(i)
        self.inflight: set[asyncio.Task[None]] = set()
        self.failed: list[tuple[int, list[Batch]]] = []  # (order taken, group) whose connection broke
        self.order = 0
        self.behind = False  # the database fell behind: spool until it catches up
        self.behind_policy = Behind()
        self._dispatcher: asyncio.Task[None] | None = None

    # -- the process ----------------------------------------------------------------------

    async def run(self) -> None:
        """Until drained; WriterFailed (logged once) on an error that is not understood."""
        from ingestor import metrics as M

        self.M = M
        self.totals = M.Totals()
        loop = asyncio.get_running_loop()
        self.aq: asyncio.Queue[Batch | str] = asyncio.Queue(maxsize=MEMORY_BATCHES)
        threading.Thread(target=self._read, args=(loop,), name="writer-reader", daemon=True).start()
        status = asyncio.ensure_future(self._status_loop())
        if self.spool:
            log.info("a spool of %.1f MB from before: replaying it first", self.spool.bytes / 2**20,
                     extra=self._spool_context("spool_start", reason="left by an earlier writer"))
            self._start_spell(Event.SPOOL_LEFT)
        self._dispatcher = asyncio.ensure_future(self._run_dispatch())
        try:
            await self._dispatcher
        except asyncio.CancelledError:
            if self.fatal is None:
                raise
        finally:
            status.cancel()
            # Groups in flight finish (a commit is acknowledged even now: it is stored). A
            # failed writer waits for them only so long: what they hold was never
            # acknowledged, so it comes again to the next writer.
            deadline = time.monotonic() + FAILED_WAIT_S
            while self.inflight and (self.fatal is None or time.monotonic() < deadline):
                await asyncio.wait(list(self.inflight), timeout=1.0)
            if self.fatal is None:
                self._sync_spool()
            self.spool.close()
            for conn in self.conns:
                if conn is not None:
                    conn.terminate()
            self.report()
        if self.fatal is not None:
            raise WriterFailed(str(self.fatal)) from self.fatal
        log.info("drained: %s%s", ", ".join(f"{t}={n}" for t, n in sorted(self.stats.rows.items())) or "no rows",
                 f"; {self.spool.bytes / 2**20:.1f} MB left in the spool" if self.spool else "")

    async def _run_dispatch(self) -> None:
        try:
            await self._connect_all()
            await self._dispatch()
        except _Stop:
            pass
        except Exception as exc:  # noqa: BLE001 - a bug of ours: the writer fails loudly, not silently
            self._fail(exc, where="dispatcher")

    def _fail(self, exc: BaseException, **context: Any) -> None:
        """Stop the writer on ``exc``: logged once, nothing more acknowledged, exit 1."""
        if self.fatal is not None:
            return
        self.fatal = exc
        self.state = step(self.state, Event.FATAL)
        log.error("writer stopping on an error it does not handle: %s", exc, exc_info=exc,
                  extra={"event": "writer_failed", "error": f"{type(exc).__name__}: {exc}", **context})
        if self._dispatcher is not None and self._dispatcher is not asyncio.current_task():
            self._dispatcher.cancel()

    def _check(self) -> None:
        if self.fatal is not None:
            raise _Stop

    def _read(self, loop: asyncio.AbstractEventLoop) -> None:
        """Blocking reads from the multiprocessing queue, handed to the loop in order. The
        bounded asyncio queue behind it is the back-pressure. Any error here (an item that
        will not unpickle, a broken pipe) ends the writer: a reader that died quietly would
        leave the writer consuming nothing with /health green."""
        try:
            while True:
                try:
                    item = self.in_queue.get(timeout=0.5)
                except queue.Empty:
                    if os.getppid() != self.ctx.parent or self.ctx.stopping.is_set():
                        item = DRAIN  # orphaned, or told to stop by a signal, and idle: finish
                    else:
                        continue
                asyncio.run_coroutine_threadsafe(self.aq.put(item), loop).result()
                if item == DRAIN:
                    return
        except BaseException as exc:  # noqa: BLE001 - handed to the loop, which stops the writer
            failure = exc  # `exc` is unbound when the block ends; the callback runs later
            try:
                loop.call_soon_threadsafe(lambda: self._fail(failure, where="reader thread"))
            except RuntimeError:  # the loop is closed: the writer is exiting anyway
                pass

    # -- dispatching ----------------------------------------------------------------------

    async def _dispatch(self) -> None:
        while True:
            self._check()
            if self.failed or self.behind:
                await self._to_spool_mode("the database went away" if self.failed else
                                          f"the database has been behind for {SPOOL_AFTER_S:g} s")
            if spooling(self.state):
                if not await self._spool_turn():
                    return
            elif not await self._direct_turn():
                return

    async def _direct_turn(self) -> bool:
        """Take what is waiting and start storing it; False once drained."""
        first = await self._next_item(0.2)
        if first is None:
            self._check_behind()
            return True
        if isinstance(first, str):
            self.state = step(self.state, Event.DRAIN)
            await self._wait_inflight()
            if self.failed:  # the last groups failed: spool them, then stop
                await self._to_spool_mode("the database went away while draining")
                return await self._spool_drain()
            return False
        items: list[Batch] = [first]
        size = first.nbytes
        drain = False
        while size < MAX_COPY_BYTES and not self.aq.empty():
            nxt = self.aq.get_nowait()
            if isinstance(nxt, str):
                drain = True
                break
            items.append(nxt)
            size += nxt.nbytes
        await self._store(items, ack=True)
        self._check_behind()
        if drain:
            self.aq.put_nowait(DRAIN)  # nothing else is left to overtake it: the reader has stopped
        return True

    async def _next_item(self, timeout: float) -> Batch | str | None:
        try:
            return await asyncio.wait_for(self.aq.get(), timeout)
        except TimeoutError:
            return None

    def _check_behind(self) -> None:
        """Every connection busy and the backlog full for SPOOL_AFTER_S: the database is slow."""
        if self.behind_policy.observe(self.aq.full(), self.free.empty()):
            self.behind = True

    async def _store(self, items: list[Batch], ack: bool) -> None:
        """Start storing ``items`` in order: groups of one table, a backfill alone after a barrier."""
        for group in _groups(items):
            self._check()
            if group[0].kind == "backfill":
                await self._wait_inflight()
                if self.failed:
                    self.failed.append((self._next_order(), group))
                    continue
            slot = await self.free.get()
            task = asyncio.ensure_future(self._run_group(slot, self._next_order(), group, ack))
            self.inflight.add(task)
            task.add_done_callback(self.inflight.discard)
            if group[0].kind == "backfill":
                await self._wait_inflight()

    def _next_order(self) -> int:
        self.order += 1
        return self.order

    async def _run_group(self, slot: int, order: int, group: list[Batch], ack: bool) -> None:
        """One group to its outcome: acknowledged once committed, kept when lost, and any
        other error stops the writer (the group is never acknowledged, so it comes again)."""
        try:
            outcome = await self._commit(slot, group)
        except Exception as exc:  # noqa: BLE001 - copier.StoreFailed, or a bug: both stop the writer
            self._fail(exc, table=group[0].table, kind=group[0].kind, batches=len(group),
                       rows=sum(b.rows for b in group), producers=sorted({b.producer for b in group}))
            return
        finally:
            self.free.put_nowait(slot)
        if isinstance(outcome, copier.Lost):
            self.failed.append((order, group))
        elif ack and self.fatal is None:
            self._ack(group)

    async def _wait_inflight(self) -> None:
        """Until every group in flight has its outcome; _Stop if the writer has failed."""
        while self.inflight:
            for result in await asyncio.gather(*list(self.inflight), return_exceptions=True):
                if isinstance(result, BaseException):  # _run_group handles its errors: this is a bug
                    self._fail(result, where="group task")
        self._check()

    # -- the spool ------------------------------------------------------------------------

    async def _to_spool_mode(self, why: str) -> None:
        """Wait for the groups in flight; spool the failed ones (in the order taken)."""
        await self._wait_inflight()
        failed = sorted(self.failed, key=lambda x: x[0])
        self.failed = []
        self.behind = False
        if not self.in_spell:
            log.warning("spooling batches to %s: %s", self.spool.directory, why,
                        extra=self._spool_context("spool_start", reason=why, failed_batches=sum(
                            len(group) for _, group in failed)))
            self._start_spell(Event.AWAY)
        else:
            self.state = step(self.state, Event.AWAY)
        for _, group in failed:
            for batch in group:
                await self._spool_append(batch)
        self._sync_spool()

    def _start_spell(self, event: Event) -> None:
        self.state = step(self.state, event)
        self.in_spell = True
        self.spell = (time.monotonic(), self.stats.spooled_batches, self.stats.replayed_batches)
        self.full_logged = False

    def _spool_context(self, event: str, **fields: Any) -> dict[str, Any]:
        """A spool log line's fields."""
        return {"event": event, "directory": str(self.spool.directory), "spool_bytes": self.spool.bytes, **fields}

    async def _spool_append(self, batch: Batch) -> None:
        """Append ``batch`` to the spool; it is acknowledged at the next ``_sync_spool``."""
        while not self.spool.append(batch):
            # Full: hold it (and, behind it, the queue) until replaying frees room.
            self._sync_spool()
            if not self.full_logged:
                self.full_logged = True
                log.error("spool full (%.0f MB): batches wait unacknowledged; the producers hold them",
                          self.spool.bytes / 2**20, extra=self._spool_context("spool_full"))
            self.report()
            await self._replay_some(timeout=PROBE_PERIOD_S)
        self.stats.spooled_batches += 1
        self.unsynced.append(batch)

    def _sync_spool(self) -> None:
        """Group commit: one fsync for everything appended since the last, then their acks
        (a spooled batch is acknowledged only once its bytes are on disk)."""
        if self.unsynced:
            self.spool.sync()
            batches, self.unsynced = self.unsynced, []
            self._ack(batches)
            self.stats.progress_at = time.monotonic()  # safe on disk: the writer is not stuck

    async def _spool_turn(self) -> bool:
        """Spool what is waiting, replay the oldest segment if the database answers; False
        once drained."""
        while not self.aq.empty():
            item = self.aq.get_nowait()
            if isinstance(item, str):
                self._sync_spool()
                self.state = step(self.state, Event.DRAIN)
                return await self._spool_drain()
            await self._spool_append(item)
        self._sync_spool()
        await self._replay_some(timeout=0.2)
        if not self.spool:
            since, spooled, replayed = self.spell
            log.info("spool replayed: batches go straight to the database again (%d batches spooled, %d replayed "
                     "in %.1f s)", self.stats.spooled_batches - spooled, self.stats.replayed_batches - replayed,
                     time.monotonic() - since, extra=self._spool_context(
                         "spool_replayed", spooled_batches=self.stats.spooled_batches - spooled,
                         replayed_batches=self.stats.replayed_batches - replayed,
                         seconds=round(time.monotonic() - since, 1)))
            if self.state is State.SPOOLING:
                self.state = step(self.state, Event.ANSWERS)
            self.state = step(self.state, Event.EMPTIED)
            self.in_spell = False
        elif not self.db_ok:
            waited = await self._next_item(0.2)
            if isinstance(waited, str):
                self.state = step(self.state, Event.DRAIN)
                return await self._spool_drain()
            if waited is not None:
                await self._spool_append(waited)
                self._sync_spool()
        return True

    async def _replay_some(self, timeout: float) -> None:
        """Commit the oldest spool segment if the database answers; it is removed only
        once every group of it is committed."""
        self._check()
        if not await self._probe():
            if self.state is State.REPLAYING:
                self.state = step(self.state, Event.AWAY)
            await asyncio.sleep(min(timeout, PROBE_PERIOD_S))
            return
        self._check()
        if self.state is not State.DRAINING:
            self.state = step(self.state, Event.ANSWERS)
        oldest = self.spool.oldest()
        if oldest is None:
            return
        path, batches = oldest
        await self._store(batches, ack=False)  # acknowledged when they were spooled
        await self._wait_inflight()  # _Stop if a group failed: the segment stays
        if self.failed:  # it went away again: the segment stays, to be replayed whole
            self.failed = []
            return
        self.spool.remove(path)
        self.stats.replayed_batches += len(batches)

    async def _spool_drain(self) -> bool:
        """DRAIN while spooling: replay for a while if the database is there, keep the rest."""
        deadline = time.monotonic() + DRAIN_REPLAY_S
        while self.spool and time.monotonic() < deadline:
            await self._replay_some(timeout=1.0)
            if not self.db_ok:
                break
        self._sync_spool()
        if self.spool:
            self.spool.sync()
            log.warning("stopping with %.1f MB spooled in %s: the next start replays it",
                        self.spool.bytes / 2**20, self.spool.directory, extra=self._spool_context("spool_kept"))
        return False

    async def _probe(self) -> bool:
        """Whether the database answers (a connection is opened if none is)."""
        if self.db_ok and any(c is not None for c in self.conns):
            return True
        try:
            conn = await asyncpg.connect(self.dsn, timeout=5)
        except (*CONNECTION_ERRORS, asyncpg.PostgresError) as exc:
            self._db_down(exc)
            return False
        idle = next((i for i, c in enumerate(self.conns) if c is None), None)
        if idle is None:
            await conn.close()
        else:
            self.conns[idle] = conn
        if not self.db_ok:
            log.info("database connection open")
        self.db_ok = True
        return True

    # -- storing --------------------------------------------------------------------------

    async def _connect_all(self) -> None:
        for i in range(len(self.conns)):
            try:
                self.conns[i] = await asyncpg.connect(self.dsn, timeout=10)
                self.db_ok = True
            except (*CONNECTION_ERRORS, asyncpg.PostgresError) as exc:
                self._db_down(exc)
                return
        log.info("database connection open")

    def _db_down(self, exc: BaseException) -> None:
        if self.db_ok or not self.db_error:
            log.error("database unavailable: %s", exc)
        self.db_ok = False
        self.db_error = str(exc) or type(exc).__name__

    async def _commit(self, slot: int, group: list[Batch]) -> copier.Outcome:
        """Store one group on connection ``slot``: its outcome (copier.StoreFailed goes up)."""
        M, w = self.M, self.ctx.name
        table = group[0].table
        conn = self.conns[slot]
        if conn is None or conn.is_closed():
            try:
                conn = self.conns[slot] = await asyncpg.connect(self.dsn, timeout=10)
            except Exception as exc:  # noqa: BLE001 - classified: away, or the writer stops
                if classify(exc) is not Kind.AWAY and not isinstance(exc, asyncpg.PostgresError):
                    raise
                self._db_down(exc)
                return copier.Lost(exc)
        started = time.perf_counter()
        outcome = await copier.store_group(conn, group)
        if isinstance(outcome, copier.Lost):
            self._db_down(outcome.error)
            M.COPY_ERRORS.labels(w, table, "connection").inc()
            conn.terminate()  # the socket is already bad: no goodbye to wait for
            self.conns[slot] = None
            return outcome
        self.db_ok = True
        self.stats.committed(group, outcome.result, time.perf_counter() - started, M, w)
        return outcome

    def _ack(self, batches: Iterable[Batch]) -> None:
        by: dict[tuple[str, int], list[int]] = {}
        for b in batches:
            if b.producer in self.acks and b.seq:
                by.setdefault((b.producer, b.incarnation), []).append(b.seq)
        for (producer, incarnation), seqs in by.items():
            self.acks[producer].put((incarnation, tuple(seqs)))

    # -- status ---------------------------------------------------------------------------

    async def _status_loop(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            self.report()

    def report(self) -> None:
        M, w = self.M, self.ctx.name
        self.stats.publish(M, self.totals, w)
        self.totals.set(M.SPOOL_QUARANTINED.labels(w), self.spool.quarantined_bytes)
        M.SPOOL_BYTES.labels(w).set(self.spool.bytes)
        M.SPOOL_FULL.labels(w).set(1 if self.spool.full else 0)
        try:
            depth = self.in_queue.qsize()
        except NotImplementedError:  # macOS
            depth = -1
        stalled = self.stats.stalled_s(max(depth, 0) + self.aq.qsize() + len(self.inflight))
        M.WRITER_STALLED.labels(w).set(stalled)
        M.QUEUE_DEPTH.labels(w, "writer_in").set(depth + self.aq.qsize())
        self.status_queue.put({
            "worker": w, "kind": "writer", "time": time.time(), **self.stats.status(),
            "db_ok": self.db_ok, "db_error": self.db_error, "state": self.state.value,
            "mode": "spool" if spooling(self.state) else self.state.value,
            "spool_bytes": self.spool.bytes, "spool_full": self.spool.full,
            "spool_quarantined_bytes": self.spool.quarantined_bytes,
            "queue_depth": depth + self.aq.qsize(), "groups_in_flight": len(self.inflight), "stalled_s": stalled,
        })

def _groups(items: list[Batch]) -> list[list[Batch]]:
    """Consecutive batches of one table and kind joined (up to MAX_COPY_BYTES); a backfill alone."""
    out: list[list[Batch]] = []
    size = 0
    for b in items:
        last = out[-1] if out else None
        if (last is not None and b.kind != "backfill" and last[0].kind == b.kind and last[0].table == b.table
                and size + b.nbytes <= MAX_COPY_BYTES):
            last.append(b)
            size += b.nbytes
        else:
            out.append([b])
            size = b.nbytes
    return out


def spool_dir(data_dir: Path, dsn: str) -> Path:
    """One spool per database: batches spooled for one DSN are never replayed into another
    (the name is a hash, so the DSN's password appears nowhere on disk)."""
    return data_dir / "spool" / hashlib.sha256(dsn.encode()).hexdigest()[:16]


def main(settings: Settings, name: str, dsn: str, in_queue: Any, status_queue: Any,
         acks: dict[str, Any] | None = None) -> None:
    async def body(ctx: ChildContext) -> None:
        # The batch pipes (wire/channel.py): given as their ends, read here as one queue.
        batches = FanIn(in_queue.readers, in_queue.control) if isinstance(in_queue, FanInEnds) else in_queue
        try:
            await Writer(ctx, dsn, batches, status_queue, acks, spool_dir(settings.data_dir, dsn),
                         settings.spool_max_mb * 2**20).run()
        finally:
            if isinstance(batches, FanIn):
                batches.close()
            # Also when failing: an ack queue nobody reads (its producer dead) must not hold
            # the exit; a lost ack costs a resend, which the unique keys turn away.
            ctx.release_queues(status_queue, *(acks or {}).values())

    # The writer takes no stop event: it stops on DRAIN, after the producers.
    try:
        run_child(settings, name, None, body)
    except WriterFailed:
        # Logged once where it happened; a non-zero exit makes the supervisor start another
        # writer, and the producers send it every batch this one never acknowledged.
        sys.exit(1)
    except SpoolError as exc:
        log.error("writer cannot start: %s", exc, extra={"event": "writer_failed", "error": str(exc)})
        sys.exit(1)
