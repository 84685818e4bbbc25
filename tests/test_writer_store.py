"""The writer's storing rules against both real databases: a message stored twice is
impossible (the unique keys of sql/005, duplicates skipped and counted), refused rows are
isolated, gap rows close, backfilled trades skip what the WebSocket already stored.
(The disk spool: tests/test_writer_spool.py.)"""

from __future__ import annotations

import logging
from array import array

import asyncpg
import orjson
import pytest

from ingestor.wire import rows
from ingestor.wire.batching import Backfill, Batch
from ingestor.writer import copier

T0 = 1_795_132_800_000


def trade(a: int, e_ms: int, symbol: str = "BTCUSDT") -> bytes:
    msg = {"e": "aggTrade", "E": e_ms, "s": symbol, "a": a, "p": "100.0", "q": "1", "f": a, "l": a, "T": e_ms - 3,
           "m": False}
    return rows.agg_trade("futures", msg, orjson.dumps(msg))


async def fetch(dsn: str, sql: str, *args: object) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        return list(await conn.fetch(sql, *args))
    finally:
        await conn.close()


async def store(dsn: str, table: str, data: list[bytes], kind: str = "rows") -> copier.CopyResult:
    conn = await asyncpg.connect(dsn)
    try:
        return await copier.store(conn, table, b"".join(data), len(data), kind)
    finally:
        await conn.close()


async def test_a_message_stored_twice_is_skipped_and_counted(db_dsn: str) -> None:
    first = [trade(a, T0 + a) for a in range(1, 101)]
    assert await store(db_dsn, "agg_trades", first) == copier.CopyResult(inserted=100)
    # A batch sent again (a writer restart) and one that overlaps it (a rotated connection).
    assert await store(db_dsn, "agg_trades", first) == copier.CopyResult(inserted=0, duplicates=100)
    overlap = [trade(a, T0 + a) for a in range(51, 151)]
    assert await store(db_dsn, "agg_trades", overlap) == copier.CopyResult(inserted=50, duplicates=50)
    ids = [r[0] for r in await fetch(db_dsn, "SELECT aggregate_trade_id FROM agg_trades ORDER BY 1")]
    assert ids == list(range(1, 151))
    # The same on the other tables' keys.
    depth = {"e": "depthUpdate", "E": T0, "T": T0, "s": "BTCUSDT", "U": 5, "u": 9, "pu": 4, "b": [], "a": []}
    row = rows.depth_update("futures", depth, orjson.dumps(depth))
    assert await store(db_dsn, "depth_updates", [row]) == copier.CopyResult(inserted=1)
    assert await store(db_dsn, "depth_updates", [row, row]) == copier.CopyResult(inserted=0, duplicates=2)


async def test_refused_rows_are_isolated_next_to_duplicates(db_dsn: str) -> None:
    good = [trade(a, T0 + a) for a in range(1, 11)]
    await store(db_dsn, "agg_trades", good[:5])
    # JSON the server will not parse (the encoder leaves that check to it), among rows already
    # stored and new ones.
    bad = rows.agg_trade("futures", {"E": T0 + 99, "T": T0 + 99, "s": "BTCUSDT", "a": 99}, b'{"e": oops}')
    result = await store(db_dsn, "agg_trades", [*good, bad])
    assert result == copier.CopyResult(inserted=5, duplicates=5, rejected=1)
    assert len(await fetch(db_dsn, "SELECT 1 FROM agg_trades")) == 10


def gap_row(how: str, closed_ms: int | None = None, n: int | None = None) -> bytes:
    return rows.stream_gap("futures", "BTCUSDT", "aggTrade", 11, 20, T0 + 10, T0 + 21, T0 + 30, how, closed_ms, n)


