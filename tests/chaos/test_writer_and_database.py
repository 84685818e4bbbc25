"""Chaos: the writer killed, the database away for 20 s, SIGTERM while it is away.
Real processes, the simulator over real sockets, real PostgreSQL; each ends with the
audit of what was sent against what is stored: nothing lost, nothing duplicated."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import orjson
import pytest

from ingestor.db.embedded import EmbeddedPostgres
from ingestor.sim.server import SimConfig, Simulator

from ..pipeline import Pipeline, sim_flags, wait_until
from ..test_pipeline_processes import samples
from .helpers import assert_nothing_lost_or_duplicated, finish, kill_when, restarted

FAST = ["--batch-age-ms", "100", "--snapshot-interval-s", "0", "--open-interest-interval-s", "0",
        "--features", "false"]


@pytest.mark.parametrize("sim", [SimConfig(n_symbols=3, seed=21, record=True)], indirect=True)
async def test_writer_killed_twice_loses_and_duplicates_nothing(sim: Simulator, system_db: str) -> None:
    pipe = await Pipeline(["--dsn", system_db, "--shards", "2", *FAST, *sim_flags(sim)]).start()
    try:
        await pipe.wait_health(200)
        for _ in range(2):
            await asyncio.sleep(2.0)
            pid = await kill_when(pipe, "writer", signal.SIGKILL)
            await restarted(pipe, "writer", pid)
        await asyncio.sleep(2.0)
        result = await finish(sim, pipe, system_db)
    finally:
        await pipe.kill()
    summary = assert_nothing_lost_or_duplicated(result)
    assert summary["tables"]["agg_trades"]["sent"] > 500
    # The producers did send batches again, and the second copies were turned away.
    assert any("sending again" in line for line in pipe.log), pipe.text()


@pytest.mark.parametrize("sim", [SimConfig(n_symbols=3, seed=22, record=True)], indirect=True)
async def test_database_away_for_20_s_is_spooled_and_replayed(sim: Simulator, tmp_path: Path) -> None:
    server = EmbeddedPostgres(tmp_path / "db")
    dsn = await asyncio.to_thread(server.start)
    # JSON logs: the spool's lines are found by their event and context, as a log collector would.
    pipe = await Pipeline(["--dsn", dsn, *FAST, "--data-dir", str(tmp_path / "data"), *sim_flags(sim)],
                          env={"INGESTOR_LOG_FORMAT": "json"}).start()
    try:
        await pipe.wait_health(200)
        await asyncio.sleep(2.0)
        await asyncio.to_thread(server.stop)
        await pipe.wait_health(503, timeout=10, check=lambda b: b["workers"]["writer"].get("mode") == "spool")
        await asyncio.sleep(20.0)
        server = EmbeddedPostgres(tmp_path / "db")
        await asyncio.to_thread(server.start)

        async def replayed() -> bool:
            text = await pipe.metrics()
            return sum(v for _, v in samples(text, "ingestor_replayed_batches")) > 0 and \
                (await pipe.health())[1]["workers"]["writer"].get("mode") == "direct"

        await wait_until(replayed, 40, "the spool replayed")
        await asyncio.sleep(1.0)
        result = await finish(sim, pipe, dsn)
    finally:
        await pipe.kill()
        await asyncio.to_thread(server.stop)
    assert_nothing_lost_or_duplicated(result)
    assert any("spooling batches" in line for line in pipe.log)
    events = [e for e in (orjson.loads(line) for line in pipe.log if line.startswith("{"))
              if str(e.get("event", "")).startswith("spool_")]
    # One line when spooling starts and one when the spool is replayed, not one per batch.
    assert [e["event"] for e in events] == ["spool_start", "spool_replayed"], events
    start, replayed_line = events
    assert start["worker"] == "writer" and start["reason"] and start["directory"].startswith(str(tmp_path))
    assert replayed_line["replayed_batches"] > 0 and replayed_line["seconds"] > 0


@pytest.mark.parametrize("sim", [SimConfig(n_symbols=2, seed=23, record=True)], indirect=True)
async def test_sigterm_while_the_database_is_away_spools_and_the_next_start_replays(
        sim: Simulator, tmp_path: Path) -> None:
    server = EmbeddedPostgres(tmp_path / "db")
    dsn = await asyncio.to_thread(server.start)
    data = ["--data-dir", str(tmp_path / "data")]
    pipe = await Pipeline(["--dsn", dsn, *FAST, *data, *sim_flags(sim)]).start()
    try:
        await pipe.wait_health(200)
        await asyncio.sleep(1.5)
        await asyncio.to_thread(server.stop)
        await pipe.wait_health(503, timeout=10, check=lambda b: b["workers"]["writer"].get("mode") == "spool")
        await asyncio.sleep(2.0)
        from ..conftest import post_json

        await post_json(sim.urls["admin"] + "/pause")  # what was sent is final
        await asyncio.sleep(1.0)
        assert await pipe.stop() == 0, pipe.text()
    finally:
        await pipe.kill()
    assert any("stopping with" in line and "spooled" in line for line in pipe.log), pipe.text()
    assert list((tmp_path / "data" / "spool").rglob("*.spool"))
    # The database comes back; the next start replays the spool before anything else.
    server = EmbeddedPostgres(tmp_path / "db")
    await asyncio.to_thread(server.start)
    again = await Pipeline(["--dsn", dsn, *FAST, *data, *sim_flags(sim)]).start()
    try:
        async def empty() -> bool:
            return not list((tmp_path / "data" / "spool").rglob("*.spool"))

        await wait_until(empty, 30, "the spool replayed by the next start")
        assert await again.stop() == 0
    finally:
        await again.kill()
        await asyncio.to_thread(server.stop)
    server = EmbeddedPostgres(tmp_path / "db")
    await asyncio.to_thread(server.start)
    try:
        from ingestor.sim.audit import audit

        result = await audit(sim, dsn)
    finally:
        await asyncio.to_thread(server.stop)
    assert_nothing_lost_or_duplicated(result)
