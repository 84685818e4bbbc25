"""Restarts that carry state: a socket worker that dies again before anything of its own
was acknowledged, and the whole pipeline stopped for a while between two runs.

Each ends with the audit (trades whole, every other hole a ``stream_gaps`` row) and, for
the trades, a look at the ids themselves: per symbol, one row per id and no id missing
between the first and the last stored."""

from __future__ import annotations

import os
import signal
import time

import asyncpg
import pytest

from ingestor.sim.server import SimConfig, Simulator

from ..pipeline import Pipeline, sim_flags, wait_until
from .helpers import finish, kill_when
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
    """Until the worker that replaced ``old_pid`` runs and has sent a status with its
    positions (its first report carries them). Not "healthy": the writer may be stopped."""

    seen_at: list[float] = []

    async def has_status() -> bool:  # the new pid, then a status sent after it was seen
        _, body = await pipe.health()
        w = body["workers"][worker]
        if w["pid"] == old_pid or not w["alive"]:
            return False
        if not seen_at:
            seen_at.append(time.monotonic())
            return False
        age = w["status_age_s"]
        return age is not None and age < time.monotonic() - seen_at[0] and "messages" in w

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


async def last_stored(dsn: str) -> dict[tuple[str, str, str], int]:
    """(market, symbol, 'trade'|'depth') -> the last stored trade id or final update id."""
    conn = await asyncpg.connect(dsn)
    try:
        trades = await conn.fetch("SELECT market, symbol, max(aggregate_trade_id) AS i FROM agg_trades "
                                  "GROUP BY market, symbol")
        depth = await conn.fetch("SELECT market, symbol, max(final_update_id) AS i FROM depth_updates "
                                 "GROUP BY market, symbol")
    finally:
        await conn.close()
    return {**{(r["market"], r["symbol"], "trade"): r["i"] for r in trades},
            **{(r["market"], r["symbol"], "depth"): r["i"] for r in depth}}


@pytest.mark.parametrize("sim", [SimConfig(n_symbols=2, seed=42, record=True, model=BUSY)], indirect=True)
async def test_downtime_between_two_runs_is_backfilled_and_recorded(sim: Simulator, system_db: str) -> None:
    """The pipeline is stopped while the exchange trades on, then started again: every trade
    of the downtime is fetched over REST (each id stored once, none missing), the diffs it
    missed are a depth gap from the last stored one, the mark prices a time gap."""
    args = ["--dsn", system_db, *FAST, *sim_flags(sim)]
    first = await Pipeline(args).start()
    try:
        await first.wait_health(200)

        async def every_symbol_stored() -> bool:
            have = await last_stored(system_db)
            return len(have) == 2 * 2 * len(sim.markets)  # 2 symbols, trades and depth, per market
        await wait_until(every_symbol_stored, 60, "trades and diffs of every symbol stored")
        assert await first.stop() == 0, first.text()
    finally:
        await first.kill()
    before = await last_stored(system_db)

    async def traded_on() -> bool:  # the exchange moved on while nothing recorded
        return all(sim.markets[m].model.books[s].agg_id >= i + 5  # type: ignore[arg-type]
                   for (m, s, kind), i in before.items() if kind == "trade")
    await wait_until(traded_on, 90, "five trades of every symbol during the downtime")

    second = await Pipeline(args).start()
    try:
        await second.wait_health(200)

        async def backfilled() -> bool:
            conn = await asyncpg.connect(system_db)
            try:
                closed = await conn.fetchval("SELECT count(*) FILTER (WHERE closed_how = 'backfilled') "
                                             "FROM stream_gaps WHERE stream = 'aggTrade'")
            finally:
                await conn.close()
            return bool(closed >= sum(1 for k in before if k[2] == "trade"))
        await wait_until(backfilled, 60, "the downtime's trades backfilled")
        result = await finish(sim, second, system_db)
    finally:
        await second.kill()
    assert_trades_whole_and_other_losses_recorded(result)
    for key, (n, distinct, span) in (await trade_ids_whole(system_db)).items():
        assert n == distinct == span, (key, n, distinct, span)
    conn = await asyncpg.connect(system_db)
    try:
        gaps = await conn.fetch("SELECT market, symbol, stream, from_id, closed_how FROM stream_gaps")
    finally:
        await conn.close()
    trade_gaps = {(g["market"], g["symbol"]): g for g in gaps if g["stream"] == "aggTrade"}
    depth_gaps = {(g["market"], g["symbol"], g["from_id"]) for g in gaps if g["stream"] == "depth"}
    for (market, symbol, kind), last in before.items():
        if kind == "trade":
            gap = trade_gaps[(market, symbol)]
            assert gap["from_id"] == last + 1 and gap["closed_how"] == "backfilled", gap
        else:
            assert (market, symbol, last + 1) in depth_gaps, (market, symbol, last, gaps)
    assert any(g["stream"] == "markPrice" and g["symbol"] == "*" for g in gaps), gaps
    assert any("carrying on from the last stored events of 4 symbol(s)" in line for line in second.log), \
        second.text()


@pytest.mark.parametrize("sim", [SimConfig(n_symbols=3, seed=43, record=True, model=BUSY)], indirect=True)
async def test_producers_killed_in_the_middle_of_a_batch_do_not_wedge_the_writer(
        sim: Simulator, system_db: str) -> None:
    """With the writer stopped (SIGSTOP) its input fills up and each producer is left in the
    middle of handing over a batch; then every producer is killed. The dead ones leave a
    batch half written: the writer must not wait for its other half forever, and the
    producers that replace them must still get their batches through."""
    pipe = await Pipeline(["--dsn", system_db, "--shards", "2", *FAST, *sim_flags(sim)]).start()
    writer_pid = 0
    try:
        await pipe.wait_health(200)
        await reports(pipe, "socket-0", 3)
        _, body = await pipe.health()
        writer_pid = body["workers"]["writer"]["pid"]
        os.kill(writer_pid, signal.SIGSTOP)

        async def backed_up() -> bool:  # batches pile up unacknowledged behind the stopped writer
            _, b = await pipe.health()
            return all(b["workers"][w].get("unacked_batches", 0) >= 20 for w in ("socket-0", "socket-1"))
        await wait_until(backed_up, 60, "producers backed up")
        pids = {w: await kill_when(pipe, w, signal.SIGKILL) for w in ("socket-0", "socket-1", "rest", "features")}

        async def replaced() -> bool:  # (not healthy: the writer is still stopped)
            _, b = await pipe.health()
            return all(b["workers"][w]["pid"] != pid and b["workers"][w]["alive"] for w, pid in pids.items())
        await wait_until(replaced, 30, "every producer restarted")
        os.kill(writer_pid, signal.SIGCONT)
        writer_pid = 0

        _, b = await pipe.health()
        before = sum(b["workers"]["writer"].get("rows", {}).values())

        async def committing() -> bool:  # the new producers' batches reach the database again
            _, b = await pipe.health()
            return sum(b["workers"]["writer"].get("rows", {}).values()) > before + 1000
        await wait_until(committing, 60, "rows committed again")
        result = await finish(sim, pipe, system_db)
    finally:
        if writer_pid:
            os.kill(writer_pid, signal.SIGCONT)
        await pipe.kill()
    assert_trades_whole_and_other_losses_recorded(result)
