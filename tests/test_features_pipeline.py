"""The feature worker in the running pipeline: real processes, the simulator over real sockets,
real PostgreSQL. Books are synced through the REST worker, bars are written, a gap makes the
book resync and is recorded, the metrics and /health show it, a killed worker comes back;
and what the worker wrote equals what a replay of the stored data computes."""

from __future__ import annotations

import asyncio
import os
import signal
from typing import Any

import asyncpg
import pytest

from ingestor.feature_spec import FeatureSettings
from ingestor.features.verify import verify_live_rows
from ingestor.sim.server import SimConfig, Simulator

from .conftest import post_json
from .pipeline import Pipeline, sim_flags, wait_until
from .test_pipeline_processes import samples

FS = FeatureSettings(bar_seconds=1, window=10)
PARAMS = "bar_seconds=1,window=10"


async def fetch(dsn: str, sql: str, *args: object) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        return list(await conn.fetch(sql, *args))
    finally:
        await conn.close()


def metric(text: str, family: str, **labels: str) -> float:
    return sum(v for lab, v in samples(text, family) if all(lab.get(k) == x for k, x in labels.items()))


@pytest.mark.parametrize("sim", [SimConfig(n_symbols=2, seed=11, record=True)], indirect=True)
async def test_feature_worker_syncs_books_writes_bars_resyncs_after_a_gap_and_restarts(
        sim: Simulator, system_db: str) -> None:
    pipe = await Pipeline(["--dsn", system_db, "--batch-age-ms", "100", "--snapshot-interval-s", "2",
                           "--feature-params", PARAMS, "--feature-watchlist", "BTCUSDT", *sim_flags(sim)]).start()
    started = asyncio.get_running_loop().time()
    try:
        health = await pipe.wait_health(200, check=lambda b: "features" in b["workers"]
                                        and b["workers"]["features"].get("markets"))
        assert health["workers"]["features"]["kind"] == "features"

        async def synced() -> bool:
            text = await pipe.metrics()
            return metric(text, "ingestor_books", state="synced") == 4 and \
                metric(text, "ingestor_feature_bars") >= 12

        await wait_until(synced, 20, "4 synced books and bars")
        syncs = await fetch(system_db, "SELECT market, symbol, reason, last_update_id, snapshot_time FROM book_syncs")
        assert {(r["market"], r["symbol"], r["reason"]) for r in syncs} == {
            (m, s, "start") for m in ("spot", "futures") for s in ("BTCUSDT", "ETHUSDT")}
        # Each book was built from a snapshot that is stored: a replay can build the same one.
        for r in syncs:
            stored = await fetch(system_db, "SELECT 1 FROM depth_snapshots WHERE market = $1 AND symbol = $2 "
                                 "AND time = $3 AND (payload->>'lastUpdateId')::bigint = $4",
                                 r["market"], r["symbol"], r["snapshot_time"], r["last_update_id"])
            assert stored, f"{r['market']} {r['symbol']}: the snapshot of its book sync is not stored"

        # Skipped futures diffs: the book sees the hole, asks for a snapshot, rebuilds, records it.
        await post_json(sim.urls["admin"] + "/faults", {"kind": "gap", "market": "futures", "symbol": "BTCUSDT"})

        async def resynced() -> bool:
            rows = await fetch(system_db, "SELECT * FROM stream_gaps WHERE stream = 'book'")
            return any(r["closed_how"] == "resynced" for r in rows)

        await wait_until(resynced, 20, "the book gap, resynced")
        gap = (await fetch(system_db, "SELECT * FROM stream_gaps WHERE stream = 'book'"))[0]
        assert (gap["market"], gap["symbol"]) == ("futures", "BTCUSDT")
        assert gap["from_id"] <= gap["to_id"] and gap["closed_at"] >= gap["detected_at"]
        # The socket worker saw the same hole in the stream it stores.
        depth_gap = await fetch(system_db, "SELECT from_id, to_id FROM stream_gaps WHERE stream = 'depth'")
        assert depth_gap and depth_gap[0]["from_id"] == gap["from_id"]

        async def sync_stored() -> bool:  # its own batch: gap rows are handed on first (wire/batching.py)
            return bool(await fetch(system_db, "SELECT 1 FROM book_syncs WHERE reason = 'gap' AND symbol = 'BTCUSDT' "
                                               "AND market = 'futures'"))
        await wait_until(sync_stored, 20, "the resync's book_syncs row")

        async def counted() -> bool:  # metrics are reported once a second
            return metric(await pipe.metrics(), "ingestor_book_syncs", market="futures", reason="gap") == 1

        await wait_until(counted, 5, "the resync in the metrics")
        text = await pipe.metrics()
        assert metric(text, "ingestor_book_drift_checks", result="ok") > 0
        assert metric(text, "ingestor_book_drift_checks", result="mismatch") == 0
        assert metric(text, "ingestor_feature_events", kind="aggTrade") > 100
        assert metric(text, "ingestor_feature_value", symbol="BTCUSDT", indicator="close") > 0
        assert not [lab for lab, _ in samples(text, "ingestor_feature_value") if lab["symbol"] != "BTCUSDT"]
        assert 0 <= metric(text, "ingestor_feature_input_lag_seconds", market="futures") < 5

        async def bars() -> bool:
            return metric(await pipe.metrics(), "ingestor_feature_bars") >= 40

        await wait_until(bars, 20, "10 bars a symbol")
        # A killed feature worker is restarted and builds its books again.
        old = (await pipe.health())[1]["workers"]["features"]["pid"]
        os.kill(old, signal.SIGKILL)
        def rebuilt(body: dict[str, Any]) -> bool:
            w = body["workers"]["features"]
            markets = w.get("markets", {})
            return w["restarts"] == 1 and len(markets) == 2 and all(
                m["books"]["synced"] == 2 and m["bars"] > 0 for m in markets.values())

        await pipe.wait_health(200, timeout=30, check=rebuilt)

        async def recorded() -> bool:  # the new worker's book syncs, through the writer
            return len(await fetch(system_db, "SELECT 1 FROM book_syncs WHERE reason = 'start'")) == 8

        await wait_until(recorded, 10, "the restarted worker's book syncs")
        assert await pipe.stop() == 0
    finally:
        await pipe.kill()
    assert asyncio.get_running_loop().time() - started < 60
    rows = await fetch(system_db, "SELECT market, symbol, bar_time, obi FROM features "
                                  "ORDER BY market, symbol, bar_time")
    by_key: dict[tuple[str, str], list[asyncpg.Record]] = {}
    for r in rows:
        by_key.setdefault((r["market"], r["symbol"]), []).append(r)
    assert set(by_key) == {(m, s) for m in ("spot", "futures") for s in ("BTCUSDT", "ETHUSDT")}
    for key, rs in by_key.items():
        assert len(rs) >= 8, key
        assert sum(r["obi"] is not None for r in rs) >= len(rs) - 3, f"{key}: the book was missing too often"


