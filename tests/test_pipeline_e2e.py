"""End to end: ``ingestor run`` (real processes) against the simulator over real sockets,
into a real PostgreSQL on both backends. What the database holds is compared with
exactly what the simulator delivered (its per-stream record)."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from typing import Any

import asyncpg
import orjson
import pytest

from ingestor.sim.server import SimConfig, Simulator

from .conftest import post_json
from .pipeline import Pipeline, sim_flags, table_counts, wait_until

# table -> (id column, how a recorded payload becomes (market, symbol, id, payload bytes) rows)
Expected = dict[str, dict[tuple[str, str], list[tuple[int, bytes]]]]


def expected_rows(sim: Simulator) -> Expected:
    out: Expected = defaultdict(lambda: defaultdict(list))
    for market, rt in sim.markets.items():
        assert rt.hub.record is not None
        for stream, payloads in rt.hub.record.items():
            for raw in payloads:
                msg = orjson.loads(raw)
                if stream.endswith("@aggTrade"):
                    out["agg_trades"][(market, msg["s"])].append((msg["a"], raw))
                elif "@depth" in stream:
                    out["depth_updates"][(market, msg["s"])].append((msg["u"], raw))
                elif stream.startswith("!markPrice@arr"):
                    for item in msg:
                        out["mark_prices"][(market, item["s"])].append((item["E"], orjson.dumps(item)))
                elif stream.startswith("!forceOrder@arr"):
                    out["force_orders"][(market, msg["o"]["s"])].append((msg["E"], raw))
                else:
                    raise AssertionError(f"unexpected stream {stream}")
    return out


ID_SQL = {
    "agg_trades": "aggregate_trade_id",
    "depth_updates": "final_update_id",
    "mark_prices": "(extract(epoch from event_time) * 1000)::bigint",
    "force_orders": "(extract(epoch from event_time) * 1000)::bigint",
}


async def stored_rows(conn: asyncpg.Connection, table: str) -> dict[tuple[str, str], list[tuple[int, Any]]]:
    out: dict[tuple[str, str], list[tuple[int, Any]]] = defaultdict(list)
    for r in await conn.fetch(f"SELECT market, symbol, {ID_SQL[table]} AS id, payload::text AS p FROM {table} "
                              f"ORDER BY market, symbol, id"):
        out[(r["market"], r["symbol"])].append((r["id"], orjson.loads(r["p"])))
    return out


def sent_total(sim: Simulator) -> int:
    exp = expected_rows(sim)
    return sum(len(v) for t in exp.values() for v in t.values())


async def stored_total(dsn: str) -> int:
    c = await table_counts(dsn)
    return sum(c[t] for t in ("agg_trades", "depth_updates", "mark_prices", "force_orders"))


async def assert_db_equals_sent(sim: Simulator, dsn: str) -> dict[str, int]:
    expected = expected_rows(sim)
    conn = await asyncpg.connect(dsn)
    counts = {}
    try:
        for table in ("agg_trades", "depth_updates", "mark_prices", "force_orders"):
            stored = await stored_rows(conn, table)
            exp = expected.get(table, {})
            assert set(stored) == set(exp), f"{table}: symbols differ: {sorted(stored)} vs {sorted(exp)}"
            for key, rows in exp.items():
                rows = sorted(rows, key=lambda r: r[0])
                got = stored[key]
                assert [r[0] for r in got] == [r[0] for r in rows], f"{table} {key}: ids differ"
                assert [r[1] for r in got] == [orjson.loads(r[1]) for r in rows], f"{table} {key}: payloads differ"
                # And as jsonb: the stored value equals the sent bytes parsed by PostgreSQL.
                same = await conn.fetchval(
                    f"SELECT count(*) FROM {table} t JOIN unnest($1::bigint[], $2::text[]) AS s(id, p) "
                    f"ON {ID_SQL[table].replace('event_time', 't.event_time')} = s.id "
                    "AND t.payload::jsonb = s.p::jsonb "
                    "WHERE t.market = $3 AND t.symbol = $4",
                    [r[0] for r in rows], [r[1].decode() for r in rows], key[0], key[1])
                assert same == len(rows), f"{table} {key}: {same} of {len(rows)} payloads equal as jsonb"
            counts[table] = sum(len(v) for v in exp.values())
    finally:
        await conn.close()
    return counts


E2E_SIM = SimConfig(n_symbols=3, record=True, seed=7)


@pytest.mark.parametrize("payload_type", ["jsonb", "json"])
@pytest.mark.parametrize("sim", [E2E_SIM], indirect=True)
async def test_pipeline_stores_exactly_what_the_simulator_sent(sim: Simulator, db_dsn: str, payload_type: str) -> None:
    pipe = await Pipeline(["--dsn", db_dsn, "--shards", "2", "--batch-age-ms", "100", "--snapshot-interval-s", "1",
                           "--open-interest-interval-s", "1", "--payload-type", payload_type, *sim_flags(sim)]).start()
    try:
        health = await pipe.wait_health(200)
        assert {"socket-0", "socket-1", "rest", "writer"} <= set(health["workers"])
        # Both shards carry streams and both markets are covered.
        assert all(health["workers"][f"socket-{i}"]["streams"] > 0 for i in range(2))
        await asyncio.sleep(4.0)
        await post_json(sim.urls["admin"] + "/pause")
        total = sent_total(sim)

        async def caught_up() -> bool:
            return await stored_total(db_dsn) >= total

        await wait_until(caught_up, 30, "the database to hold everything sent")
        assert await pipe.stop() == 0
    finally:
        await pipe.kill()
    counts = await assert_db_equals_sent(sim, db_dsn)
    assert counts["agg_trades"] > 500 and counts["depth_updates"] > 50 and counts["mark_prices"] > 5
    assert {m for t in expected_rows(sim).values() for (m, _) in t} == {"spot", "futures"}
    conn = await asyncpg.connect(db_dsn)
    try:
        # REST: snapshots of both markets' symbols, open interest of the futures ones.
        snaps = await conn.fetch("SELECT market, symbol, market_type, payload FROM depth_snapshots")
        assert {(r["market"], r["symbol"]) for r in snaps} == {
            (m, s) for m, rt in sim.markets.items() for s in rt.model.books}
        assert all(r["market"] == r["market_type"] for r in snaps)
        assert all(len(orjson.loads(r["payload"])["bids"]) > 100 for r in snaps)
        oi = await conn.fetch("SELECT market, symbol, open_interest::text AS v, payload FROM open_interest")
        assert {r["symbol"] for r in oi} == set(sim.markets["futures"].model.books)
        assert all(r["market"] == "futures" and r["v"] == orjson.loads(r["payload"])["openInterest"] for r in oi)
        assert await conn.fetchval("SELECT count(*) FROM stream_gaps") == 0
        types = {t: await conn.fetchval(f"SELECT DISTINCT pg_typeof(payload)::text FROM {t}")
                 for t in ("agg_trades", "depth_updates", "mark_prices", "depth_snapshots", "open_interest")}
        assert set(types.values()) == {payload_type}, types
        if payload_type == "json":  # kept verbatim: the exact bytes the exchange sent
            sent = {a: raw for (_m, _s), rows in expected_rows(sim)["agg_trades"].items() for a, raw in rows}
            kept = await conn.fetch("SELECT aggregate_trade_id AS a, payload::text AS p FROM agg_trades")
            assert kept and all(r["p"].encode() == sent[r["a"]] for r in kept)
    finally:
        await conn.close()


@pytest.mark.parametrize("sim", [E2E_SIM], indirect=True)
async def test_sigterm_commits_everything_received(sim: Simulator, db_dsn: str) -> None:
    # Batches that would wait 60 s: only the drain on SIGTERM can get them committed.
    pipe = await Pipeline(["--dsn", db_dsn, "--shards", "2", "--batch-age-ms", "60000", "--batch-rows", "1000000",
                           "--snapshot-interval-s", "0", "--open-interest-interval-s", "0", *sim_flags(sim)]).start()
    try:
        await pipe.wait_health(200)
        await asyncio.sleep(2.0)
        await post_json(sim.urls["admin"] + "/pause")
        await asyncio.sleep(0.5)  # the last frames cross loopback
        assert await stored_total(db_dsn) == 0, "batches were flushed before the signal"
        assert await pipe.stop() == 0
    finally:
        await pipe.kill()
    assert not [line for line in pipe.log if "did not stop" in line], "a worker had to be killed"
    counts = await assert_db_equals_sent(sim, db_dsn)
    assert counts["agg_trades"] > 100
