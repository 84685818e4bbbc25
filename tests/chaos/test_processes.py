"""Chaos in the process tree: the feature worker killed (its missed bars are recomputed
from stored data), SIGTERM in the middle of a burst (everything received is committed)."""

from __future__ import annotations

import asyncio
import signal
from datetime import timedelta
from typing import Any

import asyncpg
import pytest

from ingestor.sim.audit import audit
from ingestor.sim.model import ModelParams
from ingestor.sim.server import SimConfig, Simulator

from ..conftest import post_json
from ..pipeline import Pipeline, sim_flags
from .helpers import kill_when, restarted


@pytest.mark.parametrize("sim", [SimConfig(n_symbols=2, seed=41, record=True)], indirect=True)
async def test_feature_worker_killed_resyncs_and_its_missed_bars_are_recomputed(
        sim: Simulator, system_db: str) -> None:
    pipe = await Pipeline(["--dsn", system_db, "--batch-age-ms", "100", "--snapshot-interval-s", "2",
                           "--feature-params", "bar_seconds=1,window=4", *sim_flags(sim)]).start()
    try:
        def both_markets_have_bars(b: dict[str, Any]) -> bool:
            markets = b["workers"]["features"].get("markets", {})
            return len(markets) == 2 and all(m["bars"] >= 3 for m in markets.values())

        await pipe.wait_health(200, check=both_markets_have_bars)
        pid = await kill_when(pipe, "features", signal.SIGKILL)
        await restarted(pipe, "features", pid)
        await asyncio.sleep(3.0)  # a few bars are missed while it comes back

        recomputed: dict[str, dict[str, int]] = {}

        def filled(body: dict[str, object]) -> bool:
            done = body["workers"]["features"].get("recomputed", {})  # type: ignore[index]
            recomputed.update(done)
            return len(done) == 2 and all(v["ok"] for v in done.values())

        await pipe.wait_health(200, timeout=40, check=filled)
        await asyncio.sleep(2.0)  # a bar or two from the new worker
        assert await pipe.stop() == 0
    finally:
        await pipe.kill()
    conn = await asyncpg.connect(system_db)
    try:
        rows = await conn.fetch("SELECT market, symbol, bar_time FROM features ORDER BY 1, 2, 3")
        syncs = await conn.fetchval("SELECT count(*) FROM book_syncs WHERE reason = 'start'")
    finally:
        await conn.close()
    assert syncs == 8  # four books, built again by the new worker
    by_key: dict[tuple[str, str], list[object]] = {}
    for r in rows:
        by_key.setdefault((r["market"], r["symbol"]), []).append(r["bar_time"])
    assert len(by_key) == 4
    for key, times in by_key.items():
        # One row a bar, and no bar missing between the first and the last: the dead worker's
        # bars, the recomputed ones, the new worker's.
        steps = {b - a for a, b in zip(times, times[1:], strict=False)}
        assert steps == {timedelta(seconds=1)}, (key, sorted(steps))
        span = recomputed[key[0]]
        ms = [int(t.timestamp() * 1000) for t in times]
        features_log = [ln for ln in pipe.log if "features" in ln][-30:]
        assert span["to_ms"] > span["from_ms"], (key, span, ms, features_log)  # bars were missed, and recomputed
        assert ms[0] < span["from_ms"] and ms[-1] >= span["to_ms"], (key, span, ms)


@pytest.mark.parametrize("sim", [SimConfig(n_symbols=3, seed=42, record=True, model=ModelParams(rate=3000))],
                         indirect=True)
async def test_sigterm_mid_burst_commits_everything_received(sim: Simulator, system_db: str) -> None:
    pipe = await Pipeline(["--dsn", system_db, "--shards", "2", "--batch-age-ms", "500", "--batch-rows", "100000",
                           "--features", "false", *sim_flags(sim)]).start()
    try:
        await pipe.wait_health(200)
        await asyncio.sleep(2.5)
        assert await pipe.stop() == 0, pipe.text()  # the burst goes on: the simulator is not paused
    finally:
        await pipe.kill()
    await post_json(sim.urls["admin"] + "/pause")
    result = await audit(sim, system_db)
    # What the simulator sent after the sockets closed never arrived; everything that did is
    # stored: per stream, the stored ids are exactly the sent ones up to the last stored.
    from ingestor.sim.audit import sent_ids

    sent = sent_ids(sim)
    conn = await asyncpg.connect(system_db)
    try:
        for table, col in (("agg_trades", "aggregate_trade_id"), ("depth_updates", "final_update_id")):
            for (market, symbol), ids in sent[table].items():
                stored = [r[0] for r in await conn.fetch(
                    f"SELECT {col} FROM {table} WHERE market = $1 AND symbol = $2 ORDER BY 1", market, symbol)]
                assert stored, (table, market, symbol)
                assert stored == [i for i in ids if i <= stored[-1]], (table, market, symbol)
    finally:
        await conn.close()
    assert result.total("agg_trades").duplicated == 0 and result.total("agg_trades").stored > 2000
    assert not [line for line in pipe.log if "did not stop" in line]