async def test_a_gap_row_is_closed_by_its_closing_row_whatever_comes_first(db_dsn: str) -> None:
    await store(db_dsn, "stream_gaps", [gap_row("open")])
    await store(db_dsn, "stream_gaps", [gap_row("backfilled", T0 + 40, 10)], kind="close")
    got = await fetch(db_dsn, "SELECT closed_how, closed_rows FROM stream_gaps")
    assert [tuple(r) for r in got] == [("backfilled", 10)]
    # The open row sent again afterwards (a resend) leaves it closed, and adds nothing.
    assert (await store(db_dsn, "stream_gaps", [gap_row("open")])).duplicates == 1
    assert [tuple(r) for r in await fetch(db_dsn, "SELECT closed_how, closed_rows FROM stream_gaps")] == [
        ("backfilled", 10)]
    # A closing row whose open row never came stands alone.
    other = rows.stream_gap("spot", "ETHUSDT", "aggTrade", 1, 2, T0, T0 + 1, T0 + 2, "unrecoverable", T0 + 3, 0)
    await store(db_dsn, "stream_gaps", [other], kind="close")
    assert len(await fetch(db_dsn, "SELECT 1 FROM stream_gaps")) == 2


async def test_backfill_stores_only_trades_not_yet_stored_and_closes_the_gap(db_dsn: str) -> None:
    # Trades 1-10 and 16-20 came over the WebSocket (event time E); 11-15 were missed.
    await store(db_dsn, "agg_trades", [trade(a, T0 + a * 10) for a in (*range(1, 11), *range(16, 21))])
    await store(db_dsn, "stream_gaps", [rows.stream_gap("futures", "BTCUSDT", "aggTrade", 11, 15, T0 + 100,
                                                       T0 + 160, T0 + 170)])
    # REST gives 11-20 (from the gap's first id on): as stored, their event time is T.
    items = [{"a": a, "p": "100.0", "q": "1", "f": a, "l": a, "T": T0 + a * 10 - 3, "m": False, "s": "BTCUSDT"}
             for a in range(11, 21)]
    data = b"".join(rows.agg_trade("futures", {"E": it["T"], "T": it["T"], "s": "BTCUSDT", "a": it["a"]},
                                   orjson.dumps(it)) for it in items)
    info = Backfill("futures", "BTCUSDT", 11, 15, T0 + 100, T0 + 160, T0 + 170, items[0]["T"], items[-1]["T"], True)
    conn = await asyncpg.connect(db_dsn)
    try:
        result = await copier.store_backfill(conn, data, array("q", range(11, 21)).tobytes(), info)
    finally:
        await conn.close()
    assert (result.inserted, result.duplicates) == (5, 5)
    ids = [r[0] for r in await fetch(db_dsn, "SELECT aggregate_trade_id FROM agg_trades ORDER BY 1")]
    assert ids == list(range(1, 21))  # each id once
    gap = (await fetch(db_dsn, "SELECT closed_how, closed_rows, closed_at FROM stream_gaps"))[0]
    assert (gap["closed_how"], gap["closed_rows"]) == ("backfilled", 5) and gap["closed_at"] is not None


# ---- outcomes: rows the server refuses, errors nobody understands, a lost connection ----


