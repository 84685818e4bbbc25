"""Chaos on the exchange side: dropped connections, stalled ones, the 24 h lifetime (here a
few seconds), a socket worker killed, the REST worker killed, a 429 storm. Each ends with
the audit: trades never lost (backfilled over REST) or duplicated; other messages never
duplicated, and any lost is inside a recorded gap; rotation loses nothing at all."""

from __future__ import annotations

import asyncio
import signal
import time
from dataclasses import replace

import asyncpg
import pytest

from ingestor.binance.streams import DEFAULT_LIMITS
from ingestor.sim.audit import TABLES
from ingestor.sim.model import ModelParams
from ingestor.sim.server import SimConfig, Simulator

from ..conftest import post_json
from ..pipeline import Pipeline, sim_flags, wait_until
from .helpers import assert_nothing_lost_or_duplicated, finish, kill_when, restarted

FAST = ["--batch-age-ms", "100", "--snapshot-interval-s", "2", "--open-interest-interval-s", "2"]
BUSY = ModelParams(cascade_every_s=3.0)  # liquidations in a short run


def assert_trades_whole_and_other_losses_recorded(result: object) -> dict[str, object]:
    summary = result.summary()  # type: ignore[attr-defined]
    trades = result.total("agg_trades")  # type: ignore[attr-defined]
    assert trades.sent > 0 and trades.lost == 0 and trades.duplicated == 0, summary
    for table in TABLES:
        tally = result.total(table)  # type: ignore[attr-defined]
        assert tally.duplicated == 0 and tally.uncovered == 0, (table, summary)
    return summary  # type: ignore[no-any-return]


