"""A book that never syncs backs off, and is a /health problem and an open gap (issue 16 item 12).

The simulator answers every Spot depth request with a snapshot older than every diff
(fault ``rest_stale``), as a lagging REST server would: no Spot book can ever sync. Before
the fix the feature worker asked again at once after each refused snapshot (a real
capture showed 118 ``limit=1000`` snapshots in 32 s), silently. Now each book's asks back
off (1 s doubling to 60 s, jittered), are counted, and past a minute the book is listed as
unsynced in /health and recorded as an open ``stream_gaps`` row (stream ``book``).
"""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from ingestor.features.engine import (
    RESYNC_FIRST_WAIT_MS,
    RESYNC_MAX_WAIT_MS,
    UNSYNCED_PROBLEM_MS,
    FeatureEngine,
    Outbox,
)
from ingestor.features.indicators import FeatureSettings
from ingestor.sim.server import SimConfig, Simulator

from .conftest import post_json
from .pipeline import Pipeline, sim_flags, wait_until
from .test_pipeline_processes import samples

SYMBOLS = ("BTCUSDT", "ETHUSDT")


def max_asks(elapsed_s: float) -> int:
    """The most snapshots one book may ask for in ``elapsed_s`` under the backoff: each wait
    is at least half its nominal length (1, 2, 4 ... 60 s), plus the first ask."""
    n, t = 1, 0.0
    while True:
        wait = min(RESYNC_MAX_WAIT_MS, RESYNC_FIRST_WAIT_MS * 2 ** (n - 1)) / 2000
        if t + wait > elapsed_s:
            return n
        t += wait
        n += 1


class Feed:
    """One Spot book on the engine's clock: a diff every 100 ms, the snapshot asked for
    answered at once, stale (older than every diff) until ``fresh_from_ms``."""

    def __init__(self, fresh_from_ms: int) -> None:
        self.engine = FeatureEngine(FeatureSettings(bar_seconds=1, window=10), {("spot", "X"): 0.01})
        self.t = T0
        self.u = 100
        self.fresh_from_ms = fresh_from_ms
        self.asks: list[int] = []
        self.out: list[Outbox] = []

    def run(self, until_ms: int) -> None:
        eng = self.engine
        while self.t < until_ms:
            self.t += 100
            eng.depth("spot", [{"e": "depthUpdate", "E": self.t, "s": "X", "U": self.u + 1, "u": self.u + 3,
                                "b": [["1.00", "1"]], "a": [["1.02", "1"]]}])
            self.u += 3
            eng.clock("spot", self.t)
            out = eng.outbox.take()
            self.out.append(out)
            for _ in out.requests:
                self.asks.append(self.t)
                lid = 1 if self.t < self.fresh_from_ms else self.u
                eng.snapshot("spot", "X", self.t, {"lastUpdateId": lid, "bids": [["1.00", "1"]],
                                                   "asks": [["1.02", "1"]]})


T0 = 1_800_000_000_000


def test_the_engine_backs_off_reports_once_and_closes_the_same_gap() -> None:
    feed = Feed(fresh_from_ms=T0 + 300_000)
    feed.run(T0 + 400_000)
    asks = feed.asks
    waits = [b - a for a, b in zip(asks, asks[1:], strict=False)]
    # Each wait at least half its nominal length, at most all of it (plus a diff's 100 ms).
    for i, w in enumerate(waits[:-1]):
        nominal = min(RESYNC_MAX_WAIT_MS, RESYNC_FIRST_WAIT_MS * 2**i)
        assert nominal // 2 <= w <= nominal + 100, (i, waits)
    assert len(asks) <= max_asks(300.0) + 1
    unsynced = [u for o in feed.out for u in o.unsynced]
    (gap, n), = unsynced  # once
    assert gap.closed_ms is None and gap.from_ms == T0 + 100 and n >= 6
    closed = [g for o in feed.out for g in o.gaps]
    assert [(g.first_missing, g.last_missing, g.from_ms) for g in closed] == [
        (gap.first_missing, gap.last_missing, gap.from_ms)]  # the same key: the close updates the open row
    assert closed[0].closed_ms is not None and not feed.engine.unsynced_books("spot")
    c = feed.engine.counters["spot"]
    assert (c.snapshot_requests, c.snapshot_retries) == (len(asks), len(asks) - 1)


