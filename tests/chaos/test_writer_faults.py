"""Chaos: faults on the writer's side that nobody tried before issue 16. Real processes,
the simulator over real sockets, real PostgreSQL, and server-side errors made by triggers
and locks in the test database:

- rows the server refuses for a reason of their own (54000, raised by a trigger for some
  trade ids): the rest is stored, the refused rows are kept in ``rejected_rows`` with their
  bytes, and the writer never wedges;
- an error of a class the writer does not understand (XX000, for the first attempts): the
  writer exits non-zero, is restarted, and every row is stored once;
- a table locked so that every connection waits: /health turns 503 (work pending, nothing
  committed past ``--writer-stall-s``), and once the lock goes, nothing is lost;
- the writer SIGKILLed while it replays a spool: the next writer replays it again, and
  every row is stored exactly once.
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest

from ingestor.db.embedded import EmbeddedPostgres
from ingestor.sim.audit import TABLES, audit, sent_ids
from ingestor.sim.server import SimConfig, Simulator
from ingestor.wire import rows as R

from ..conftest import post_json
from ..pipeline import Pipeline, sim_flags, wait_until
from ..test_pipeline_processes import samples
from .helpers import assert_nothing_lost_or_duplicated, finish, kill_when, restarted

FAST = ["--batch-age-ms", "100", "--snapshot-interval-s", "0", "--open-interest-interval-s", "0",
        "--features", "false"]


async def execute(dsn: str, sql: str) -> None:
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def fetch(dsn: str, sql: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        return list(await conn.fetch(sql))
    finally:
        await conn.close()


async def trades_sent_and_written(sim: Simulator, pipe: Pipeline, dsn: str) -> bool:
    """Every trade the simulator sent is stored or kept as refused (the writer is not stuck)."""
    sent = {(m, s, a) for (m, s), ids in sent_ids(sim)["agg_trades"].items() for a in ids}
    stored = {(r[0], r[1], r[2]) for r in await fetch(dsn, "SELECT market, symbol, aggregate_trade_id "
                                                           "FROM agg_trades")}
    refused = {(p["m"], p["s"], p["a"]) for p in await refused_trades(dsn)}
    return sent <= stored | refused


async def writer_status(pipe: Pipeline, check: Any, timeout: float, what: str) -> None:
    """Until the writer's status (whatever /health's code) satisfies ``check``."""
    async def holds() -> bool:
        try:
            _, body = await pipe.health()
        except (TimeoutError, aiohttp.ClientError):
            return False
        return bool(check(body["workers"]["writer"]))

    await wait_until(holds, timeout, what)


async def refused_trades(dsn: str) -> list[dict[str, object]]:
    out = []
    for r in await fetch(dsn, "SELECT raw, payload FROM rejected_rows WHERE table_name = 'agg_trades'"):
        payload = orjson.loads(r["payload"])
        market = r["raw"][6:6 + int.from_bytes(r["raw"][2:6], "big")].decode()  # the first field: market
        out.append({"m": market, "s": payload["s"], "a": payload["a"], "raw": r["raw"]})
    return out


@pytest.mark.parametrize("sim", [SimConfig(n_symbols=3, seed=31, record=True)], indirect=True)
async def test_rows_the_server_refuses_are_kept_aside_and_everything_else_is_stored(
        sim: Simulator, system_db: str) -> None:
    """Issue 16 item 4. Before: ProgramLimitExceededError was retried forever, the writer
    wedged on the first group holding such a row, /health stayed 200."""
    await execute(system_db, """
        CREATE FUNCTION refuse_some() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF NEW.aggregate_trade_id % 97 = 0 THEN
                RAISE EXCEPTION 'injected: trade % too large', NEW.aggregate_trade_id
                    USING ERRCODE = 'program_limit_exceeded';
            END IF;
            RETURN NEW;
        END $$;
        CREATE TRIGGER refuse_some BEFORE INSERT ON agg_trades FOR EACH ROW EXECUTE FUNCTION refuse_some();
    """)
    pipe = await Pipeline(["--dsn", system_db, *FAST, *sim_flags(sim)]).start()
    try:
        await pipe.wait_health(200)

        async def some_refused() -> bool:
            return len(await refused_trades(system_db)) >= 5

        await wait_until(some_refused, 60, "refused trades kept in rejected_rows")
        await post_json(sim.urls["admin"] + "/pause")
        await wait_until(lambda: trades_sent_and_written(sim, pipe, system_db), 45,
                         "every trade stored or kept as refused")
        health = await pipe.wait_health(200)
        assert health["workers"]["writer"]["restarts"] == 0
        assert health["workers"]["writer"]["rejected_rows"].get("agg_trades", 0) > 0
        text = await pipe.metrics()
        assert sum(v for lab, v in samples(text, "ingestor_rows_rejected") if lab["table"] == "agg_trades") > 0
        assert await pipe.stop() == 0, pipe.text()
    finally:
        await pipe.kill()
    result = await audit(sim, system_db)
    refused = await refused_trades(system_db)
    assert refused and all(int(str(r["a"])) % 97 == 0 for r in refused)
    columns = len(R.TABLES["agg_trades"]).to_bytes(2, "big")
    assert all(r["raw"][:2] == columns for r in refused)  # the row's COPY tuple, as it was
    sent = sent_ids(sim)["agg_trades"]
    expected_lost = sum(1 for ids in sent.values() for a in ids if a % 97 == 0)
    assert len({(r["m"], r["s"], r["a"]) for r in refused}) == expected_lost
    trades = result.total("agg_trades")
    assert trades.lost == expected_lost and trades.duplicated == 0, result.summary()
    assert_nothing_lost_or_duplicated(result, tuple(t for t in TABLES if t != "agg_trades"))
    errors = [line for line in pipe.log if "refused by the database" in line]
    assert 1 <= len(errors) <= 2, errors  # one line per table a minute, not one per row


@pytest.mark.parametrize("sim", [SimConfig(n_symbols=3, seed=32, record=True)], indirect=True)
async def test_an_error_the_writer_does_not_understand_restarts_it_and_loses_nothing(
        sim: Simulator, system_db: str) -> None:
    """Issue 16 item 1. Before: the writer retried the group every 2 s, never exited, and a
    group raising anything else was dropped."""
    await execute(system_db, """
        CREATE SEQUENCE writer_fault;
        CREATE FUNCTION writer_fault() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF nextval('writer_fault') <= 3 THEN
                RAISE EXCEPTION 'injected internal error' USING ERRCODE = 'XX000';
            END IF;
            RETURN NEW;
        END $$;
        CREATE TRIGGER writer_fault BEFORE INSERT ON agg_trades FOR EACH ROW EXECUTE FUNCTION writer_fault();
    """)
    pipe = await Pipeline(["--dsn", system_db, "--shards", "2", *FAST, *sim_flags(sim)]).start()
    try:
        await pipe.wait_health(200, timeout=60, check=lambda b: b["workers"]["writer"]["restarts"] >= 1)
        result = await finish(sim, pipe, system_db)
    finally:
        await pipe.kill()
    summary = assert_nothing_lost_or_duplicated(result)
    assert summary["tables"]["agg_trades"]["sent"] > 100
    failures = [line for line in pipe.log if "writer stopping on an error it does not handle" in line]
    assert failures and all("XX000" in line for line in failures), pipe.text()
    assert any("writer" in line and "exited with 1" in line for line in pipe.log), pipe.text()


@pytest.mark.parametrize("sim", [SimConfig(n_symbols=2, seed=33, record=True)], indirect=True)
async def test_a_writer_that_commits_nothing_with_work_pending_turns_health_red(
        sim: Simulator, system_db: str) -> None:
    """Issue 16 item 4 (/health). Before: every connection waiting on a lock, the queue
    growing, and /health 200."""
    pipe = await Pipeline(["--dsn", system_db, *FAST, "--writer-stall-s", "3", *sim_flags(sim)]).start()
    lock = await asyncpg.connect(system_db, timeout=10)
    try:
        await pipe.wait_health(200)
        tx = lock.transaction()
        await tx.start()
        await lock.execute("LOCK TABLE agg_trades IN SHARE MODE")  # COPY waits; reads do not
        body = await pipe.wait_health(503, timeout=60, check=lambda b: any(
            "nothing committed" in p for p in b["problems"]))
        assert body["workers"]["writer"]["stalled_s"] > 3
        await tx.rollback()
        await pipe.wait_health(200, timeout=60)
        result = await finish(sim, pipe, system_db)
    finally:
        await lock.close()
        await pipe.kill()
    assert_nothing_lost_or_duplicated(result)


@pytest.mark.parametrize("sim", [SimConfig(n_symbols=2, seed=34, record=True)], indirect=True)
async def test_the_writer_killed_while_replaying_the_spool_loses_and_duplicates_nothing(
        sim: Simulator, tmp_path: Path) -> None:
    """Issue 16 item 9: a crash mid-replay. The spool is left by a run stopped while the
    database was away; the next run's writer replays it against a table kept locked (so
    the replay is certainly under way), is SIGKILLed there, and its successor replays the
    segment again once the lock goes: what was committed comes back as duplicates."""
    server = EmbeddedPostgres(tmp_path / "db")
    dsn = await asyncio.to_thread(server.start)
    data = ["--data-dir", str(tmp_path / "data")]
    pipe = await Pipeline(["--dsn", dsn, *FAST, *data, *sim_flags(sim)]).start()
    try:
        await pipe.wait_health(200)

        async def trades_stored() -> bool:
            return (await fetch(dsn, "SELECT count(*) FROM agg_trades"))[0][0] > 100

        await wait_until(trades_stored, 30, "trades stored before the outage")
        await asyncio.to_thread(server.stop)
        await pipe.wait_health(503, timeout=15, check=lambda b: b["workers"]["writer"].get("spooled_batches", 0) > 20)
        await post_json(sim.urls["admin"] + "/pause")  # what was sent is final
        assert await pipe.stop() == 0, pipe.text()
    finally:
        await pipe.kill()
    spool = tmp_path / "data" / "spool"
    assert list(spool.rglob("*.spool"))
    server = EmbeddedPostgres(tmp_path / "db")
    await asyncio.to_thread(server.start)
    # Locked before the next run starts, so its writer's replay certainly waits on it.
    lock = await asyncpg.connect(dsn, timeout=10)
    tx = lock.transaction()
    await tx.start()
    await lock.execute("LOCK TABLE agg_trades IN SHARE MODE")  # COPY waits; reads do not
    again = await Pipeline(["--dsn", dsn, *FAST, *data, *sim_flags(sim)]).start()
    try:
        await writer_status(again, lambda w: w.get("state") == "replaying" and w.get("groups_in_flight", 0) > 0,
                            30, "the writer replaying the spool")
        pid = await kill_when(again, "writer", signal.SIGKILL)
        await restarted(again, "writer", pid, timeout=30)
        await tx.rollback()

        async def replayed() -> bool:
            return not list(spool.rglob("*.spool"))

        await wait_until(replayed, 60, "the spool replayed by the restarted writer")
        assert await again.stop() == 0, again.text()
        result = await audit(sim, dsn)
    finally:
        await lock.close()
        await again.kill()
        await asyncio.to_thread(server.stop)
    assert_nothing_lost_or_duplicated(result)
    assert not list(spool.rglob("quarantine/*"))  # a SIGKILL cuts no acknowledged record
