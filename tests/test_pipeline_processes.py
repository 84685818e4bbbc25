"""The process tree under stress: a killed worker, bad frames, a database that goes away,
and what the metrics endpoint says about it all. Real processes, real sockets, real
PostgreSQL."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import asyncpg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from ingestor.db.embedded import EmbeddedPostgres
from ingestor.sim.server import SimConfig, Simulator

from .conftest import post_json
from .pipeline import Pipeline, sim_flags, table_counts, wait_until


def samples(text: str, family: str) -> list[tuple[dict[str, str], float]]:
    out = []
    for fam in text_string_to_metric_families(text):
        if fam.name == family:
            out.extend((s.labels, s.value) for s in fam.samples if s.name.endswith(("_total", "")) and
                       not s.name.endswith("_created"))
    return out


@pytest.mark.parametrize("sim", [SimConfig(n_symbols=3, seed=3)], indirect=True)
async def test_killed_worker_restarts_and_metrics_carry_every_worker(sim: Simulator, system_db: str) -> None:
    pipe = await Pipeline(["--dsn", system_db, "--shards", "2", "--batch-age-ms", "100", *sim_flags(sim)]).start()
    try:
        health = await pipe.wait_health(200)
        old = health["workers"]["socket-1"]["pid"]
        os.kill(old, signal.SIGKILL)
        await pipe.wait_health(503, timeout=10, check=lambda b: not b["workers"]["socket-1"]["alive"]
                               or b["workers"]["socket-1"]["pid"] != old)
        health = await pipe.wait_health(200, timeout=20, check=lambda b: b["workers"]["socket-1"]["restarts"] == 1
                                        and b["workers"]["socket-1"].get("connected_streams", 0) > 0)
        assert health["workers"]["socket-1"]["pid"] != old
        before = (await table_counts(system_db))["agg_trades"]

        async def flowing() -> bool:
            return (await table_counts(system_db))["agg_trades"] > before + 50

        await wait_until(flowing, 15, "trades after the restart")
        assert any("socket-1" in line and "exited" in line for line in pipe.log)

        # The writer too: killed while waiting on the queue, restarted, and rows flow again.
        writer = health["workers"]["writer"]["pid"]
        os.kill(writer, signal.SIGKILL)
        await pipe.wait_health(200, timeout=20, check=lambda b: b["workers"]["writer"]["restarts"] == 1
                               and b["workers"]["writer"]["pid"] != writer)
        before = (await table_counts(system_db))["agg_trades"]
        await wait_until(flowing, 15, "trades after the writer restart")

        text = await pipe.metrics()
        received = samples(text, "ingestor_messages_received")
        assert {lab["worker"] for lab, _ in received} == {"socket-0", "socket-1"}
        assert {lab["market"] for lab, v in received if v > 0} == {"spot", "futures"}
        written = {lab["table"]: v for lab, v in samples(text, "ingestor_rows_written") if lab["worker"] == "writer"}
        assert written["agg_trades"] > 0 and written["depth_updates"] > 0
        assert any(lab["worker"] == "rest" for lab, _ in samples(text, "ingestor_rest_requests"))
        lag = [s for fam in text_string_to_metric_families(text) if fam.name == "ingestor_event_to_commit_seconds"
               for s in fam.samples if s.name.endswith("_count")]
        assert lag and all(s.labels["worker"] == "writer" for s in lag)
        assert await pipe.stop() == 0
    finally:
        await pipe.kill()


@pytest.mark.parametrize("sim", [SimConfig(n_symbols=2, seed=5)], indirect=True)
async def test_bad_frames_are_counted_and_skipped_and_gaps_recorded(sim: Simulator, system_db: str) -> None:
    pipe = await Pipeline(["--dsn", system_db, "--batch-age-ms", "100", *sim_flags(sim)]).start()
    try:
        await pipe.wait_health(200)
        for kind in ("malformed", "non_json", "unknown_event"):
            for market in ("spot", "futures"):
                await post_json(sim.urls["admin"] + "/faults", {"kind": kind, "market": market})
        await post_json(sim.urls["admin"] + "/faults", {"kind": "gap", "market": "futures", "count": 2})
        await post_json(sim.urls["admin"] + "/faults", {"kind": "skip_trades", "market": "spot", "count": 3})

        async def rejected_all() -> bool:
            text = await pipe.metrics()
            counts = {(lab["market"], lab["reason"]): v for lab, v in samples(text, "ingestor_frames_rejected")}
            # Truncated JSON and HTML arrive without the combined-stream envelope; the
            # unknown event has one.
            return all(counts.get((m, "envelope"), 0) >= 2 and counts.get((m, "unknown_event"), 0) >= 1
                       for m in ("spot", "futures"))

        await wait_until(rejected_all, 15, "rejected frames in the metrics")

        async def gaps() -> bool:
            conn = await asyncpg.connect(system_db)
            try:
                kinds = {tuple(r) for r in await conn.fetch("SELECT DISTINCT market, stream FROM stream_gaps")}
            finally:
                await conn.close()
            return {("futures", "depth"), ("spot", "aggTrade")} <= kinds

        await wait_until(gaps, 15, "stream_gaps rows")
        health = await pipe.wait_health(200)
        assert health["workers"]["socket-0"]["restarts"] == 0  # bad input never kills a worker
        assert await pipe.stop() == 0
    finally:
        await pipe.kill()
    conn = await asyncpg.connect(system_db)
    try:
        rows = await conn.fetch("SELECT market, symbol, stream, from_id, to_id, closed_how, closed_rows "
                                "FROM stream_gaps")
        kinds = {(r["market"], r["stream"]) for r in rows}
        assert ("futures", "depth") in kinds and ("spot", "aggTrade") in kinds
        # The skipped trades were fetched over REST and the gap closed with their count; the
        # diffs a depth gap misses cannot be fetched: recorded as unrecoverable.
        trade_gap = next(r for r in rows if r["stream"] == "aggTrade")
        assert trade_gap["to_id"] - trade_gap["from_id"] + 1 == 3
        assert (trade_gap["closed_how"], trade_gap["closed_rows"]) == ("backfilled", 3)
        ids = [r[0] for r in await conn.fetch(
            "SELECT aggregate_trade_id FROM agg_trades WHERE market = 'spot' AND symbol = $1 "
            "AND aggregate_trade_id BETWEEN $2 AND $3 ORDER BY 1", trade_gap["symbol"], trade_gap["from_id"],
            trade_gap["to_id"])]
        assert ids == list(range(trade_gap["from_id"], trade_gap["to_id"] + 1))
        assert {r["closed_how"] for r in rows if r["stream"] == "depth"} == {"unrecoverable"}
        # Nothing malformed was stored: every stored payload parses as the event its table holds.
        assert await conn.fetchval("SELECT count(*) FROM agg_trades WHERE payload->>'e' <> 'aggTrade'") == 0
    finally:
        await conn.close()


@pytest.mark.parametrize("sim", [SimConfig(n_symbols=2, seed=9)], indirect=True)
async def test_health_turns_503_when_the_database_stops(sim: Simulator, tmp_path: Path) -> None:
    server = EmbeddedPostgres(tmp_path)
    dsn = await asyncio.to_thread(server.start)
    pipe = await Pipeline(["--dsn", dsn, "--batch-age-ms", "100", *sim_flags(sim)]).start()
    try:
        await pipe.wait_health(200)
        await asyncio.to_thread(server.stop)
        # Other problems may turn it 503 first (a worker whose status is late while its
        # connection fails): wait for the one this is about.
        body = await pipe.wait_health(503, timeout=20, check=lambda b: b["database"]["reachable"] is False)
        assert "database unreachable" in body["problems"]
        # Back up: the writer reconnects and the service is healthy again.
        server = EmbeddedPostgres(tmp_path)
        await asyncio.to_thread(server.start)
        await pipe.wait_health(200, timeout=30, check=lambda b: b["database"]["reachable"])
        assert await pipe.stop() == 0
    finally:
        await pipe.kill()
        await asyncio.to_thread(server.stop)


@pytest.mark.parametrize("sim", [SimConfig(n_symbols=2, seed=11, markets=("spot",))], indirect=True)
async def test_oversized_frames_close_and_reopen_the_connection(sim: Simulator, system_db: str) -> None:
    # Spot diff-depth frames are a few hundred bytes; aggTrades about 200. A 250-byte
    # limit makes the depth frames "too large" while trades still fit.
    pipe = await Pipeline(["--dsn", system_db, "--markets", "spot", "--max-frame-bytes", "250",
                           "--snapshot-interval-s", "0", *sim_flags(sim)]).start()
    try:
        async def reopened() -> bool:
            text = await pipe.metrics()
            oversize = sum(v for lab, v in samples(text, "ingestor_frames_rejected") if lab["reason"] == "oversize")
            reconnects = sum(v for _, v in samples(text, "ingestor_reconnects"))
            return oversize >= 2 and reconnects >= 2

        await wait_until(reopened, 20, "oversized frames to close and reopen connections")
        _, health = await pipe.health()
        assert health["workers"]["socket-0"]["restarts"] == 0  # the worker itself never died
        assert await pipe.stop() == 0
    finally:
        await pipe.kill()
