"""REST worker process: the only REST client of the pipeline.

Polls full depth snapshots (every symbol of both markets) and USD-M open interest on
their intervals. Each kind of job is spread evenly over its interval (symbol i of n runs
at i/n of the way through), so the weight is spent smoothly, not in bursts; the
``RestClient`` keeps the per-minute budget and honours ``Retry-After``.

It also serves the feature worker: a snapshot it asks for (to build or rebuild a book) is
fetched at once, up to four at a time beside the periodic jobs, which go on meanwhile (one
at a time per market: at least a fifth of the turns when the budget binds, never starved;
tests/test_rest_worker_fairness.py), and every snapshot fetched, asked for or periodic, is
both stored and handed to the feature worker (which builds books only from stored
snapshots, so a replay can build the same ones).

Stop: every wait (the weight budget, ``Retry-After`` of up to an hour, a reply) ends when
the worker is told to stop (the client raises ``RestStopped``). What it holds is handed
to the writer and acknowledged before it exits: the trades a backfill fetched so far go
as plain rows, and the gap's row stays open for the next run's gap scan to fill
(tests/test_rest_worker_stop.py).
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import queue
import time
from array import array
from dataclasses import dataclass
from typing import Any

import aiohttp
import asyncpg
import orjson

from ingestor.binance.rest_client import RestClient, RestError, RestStopped
from ingestor.binance.rest_limits import AGG_TRADES_WEIGHT, OPEN_INTEREST_WEIGHT, depth_weight
from ingestor.binance.streams import Market
from ingestor.config import Settings
from ingestor.wire import rows
from ingestor.wire.batching import Backfill, Batch, Batcher
from ingestor.wire.child import ChildContext, run_child
from ingestor.wire.delivery import Delivery, WriterLink
from ingestor.wire.feed import FEED_QUEUE_MAX, Snapshot, SnapshotRequest, TradeGapRequest, put_bounded

log = logging.getLogger(__name__)

ACK_WAIT_S = 20.0  # at stop, how long to wait for the writer to acknowledge the last batches
# At stop, requests in flight hand over what they hold and end at once (their waits end on
# stop); this only bounds a bug's cost, well inside the supervisor's PRODUCER_STOP_TIMEOUT_S.
REQUESTS_STOP_WAIT_S = 5.0
MAX_BACKFILL_TRADES = 200_000  # per gap: past this, the rest of the gap is recorded as unrecoverable
GAP_SCAN_PERIOD_S = 15.0
_MS = "(extract(epoch FROM {}) * 1000)::bigint"

@dataclass(frozen=True, order=True)
class Job:
    market: Market
    kind: str  # "depth" | "openInterest"
    symbol: str
    interval_s: float

def schedule(symbols: dict[Market, list[str]], settings: Settings) -> list[tuple[float, Job]]:
    """(offset seconds, job) for every periodic request, spread over each interval."""
    jobs: list[Job] = []
    for market, syms in symbols.items():
        if settings.snapshot_interval_s > 0:
            jobs.extend(Job(market, "depth", s, settings.snapshot_interval_s) for s in syms)
        if market == "futures" and settings.open_interest_interval_s > 0:
            jobs.extend(Job(market, "openInterest", s, settings.open_interest_interval_s) for s in syms)
    out: list[tuple[float, Job]] = []
    for kind in ("depth", "openInterest"):
        group = [j for j in jobs if j.kind == kind]
        out.extend((i * j.interval_s / len(group), j) for i, j in enumerate(group))
    return out

class RestWorker:
    def __init__(self, ctx: ChildContext, symbols: dict[Market, list[str]], link: WriterLink,
                 status_queue: Any, feature_queue: Any = None, request_queue: Any = None,
                 dsn: str | None = None) -> None:
        self.ctx = ctx
        self.settings = s = ctx.settings
        self.symbols = symbols
        self.delivery = Delivery(ctx.name, link)
        self.status_queue = status_queue
        self.feature_queue = feature_queue
        self.request_queue = request_queue
        self.asked: set[tuple[Any, ...]] = set()  # requests waiting or in flight (one each)
        self.served = 0
        self.backfilled = 0
        self.dsn = dsn
        self.snapshot_times: dict[tuple[Market, str], tuple[int, int]] = {}  # last stored (time, lastUpdateId)
        self.batcher = Batcher(self.delivery.send, batch_rows=s.batch_rows, batch_age_s=s.batch_age_ms / 1000,
                               producer=ctx.name)
        self.done: dict[str, int] = {}
        self.failed = 0
        self.skipped: dict[str, int] = {}  # periodic jobs not run while over the buffer budget, by kind
        self.skip_logged = False  # once per spell over budget
        self.snapshots_not_fed = 0  # stored, but the feature worker's queue was full (FEED_QUEUE_MAX)
        self.bad_responses = 0  # 200 replies that are not what the endpoint returns (of failed)
        self.totals: Any = None  # metrics.Totals, created on the first report (after import)

    async def run(self) -> None:
        s = self.settings
        timeout = aiohttp.ClientTimeout(total=30)
        # Sets ctx.stopping on the stop event, SIGTERM or a dead parent: every wait of the
        # client and of the loops below ends on it.
        stop = asyncio.ensure_future(self.ctx.watch())
        async with aiohttp.ClientSession(timeout=timeout) as session:
            self.client = RestClient(session, {m: s.rest_url(m) for m in self.symbols}, s.rest_weight_share,
                                     stopping=self.ctx.stopping)
            pump = asyncio.ensure_future(self._pump())
            scan = asyncio.ensure_future(self._scan_open_gaps())
            requests = asyncio.ensure_future(self._serve_requests())
            jobs = schedule(self.symbols, s)
            # One schedule per market: a market that is backing off (429, Retry-After) must
            # not hold up the other one.
            periodic = [asyncio.ensure_future(self._periodic([(off, j) for off, j in jobs if j.market == m]))
                        for m in self.symbols]
            await _until_done(stop, [pump, scan, requests, *periodic])
            await asyncio.gather(*periodic, requests)  # they end on stop, handing over what they hold
            for task in (scan, pump):
                await _cancelled(task)
        self.batcher.flush(force=True)
        await self.delivery.wait_acked(ACK_WAIT_S)
        self.report()

    async def _periodic(self, jobs: list[tuple[float, Job]]) -> None:
        start = time.monotonic()
        heap = [(start + off, job) for off, job in jobs]
        heapq.heapify(heap)
        while heap and not self.ctx.should_stop():
            due, job = heap[0]
            wait = due - time.monotonic()
            if wait > 0:
                try:
                    await asyncio.wait_for(self.ctx.stopping.wait(), min(wait, 0.5))
                except TimeoutError:
                    pass
                continue
            heapq.heappop(heap)
            if self._over_budget(job):
                heapq.heappush(heap, (max(due + job.interval_s, time.monotonic()), job))
                continue
            try:
                await self._run_job(job)
            except RestStopped:
                return
            heapq.heappush(heap, (max(due + job.interval_s, time.monotonic()), job))

    def _over_budget(self, job: Job) -> bool:
        """While this worker's unacknowledged batches are over its budget, periodic jobs are
        skipped (the next one comes at its interval), counted and logged once per spell
        (tests/chaos/test_stalled_writer.py)."""
        if not self.delivery.paused:
            self.skip_logged = False
            return False
        self.skipped[job.kind] = self.skipped.get(job.kind, 0) + 1
        if not self.skip_logged:
            self.skip_logged = True
            log.warning("over the buffer budget (--max-buffer-mb): periodic snapshots and open interest are skipped "
                        "until the writer catches up", extra={"event": "rest_jobs_skipped", "job": job.kind})
        return True

    async def _run_job(self, job: Job) -> None:
        try:
            if job.kind == "depth":
                await self._snapshot(job.market, job.symbol)
            else:
                body = await self.client.get(job.market, "openInterest", {"symbol": job.symbol},
                                             weight=OPEN_INTEREST_WEIGHT)
                msg = _json_object(body)
                self.batcher.add("open_interest", rows.open_interest(job.market, msg, body), msg["time"])
            self.done[job.kind] = self.done.get(job.kind, 0) + 1
        except (RestError, orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            self.failed += 1
            self.bad_responses += isinstance(exc, BadResponse)
            log.warning("%s %s %s: %s", job.market, job.kind, job.symbol, exc, extra={
                "event": "rest_failed", "market": job.market, "symbol": job.symbol, "job": job.kind,
                "reason": str(exc)})

    async def _snapshot(self, market: Market, symbol: str) -> None:
        limit = self.settings.snapshot_limit
        body = await self.client.get(market, "depth", {"symbol": symbol, "limit": limit},
                                     weight=depth_weight(market, limit))
        msg = _json_object(body)
        t_ms = msg.get("T") or int(time.time() * 1000)
        # The stored time is part of the table's key: two different snapshots of one symbol
        # (a periodic one and one asked for, in the same millisecond) must not share it, or
        # the second would be taken for the first sent twice. The same snapshot again may.
        lid = int(msg["lastUpdateId"])
        prev = self.snapshot_times.get((market, symbol))
        if prev is not None and prev[1] != lid and t_ms <= prev[0]:
            t_ms = prev[0] + 1
        self.snapshot_times[(market, symbol)] = (t_ms, lid)
        self.batcher.add("depth_snapshots", rows.depth_snapshot(market, symbol, t_ms, body), t_ms)
        # Bounded like the socket workers' feeds: a stalled feature worker must not make this
        # process hold every snapshot since. One refused is stored all the same; a book that
        # needs it asks again.
        if self.feature_queue is not None and not put_bounded(self.feature_queue, Snapshot(market, symbol, t_ms, body),
                                                              FEED_QUEUE_MAX):
            self.snapshots_not_fed += 1

    async def _serve_requests(self) -> None:
        """What the other workers ask for, a few at a time within the weight budget: snapshots
        for the feature worker's books, trade backfills for the socket workers' gaps."""
        if self.request_queue is None:
            return
        slots = asyncio.Semaphore(4)
        tasks: set[asyncio.Task[None]] = set()
        crashed: list[BaseException] = []  # a request that failed in a way not handled in serve

        def finished(task: asyncio.Task[None]) -> None:
            tasks.discard(task)
            if not task.cancelled() and task.exception() is not None:
                crashed.append(task.exception())  # type: ignore[arg-type]

        async def serve(req: SnapshotRequest | TradeGapRequest, key: tuple[Any, ...]) -> None:
            try:
                async with slots:
                    if self.ctx.stopping.is_set():
                        return  # asked again: the feature worker's next run, the gap by the next scan
                    # Held, never dropped, while over budget: a backfill's rows are what the
                    # gap is waiting for.
                    if not await self.delivery.wait_for_room(self.ctx.should_stop):
                        return  # stopping: a backfill's gap stays open for the next run's scan
                    if isinstance(req, TradeGapRequest):
                        await self._backfill(req)
                    else:
                        await self._snapshot(req.market, req.symbol)
                        self.served += 1
                        self.done["depth"] = self.done.get("depth", 0) + 1
            except RestStopped:
                pass  # stopping: what it held is handed over (a backfill's trades); asked again next run
            except (RestError, orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
                self.failed += 1  # asked again: the feature worker after its timeout, a gap by the scan
                self.bad_responses += isinstance(exc, BadResponse)
                log.warning("%s %s %s (asked for): %s", req.market, type(req).__name__, req.symbol, exc, extra={
                    "event": "rest_failed", "market": req.market, "symbol": req.symbol, "job": type(req).__name__,
                    "reason": str(exc)})
            finally:
                self.asked.discard(key)

        try:
            while not self.ctx.stopping.is_set():
                got = False
                while True:
                    try:
                        req = self.request_queue.get_nowait()
                    except queue.Empty:
                        break
                    got = True
                    self._take(req, tasks, serve, finished)
                if crashed:  # a bug: the worker ends loudly, the supervisor restarts it
                    raise crashed[0]
                if not got:
                    await asyncio.sleep(0.02)
        finally:  # stopping: each request in flight ends at once, a backfill handing over its trades
            if tasks:
                await asyncio.wait(tasks, timeout=REQUESTS_STOP_WAIT_S)
            for task in list(tasks):
                await _cancelled(task)

    def _take(self, req: Any, tasks: set[asyncio.Task[None]], serve: Any, finished: Any) -> None:
        if req.market not in self.symbols:
            return
        key: tuple[Any, ...] = ((req.market, req.symbol) if isinstance(req, SnapshotRequest)
                                else (req.market, req.symbol, req.from_id, req.to_id))
        if key in self.asked:
            return
        self.asked.add(key)
        task = asyncio.ensure_future(serve(req, key))
        tasks.add(task)
        task.add_done_callback(finished)

    async def _backfill(self, req: TradeGapRequest) -> None:
        """Fetch the trades of a gap (``fromId`` pages of 1,000) and hand them to the writer,
        which stores those not stored yet and closes the gap's row."""
        items: list[dict[str, Any]] = []
        next_id = req.from_id
        try:
            while next_id <= req.to_id and len(items) < MAX_BACKFILL_TRADES:
                body = await self.client.get(req.market, "aggTrades",
                                             {"symbol": req.symbol, "fromId": next_id, "limit": 1000},
                                             weight=AGG_TRADES_WEIGHT[req.market])
                page = _json_array(body)
                if not page:
                    break
                items.extend(t for t in page if t["a"] <= req.to_id)
                next_id = page[-1]["a"] + 1
        except RestStopped:
            # Stopping half way: the trades in hand are stored as plain rows (the key on
            # trade_time skips any stored already); the gap's row stays open, and the next
            # run's gap scan fetches it whole (store_backfill leaves out what is stored).
            for t in items:
                self.batcher.add("agg_trades", _rest_trade_row(req, t), t["T"])
            if items:
                log.info("%s %s: stopping during the backfill of trades %d..%d; %d fetched trade(s) stored, "
                         "the gap stays open for the next run", req.market, req.symbol, req.from_id, req.to_id,
                         len(items))
            raise
        ids = [t["a"] for t in items]
        complete = ids == list(range(req.from_id, req.to_id + 1))
        parts = [_rest_trade_row(req, t) for t in items]
        first_t = items[0]["T"] if items else req.from_ms
        last_t = items[-1]["T"] if items else req.to_ms
        info = Backfill(req.market, req.symbol, req.from_id, req.to_id, req.from_ms, req.to_ms, req.detected_ms,
                        first_t, last_t, complete)
        self.delivery.send(Batch("agg_trades", len(parts), b"".join(parts),
                                 array("q", (t["T"] for t in items)).tobytes(), kind="backfill",
                                 ids=array("q", ids).tobytes(), backfill=info))
        self.backfilled += len(items)
        self.done["backfill"] = self.done.get("backfill", 0) + 1
        # The gap's closing line: the writer closes its row with this batch.
        (log.info if complete else log.warning)(
            "%s %s: backfilled trades %d..%d over REST (%d of %d)%s", req.market, req.symbol, req.from_id,
            req.to_id, len(items), req.to_id - req.from_id + 1, "" if complete else ": the rest is unrecoverable",
            extra={"event": "gap_closed", "market": req.market, "symbol": req.symbol, "stream": "aggTrade",
                   "from_id": req.from_id, "to_id": req.to_id, "missing": req.to_id - req.from_id + 1,
                   "fetched": len(items), "closed_how": "backfilled" if complete else "unrecoverable"})

    async def _scan_open_gaps(self) -> None:
        """The safety net: trade gaps still open in the database (a request lost with a
        worker that died, or left by an earlier run) are asked for again."""
        if self.dsn is None or self.request_queue is None:
            return
        while True:
            await asyncio.sleep(GAP_SCAN_PERIOD_S)
            try:
                conn = await asyncpg.connect(self.dsn, timeout=5)
                try:
                    open_gaps = await conn.fetch(
                        f"""SELECT market, symbol, from_id, to_id, {_MS.format("from_time")} AS f,
                                   {_MS.format("to_time")} AS t, {_MS.format("detected_at")} AS d
                            FROM stream_gaps WHERE stream = 'aggTrade' AND closed_how = 'open'
                              AND detected_at < now() - make_interval(secs => $1)""", GAP_SCAN_PERIOD_S)
                finally:
                    await conn.close()
            except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                continue  # the database is away: the writer spools, the next scan will see
            for g in open_gaps:
                self.request_queue.put(TradeGapRequest(g["market"], g["symbol"], g["from_id"], g["to_id"], g["f"],
                                                       g["t"], g["d"]))

    async def _pump(self) -> None:
        last = 0.0
        while True:
            await asyncio.sleep(0.05)
            self.batcher.flush()
            self.delivery.poll()
            if time.monotonic() - last >= 1.0:
                last = time.monotonic()
                self.report()

    def report(self) -> None:
        from ingestor import metrics as M

        w = self.ctx.name
        client = getattr(self, "client", None)
        if self.totals is None:
            self.totals = M.Totals()
        if client is not None:
            for (market, endpoint, status), n in client.requests.items():
                self.totals.set(M.REST_REQUESTS.labels(w, market, endpoint, str(status)), n)
            for market, budget in client.budgets.items():
                M.REST_WEIGHT.labels(w, market).set(budget.used)
        for table, n in self.batcher.sent_rows.items():
            self.totals.set(M.ROWS_SENT.labels(w, table), n)
        M.BUFFER_BYTES.labels(w).set(self.delivery.pending_bytes)
        M.BACKPRESSURE.labels(w).set(int(self.delivery.paused))
        self.totals.set(M.REST_BAD_RESPONSES.labels(w), self.bad_responses)
        self.status_queue.put({
            "worker": w, "kind": "rest", "time": time.time(), "requests_done": dict(self.done),
            "failed": self.failed, "bad_responses": self.bad_responses, "snapshots_not_fed": self.snapshots_not_fed,
            "weight_used": {m: b.used for m, b in client.budgets.items()} if client else {},
            "pending_rows": self.batcher.pending_rows(), "requests_open": len(self.asked),
            "snapshots_served": self.served, "trades_backfilled": self.backfilled,
            "jobs_skipped": dict(self.skipped), **self.delivery.status(),
        })

