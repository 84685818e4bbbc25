"""Connection faults the exchange side can make beyond drops and stalls: a frame with a
bogus id, a rotation whose old connection will not close, a connection too quiet to
prove itself. Each ends with the audit: nothing lost, nothing stored twice."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from ingestor.binance.plan import Connection
from ingestor.config import Settings
from ingestor.sim.model import ModelParams
from ingestor.sim.server import SimConfig, Simulator
from ingestor.sim.ws_server import BOGUS_ID
from ingestor.wire.child import ChildContext
from ingestor.workers.frames import FrameHandler
from ingestor.workers.socket_worker import StreamConnection, rotation_retry_delay

from ..conftest import post_json
from ..pipeline import Pipeline, sim_flags, table_counts, wait_until
from .helpers import assert_nothing_lost_or_duplicated, finish

FAST = ["--batch-age-ms", "100", "--snapshot-interval-s", "2", "--open-interest-interval-s", "2"]
BUSY = ModelParams(cascade_every_s=2.0)  # liquidations in a short run
QUIET = ModelParams(cascade_every_s=1e9)  # no liquidations at all
MAX_AGE_S = 4.0


def rejected(text: str, reason: str) -> float:
    return sum(s.value for fam in text_string_to_metric_families(text) if fam.name == "ingestor_frames_rejected"
               for s in fam.samples if s.name.endswith("_total") and s.labels.get("reason") == reason)


async def gap_rows(dsn: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        return list(await conn.fetch("SELECT * FROM stream_gaps"))
    finally:
        await conn.close()


@pytest.mark.parametrize("sim", [SimConfig(n_symbols=3, seed=41, record=True, model=BUSY)], indirect=True)
async def test_a_bogus_id_costs_one_frame_and_the_streams_carry_on(sim: Simulator, system_db: str) -> None:
    pipe = await Pipeline(["--dsn", system_db, *FAST, *sim_flags(sim)]).start()
    try:
        await pipe.wait_health(200)

        async def flowing() -> bool:  # every kind has a position the bogus frames could jump past
            counts = await table_counts(system_db)
            return all(counts[t] > 0 for t in ("agg_trades", "depth_updates", "mark_prices", "force_orders"))

        await wait_until(flowing, 30, "rows of every stream kind stored")
        reply = await post_json(sim.urls["admin"] + "/faults", {"kind": "bogus_id"})
        assert sum(reply["targets"]) >= 2, reply
        before = await table_counts(system_db)

        async def rejected_and_carried_on() -> bool:
            text = await pipe.metrics()
            counts = await table_counts(system_db)
            return (rejected(text, "implausible_id") >= 4 and rejected(text, "implausible_time") >= 1
                    and all(counts[t] > before[t] for t in ("agg_trades", "depth_updates", "mark_prices")))

        await wait_until(rejected_and_carried_on, 30, "the bogus frames rejected and the streams stored on")
        text = await pipe.metrics()
        assert rejected(text, "fields") == 0 and rejected(text, "json") == 0
        result = await finish(sim, pipe, system_db)
    finally:
        await pipe.kill()
    summary = assert_nothing_lost_or_duplicated(result)
    assert result.total("agg_trades").extra == 0, summary  # the bogus trade was not stored
    # Nothing pinned: no gap, so no absurd range asked of the REST backfill.
    assert [g for g in await gap_rows(system_db) if g["symbol"] != "*"] == [], summary
    assert all((g["to_id"] or 0) < BOGUS_ID // 2 for g in await gap_rows(system_db))


async def socket_status(pipe: Pipeline) -> list[dict[str, Any]]:
    _, body = await pipe.health()
    return [w for name, w in body["workers"].items() if name.startswith("socket-")]


@pytest.mark.parametrize("sim", [SimConfig(n_symbols=3, seed=42, record=True, model=BUSY)], indirect=True)
async def test_a_rotation_whose_old_connection_will_not_close_loses_nothing(sim: Simulator, system_db: str) -> None:
    pipe = await Pipeline(["--dsn", system_db, *FAST, "--connection-max-age-s", str(MAX_AGE_S),
                           *sim_flags(sim)]).start()
    try:
        await pipe.wait_health(200)

        async def flowing() -> bool:
            counts = await table_counts(system_db)
            return counts["agg_trades"] > 0 and counts["depth_updates"] > 0

        await wait_until(flowing, 30, "rows stored")
        # Every open connection stops reading what the client sends: its next rotation's close
        # cannot complete.
        reply = await post_json(sim.urls["admin"] + "/faults", {"kind": "hold_close"})
        held = sum(reply["targets"])
        assert held >= 2, reply
        [before] = await socket_status(pipe)

        async def rotated_past_it() -> bool:
            [w] = await socket_status(pipe)
            return (w.get("forced_closes", 0) >= held and w["connected"] == w["connections"]
                    and w["rotations"] >= before["rotations"] + 2 * w["connections"])

        await wait_until(rotated_past_it, 60, "every held connection aborted, and rotations going on")
        result = await finish(sim, pipe, system_db)
    finally:
        await pipe.kill()
    assert_nothing_lost_or_duplicated(result)
    assert not await gap_rows(system_db)  # the old one delivered until it was aborted, the new one held the rest
    assert sum(1 for line in pipe.log if "did not close within" in line) >= held
    assert not any("connection task failed" in line for line in pipe.log), pipe.text()


@pytest.mark.parametrize("sim", [SimConfig(markets=("futures",), n_symbols=1, seed=43, record=True, model=QUIET)],
                         indirect=True)
async def test_a_quiet_connection_rotates_too(sim: Simulator, system_db: str) -> None:
    # One stream a shard: one of them holds only !forceOrder@arr, and this market has no
    # liquidations: that connection never delivers a frame, yet must be rotated.
    pipe = await Pipeline(["--dsn", system_db, *FAST, "--markets", "futures", "--shards", "4",
                           "--connection-max-age-s", str(MAX_AGE_S), *sim_flags(sim)]).start()
    try:
        await pipe.wait_health(200)
        workers = await socket_status(pipe)
        assert len(workers) == 4 and all(w["streams"] == 1 for w in workers), workers

        async def all_rotated() -> bool:
            return all(w["rotations"] >= 2 for w in await socket_status(pipe))

        await wait_until(all_rotated, 90, "every connection, the quiet one too, rotated twice")
        result = await finish(sim, pipe, system_db)
    finally:
        await pipe.kill()
    assert_nothing_lost_or_duplicated(result)
    assert result.total("force_orders").sent == 0  # it was quiet indeed
    assert not any("rotation failed" in line for line in pipe.log), pipe.text()


class FailsOnce(FrameHandler):
    """A handler with a bug: the first lost connection raises out of it (a seam for a fault of
    our own; the connection, the sockets and the simulator are real)."""

    failed = False

    def connection_lost(self, kinds: set[str]) -> None:
        if not self.failed:
            self.failed = True
            raise RuntimeError("a bug of ours")
        super().connection_lost(kinds)


@pytest.mark.parametrize("sim", [SimConfig(markets=("futures",), n_symbols=2, seed=44)], indirect=True)
async def test_a_connection_task_that_fails_is_restarted(sim: Simulator) -> None:
    settings = Settings(futures_ws_url=sim.urls["futures_ws"])
    spec = Connection("futures", "market", ("!markPrice@arr@1s",))
    batches: list[object] = []
    handler = FailsOnce("futures", batches.append)
    conn = StreamConnection(spec, spec.url(settings.futures_ws_url), handler, settings)
    ctx = ChildContext(settings, "socket-test", None)
    task = asyncio.ensure_future(conn.run_owned(ctx))
    try:
        async def received(n: int) -> bool:
            assert not task.done(), task
            return handler.messages.get("markPriceUpdate", 0) >= n

        await wait_until(lambda: received(1), 20, "mark prices")
        await post_json(sim.urls["admin"] + "/faults", {"kind": "drop"})  # the handler raises on it

        async def restarted() -> bool:
            assert not task.done(), task
            return conn.task_failures == 1 and conn.connected

        await wait_until(restarted, 20, "the failed connection task started over")
        seen = handler.messages["markPriceUpdate"]
        await wait_until(lambda: received(seen + 1), 20, "mark prices again")
        ctx.stopping.set()
        await asyncio.wait_for(task, 20)  # and it stops cleanly
    finally:
        task.cancel()


def test_a_failed_rotation_is_retried_before_the_cut() -> None:
    # Within minutes: 30 s, doubling up to 5 min.
    assert [rotation_retry_delay(n, 86_400) for n in range(1, 7)] == [30, 60, 120, 240, 300, 300]
    # With the default age (23.5 h), the attempts before the 24 h cut: eight at least, and
    # the last ones ever closer to it.
    left, attempts = 1800.0, 0
    while left > 5:
        attempts += 1
        left -= rotation_retry_delay(attempts, left)
    assert attempts >= 8
    assert rotation_retry_delay(3, 100) == 50 and rotation_retry_delay(1, 2) == 5 and rotation_retry_delay(9, -60) == 5
