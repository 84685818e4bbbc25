"""The writer's storing rules against both real databases: a message stored twice is
impossible (the unique keys of sql/005, duplicates skipped and counted), refused rows are
isolated, gap rows close, backfilled trades skip what the WebSocket already stored.
And the disk spool: order, bounds, crash leftovers."""

from __future__ import annotations

import pickle
from array import array
from pathlib import Path

import asyncpg
import orjson

from ingestor.binance import rows
from ingestor.workers.batching import Backfill, Batch
from ingestor.writer import copier
from ingestor.writer.spool import Spool

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


# ---- the spool ---------------------------------------------------------------------------


def batch(i: int, size: int = 10) -> Batch:
    return Batch("agg_trades", 1, bytes([i % 256]) * size, b"", producer="p", incarnation=1, seq=i)


def test_spool_is_first_in_first_out_across_segments_and_restarts(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=10_000, segment_bytes=300)
    for i in range(1, 21):
        assert spool.append(batch(i))
    assert spool and spool.bytes > 0
    spool.close()
    again = Spool(tmp_path, max_bytes=10_000, segment_bytes=300)  # a new process finds it
    seen = []
    while (oldest := again.oldest()) is not None:
        path, batches = oldest
        seen += [b.seq for b in batches]
        again.remove(path)
    assert seen == list(range(1, 21))
    assert not again and again.bytes == 0 and not list(tmp_path.glob("*.spool"))


def test_spool_refuses_past_its_bound(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=2_000)
    n = 0
    while spool.append(batch(n, size=300)):
        n += 1
    assert 3 <= n <= 6 and spool.full and spool.refused == 1
    assert spool.bytes <= 2_000


def test_spool_survives_a_record_cut_short_and_sets_aside_what_it_cannot_read(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=10_000)
    for i in range(1, 4):
        spool.append(batch(i))
    spool.close()
    seg = next(tmp_path.glob("*.spool"))
    seg.write_bytes(seg.read_bytes()[:-5])  # the process died mid-write
    bad = tmp_path / "000000000099.spool"
    bad.write_bytes(len(b"junk").to_bytes(4, "little") + b"junk")
    again = Spool(tmp_path, max_bytes=10_000)
    path, batches = again.oldest()  # type: ignore[misc]
    assert [b.seq for b in batches] == [1, 2]
    again.remove(path)
    assert again.oldest() is None  # the unreadable one set aside
    assert (tmp_path / "000000000099.bad").exists()
    assert pickle.loads(pickle.dumps(batch(1))).seq == 1