async def snapshots(dsn: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return int(await conn.fetchval("SELECT count(*) FROM depth_snapshots"))
    finally:
        await conn.close()


async def gap_rows(dsn: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        return list(await conn.fetch("SELECT * FROM stream_gaps ORDER BY detected_at"))
    finally:
        await conn.close()


@pytest.mark.parametrize("sim", [SimConfig(n_symbols=3, seed=31, record=True, model=BUSY)], indirect=True)
async def test_dropped_connections_lose_no_trade_and_record_the_rest(sim: Simulator, system_db: str) -> None:
    pipe = await Pipeline(["--dsn", system_db, "--shards", "2", *FAST, *sim_flags(sim)]).start()
    try:
        await pipe.wait_health(200)
        for market in ("futures", "spot", "futures"):
            await asyncio.sleep(2.0)
            await post_json(sim.urls["admin"] + "/faults", {"kind": "drop", "market": market})
        started = time.monotonic()
        await pipe.wait_health(200, timeout=15)  # every connection back
        assert time.monotonic() - started < 10
        await asyncio.sleep(2.0)
        result = await finish(sim, pipe, system_db)
    finally:
        await pipe.kill()
    summary = assert_trades_whole_and_other_losses_recorded(result)
    assert any("reconnecting" in line for line in pipe.log)
    gaps = await gap_rows(system_db)
    assert all(g["closed_how"] in ("backfilled", "unrecoverable", "resynced") for g in gaps), summary
    assert {g["stream"] for g in gaps if g["symbol"] == "*"} <= {"markPrice", "forceOrder"}


@pytest.mark.parametrize("sim", [SimConfig(n_symbols=2, seed=32, record=True)], indirect=True)
async def test_a_stalled_connection_is_replaced_within_seconds(sim: Simulator, system_db: str) -> None:
    pipe = await Pipeline(["--dsn", system_db, *FAST, *sim_flags(sim)]).start()
    try:
        await pipe.wait_health(200)
        await asyncio.sleep(1.5)
        await post_json(sim.urls["admin"] + "/faults", {"kind": "stall", "market": "spot"})
        stalled = time.monotonic()

        async def reconnected() -> bool:
            _, body = await pipe.health()
            return body["workers"]["socket-0"].get("reconnects", 0) >= 1

        await wait_until(reconnected, 20, "the stalled connection replaced")
        assert time.monotonic() - stalled < 10  # no data, no pong: found by the client's pings
        await pipe.wait_health(200, timeout=15)
        await asyncio.sleep(1.5)
        result = await finish(sim, pipe, system_db)
    finally:
        await pipe.kill()
    assert_trades_whole_and_other_losses_recorded(result)
    # What the stall held back was never sent: the trades it skipped came back over REST.
    backfilled = [g for g in await gap_rows(system_db) if g["stream"] == "aggTrade"]
    assert backfilled and all(g["closed_how"] == "backfilled" for g in backfilled)


LIFETIME_S = 6.0


@pytest.mark.parametrize("sim", [SimConfig(n_symbols=3, seed=33, record=True, model=BUSY,
                                           limits={m: replace(lim, max_lifetime_s=LIFETIME_S)
                                                   for m, lim in DEFAULT_LIMITS.items()})], indirect=True)
async def test_rotation_before_the_lifetime_limit_loses_and_duplicates_nothing(sim: Simulator,
                                                                             system_db: str) -> None:
    pipe = await Pipeline(["--dsn", system_db, *FAST, "--connection-max-age-s", str(LIFETIME_S - 2.5),
                           *sim_flags(sim)]).start()
    try:
        await pipe.wait_health(200)

        async def rotated() -> bool:
            _, body = await pipe.health()
            w = body["workers"]["socket-0"]
            return w.get("rotations", 0) >= 2 * w.get("connections", 99)

        await wait_until(rotated, 30, "every connection rotated twice")
        result = await finish(sim, pipe, system_db)
    finally:
        await pipe.kill()
    assert_nothing_lost_or_duplicated(result)
    assert not await gap_rows(system_db)  # nothing to record: the new connection was flowing first
    stats = sim.stats()
    assert sum(m["ws"]["lifetime_closed_total"] for m in stats["markets"].values()) == 0  # we always left first
    assert sum(1 for line in pipe.log if "connection rotated" in line) >= 6


@pytest.mark.parametrize("sim", [SimConfig(n_symbols=3, seed=34, record=True, model=BUSY)], indirect=True)
async def test_socket_worker_killed_is_back_within_2_s_and_its_trades_are_backfilled(
        sim: Simulator, system_db: str) -> None:
    pipe = await Pipeline(["--dsn", system_db, *FAST, *sim_flags(sim)]).start()
    try:
        await pipe.wait_health(200)
        await asyncio.sleep(3.5)  # the supervisor has its sequence positions
        killed = time.monotonic()
        pid = await kill_when(pipe, "socket-0", signal.SIGKILL)
        await restarted(pipe, "socket-0", pid)
        assert time.monotonic() - killed < 4.0  # restarted within 2 s, seen by /health within another
        await pipe.wait_health(200, timeout=15)
        await asyncio.sleep(2.0)
        result = await finish(sim, pipe, system_db)
    finally:
        await pipe.kill()
    assert_trades_whole_and_other_losses_recorded(result)
    assert any("carrying on from the sequence positions" in line for line in pipe.log)


@pytest.mark.parametrize("sim", [SimConfig(n_symbols=2, seed=35, record=True)], indirect=True)
async def test_rest_worker_killed_and_a_429_storm_lose_nothing_and_never_get_banned(
        sim: Simulator, system_db: str) -> None:
    pipe = await Pipeline(["--dsn", system_db, *FAST, *sim_flags(sim)]).start()
    try:
        await pipe.wait_health(200)
        await asyncio.sleep(1.0)
        pid = await kill_when(pipe, "rest", signal.SIGKILL)
        await restarted(pipe, "rest", pid)
        for market in ("spot", "futures"):
            await post_json(sim.urls["admin"] + "/faults", {"kind": "rest_429", "market": market, "count": 6,
                                                           "duration": 2})
        await asyncio.sleep(3.0)
        before = await snapshots(system_db)

        async def carried_on() -> bool:  # snapshots come in again after the storm
            return await snapshots(system_db) > before

        await wait_until(carried_on, 15, "snapshots after the 429 storm")
        result = await finish(sim, pipe, system_db)
    finally:
        await pipe.kill()
    assert_nothing_lost_or_duplicated(result)
    stats = sim.stats()
    assert all("418" not in v["rest"]["rejected"] for v in stats["markets"].values()), stats  # never banned
    assert sum(1 for line in pipe.log if "HTTP 429, backing off" in line) >= 2
