"""The supervisor: settings in, database ready, universe resolved, children running.

Owns the process tree. Children are started with the ``spawn`` context (no inherited
event loop, sockets or threads). A child that dies is restarted with exponential
backoff; the backoff resets once it has run for a minute. SIGINT/SIGTERM stop the
producers first (socket and REST workers hand over every row they hold), then the
feature worker finishes what they fed it, then the writer drains everything queued
before it exits, then the supervisor exits 0.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing as mp
import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

from ingestor.binance.plan import Connection, plan
from ingestor.binance.rest_client import RestClient, RestError
from ingestor.binance.sequence import Positions
from ingestor.binance.streams import Market
from ingestor.binance.universe import Universe, UniverseError, resolve_universe
from ingestor.config import Settings, mask_dsn
from ingestor.db.embedded import EmbeddedPostgres
from ingestor.db.migrate import PayloadTypeError, apply_policies, capabilities, ensure_payload_type, migrate
from ingestor.db.reference import record_symbol_info
from ingestor.db.resume import stored_positions
from ingestor.features import worker as feature_worker
from ingestor.wire import feed
from ingestor.wire.channel import FanInEnds, add_sender
from ingestor.wire.delivery import WriterLink
from ingestor.workers import rest_worker, socket_worker
from ingestor.writer import process as writer_process

log = logging.getLogger(__name__)

RESTART_BACKOFF_MAX_S = 30.0
RESTART_RESET_AFTER_S = 60.0
PRODUCER_STOP_TIMEOUT_S = 30.0
FEATURES_DRAIN_TIMEOUT_S = 60.0
WRITER_DRAIN_TIMEOUT_S = 120.0
FEATURE_LAG_PROBLEM_S = 30.0


class StartupError(Exception):
    """Something that stops the pipeline from starting; the message is for the user."""


@dataclass
class Child:
    name: str
    kind: str  # socket | rest | features | writer
    target: Callable[..., None]
    args: tuple[Any, ...]
    reads: tuple[Any, ...] = ()  # queues it is the only reader of
    link_at: int | None = None  # a producer: where its WriterLink is in args (a new batch pipe each start)
    positions: dict[Any, Any] = field(default_factory=dict)  # a socket worker's last sequence positions
    process: Any = None
    restarts: int = 0
    started_at: float = 0.0
    next_start: float = 0.0
    backoff_s: float = 0.5
    status: dict[str, Any] = field(default_factory=dict)


async def open_database(settings: Settings) -> tuple[str, EmbeddedPostgres | None]:
    """The DSN to use: the configured one (checked now), or a started embedded server."""
    embedded = None
    if settings.dsn is None:
        embedded = EmbeddedPostgres(settings.data_dir)
        try:
            dsn = await asyncio.to_thread(embedded.start)
        except Exception as exc:  # noqa: BLE001 - any failure of the embedded server is fatal here
            raise StartupError(f"could not start the embedded PostgreSQL in {embedded.pgdata}: {exc}") from exc
        log.info("embedded PostgreSQL in %s (set INGESTOR_DSN or --dsn to use a server of your own)",
                 embedded.pgdata)
    else:
        dsn = settings.dsn
    try:
        conn = await asyncpg.connect(dsn, timeout=10)
    except (TimeoutError, OSError, asyncpg.PostgresError, ValueError) as exc:
        if embedded is not None:
            embedded.stop()
        raise StartupError(f"cannot connect to the database {mask_dsn(dsn)}: {exc}") from exc
    try:
        applied = await migrate(conn)
        if applied:
            log.info("applied migrations: %s", ", ".join(applied))
        await ensure_payload_type(conn, settings.payload_type)
        caps = await capabilities(conn)
        log.info("PostgreSQL %s, %s", caps.server_version,
                 f"TimescaleDB {caps.timescaledb} ({caps.license} licence)" if caps.timescaledb else
                 "no TimescaleDB: plain tables with BRIN time indexes")
        for warning in await apply_policies(conn, caps, settings.compress_after_days or None,
                                            settings.retention_days or None):
            log.warning("%s", warning)
    except PayloadTypeError as exc:
        if embedded is not None:
            embedded.stop()
        raise StartupError(str(exc)) from None
    finally:
        await conn.close()
    return dsn, embedded


async def load_universe(settings: Settings) -> Universe:
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        client = RestClient(session, {m: settings.rest_url(m) for m in settings.market_list},
                            settings.rest_weight_share)
        try:
            return await resolve_universe(client, settings.market_list, settings.symbols, settings.top)
        except RestError as exc:
            raise StartupError(f"cannot read the symbol list: {exc}") from exc
        except aiohttp.ClientError as exc:
            raise StartupError(f"cannot reach the exchange's REST API: {exc}") from exc
        except UniverseError as exc:
            raise StartupError(str(exc)) from exc


class Supervisor:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.ctx = mp.get_context("spawn")
        self.children: list[Child] = []
        self.stopping = False
        self.started = time.time()
        self.dsn = ""
        self.universe: Universe | None = None
        self.shards: list[list[Connection]] = []
        self.db_reachable = False
        self.db_checked = 0.0
        self.http_url = ""
        self._stop_requested = asyncio.Event()

    # -- start ----------------------------------------------------------------------

    def _metrics_dir(self) -> Path:
        path = Path(tempfile.mkdtemp(prefix="ingestor-metrics-"))
        # prometheus_client reads this at import in every child; spawn passes the
        # environment on, so it is set here, once, before any child starts.
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(path)
        return path

    async def run(self, ready: Callable[[Supervisor], None] | None = None) -> int:
        s = self.settings
        self.dsn, embedded = await open_database(s)
        try:
            self.universe = await load_universe(s)
            symbols = {m: list(v) for m, v in self.universe.symbols.items() if v}
            suffix: dict[Market, str] = {m: s.depth_stream_suffix(m) for m in symbols}
            self.shards = plan(self.universe, suffix, s.shards)
            log.info("recording %d symbols (%s) on %d shard(s), %d connections", self.universe.count(),
                     ", ".join(f"{m}: {len(v)}" for m, v in symbols.items()), s.shards,
                     sum(len(c) for c in self.shards))
            await self._record_symbol_info()
            resume = await self._stored_positions(symbols)
            self.metrics_dir = self._metrics_dir()
            # Batches travel on one pipe per producer (wire/channel.py: a producer killed in
            # the middle of a batch cannot wedge the writer or the other producers), made
            # anew for each producer start; the writer is handed each one as it is made.
            # What bounds them is each producer's budget of unacknowledged batches (below).
            self.batch_pipes: dict[str, Any] = {}  # producer -> the reading end of its current pipe
            self.writer_control: Any = None  # the running writer's control connection
            self.status_queue = self.ctx.Queue()
            self.stop_event = self.ctx.Event()
            # Each producer's acknowledgements from the writer, and the count of writer
            # starts: a producer sends its unacknowledged batches again when it moves.
            self.writer_epoch = self.ctx.Value("q", 0)
            producers = [f"socket-{i}" for i in range(len(self.shards))] + ["rest"] + (
                ["features"] if s.features else [])
            self.ack_queues = {name: self.ctx.Queue() for name in producers}
            budgets = buffer_budgets(s.max_buffer_mb * 2**20, len(self.shards), s.features)

            def link(name: str) -> WriterLink:  # its pipe is made at each start (_start)
                return WriterLink(None, self.ack_queues[name], self.writer_epoch, budgets[name])

            # The feature worker's input (feeds and snapshots), and the REST worker's requests
            # (snapshots for the feature worker's books, backfills for the socket workers' gaps).
            self.feature_queue = self.ctx.Queue() if s.features else None
            self.request_queue = self.ctx.Queue()
            self.children.append(Child("writer", "writer", writer_process.main,
                                       (s, "writer", self.dsn, None, self.status_queue, self.ack_queues)))
            if s.features:
                ticks = {k: float(v) for k, v in self.universe.tick_sizes.items()}
                self.children.append(Child("features", "features", feature_worker.main,
                                           (s, "features", ticks, self.feature_queue, link("features"),
                                            self.request_queue, self.status_queue, self.dsn),
                                           (self.feature_queue, self.ack_queues["features"]), link_at=4))
            for i, conns in enumerate(self.shards):
                name = f"socket-{i}"
                # Each worker carries on from where the last run stopped, for its markets.
                seeded = {m: resume[m] for m in {c.market for c in conns} if m in resume}
                self.children.append(Child(name, "socket", socket_worker.main,
                                           (s, name, conns, symbols, link(name), self.status_queue,
                                            self.stop_event, self.feature_queue, self.request_queue, seeded),
                                           (self.ack_queues[name],), positions=seeded, link_at=4))
            self.children.append(Child("rest", "rest", rest_worker.main,
                                       (s, "rest", symbols, link("rest"), self.status_queue, self.stop_event,
                                        self.feature_queue, self.request_queue, self.dsn),
                                       (self.ack_queues["rest"], self.request_queue), link_at=3))
            for child in self.children:
                self._start(child)
            threading.Thread(target=self._read_status, name="status-reader", daemon=True).start()
            from ingestor.health import HealthServer

            health = HealthServer(self, self.metrics_dir)
            self.http_url = await health.start(s.http_host, s.http_port)
            log.info("health and metrics on %s/health, %s/metrics", self.http_url, self.http_url)
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, self.request_stop)
            if ready is not None:
                ready(self)
            try:
                await self._watch()
                await self._shutdown()
            finally:
                await health.stop()
                shutil.rmtree(self.metrics_dir, ignore_errors=True)
        finally:
            if embedded is not None:
                await asyncio.to_thread(embedded.stop)
        return 0

    async def _record_symbol_info(self) -> None:
        assert self.universe is not None
        conn = await asyncpg.connect(self.dsn, timeout=10)
        try:
            n = await record_symbol_info(conn, self.universe, int(time.time() * 1000))
        finally:
            await conn.close()
        if n:
            log.info("stored the exchange info of %d symbol(s) (new or changed)", n)

    async def _stored_positions(self, symbols: dict[Market, list[str]]) -> dict[Market, Positions]:
        """The last stored ids and times: the downtime since the last run is a hole like any
        other (trades backfilled, depth and id-less streams recorded as gaps)."""
        conn = await asyncpg.connect(self.dsn, timeout=10)
        try:
            resume = await stored_positions(conn, symbols)
        finally:
            await conn.close()
        if resume:
            newest = max(ms for pos in resume.values() for state in pos.values() for _, ms in state.values())
            n = len({(m, sym) for m, pos in resume.items() for state in pos.values() for sym in state})
            log.info("carrying on from the last stored events of %d symbol(s) (the newest %.0f s ago): the "
                     "downtime since is backfilled or recorded as gaps", n, time.time() - newest / 1000,
                     extra={"event": "resume", "symbols": n, "newest_ms": newest})
        return resume

    def request_stop(self) -> None:
        if not self._stop_requested.is_set():
            log.info("stopping: producers first, then the writer drains")
        self._stop_requested.set()

    def _start(self, child: Child) -> None:
        sending_end = None
        if child.kind == "writer":
            with self.writer_epoch.get_lock():
                self.writer_epoch.value += 1
            # A fresh control connection each time (one a killed writer was reading from may
            # be cut mid-message), and the reading ends of every producer's current pipe.
            if self.writer_control is not None:
                self.writer_control.close()
            self.writer_control, theirs = self.ctx.Pipe(duplex=True)
            args = list(child.args)
            args[3] = FanInEnds(dict(self.batch_pipes), theirs)
            child.args = tuple(args)
        elif child.link_at is not None:
            # A fresh pipe for each start: the last one may end in half a batch of the dead one.
            reading, sending_end = self.ctx.Pipe(duplex=False)
            old = self.batch_pipes.pop(child.name, None)
            if old is not None:
                old.close()  # the running writer has its own copy, read to the end
            self.batch_pipes[child.name] = reading
            args = list(child.args)
            args[child.link_at] = replace(args[child.link_at], queue=sending_end)
            child.args = tuple(args)
        child.process = self.ctx.Process(target=child.target, args=child.args, name=child.name, daemon=False)
        child.process.start()
        child.started_at = time.monotonic()
        log.info("started %s (pid %d)", child.name, child.process.pid)
        if child.kind == "writer":
            child.args[3].control.close()  # the writer has it now
        elif sending_end is not None:
            # Only the producer may hold the sending end: when it dies the pipe ends (EOF),
            # which is how the writer knows that nothing more comes from it.
            sending_end.close()
            self._hand_to_writer(child.name)

    def _hand_to_writer(self, name: str) -> None:
        """Give the running writer the reading end of ``name``'s new pipe. A writer that is
        not running gets every current pipe when it starts."""
        writer = next(c for c in self.children if c.kind == "writer")
        if writer.process is None or writer.process.exitcode is not None or self.writer_control is None:
            return
        try:
            add_sender(self.writer_control, name, self.batch_pipes[name], writer.process.pid)
        except OSError as exc:  # it died just now: its successor gets the pipe at its start
            log.warning("could not hand %s's pipe to the writer (%s): the next writer gets it", name, exc)

    # -- watch ----------------------------------------------------------------------

    async def _watch(self) -> None:
        from prometheus_client import multiprocess

        while not self._stop_requested.is_set():
            now = time.monotonic()
            for child in self.children:
                proc = child.process
                if proc is not None and proc.exitcode is not None:
                    log.error("%s (pid %d) exited with %s; restarting in %.1f s", child.name, proc.pid,
                              proc.exitcode, child.backoff_s, extra={
                                  "event": "worker_exit", "child": child.name, "pid": proc.pid,
                                  "exitcode": proc.exitcode, "restarts": child.restarts,
                                  "delay_s": child.backoff_s})
                    multiprocess.mark_process_dead(proc.pid)
                    for q in child.reads:
                        release_reader_lock(q)
                    child.process = None
                    child.next_start = now + child.backoff_s
                    child.backoff_s = min(RESTART_BACKOFF_MAX_S, child.backoff_s * 2)
                elif proc is None and now >= child.next_start:
                    child.restarts += 1
                    if child.kind == "features":
                        # It fills the bars its predecessor missed, from the first one the
                        # chain of dead workers owes.
                        child.args = (*child.args[:8], dict((child.status or {}).get("bar_starts") or {}))
                    if child.kind == "socket":
                        # The new worker carries on from the sequences its predecessor last
                        # reported, so it sees (and has backfilled) what the death lost.
                        markets = {c.market for c in child.args[2]}
                        child.args = (*child.args[:9], with_time_floor(child.positions, markets,
                                                                       int(self.started * 1000)))
                    self._start(child)
                elif proc is not None and now - child.started_at > RESTART_RESET_AFTER_S:
                    child.backoff_s = 0.5
            await self._check_db()
            try:
                await asyncio.wait_for(self._stop_requested.wait(), 0.1)
            except TimeoutError:
                pass

    async def _check_db(self) -> None:
        if time.monotonic() - self.db_checked < 2.0:
            return
        self.db_checked = time.monotonic()
        try:
            conn = await asyncpg.connect(self.dsn, timeout=2)
            try:
                await conn.fetchval("SELECT 1", timeout=2)
            finally:
                await conn.close(timeout=2)
            self.db_reachable = True
        except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
            self.db_reachable = False

    def _read_status(self) -> None:
        by_name = {c.name: c for c in self.children}
        while True:
            try:
                st = self.status_queue.get()
            except (EOFError, OSError, ValueError):
                return
            child = by_name.get(st.get("worker", ""))
            if child is not None:
                positions = st.pop("positions", None)
                if positions is not None:
                    child.positions = positions
                child.status = st

    # -- stop -----------------------------------------------------------------------

    async def _shutdown(self) -> None:
        from prometheus_client import multiprocess

        self.stopping = True
        self.stop_event.set()
        producers = [c for c in self.children if c.kind in ("socket", "rest")]
        writer = next(c for c in self.children if c.kind == "writer")
        await self._join(producers, PRODUCER_STOP_TIMEOUT_S)
        features = [c for c in self.children if c.kind == "features"]
        if features and self.feature_queue is not None:
            if features[0].process is not None and features[0].process.exitcode is None:
                self.feature_queue.put(feed.DRAIN)  # after everything the producers fed it
                await self._join(features, FEATURES_DRAIN_TIMEOUT_S)
            else:
                log.warning("the feature worker is not running: bars still open are not written")
        if writer.process is None or writer.process.exitcode is not None:
            self._start(writer)  # died during shutdown: the pipes still hold its work
        # Every producer has exited: the writer reads each pipe to its end, then drains.
        self.writer_control.send(("drain",))
        await self._join([writer], WRITER_DRAIN_TIMEOUT_S)
        for c in self.children:
            if c.process is not None:
                multiprocess.mark_process_dead(c.process.pid)
        log.info("stopped")

    async def _join(self, children: list[Child], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for c in children:
            if c.process is None:
                continue
            while c.process.exitcode is None and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            if c.process.exitcode is None:
                log.error("%s did not stop within %.0f s; killing it", c.name, timeout)
                c.process.kill()
                await asyncio.to_thread(c.process.join, 5)

    # -- health ---------------------------------------------------------------------

    def health(self) -> tuple[bool, dict[str, Any]]:
        now = time.time()
        problems: list[str] = []
        workers: dict[str, Any] = {}
        for c in self.children:
            alive = c.process is not None and c.process.exitcode is None
            st = dict(c.status)
            age = None if not st else round(now - st.pop("time", now), 3)
            st.pop("worker", None)
            workers[c.name] = {"alive": alive, "pid": c.process.pid if c.process else None,
                               "restarts": c.restarts, "status_age_s": age, **st}
            if not alive:
                problems.append(f"{c.name} is not running")
            elif age is None:
                problems.append(f"{c.name} has not reported yet")
            elif age > 5.0:
                problems.append(f"{c.name} has not reported for {age} s")
            if c.kind == "socket" and st and st.get("connected", 0) < st.get("connections", 0):
                if time.monotonic() - c.started_at > 10.0:
                    problems.append(f"{c.name}: {st['connections'] - st['connected']} connection(s) down")
            if c.kind == "features" and st:
                for market, m in st.get("markets", {}).items():
                    lag = m.get("input_lag_s")
                    if lag is not None and lag > FEATURE_LAG_PROBLEM_S and st.get("queue_depth", 0) > 0:
                        problems.append(f"{c.name}: {market} input {lag:.0f} s behind")
                    if m.get("unsynced_books"):  # past the feature engine's UNSYNCED_PROBLEM_MS
                        problems.append(f"{c.name}: {market} book(s) not synced for over a minute: "
                                        + ", ".join(m["unsynced_books"][:10]))
            # A writer with work pending that commits nothing (a wedged group, a database that
            # takes the connection but never the rows) loses nothing yet, but will: say so.
            if c.kind == "writer" and st and (st.get("stalled_s") or 0) > self.settings.writer_stall_s:
                problems.append(f"{c.name}: work pending and nothing committed for {st['stalled_s']:.0f} s "
                                f"(state {st.get('state')}, {st.get('groups_in_flight', 0)} group(s) in flight, "
                                f"queue {st.get('queue_depth', 0)})")
        writer = workers.get("writer", {})
        last_commit = writer.get("last_commit")
        db = {"reachable": self.db_reachable and bool(writer.get("db_ok", True)),
              "last_commit_age_s": None if not last_commit else round(now - last_commit, 3),
              "error": writer.get("db_error") or None}
        if not db["reachable"]:
            problems.append("database unreachable")
        healthy = not problems and not self.stopping
        return healthy, {
            "status": "ok" if healthy else "unhealthy", "problems": problems, "stopping": self.stopping,
            "uptime_s": round(now - self.started, 1), "workers": workers, "database": db,
        }


# The REST and feature workers' slices of --max-buffer-mb; the socket workers share the rest.
SMALL_PRODUCER_SHARE = 0.05


def with_time_floor(positions: dict[Any, Any], markets: set[Market], since_ms: int) -> dict[Any, Any]:
    """``positions`` for a restarted socket worker, with a floor for the streams without ids
    (mark prices ``m``, liquidations ``f``) that no acknowledged batch has placed yet: their
    time gap then starts at ``since_ms`` (this run's start), not at the successor's own start,
    so it covers what the dead worker received and never had stored (seen in `demo --chaos`:
    liquidations lost with no gap around them). The floor sits under the symbol ``*``, which
    no event has, so it never makes a real event look stale."""
    out = {m: {kind: dict(state) for kind, state in by_kind.items()} for m, by_kind in positions.items()}
    for market in markets:
        by_kind = out.setdefault(market, {})
        for kind in ("m", "f"):
            if not by_kind.get(kind):
                by_kind[kind] = {"*": (since_ms, since_ms)}
    return out


def buffer_budgets(total_bytes: int, sockets: int, features: bool) -> dict[str, int]:
    """Each producer's budget of unacknowledged batch bytes, summing to at most ``total_bytes``.

    The socket workers get most of it: the exchange does not wait, and a socket worker
    that reaches its budget stops reading and soon loses its connection (a recorded,
    backfilled gap), so every byte more is time the writer may stall without a gap. The
    REST worker can skip its periodic jobs and hold its backfills, and the feature worker
    writes a few rows per bar: a small fixed slice each."""
    small = int(total_bytes * SMALL_PRODUCER_SHARE)
    out = {"rest": small}
    if features:
        out["features"] = small
    per_socket = (total_bytes - sum(out.values())) // max(1, sockets)
    out.update({f"socket-{i}": per_socket for i in range(sockets)})
    return out


def release_reader_lock(q: Any) -> None:
    """Free the batch queue's reader lock if the dead writer held it.

    ``multiprocessing.Queue.get`` holds a process-shared lock while it waits, and a
    process killed there never releases it: the restarted writer would then wait forever.
    The writer is the queue's only reader, so once it is dead nobody may hold the lock.
    (Batches it had taken but not committed are lost with it; issue 5 replaces this
    queue with acknowledged per-producer channels.)
    """
    lock = q._rlock  # no public API for this; see the docstring
    lock.acquire(False)  # taken now if it was free; either way it is ours to release
    lock.release()


async def run_supervisor(settings: Settings, ready: Callable[[Supervisor], None] | None = None) -> int:
    """Run until stopped; a StartupError carries the one line to show the user."""
    return await Supervisor(settings).run(ready)


__all__ = ["Supervisor", "StartupError", "buffer_budgets", "run_supervisor", "open_database"]
