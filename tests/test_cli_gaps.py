"""``ingestor gaps`` as a user runs it: a real process against both real databases, on
``stream_gaps`` rows of every kind a recording leaves (a backfilled trade gap, a resynced
book, an unrecoverable diff gap, a time gap of an id-less stream, one still open)."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import asyncpg
import orjson

from .test_features_show_report import ingestor


def _gaps(now: datetime) -> list[tuple[object, ...]]:
    """The rows, dated back from ``now`` (taken when the test runs, not when it is collected:
    the filters below are relative to the clock)."""
    return [
        # market, symbol, stream, from_id, to_id, from_time, to_time, detected_at, closed_how, closed_rows
        ("spot", "BTCUSDT", "aggTrade", 101, 150, None, None, now - timedelta(hours=3), "backfilled", 50),
        ("futures", "BTCUSDT", "book", 7001, 7004, None, None, now - timedelta(hours=2), "resynced", None),
        ("futures", "ETHUSDT", "depth", 900, 909, None, None, now - timedelta(minutes=30), "unrecoverable", None),
        ("futures", "*", "markPrice", None, None, now - timedelta(minutes=10, seconds=4),
         now - timedelta(minutes=10), now - timedelta(minutes=10), "unrecoverable", None),
        ("futures", "ETHUSDT", "aggTrade", 5000, 5001, None, None, now - timedelta(minutes=1), "open", None),
        ("spot", "ETHUSDT", "aggTrade", 1, 9, None, None, now - timedelta(days=3), "backfilled", 9),  # too old
    ]


async def _insert(dsn: str) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    conn = await asyncpg.connect(dsn)
    try:
        await conn.executemany(
            """INSERT INTO stream_gaps (market, symbol, stream, from_id, to_id, from_time, to_time, detected_at,
                                        closed_how, closed_rows, closed_at)
               VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10,
                       CASE WHEN $9::text = 'open' THEN NULL ELSE $8::timestamptz + interval '2 seconds' END)""",
            _gaps(now))
    finally:
        await conn.close()


async def _json(dsn: str, *args: str) -> list[dict[str, object]]:
    rc, out, err = await ingestor("gaps", "--dsn", dsn, "--json", *args)
    assert rc == 0, err
    return list(orjson.loads(out))


async def test_gaps_lists_each_hole_and_how_it_was_closed(db_dsn: str) -> None:
    await _insert(db_dsn)
    rc, out, err = await ingestor("gaps", "--dsn", db_dsn)
    assert rc == 0, err
    head, _, *lines = out.splitlines()
    # The default is the last 24 h: five gaps, the three-day-old one left out; oldest first.
    assert head.startswith("5 gap(s) since ") and head.endswith(
        "1 backfilled, 1 open, 1 resynced, 2 unrecoverable"), head
    body = lines[1:]
    assert [ln.split()[2:5] for ln in body] == [["spot", "BTCUSDT", "aggTrade"], ["futures", "BTCUSDT", "book"],
                                                 ["futures", "ETHUSDT", "depth"], ["futures", "*", "markPrice"],
                                                 ["futures", "ETHUSDT", "aggTrade"]]
    assert "ids 101..150 (50)" in body[0] and "backfilled" in body[0] and body[0].split()[-3] == "50"
    assert "4.0 s without events" in body[3]
    assert body[4].rstrip().endswith("open")  # not closed: no rows, no closing time


async def test_gaps_filters_by_time_market_symbol_and_open(db_dsn: str) -> None:
    await _insert(db_dsn)
    every = await _json(db_dsn, "--since", "-7d")
    assert len(every) == 6 and every[0]["closed_how"] == "open"  # newest first in JSON
    assert {r["stream"] for r in await _json(db_dsn, "--since", "-45m")} == {"depth", "markPrice", "aggTrade"}
    since_s = str(int(time.time()) - 2 * 3600 - 60)  # Unix seconds work too
    assert len(await _json(db_dsn, "--since", since_s)) == 4
    spot = await _json(db_dsn, "--markets", "spot", "--since", "-7d")
    assert {r["market"] for r in spot} == {"spot"} and len(spot) == 2
    # A symbol filter keeps the gaps of all-market streams (symbol '*'): they concern it too.
    eth = await _json(db_dsn, "--symbols", "ETHUSDT", "--markets", "futures")
    assert sorted(str(r["stream"]) for r in eth) == ["aggTrade", "depth", "markPrice"]
    (still_open,) = await _json(db_dsn, "--open")
    assert (still_open["symbol"], still_open["from_id"], still_open["to_id"]) == ("ETHUSDT", 5000, 5001)
    assert still_open["closed_at"] is None
    assert len(await _json(db_dsn, "--since", "-7d", "--limit", "2")) == 2


async def test_gaps_on_an_empty_record_and_bad_input(db_dsn: str) -> None:
    rc, out, err = await ingestor("gaps", "--dsn", db_dsn)
    assert rc == 0 and out.startswith("no gaps since "), (out, err)
    rc, out, err = await ingestor("gaps", "--dsn", db_dsn, "--since", "yesterday-ish")
    assert rc == 2 and "--since" in err and "Traceback" not in err, err
    rc, _, err = await ingestor("gaps", "--dsn", "postgresql://u:hunter2@127.0.0.1:1/none", timeout=30)
    assert rc == 1 and "hunter2" not in err and "Traceback" not in err, err
