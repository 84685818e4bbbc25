"""SIGTERM while the REST worker waits out an hour's Retry-After (issue 16 item 11).

Before: a periodic job waiting in the client's ``Retry-After`` sleep (up to an hour) kept
the REST worker alive past the supervisor's stop deadline, and it was SIGKILLed with rows
in hand. Now every wait ends on stop: the pipeline exits 0 without killing anyone, every
snapshot and open interest reply the simulator served is stored, and the trade gap whose
backfill was waiting stays ``open`` for the next run's gap scan.
"""

from __future__ import annotations

import asyncpg
import pytest

from ingestor.sim.server import SimConfig, Simulator

from .conftest import post_json
from .pipeline import Pipeline, sim_flags, wait_until


async def fetch(dsn: str, sql: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        return list(await conn.fetch(sql))
    finally:
        await conn.close()


def served(sim: Simulator, market: str, endpoint: str) -> int:
    return sum(n for path, n in sim.markets[market].rest.served.items() if path.endswith("/" + endpoint))


@pytest.mark.parametrize("sim", [SimConfig(n_symbols=2, seed=7)], indirect=True)
async def test_sigterm_during_an_hour_of_retry_after_stops_in_time_keeping_everything(
        sim: Simulator, system_db: str) -> None:
    pipe = await Pipeline(["--dsn", system_db, "--batch-age-ms", "100", "--snapshot-interval-s", "1",
                           "--open-interest-interval-s", "1", *sim_flags(sim)]).start()
    stopped = False
    try:
        await pipe.wait_health(200, timeout=30)

        async def polling() -> bool:
            return served(sim, "futures", "depth") >= 2 and served(sim, "futures", "openInterest") >= 2

        await wait_until(polling, 20, "periodic futures snapshots and open interest")
        # The next futures request gets 429 with an hour's Retry-After: the client blocks the
        # market, and the job that met it waits in there.
        await post_json(sim.urls["admin"] + "/faults", {"kind": "rest_429", "market": "futures", "duration": 3600})

        async def blocked() -> bool:
            return not sim.markets["futures"].rest.pending

        await wait_until(blocked, 20, "the 429 served")
        # A trade gap: its backfill waits behind the block too.
        await post_json(sim.urls["admin"] + "/faults", {"kind": "skip_trades", "market": "futures",
                                                        "symbol": "BTCUSDT", "count": 3})

        async def gap_waiting() -> bool:
            rows = await fetch(system_db, "SELECT 1 FROM stream_gaps WHERE market = 'futures' "
                                          "AND stream = 'aggTrade' AND closed_how = 'open'")
            _, body = await pipe.health()
            return bool(rows) and body["workers"]["rest"].get("requests_open", 0) >= 1

        await wait_until(gap_waiting, 30, "the open trade gap asked for")
        stopped = True
        rc = await pipe.stop(timeout=90)
        assert rc == 0, pipe.text()
        assert not [ln for ln in pipe.log if "did not stop within" in ln], pipe.text()
    finally:
        if not stopped:
            await pipe.stop()

    gaps = await fetch(system_db, "SELECT closed_how FROM stream_gaps WHERE market = 'futures' "
                                  "AND stream = 'aggTrade'")
    assert [g["closed_how"] for g in gaps] == ["open"]  # left for the next run's gap scan
    # Everything it fetched is stored: each reply the simulator served is a row.
    for market in ("spot", "futures"):
        stored = await fetch(system_db, f"SELECT count(*) AS n FROM depth_snapshots WHERE market = '{market}'")
        assert stored[0]["n"] == served(sim, market, "depth"), market
    stored = await fetch(system_db, "SELECT count(*) AS n FROM open_interest")
    assert stored[0]["n"] == served(sim, "futures", "openInterest")


@pytest.mark.parametrize("sim", [SimConfig(n_symbols=1, seed=8)], indirect=True)
async def test_sigterm_half_way_through_a_backfill_stores_the_trades_fetched(sim: Simulator, system_db: str) -> None:
    """A gap of 1,200 trades takes two pages; the second meets an hour's Retry-After. At
    SIGTERM the 1,000 trades of the first page are stored, and the gap stays open."""
    pipe = await Pipeline(["--dsn", system_db, "--batch-age-ms", "100", "--snapshot-interval-s", "0",
                           "--open-interest-interval-s", "0", *sim_flags(sim)]).start()
    stopped = False
    try:
        await pipe.wait_health(200, timeout=30)

        async def books_built() -> bool:
            _, body = await pipe.health()
            return served(sim, "futures", "depth") >= 1 and body["workers"]["rest"].get("requests_open") == 0

        await wait_until(books_built, 30, "the books' snapshots served")
        # Futures' next two requests are the gap's two pages: the first is answered, the
        # second gets 429 with an hour's Retry-After.
        await post_json(sim.urls["admin"] + "/faults", [
            {"kind": "rest_slow", "market": "futures", "delay": 1},
            {"kind": "rest_429", "market": "futures", "duration": 3600}])
        await post_json(sim.urls["admin"] + "/faults", {"kind": "skip_trades", "market": "futures",
                                                        "symbol": "BTCUSDT", "count": 1200})

        async def second_page_blocked() -> bool:
            return not sim.markets["futures"].rest.pending

        await wait_until(second_page_blocked, 60, "the second page refused with 429")
        assert served(sim, "futures", "aggTrades") == 1
        stopped = True
        assert await pipe.stop(timeout=90) == 0, pipe.text()
        assert not [ln for ln in pipe.log if "did not stop within" in ln], pipe.text()
    finally:
        if not stopped:
            await pipe.stop()

    (gap,) = await fetch(system_db, "SELECT from_id, to_id, closed_how FROM stream_gaps WHERE market = 'futures' "
                                    "AND stream = 'aggTrade'")
    assert (gap["to_id"] - gap["from_id"] + 1, gap["closed_how"]) == (1200, "open")
    got = await fetch(system_db, f"SELECT count(*) AS n FROM agg_trades WHERE market = 'futures' "
                                 f"AND aggregate_trade_id BETWEEN {gap['from_id']} AND {gap['to_id']}")
    assert got[0]["n"] == 1000  # the first page, handed over at stop