async def execute(dsn: str, sql: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def trades_batch(ids: range, symbol: str = "BTCUSDT") -> Batch:
    data = [trade(a, T0 + a, symbol) for a in ids]
    return Batch("agg_trades", len(data), b"".join(data), array("q", [T0 + a for a in ids]).tobytes())


async def store_group(dsn: str, group: list[Batch]) -> copier.Outcome:
    conn = await asyncpg.connect(dsn)
    try:
        return await copier.store_group(conn, group)
    finally:
        await conn.close()


async def test_a_row_over_the_index_limit_is_isolated_kept_with_its_bytes_and_the_rest_stored(
        db_dsn: str) -> None:
    """Issue 16 item 4: "index row size exceeds btree maximum" (SQLSTATE 54000, program limit
    exceeded) is the row's fault: before, the writer retried the group forever."""
    import secrets

    huge = "X" + secrets.token_hex(1800).upper()  # incompressible: the key cannot fit a btree page
    bad = trade(7, T0 + 7, huge)
    group = [trades_batch(range(1, 7)), Batch("agg_trades", 1, bad, array("q", [T0 + 7]).tobytes()),
             trades_batch(range(8, 11))]
    outcome = await store_group(db_dsn, group)
    assert isinstance(outcome, copier.Stored)
    assert (outcome.result.inserted, outcome.result.rejected) == (9, 1)
    ids = [r[0] for r in await fetch(db_dsn, "SELECT aggregate_trade_id FROM agg_trades ORDER BY 1")]
    assert ids == [1, 2, 3, 4, 5, 6, 8, 9, 10]
    (kept,) = await fetch(db_dsn, "SELECT table_name, sqlstate, error, raw, payload FROM rejected_rows")
    assert (kept["table_name"], kept["sqlstate"]) == ("agg_trades", "54000")
    assert "index row size" in kept["error"] and "btree" in kept["error"] and kept["raw"] == bad
    assert orjson.loads(kept["payload"])["s"] == huge


async def test_rows_a_trigger_refuses_are_isolated_and_one_line_is_logged_for_many(
        db_dsn: str, caplog: pytest.LogCaptureFixture) -> None:
    """Issue 16 items 4 and 13: an exception a trigger raises for a row (P0001) isolates the
    row; 200 refused rows write one ERROR line, not 200."""
    await execute(db_dsn, """
        CREATE FUNCTION refuse_odd() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF NEW.aggregate_trade_id % 2 = 1 THEN RAISE EXCEPTION 'odd trade %', NEW.aggregate_trade_id; END IF;
            RETURN NEW;
        END $$;
        CREATE TRIGGER refuse_odd BEFORE INSERT ON agg_trades FOR EACH ROW EXECUTE FUNCTION refuse_odd();
    """)
    copier.REFUSED_LOG.last.clear()
    copier.REFUSED_LOG.unlogged.clear()
    with caplog.at_level(logging.ERROR, logger="ingestor.writer.copier"):
        outcome = await store_group(db_dsn, [trades_batch(range(1, 401))])
        again = await store_group(db_dsn, [trades_batch(range(401, 421))])
    assert isinstance(outcome, copier.Stored) and isinstance(again, copier.Stored)
    assert (outcome.result.inserted, outcome.result.rejected) == (200, 200)
    kept = await fetch(db_dsn, "SELECT sqlstate, payload FROM rejected_rows ORDER BY 1")
    assert len(kept) == 210 and {r["sqlstate"] for r in kept} == {"P0001"}
    assert sorted(orjson.loads(r["payload"])["a"] for r in kept) == list(range(1, 421, 2))
    lines = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(lines) == 1, [r.getMessage() for r in lines]
    assert "200 row(s) refused" in lines[0].getMessage() and "odd trade" in lines[0].getMessage()


async def test_an_error_that_is_not_the_rows_fault_is_a_failure_not_a_retry(db_dsn: str) -> None:
    """Issue 16 item 1: an internal error (XX000) is neither isolated nor retried: the
    writer is told to stop (copier.StoreFailed) and nothing is stored or kept as refused."""
    await execute(db_dsn, """
        CREATE FUNCTION broken() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN RAISE EXCEPTION 'injected' USING ERRCODE = 'XX000'; END $$;
        CREATE TRIGGER broken BEFORE INSERT ON agg_trades FOR EACH ROW EXECUTE FUNCTION broken();
    """)
    with pytest.raises(copier.StoreFailed, match="SQLSTATE XX000"):
        await store_group(db_dsn, [trades_batch(range(1, 51))])
    assert await fetch(db_dsn, "SELECT 1 FROM agg_trades") == []
    assert await fetch(db_dsn, "SELECT 1 FROM rejected_rows") == []


async def test_a_connection_cut_by_the_server_is_an_outcome_lost(db_dsn: str) -> None:
    conn = await asyncpg.connect(db_dsn)
    try:
        pid = conn.get_server_pid()
        await execute(db_dsn, f"SELECT pg_terminate_backend({pid})")
        outcome = await copier.store_group(conn, [trades_batch(range(1, 11))])
    finally:
        conn.terminate()
    assert isinstance(outcome, copier.Lost)
