"""Restarts that carry state: a socket worker that dies again before anything of its own
was acknowledged, and the whole pipeline stopped for a while between two runs.

Each ends with the audit (trades whole, every other hole a ``stream_gaps`` row) and, for
the trades, a look at the ids themselves: per symbol, one row per id and no id missing
between the first and the last stored."""

from __future__ import annotations

import os
import signal

import asyncpg
import pytest

from ingestor.sim.server import SimConfig, Simulator

from ..pipeline import Pipeline, sim_flags, wait_until
from .helpers import finish, kill_when, restarted
from .test_connections import BUSY, FAST, assert_trades_whole_and_other_losses_recorded


async def trade_ids_whole(dsn: str) -> dict[tuple[str, str], tuple[int, int, int]]:
    """Per (market, symbol): (rows, distinct ids, max - min + 1); all three equal means every
    trade between the first and the last stored is there exactly once."""
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            """SELECT market, symbol, count(*) AS n, count(DISTINCT aggregate_trade_id) AS d,
                      max(aggregate_trade_id) - min(aggregate_trade_id) + 1 AS span
               FROM agg_trades GROUP BY market, symbol""")
    finally:
        await conn.close()
    return {(r["market"], r["symbol"]): (r["n"], r["d"], r["span"]) for r in rows}


async def reports(pipe: Pipeline, worker: str, n: int) -> None:
    """Until ``worker`` has sent ``n`` more status reports (told apart by their message count,
    which moves while the simulator sends)."""
    seen: set[int] = set()

    async def enough() -> bool:
        _, body = await pipe.health()
        seen.add(body["workers"][worker].get("messages", -1))
        return len(seen) > n

    await wait_until(enough, 30, f"{n} reports of {worker}")


async def reported(pipe: Pipeline, worker: str, old_pid: int) -> None:
    """Until the worker that replaced ``old_pid`` has sent a status with its positions (its
    first report carries them)."""
    await restarted(pipe, worker, old_pid)

    async def has_status() -> bool:
        _, body = await pipe.health()
        w = body["workers"][worker]
        return w["pid"] != old_pid and w["status_age_s"] is not None and "messages" in w

    await wait_until(has_status, 20, f"{worker} reporting")


@pytest.mark.parametrize("sim", [SimConfig(n_symbols=3, seed=41, record=True, model=BUSY)], indirect=True)
async def test_a_socket_worker_killed_twice_while_nothing_is_acknowledged_leaves_no_hole_unrecorded(
        sim: Simulator, system_db: str) -> None:
    """The writer is stopped (SIGSTOP), so nothing the restarted worker sends is acknowledged
    before it is killed again. Its successor must still know where the first one's safe
    positions were: a report that carries no acknowledged positions of its own must not
    erase them (it did: the third worker started blind and the second one's gap row, never
    stored, was the only record of the hole)."""
    pipe = await Pipeline(["--dsn", system_db, *FAST, *sim_flags(sim)]).start()
    writer_pid = 0
    try:
        await pipe.wait_health(200)

        async def positions_reported() -> bool:  # socket-0's first acknowledged positions are in
            _, body = await pipe.health()
            return body["workers"]["writer"].get("rows", {}).get("depth_updates", 0) > 0
        await wait_until(positions_reported, 30, "depth rows committed")
        await reports(pipe, "socket-0", 3)  # positions go with every second report: one is in
        _, body = await pipe.health()
        writer_pid = body["workers"]["writer"]["pid"]
        os.kill(writer_pid, signal.SIGSTOP)
        first = await kill_when(pipe, "socket-0", signal.SIGKILL)
        await reported(pipe, "socket-0", first)
        second = await kill_when(pipe, "socket-0", signal.SIGKILL)
        await reported(pipe, "socket-0", second)
        os.kill(writer_pid, signal.SIGCONT)
        writer_pid = 0
        await pipe.wait_health(200, timeout=60)
        result = await finish(sim, pipe, system_db)
    finally:
        if writer_pid:
            os.kill(writer_pid, signal.SIGCONT)
        await pipe.kill()
    assert_trades_whole_and_other_losses_recorded(result)