@pytest.mark.parametrize("sim", [SimConfig(n_symbols=2, seed=12, record=True)], indirect=True)
async def test_live_rows_equal_the_replay_across_a_resync(sim: Simulator, system_db: str) -> None:
    pipe = await Pipeline(["--dsn", system_db, "--batch-age-ms", "100", "--snapshot-interval-s", "1",
                           "--feature-params", PARAMS, *sim_flags(sim)]).start()
    since_ms = int(asyncio.get_running_loop().time() * 0)  # every row of this fresh database
    try:
        await pipe.wait_health(200)
        await asyncio.sleep(6)
        for market in ("spot", "futures"):  # a resync in each market, so the replay must follow it
            await post_json(sim.urls["admin"] + "/faults", {"kind": "gap", "market": market, "symbol": "ETHUSDT"})
        await asyncio.sleep(8)
        assert await pipe.stop() == 0
    finally:
        await pipe.kill()
    assert len(await fetch(system_db, "SELECT 1 FROM book_syncs WHERE reason = 'gap'")) == 2
    conn = await asyncpg.connect(system_db)
    try:
        cmp = await verify_live_rows(conn, FS, ("spot", "futures"), since_ms, 1000)
    finally:
        await conn.close()
    assert cmp.live >= 4 * 10
    assert cmp.identical, (cmp.missing[:3], cmp.extra[:3], cmp.differing[:5])
