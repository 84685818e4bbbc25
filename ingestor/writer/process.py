"""Writer process: the only database client on the hot path.

Batches arrive already encoded (COPY tuples). Several connections each take the next
batches from one queue, join those of the same table, and send them with one binary
``COPY``; PostgreSQL's jsonb parsing, not this process, limits one connection, hence
several. A batch is never dropped: a lost connection is re-opened and the same COPY sent
again; rows the server refuses are isolated by splitting the batch, logged with a
sample and counted, so one bad row cannot take its neighbours with it.

Shutdown: the supervisor puts ``DRAIN`` on the queue after every producer has exited;
everything before it is committed, then the process exits.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import threading
import time
from typing import Any

import asyncpg
import numpy as np

from ingestor.binance.rows import TABLES
from ingestor.config import Settings
from ingestor.workers.batching import Batch
from ingestor.workers.child import ChildContext, run_child
from ingestor.writer.copy_binary import copy_file, tuple_offsets

log = logging.getLogger(__name__)

DRAIN = "drain"
MAX_COPY_BYTES = 8 * 1024 * 1024  # batches of one table joined into one COPY up to this size
LAG_SAMPLES = 16  # lag quantiles observed per batch: a per-row histogram without per-row calls
_CONNECTION_ERRORS = (OSError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError,
                      asyncpg.exceptions.OperatorInterventionError, asyncio.TimeoutError)
_ROW_ERRORS = (asyncpg.DataError, asyncpg.IntegrityConstraintViolationError)


class Writer:
    def __init__(self, ctx: ChildContext, dsn: str, in_queue: Any, status_queue: Any) -> None:
        self.ctx = ctx
        self.dsn = dsn
        self.in_queue = in_queue
        self.status_queue = status_queue
        self.rows: dict[str, int] = {}
        self.batches: dict[str, int] = {}
        self.rejected: dict[str, int] = {}
        self.last_commit = 0.0
        self.db_ok = False
        self.db_error = ""
        self._reader_done = threading.Event()

    async def run(self) -> None:
        from ingestor import metrics as M

        self.M = M
        self.totals = M.Totals()
        loop = asyncio.get_running_loop()
        self.aq: asyncio.Queue[Batch | str] = asyncio.Queue(maxsize=64)
        reader = threading.Thread(target=self._read, args=(loop,), name="writer-reader", daemon=True)
        reader.start()
        copiers = [asyncio.ensure_future(self._copier(i)) for i in range(self.ctx.settings.writer_connections)]
        status = asyncio.ensure_future(self._status_loop())
        await asyncio.gather(*copiers)
        status.cancel()
        self.report()
        log.info("drained: %s", ", ".join(f"{t}={n}" for t, n in sorted(self.rows.items())) or "no rows")

    def _read(self, loop: asyncio.AbstractEventLoop) -> None:
        """Blocking reads from the multiprocessing queue, handed to the loop in order.

        The bounded asyncio queue is the back-pressure: when the database is slow this
        thread waits, and the producers' batches wait in the pipe behind it.
        """
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

    async def _copier(self, index: int) -> None:
        # Connect before the first batch, so /health reports the database from the start.
        conn: asyncpg.Connection | None = await self._connect()
        while True:
            item = await self.aq.get()
            if isinstance(item, str):
                await self.aq.put(item)  # the other copiers need to see it too
                break
            batches = [item]
            size = len(item.data)
            drain_seen = False
            while size < MAX_COPY_BYTES and not self.aq.empty():
                nxt = self.aq.get_nowait()
                if isinstance(nxt, str):
                    drain_seen = True
                    break
                batches.append(nxt)
                size += len(nxt.data)
            by_table: dict[str, list[Batch]] = {}
            for b in batches:
                by_table.setdefault(b.table, []).append(b)
            for table, group in by_table.items():
                conn = await self._copy(conn, table, group)
            if drain_seen:
                await self.aq.put(DRAIN)
                break
        if conn is not None:
            await conn.close()

    async def _connect(self) -> asyncpg.Connection:
        attempt = 0
        while True:
            try:
                conn = await asyncpg.connect(self.dsn, timeout=10)
                if not self.db_ok:
                    log.info("database connection open")
                self.db_ok = True
                return conn
            except (*_CONNECTION_ERRORS, asyncpg.PostgresError) as exc:
                self._db_down(exc)
                attempt += 1
                await asyncio.sleep(min(10.0, 0.2 * 2**attempt))

    def _db_down(self, exc: BaseException) -> None:
        if self.db_ok or not self.db_error:
            log.error("database unavailable: %s", exc)
        self.db_ok = False
        self.db_error = str(exc) or type(exc).__name__

    async def _copy(self, conn: asyncpg.Connection | None, table: str, group: list[Batch]) -> asyncpg.Connection:
        data = b"".join(b.data for b in group)
        n = sum(b.rows for b in group)
        while True:
            if conn is None or conn.is_closed():
                conn = await self._connect()
            started = time.perf_counter()
            try:
                await _copy_rows(conn, table, data)
            except _ROW_ERRORS as exc:
                n = await self._isolate(conn, table, data, exc)
            except _CONNECTION_ERRORS as exc:
                self._db_down(exc)
                self.M.COPY_ERRORS.labels(self.ctx.name, table, "connection").inc()
                conn.terminate()  # the socket is already bad: no goodbye to wait for
                conn = None
                await asyncio.sleep(0.5)
                continue
            except asyncpg.PostgresError as exc:
                # Not the rows' fault (a missing table, permissions...): keep the batch and retry.
                log.error("COPY into %s failed: %s; retrying", table, exc)
                self.M.COPY_ERRORS.labels(self.ctx.name, table, "server").inc()
                await asyncio.sleep(2.0)
                continue
            break
        elapsed = time.perf_counter() - started
        self.db_ok = True
        self.last_commit = time.time()
        self.rows[table] = self.rows.get(table, 0) + n
        self.batches[table] = self.batches.get(table, 0) + 1
        M, w = self.M, self.ctx.name
        M.COPY_SECONDS.labels(w, table).observe(elapsed)
        ev = np.concatenate([np.frombuffer(b.event_ms, dtype=np.int64) for b in group])
        if len(ev):
            points = np.quantile(ev, np.linspace(0, 1, min(LAG_SAMPLES, len(ev))))
            lags = (self.last_commit * 1000 - points) / 1000
            hist = M.LAG_SECONDS.labels(w, table)
            for lag in lags:
                hist.observe(max(float(lag), 0.0))
        return conn

    async def _isolate(self, conn: asyncpg.Connection, table: str, data: bytes, exc: BaseException) -> int:
        """Commit every row the server accepts; log and count the ones it refuses."""
        offsets = tuple_offsets(data)
        stored = 0
        spans = [(0, len(offsets) - 1)]
        while spans:
            lo, hi = spans.pop()
            chunk = data[offsets[lo] : offsets[hi]]
            try:
                await _copy_rows(conn, table, chunk)
                stored += hi - lo
            except _ROW_ERRORS as err:
                if hi - lo == 1:
                    self.rejected[table] = self.rejected.get(table, 0) + 1
                    self.M.ROWS_REJECTED.labels(self.ctx.name, table).inc()
                    log.error("%s: row refused by the database (%s): %r", table, err, chunk[:300])
                else:
                    mid = (lo + hi) // 2
                    spans.extend(((mid, hi), (lo, mid)))
        log.warning("%s: batch refused (%s); stored %d rows, refused %d", table, exc, stored,
                    len(offsets) - 1 - stored)
        return stored

    async def _status_loop(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            self.report()

    def report(self) -> None:
        M, w = self.M, self.ctx.name
        for table, n in self.rows.items():
            self.totals.set(M.ROWS_WRITTEN.labels(w, table), n)
        for table, n in self.batches.items():
            self.totals.set(M.COPY_BATCHES.labels(w, table), n)
        try:
            depth = self.in_queue.qsize()
        except NotImplementedError:  # macOS
            depth = -1
        M.QUEUE_DEPTH.labels(w, "writer_in").set(depth + self.aq.qsize())
        self.status_queue.put({
            "worker": w, "kind": "writer", "time": time.time(), "rows": dict(self.rows),
            "rejected_rows": dict(self.rejected), "db_ok": self.db_ok, "db_error": self.db_error,
            "last_commit": self.last_commit or None, "queue_depth": depth + self.aq.qsize(),
        })


async def _copy_rows(conn: asyncpg.Connection, table: str, rows: bytes) -> None:
    # asyncpg takes a bytes source for a file name; a memoryview is read as the data.
    await conn.copy_to_table(table, source=memoryview(copy_file(rows)), columns=TABLES[table], format="binary")


def main(settings: Settings, name: str, dsn: str, in_queue: Any, status_queue: Any) -> None:
    async def body(ctx: ChildContext) -> None:
        await Writer(ctx, dsn, in_queue, status_queue).run()
        ctx.release_queues(status_queue)

    # The writer takes no stop event: it stops on DRAIN, after the producers.
    run_child(settings, name, None, body)