class BadResponse(ValueError):
    """A 200 reply whose JSON is not what the endpoint returns (a list for an object, a
    string...): counted as a failed request, logged, and asked again later."""


def _json_object(body: bytes) -> dict[str, Any]:
    msg = orjson.loads(body)
    if not isinstance(msg, dict):
        raise BadResponse(f"expected a JSON object, got {type(msg).__name__}: {body[:100]!r}")
    return msg


def _json_array(body: bytes) -> list[dict[str, Any]]:
    msg = orjson.loads(body)
    if not isinstance(msg, list) or not all(isinstance(t, dict) for t in msg):
        raise BadResponse(f"expected a JSON array of objects: {body[:100]!r}")
    return msg


def _rest_trade_row(req: TradeGapRequest, t: dict[str, Any]) -> bytes:
    """A REST trade has no event time or symbol: it is stored with its own fields plus "s",
    its event_time its trade time T (see README, "Gaps"); the table's key is on T."""
    payload = orjson.dumps({**t, "s": req.symbol})
    return rows.agg_trade(req.market, {"E": t["T"], "T": t["T"], "s": req.symbol, "a": t["a"]}, payload)


async def _until_done(stop: asyncio.Future[None], tasks: list[asyncio.Future[None]]) -> None:
    """Until ``stop`` is done. A task that fails before ends the worker loudly (its error
    raised: the process exits non-zero and the supervisor restarts it)."""
    pending: set[asyncio.Future[None]] = {stop, *tasks}
    while not stop.done():
        done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            task.result()


async def _cancelled(task: asyncio.Future[None]) -> None:
    """Cancel ``task`` and wait for it; an error it ended with is raised, not dropped."""
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass


def main(settings: Settings, name: str, symbols: dict[Market, list[str]], link: WriterLink, status_queue: Any,
         stop_event: Any, feature_queue: Any = None, request_queue: Any = None, dsn: str | None = None) -> None:
    async def body(ctx: ChildContext) -> None:
        await RestWorker(ctx, symbols, link, status_queue, feature_queue, request_queue, dsn).run()
        queues = (link.queue, feature_queue) if ctx.orphaned else ()
        ctx.release_queues(status_queue, *(q for q in queues if q is not None))

    run_child(settings, name, stop_event, body)
