"""REST worker process: the only REST client of the pipeline.

Polls full depth snapshots (every symbol of both markets) and USD-M open interest on
their intervals. Each kind of job is spread evenly over its interval (symbol i of n runs
at i/n of the way through), so the weight is spent smoothly, not in bursts; the
``RestClient`` keeps the per-minute budget and honours ``Retry-After``.

It also serves the feature worker: a snapshot it asks for (to build or rebuild a book) is
fetched before any periodic one, and every snapshot fetched, asked for or periodic, is
both stored and handed to the feature worker (which builds books only from stored
snapshots, so a replay can build the same ones).
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import queue
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

from ingestor.binance import rows
from ingestor.binance.rest_client import RestClient, RestError
from ingestor.binance.rest_limits import OPEN_INTEREST_WEIGHT, depth_weight
from ingestor.binance.streams import Market
from ingestor.config import Settings
from ingestor.features.feed import Snapshot, SnapshotRequest
from ingestor.workers.batching import Batcher
from ingestor.workers.child import ChildContext, run_child
from ingestor.workers.delivery import Delivery, WriterLink

log = logging.getLogger(__name__)

ACK_WAIT_S = 20.0  # at stop, how long to wait for the writer to acknowledge the last batches

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
                 status_queue: Any, feature_queue: Any = None, request_queue: Any = None) -> None:
        self.ctx = ctx
        self.settings = s = ctx.settings
        self.symbols = symbols
        self.delivery = Delivery(ctx.name, link)
        self.status_queue = status_queue
        self.feature_queue = feature_queue
        self.request_queue = request_queue
        self.asked: set[tuple[Market, str]] = set()  # requests waiting or in flight (one each)
        self.served = 0
        self.batcher = Batcher(self.delivery.send, batch_rows=s.batch_rows, batch_age_s=s.batch_age_ms / 1000,
                               producer=ctx.name)
        self.done: dict[str, int] = {}
        self.failed = 0
        self.totals: Any = None  # metrics.Totals, created on the first report (after import)

    async def run(self) -> None:
        s = self.settings
        timeout = aiohttp.ClientTimeout(total=30)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            self.client = RestClient(session, {m: s.rest_url(m) for m in self.symbols}, s.rest_weight_share)
            start = time.monotonic()
            heap = [(start + off, job) for off, job in schedule(self.symbols, s)]
            heapq.heapify(heap)
            pump = asyncio.ensure_future(self._pump())
            requests = asyncio.ensure_future(self._serve_requests())
            while heap and not self.ctx.should_stop():
                if self.asked:  # books waiting for a snapshot come first
                    await asyncio.sleep(0.05)
                    continue
                due, job = heap[0]
                wait = due - time.monotonic()
                if wait > 0:
                    try:
                        await asyncio.wait_for(self.ctx.stopping.wait(), min(wait, 0.5))
                    except TimeoutError:
                        pass
                    continue
                heapq.heappop(heap)
                await self._run_job(job)
                heapq.heappush(heap, (max(due + job.interval_s, time.monotonic()), job))
            if not heap:
                await self.ctx.watch()  # nothing scheduled: idle until told to stop
            pump.cancel()
            requests.cancel()
            await asyncio.gather(pump, requests, return_exceptions=True)
        self.batcher.flush(force=True)
        await self.delivery.wait_acked(ACK_WAIT_S)
        self.report()

    async def _run_job(self, job: Job) -> None:
        try:
            if job.kind == "depth":
                await self._snapshot(job.market, job.symbol)
            else:
                body = await self.client.get(job.market, "openInterest", {"symbol": job.symbol},
                                             weight=OPEN_INTEREST_WEIGHT)
                msg = orjson.loads(body)
                self.batcher.add("open_interest", rows.open_interest(job.market, msg, body), msg["time"])
            self.done[job.kind] = self.done.get(job.kind, 0) + 1
        except (RestError, orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            self.failed += 1
            log.warning("%s %s %s: %s", job.market, job.kind, job.symbol, exc)

    async def _snapshot(self, market: Market, symbol: str) -> None:
        limit = self.settings.snapshot_limit
        body = await self.client.get(market, "depth", {"symbol": symbol, "limit": limit},
                                     weight=depth_weight(market, limit))
        msg = orjson.loads(body)
        t_ms = msg.get("T") or int(time.time() * 1000)
        self.batcher.add("depth_snapshots", rows.depth_snapshot(market, symbol, t_ms, body), t_ms)
        if self.feature_queue is not None:
            self.feature_queue.put(Snapshot(market, symbol, t_ms, body))

    async def _serve_requests(self) -> None:
        """Snapshots the feature worker asks for, a few at a time within the weight budget."""
        if self.request_queue is None:
            return
        slots = asyncio.Semaphore(4)
        tasks: set[asyncio.Task[None]] = set()

        async def serve(req: SnapshotRequest) -> None:
            key = (req.market, req.symbol)
            try:
                async with slots:
                    await self._snapshot(req.market, req.symbol)
                self.served += 1
                self.done["depth"] = self.done.get("depth", 0) + 1
            except (RestError, orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
                self.failed += 1  # the feature worker asks again after its timeout
                log.warning("%s depth %s (asked for by the feature worker): %s", req.market, req.symbol, exc)
            finally:
                self.asked.discard(key)

        try:
            while True:
                got = False
                while True:
                    try:
                        req = self.request_queue.get_nowait()
                    except queue.Empty:
                        break
                    got = True
                    key = (req.market, req.symbol)
                    if key in self.asked or req.market not in self.symbols:
                        continue
                    self.asked.add(key)
                    task = asyncio.ensure_future(serve(req))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                if not got:
                    await asyncio.sleep(0.02)
        finally:  # stopping: requests in flight are dropped (a new worker asks again)
            for task in list(tasks):
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

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
        self.status_queue.put({
            "worker": w, "kind": "rest", "time": time.time(), "requests_done": dict(self.done),
            "failed": self.failed,
            "weight_used": {m: b.used for m, b in client.budgets.items()} if client else {},
            "pending_rows": self.batcher.pending_rows(), "snapshots_asked": len(self.asked),
            "snapshots_served": self.served,
        })

def main(settings: Settings, name: str, symbols: dict[Market, list[str]], link: WriterLink, status_queue: Any,
         stop_event: Any, feature_queue: Any = None, request_queue: Any = None) -> None:
    async def body(ctx: ChildContext) -> None:
        await RestWorker(ctx, symbols, link, status_queue, feature_queue, request_queue).run()
        queues = (link.queue, feature_queue) if ctx.orphaned else ()
        ctx.release_queues(status_queue, *(q for q in queues if q is not None))

    run_child(settings, name, stop_event, body)
