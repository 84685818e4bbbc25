"""Connection faults the exchange side can make beyond drops and stalls: a frame with a
bogus id, a rotation whose old connection will not close, a connection too quiet to
prove itself. Each ends with the audit: nothing lost, nothing stored twice."""

from __future__ import annotations

import asyncpg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from ingestor.sim.model import ModelParams
from ingestor.sim.server import SimConfig, Simulator
from ingestor.sim.ws_server import BOGUS_ID

from ..conftest import post_json
from ..pipeline import Pipeline, sim_flags, table_counts, wait_until
from .helpers import assert_nothing_lost_or_duplicated, finish

FAST = ["--batch-age-ms", "100", "--snapshot-interval-s", "2", "--open-interest-interval-s", "2"]
BUSY = ModelParams(cascade_every_s=2.0)  # liquidations in a short run


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
