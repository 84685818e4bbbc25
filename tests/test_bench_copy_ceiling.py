"""The COPY ceiling benchmark stores what it reports: every row it counts is in the table,
once, with ids and times renumbered consistently in the columns and the JSON, also after
the batches' ids and times have been shifted for a second pass through the pool."""

from __future__ import annotations

import asyncpg
import numpy as np
import pytest

from benchmarks import copy_ceiling as cc

BATCH = 200  # small batches: many passes through the pool in a fraction of a second


def test_ascii_digits_are_zero_padded_13_digit_numbers() -> None:
    values = np.array([0, 7, 1_000_000_000_000, 1_700_000_000_123, 9_999_999_999_999], dtype=np.int64)
    assert [bytes(r).decode() for r in cc.ascii_digits(values)] == [f"{v:013d}" for v in values.tolist()]
    with pytest.raises(OverflowError):
        cc.ascii_digits(np.array([10**13], dtype=np.int64))


@pytest.mark.parametrize("payload_type", ["jsonb", "bytea"])
async def test_copy_into_stores_every_row_once_with_matching_payload(db_dsn: str, payload_type: str) -> None:
    mix = {"aggTrade": 0.5, "depthUpdate20": 0.5}
    r = await cc.copy_into(db_dsn, mix, connections=2, seconds=0.4, warmup=0.1, payload_type=payload_type,
                           batch_rows=BATCH)
    assert r["stored_ok"], r
    assert r["rows_per_s"] > 0 and r["bytes_per_s"] > 0
    agg, depth = (("agg_trades", "depth_updates") if payload_type == "jsonb"
                  else ("agg_trades_bytea", "depth_updates_bytea"))
    # Past the pool: the shifted batches were stored too.
    assert r["copied_rows"][agg] > cc.POOL_BATCHES * BATCH
    assert r["copied_rows"][depth] > cc.POOL_BATCHES * BATCH
    doc = "payload" if payload_type == "jsonb" else "convert_from(payload, 'UTF8')::jsonb"
    conn = await asyncpg.connect(db_dsn)
    try:
        a = await conn.fetchrow(
            f"""SELECT count(*) AS n, count(DISTINCT aggregate_trade_id) AS ids,
                       count(*) FILTER (WHERE ({doc}->>'a')::bigint <> aggregate_trade_id
                                           OR ({doc}->>'E')::bigint <> (extract(epoch FROM event_time) * 1000)::bigint
                                           OR ({doc}->>'s') <> symbol
                                           OR ({doc}->>'T')::bigint > ({doc}->>'E')::bigint
                                           OR ({doc}->>'f')::bigint > ({doc}->>'l')::bigint) AS bad
                FROM {agg}""")
        d = await conn.fetchrow(
            f"""SELECT count(*) AS n, count(DISTINCT final_update_id) AS ids,
                       count(*) FILTER (WHERE ({doc}->>'u')::bigint <> final_update_id
                                           OR ({doc}->>'U')::bigint <> first_update_id
                                           OR first_update_id > final_update_id
                                           OR ({doc}->>'E')::bigint <> (extract(epoch FROM event_time) * 1000)::bigint
                                           OR jsonb_array_length({doc}->'b') <> 20
                                           OR jsonb_array_length({doc}->'a') <> 20) AS bad
                FROM {depth}""")
    finally:
        await conn.close()
    assert (a["n"], a["ids"], a["bad"]) == (r["copied_rows"][agg], r["copied_rows"][agg], 0)
    assert (d["n"], d["ids"], d["bad"]) == (r["copied_rows"][depth], r["copied_rows"][depth], 0)