def test_the_bound_is_a_handful_a_minute() -> None:
    assert max_asks(UNSYNCED_PROBLEM_MS / 1000 + 30) <= 10  # against 118 in 32 s before
    assert max_asks(0.0) == 1


@pytest.mark.timeout(300)  # a minute to become a problem, up to a minute's backoff to recover
@pytest.mark.parametrize("sim", [SimConfig(n_symbols=2, seed=5)], indirect=True)
async def test_a_book_that_never_syncs_backs_off_and_is_a_problem_and_an_open_gap(
        sim: Simulator, system_db: str) -> None:
    await post_json(sim.urls["admin"] + "/faults", {"kind": "rest_stale", "market": "spot", "count": 1_000_000})
    # No periodic snapshots: every Spot depth request is one the feature worker asked for.
    pipe = await Pipeline(["--dsn", system_db, "--batch-age-ms", "100", "--snapshot-interval-s", "0",
                           *sim_flags(sim)]).start()
    loop = asyncio.get_running_loop()
    started = loop.time()
    spot = sim.markets["spot"].rest

    def served() -> int:
        return sum(n for path, n in spot.served.items() if path.endswith("/depth"))

    try:
        async def problem_or_storm() -> bool:
            if served() > 2 * len(SYMBOLS) * max_asks(UNSYNCED_PROBLEM_MS / 1000 + 60):
                return True  # a storm: no need to wait for the rest
            code, body = await pipe.health()
            return code == 503 and any("not synced" in p for p in body["problems"])

        await wait_until(problem_or_storm, UNSYNCED_PROBLEM_MS / 1000 + 60, "the unsynced books' /health problem")
        elapsed = loop.time() - started
        asked = served()
        assert asked <= len(SYMBOLS) * max_asks(elapsed), (asked, elapsed)
        code, body = await pipe.health()
        problems = [p for p in body["problems"] if "not synced" in p]
        assert code == 503 and problems and all(s in problems[0] for s in SYMBOLS), body["problems"]
        assert body["workers"]["features"]["markets"]["spot"]["unsynced_books"] == list(SYMBOLS)
        assert not body["workers"]["features"]["markets"]["futures"]["unsynced_books"]

        async def gap_rows() -> list[asyncpg.Record]:
            conn = await asyncpg.connect(system_db)
            try:
                return list(await conn.fetch(
                    "SELECT symbol, closed_how, from_id, to_id FROM stream_gaps WHERE market = 'spot' "
                    "AND stream = 'book' ORDER BY symbol"))
            finally:
                await conn.close()

        async def recorded() -> bool:
            return len(await gap_rows()) == len(SYMBOLS)

        await wait_until(recorded, 15, "an open book gap per Spot symbol")
        rows = await gap_rows()
        assert [(r["symbol"], r["closed_how"]) for r in rows] == [(s, "open") for s in SYMBOLS]
        assert all(r["from_id"] <= r["to_id"] for r in rows)
        text = await pipe.metrics()
        retries = sum(v for lab, v in samples(text, "ingestor_book_snapshot_requests")
                      if lab.get("market") == "spot" and lab.get("kind") == "retry")
        assert retries >= len(SYMBOLS)
        # Logged once per book, not per attempt.
        lines = [ln for ln in pipe.log if "book not synced for" in ln]
        assert sorted(s for s in SYMBOLS for ln in lines if s in ln) == sorted(SYMBOLS), lines

        # The REST server answers properly again: at the next ask (within the longest wait)
        # each book syncs, its gap row is closed as resynced, and /health is green.
        sim.markets["spot"].rest.pending.clear()

        async def recovered() -> bool:
            code, _ = await pipe.health()
            return code == 200 and [r["closed_how"] for r in await gap_rows()] == ["resynced"] * len(SYMBOLS)

        try:
            await wait_until(recovered, RESYNC_MAX_WAIT_MS / 1000 + 30, "the books synced and their gaps closed")
        except AssertionError:
            code, body = await pipe.health()
            conn = await asyncpg.connect(system_db)
            every = [dict(r) for r in await conn.fetch("SELECT * FROM stream_gaps")]
            await conn.close()
            raise AssertionError((code, body["problems"], every, pipe.text())) from None
        assert [(r["symbol"], r["from_id"], r["to_id"]) for r in await gap_rows()] == [
            (r["symbol"], r["from_id"], r["to_id"]) for r in rows]  # the open rows, closed: same key
    finally:
        assert await pipe.stop() == 0
