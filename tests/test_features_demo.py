"""Live against replay, as a user sees it: ``ingestor demo`` records the simulator and computes
features live; ``ingestor features replay`` recomputes them from the stored data, to Parquet and
CSV (twice: the same file content every time) and into the table (replacing, never adding);
``ingestor report`` draws the demo's data. Real processes, both real databases."""

from __future__ import annotations

import csv
import math
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pyarrow.parquet as pq

from ingestor.feature_spec import FEATURE_COLUMNS

from .test_features_show_report import PNG_SIGNATURE, ingestor

PARAMS = ("--feature-params", "bar_seconds=1,window=10")
KEY = ("market", "symbol", "bar_time")


async def stored(dsn: str) -> list[dict[str, Any]]:
    conn = await asyncpg.connect(dsn)
    try:
        recs = await conn.fetch("SELECT * FROM features ORDER BY market, symbol, bar_time")
    finally:
        await conn.close()
    return [dict(r) for r in recs]


def same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    return bool(a == b)


def assert_rows_equal(got: list[dict[str, Any]], want: list[dict[str, Any]], what: str) -> None:
    assert len(got) == len(want), f"{what}: {len(got)} rows, {len(want)} stored"
    for g, w in zip(got, want, strict=True):
        assert tuple(g[k] for k in KEY) == tuple(w[k] for k in KEY), what
        bad = [c for c in FEATURE_COLUMNS if not same(g[c], w[c])]
        assert not bad, f"{what} {w['market']} {w['symbol']} {w['bar_time']}: {bad}"


def ms(t: datetime) -> int:
    return int(t.timestamp() * 1000)


async def test_demo_rows_equal_their_replay_in_every_output(db_dsn: str, tmp_path: Path) -> None:
    rc, out, err = await ingestor("demo", "--json", "--duration", "22", "--dsn", db_dsn, *PARAMS, timeout=150)
    assert rc == 0, err[-3000:]
    f = orjson.loads(out)["features"]
    assert f["replay_identical"], f
    assert f["symbols"] == 6 and f["rows"] >= 6 * 12 and f["bar_seconds"] == 1
    assert f["book_syncs"] >= 6 and f["drift_checks"] > 0 and f["drift_mismatches"] == 0
    live = await stored(db_dsn)
    assert len(live) == f["rows"]
    for market in ("spot", "futures"):
        mine = [r for r in live if r["market"] == market]
        first, last = ms(mine[0]["bar_time"]), max(ms(r["bar_time"]) for r in mine) + 1000
        span = ("--from", str(first), "--to", str(last), "--markets", market)
        files = []
        for name in ("a.parquet", "b.parquet", "c.csv"):
            path = tmp_path / f"{market}-{name}"
            rc, out, err = await ingestor("features", "replay", "--dsn", db_dsn, *PARAMS, *span, "--out", str(path))
            assert rc == 0, err
            assert f"{len(mine):,} rows written to {path}" in out
            assert "0 mismatched" in out and "100%" in err  # the drift checks, and the progress lines
            files.append(path)
        a, b = pq.read_table(files[0]), pq.read_table(files[1])
        assert a.equals(b)  # the same input, the same rows, every time
        replayed = [{**r, "bar_time": r["bar_time"]} for r in a.to_pylist()]
        for r in replayed:
            for c in FEATURE_COLUMNS:
                if r[c] is None:
                    r[c] = math.nan  # stored NULLs read back as None too: compare like with like
        for r in mine:
            for c in FEATURE_COLUMNS:
                if r[c] is None:
                    r[c] = math.nan
        assert_rows_equal(sorted(replayed, key=lambda r: (r["symbol"], r["bar_time"])),
                          sorted(mine, key=lambda r: (r["symbol"], r["bar_time"])), f"{market} parquet")
        with files[2].open() as fh:
            lines = list(csv.DictReader(fh))
        assert len(lines) == len(mine)
        row = next(x for x in lines if x["symbol"] == mine[-1]["symbol"] and
                   datetime.fromisoformat(x["bar_time"]) == mine[-1]["bar_time"])
        assert float(row["close"]) == mine[-1]["close"] and int(row["trades"]) == mine[-1]["trades"]

    # Into the table: the range's rows are replaced by equal ones, none added.
    first, last = ms(live[0]["bar_time"]), max(ms(r["bar_time"]) for r in live) + 1000
    rc, out, err = await ingestor("features", "replay", "--dsn", db_dsn, *PARAMS, "--markets", "futures",
                                  "--from", str(min(ms(r["bar_time"]) for r in live if r["market"] == "futures")),
                                  "--to", str(last))
    assert rc == 0, err
    n_futures = sum(r["market"] == "futures" for r in live)
    assert f"{n_futures:,} rows written to the features table (replacing {n_futures:,})" in out
    again = await stored(db_dsn)
    for rows in (again, live):
        for r in rows:
            for c in FEATURE_COLUMNS:
                if r[c] is None:
                    r[c] = math.nan
    assert_rows_equal(again, live, "table")

    # The picture of the demo's data.
    png = tmp_path / "demo.png"
    rc, out, err = await ingestor("report", "--dsn", db_dsn, "--symbol", "BTCUSDT", "--market", "futures",
                                  "--from", str(first), "--to", str(last), "--out", str(png))
    assert rc == 0, err
    assert png.read_bytes()[:8] == PNG_SIGNATURE and png.stat().st_size > 50_000
