"""``ingestor features show`` and ``ingestor report`` as a user runs them: real processes against
both real databases, on features rows computed by BarBuilder + FeatureState from a scripted market
(a sell-off into a bid wall and a squeeze into an ask wall), so that signals, walls, liquidations,
empty bars and an unsynced book really are in the table."""

from __future__ import annotations

import asyncio
import math
import os
import random
import re
import sys
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import Any

import asyncpg
import numpy as np
import orjson
from matplotlib import image as mpimg

from ingestor.feature_spec import FEATURE_COLUMNS, FeatureSettings
from ingestor.features import query
from ingestor.features.bars import BarBuilder, Liquidation
from ingestor.features.indicators import FeatureState
from ingestor.wire import rows
from ingestor.wire.copy_binary import copy_file

INGESTOR = str(Path(sys.executable).parent / "ingestor")
T0 = 1_795_132_800_000  # 2026-11-20T00:00:00Z
TICK = 0.1
N_BARS = 110
LONG_BAR, SHORT_BAR = 44, 84  # where the script sets up each signal
UNSYNCED = range(50, 55)  # bars closing while the book is not synced
EMPTY = range(90, 93)  # bars without trades
SETTINGS = {"window": 30, "div_bars": 10}


# -- the scripted market ---------------------------------------------------------------------------

@dataclass
class BarPlan:
    """One minute of the script: trades as (ms offset, price in ticks, qty, is a market sell)."""

    trades: list[tuple[int, int, float, bool]] = field(default_factory=list)
    liqs: list[tuple[int, str, int, float]] = field(default_factory=list)  # (offset, side, ticks, qty)
    bid_scale: float = 1.0
    ask_scale: float = 1.0
    walls: dict[int, float] = field(default_factory=dict)  # price in ticks -> qty (either side)
    synced: bool = True


def _spread(n: int, rnd: random.Random) -> list[int]:
    """n increasing offsets inside the first 58 s of a bar."""
    return sorted(rnd.sample(range(0, 58_000, 7), n))


def _walk(p: int, n: int, rnd: random.Random, drift: float = 0.0, sell_share: float = 0.5,
          qty: tuple[float, float] = (0.2, 1.5)) -> tuple[list[tuple[int, int, float, bool]], int]:
    out = []
    for off in _spread(n, rnd):
        p += rnd.choice((-1, 0, 1))
        if rnd.random() < abs(drift):
            p += 1 if drift > 0 else -1
        out.append((off, p, round(rnd.uniform(*qty), 3), rnd.random() < sell_share))
    return out, p


def _trend(p: int, ticks: int, n: int, rnd: random.Random, sell_share: float) -> tuple[list[Any], int]:
    """A bar moving ``ticks`` in n trades, mostly in one direction, heavy volume."""
    out = []
    step = 1 if ticks > 0 else -1
    noise = n - abs(ticks)
    moves = [step] * abs(ticks) + [1, -1] * (noise // 3) + [0] * (noise - 2 * (noise // 3))
    rnd.shuffle(moves)
    for off, mv in zip(_spread(n, rnd), moves, strict=True):
        p += mv
        out.append((off, p, round(rnd.uniform(1.0, 4.0), 3), rnd.random() < sell_share))
    return out, p


def _absorb(p: int, n: int, rnd: random.Random, sell: bool) -> list[Any]:
    """Heavy one-sided flow that does not move price: open = close = p."""
    away = -1 if sell else 1
    out = [(off, p + (away if i % 3 == 1 else 0), round(rnd.uniform(2.0, 4.0), 3), sell)
           for i, off in enumerate(_spread(n, rnd))]
    out[0] = (out[0][0], p, 0.5, not sell)
    out[-1] = (out[-1][0], p, 0.5, not sell)
    return out


def _reversal(p: int, sell: bool) -> tuple[list[Any], int]:
    """All aggression against the move: a wick two ticks past the absorption bar's extreme, then
    back over; every bucket is a one-sided imbalance."""
    d = 1 if sell else -1  # the wick's direction
    path = [p, p + 2 * d, p + d, p, p - d, p - d]
    out = [(1_000 + 9_000 * i, q, round(1.0 + 0.3 * i, 3), sell) for i, q in enumerate(path)]
    return out, path[-1]


@cache
def script() -> list[BarPlan]:
    rnd = random.Random(7)
    plans = [BarPlan() for _ in range(N_BARS)]
    p = 1000  # 100.0
    walls: dict[int, float] = {}
    for i, plan in enumerate(plans):
        if i == 10:
            walls[p + 15] = 40.0  # an ask wall 1.5 % above, standing through the calm
        if i == 36:
            walls.clear()
        if i == 40:
            walls[p - 32] = 60.0  # the bid wall the sell-off will end at (3.0 down, then a wick)
        if i == 45:
            walls.clear()  # pulled once hit
        if i == 78:
            walls[p + 32] = 60.0
        if i == SHORT_BAR + 1:
            walls.clear()
        plan.walls = dict(walls)
        plan.bid_scale, plan.ask_scale = rnd.uniform(0.6, 1.6), rnd.uniform(0.6, 1.6)
        plan.synced = i not in UNSYNCED
        if i in (40, 41, 42):  # sell-off: 1 % per bar on five times the volume, longs liquidated
            plan.trades, p = _trend(p, -10, 40, rnd, sell_share=0.85)
            plan.liqs = [(off, "SELL", p + rnd.randint(0, 8), round(rnd.uniform(2, 10), 2))
                         for off in _spread(rnd.randint(3, 6), rnd)]
        elif i in (80, 81, 82):  # squeeze, shorts liquidated
            plan.trades, p = _trend(p, 10, 40, rnd, sell_share=0.15)
            plan.liqs = [(off, "BUY", p - rnd.randint(0, 8), round(rnd.uniform(2, 10), 2))
                         for off in _spread(rnd.randint(3, 6), rnd)]
        elif i in (43, 83):
            plan.trades = _absorb(p, 50, rnd, sell=i == 43)
        elif i == LONG_BAR:
            plan.trades, p = _reversal(p, sell=False)
            plan.bid_scale, plan.ask_scale = 3.0, 1.0
        elif i == SHORT_BAR:
            plan.trades, p = _reversal(p, sell=True)
            plan.bid_scale, plan.ask_scale = 1.0, 3.0
        elif i in EMPTY:
            plan.trades = []
        else:
            drift = 0.3 if 45 <= i < 50 else (-0.3 if 85 <= i < 90 else 0.0)
            plan.trades, p = _walk(p, 20, rnd, drift=drift, sell_share=0.5 - drift)
            if rnd.random() < 0.1:  # now and then a stray liquidation
                plan.liqs = [(30_000, rnd.choice(("BUY", "SELL")), p, round(rnd.uniform(0.5, 3), 2))]
    return plans


def _book(close: float, plan: BarPlan, rnd: random.Random) -> tuple[Any, Any]:
    if not plan.synced:
        return None, None
    c = round(close / TICK)
    levels = np.arange(1, 26)
    bid_t, ask_t = c - levels, c + levels
    bid_q = np.array([rnd.uniform(1, 3) * plan.bid_scale for _ in levels])
    ask_q = np.array([rnd.uniform(1, 3) * plan.ask_scale for _ in levels])
    for t, q in plan.walls.items():
        bid_q[bid_t == t] = q
        ask_q[ask_t == t] = q
    return (bid_t / 10, bid_q), (ask_t / 10, ask_q)


@cache
def feature_rows(bar_seconds: int) -> list[tuple[int, dict[str, Any]]]:
    """``(bar start ms, row)`` for the whole script at one bar size."""
    s = FeatureSettings(bar_seconds=bar_seconds, **SETTINGS)
    bb = BarBuilder.from_settings(s, TICK)
    fs = FeatureState(TICK, s)
    rnd = random.Random(11)
    plans = script()
    out = []

    def closed(bars: list[Any]) -> None:
        for bar in bars:
            # The book as it stood at the close: that of the bar's last minute.
            plan = plans[min((bar.end_ms - 1 - T0) // 60_000, N_BARS - 1)]
            out.append((bar.start_ms, fs.update(bar, *_book(bar.close, plan, rnd))))

    for i, plan in enumerate(plans):
        start = T0 + i * 60_000
        trades = iter(plan.trades)
        for off, side, ticks, qty in [*plan.liqs, (None, "", 0, 0.0)]:
            # Trades up to the liquidation's time, so that it lands in an open bar.
            for t_off, ticks_t, q, sell in trades:
                closed(bb.add_trade(start + t_off, ticks_t / 10, q, sell))
                if off is not None and t_off >= off:
                    break
            if off is not None:
                closed(bb.add_liquidation(Liquidation(start + off, side, ticks / 10, qty)))
    closed(bb.on_clock(T0 + N_BARS * 60_000 + 10_000))
    return out


async def insert(dsn: str, bar_seconds: int, symbol: str = "BTCUSDT") -> list[tuple[int, dict[str, Any]]]:
    made = feature_rows(bar_seconds)
    data = b"".join(rows.features("futures", symbol, start, bar_seconds, row) for start, row in made)
    conn = await asyncpg.connect(dsn)
    try:
        await conn.copy_to_table("features", source=memoryview(copy_file(data)), columns=rows.TABLES["features"],
                                 format="binary")
        await conn.execute("ANALYZE features")
    finally:
        await conn.close()
    return made


def test_script_has_what_the_commands_must_show() -> None:
    made = dict(feature_rows(60))
    assert len(made) == N_BARS
    at = [row for _, row in sorted(made.items())]
    assert at[LONG_BAR]["signal"] == 1 and at[SHORT_BAR]["signal"] == -1
    assert min(r["panic_index"] for r in at[40:43]) <= -2 and max(r["panic_index"] for r in at[80:83]) >= 2
    assert at[LONG_BAR]["dist_to_buy_wall"] < 0.5 and at[SHORT_BAR]["dist_to_sell_wall"] < 0.5
    assert sum(r["liq_long_notional"] for r in at[40:43]) > 1000
    assert sum(r["liq_short_notional"] for r in at[80:83]) > 1000
    assert all(math.isnan(at[i]["obi"]) for i in UNSYNCED) and all(at[i]["volume"] == 0 for i in EMPTY)


# -- running the commands --------------------------------------------------------------------------

async def ingestor(*args: str, timeout: float = 60, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("INGESTOR_")}, **(env or {})}
    proc = await asyncio.create_subprocess_exec(INGESTOR, *args, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE, env=env)
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S")


_NUM = r"[+-]?[\d,]+(?:\.\d+)?"
_WALL = rf"-|{_NUM} \([\d.]+%\)"
_TAIL = re.compile(rf"({_WALL}) +({_WALL}) +({_NUM}|-) +({_NUM}|-)(?: +(LONG|SHORT) +({_NUM}) +({_NUM}))?")


def parse_line(line: str) -> dict[str, Any]:
    """A table line back into values (text as printed)."""
    tok = line.split()
    cells = dict(zip(("time", "close", "volume", "delta", "cvd", "panic", "absorb", "obi"),
                     [f"{tok[0]} {tok[1]}", *tok[2:9]], strict=True))
    m = _TAIL.fullmatch(" ".join(tok[9:]))
    assert m, line
    cells.update(zip(("buy_wall", "sell_wall", "liq", "fp", "signal", "stop", "tp"), m.groups(), strict=True))
    return cells


def near(text: str, want: Any) -> bool:
    """The printed number is ``want`` rounded to the decimals shown; ``-`` is NULL."""
    if text == "-":
        return want is None or math.isnan(want)
    decimals = len(text.partition(".")[2])
    return abs(float(text.replace(",", "")) - want) <= 0.5 * 10**-decimals + 1e-9


def table_lines(out: str) -> tuple[str, list[str]]:
    head, blank, *lines = out.rstrip("\n").split("\n")
    assert blank == "" and lines[0].startswith("time (UTC)"), out
    return head, lines[1:]


# -- show ------------------------------------------------------------------------------------------

async def test_show_prints_the_last_bars_in_order(db_dsn: str) -> None:
    made = await insert(db_dsn, 60)
    rc, out, err = await ingestor("features", "show", "--dsn", db_dsn, "--symbol", "btcusdt", "--last", "70")
    assert rc == 0, err
    head, lines = table_lines(out)
    assert head.startswith("futures BTCUSDT, 60 s bars: the last 70")
    want = made[-70:]
    assert [parse_line(ln)["time"] for ln in lines] == [iso(start) for start, _ in want]
    signals = {}
    for line, (_, row) in zip(lines, want, strict=True):
        c = parse_line(line)
        for cell, col in (("close", "close"), ("volume", "volume"), ("delta", "delta"), ("cvd", "cvd"),
                          ("panic", "panic_index"), ("absorb", "absorption"), ("obi", "obi"),
                          ("liq", "liq_notional"), ("fp", "fp_imbalance")):
            assert near(c[cell], row[col]), (line, cell, row[col])
        for cell, side in (("buy_wall", "buy"), ("sell_wall", "sell")):
            if math.isnan(row[f"{side}_wall_price"]):
                assert c[cell] == "-", line
            else:
                price, dist = re.fullmatch(r"(\S+) \((\S+)%\)", c[cell]).groups()  # type: ignore[union-attr]
                assert near(price, row[f"{side}_wall_price"]) and near(dist, row[f"dist_to_{side}_wall"]), line
        if row["signal"]:
            signals[c["time"]] = c["signal"]
            assert near(c["stop"], row["stop_price"]) and near(c["tp"], row["take_profit"]), line
        else:
            assert c["signal"] is None, line
    assert signals[iso(T0 + LONG_BAR * 60_000)] == "LONG" and signals[iso(T0 + SHORT_BAR * 60_000)] == "SHORT"
    # An unsynced book is NULL, shown as "-", not as a zero imbalance.
    unsynced = next(ln for ln in lines if parse_line(ln)["time"] == iso(T0 + UNSYNCED[0] * 60_000))
    assert parse_line(unsynced)["obi"] == "-"

    rc, out, _ = await ingestor("features", "show", "--dsn", db_dsn, "--symbol", "BTCUSDT")
    assert rc == 0 and len(table_lines(out)[1]) == 30  # the default --last


async def test_show_json_is_the_stored_rows(db_dsn: str) -> None:
    made = await insert(db_dsn, 60)
    rc, out, err = await ingestor("features", "show", "--dsn", db_dsn, "--symbol", "BTCUSDT", "--last", "12",
                                  "--json")
    assert rc == 0, err
    got = orjson.loads(out)
    assert len(got) == 12
    for rec, (start, row) in zip(got, made[-12:], strict=True):
        assert set(rec) == set(query.COLUMNS)
        assert (rec["market"], rec["symbol"], rec["bar_seconds"]) == ("futures", "BTCUSDT", 60)
        assert rec["bar_time"] == datetime.fromtimestamp(start / 1000, UTC).isoformat().replace("+00:00", "Z")
        for col in FEATURE_COLUMNS:
            want = row[col]
            if isinstance(want, float) and math.isnan(want):
                assert rec[col] is None, col
            else:
                assert rec[col] == want, (col, rec[col], want)


async def test_show_without_rows_says_what_fills_the_table(db_dsn: str) -> None:
    await insert(db_dsn, 60)
    for args, what in ((["--symbol", "NOPEUSDT"], "futures NOPEUSDT"),
                       (["--symbol", "BTCUSDT", "--market", "spot"], "spot BTCUSDT")):
        rc, out, err = await ingestor("features", "show", "--dsn", db_dsn, *args)
        assert rc == 1 and out == ""
        lines = err.strip().splitlines()
        assert len(lines) == 1 and what in lines[0] and "ingestor features replay" in lines[0], err
    rc, _, err = await ingestor("features", "show", "--dsn", db_dsn, "--symbol", "BTCUSDT", "--bar", "5")
    assert rc == 1 and "no 5 s bars for futures BTCUSDT; stored: 60 s bars from 2026-11-20 00:00:00" in err


async def test_show_defaults_to_the_bar_size_with_the_newest_row(db_dsn: str) -> None:
    await insert(db_dsn, 60)
    made300 = await insert(db_dsn, 300)
    rc, out, err = await ingestor("features", "show", "--dsn", db_dsn, "--symbol", "BTCUSDT", "--last", "3")
    assert rc == 0, err
    assert table_lines(out)[0].startswith("futures BTCUSDT, 60 s bars")
    rc, out, _ = await ingestor("features", "show", "--dsn", db_dsn, "--symbol", "BTCUSDT", "--last", "3",
                                "--bar", "300")
    assert [parse_line(ln)["time"] for ln in table_lines(out)[1]] == [iso(s) for s, _ in made300[-3:]]
    # Once the newest 60 s bars are gone, the 300 s bars are the most recent ones.
    conn = await asyncpg.connect(db_dsn)
    try:
        await conn.execute("DELETE FROM features WHERE bar_seconds = 60 AND bar_time > $1",
                           query.utc(made300[-1][0] - 60_000))
    finally:
        await conn.close()
    rc, out, _ = await ingestor("features", "show", "--dsn", db_dsn, "--symbol", "BTCUSDT", "--last", "3")
    assert rc == 0 and table_lines(out)[0].startswith("futures BTCUSDT, 300 s bars")


async def test_queries_walk_the_bar_index(db_dsn: str) -> None:
    """On a table of many symbols, and with sequential scans priced out, no query falls back to
    one or sorts: each is answered from features_bar_key in index order. (TimescaleDB also has a
    bar_time index; with a single symbol the planner may walk that one and filter, rightly.)"""
    for i in range(20):
        await insert(db_dsn, 60, symbol=f"ALT{i}USDT")
    await insert(db_dsn, 60)
    start, end = query.utc(T0), query.utc(T0 + 3_600_000)
    conn = await asyncpg.connect(db_dsn)
    try:
        await conn.execute("SET enable_seqscan = off")
        await conn.execute("SET enable_bitmapscan = off")  # the BRIN index of the plain backend
        for sql, args in ((query.INVENTORY_SQL, ("futures", "BTCUSDT")),
                          (query.LATEST_SQL, ("futures", "BTCUSDT", 60, 30)),
                          (query.RANGE_SQL, ("futures", "BTCUSDT", 60, start, end, 20_001))):
            plan = "\n".join(r[0] for r in await conn.fetch("EXPLAIN " + sql, *args))
            assert "Seq Scan" not in plan and "Sort" not in plan, plan
            assert "features_bar_key" in plan, plan
    finally:
        await conn.close()


# -- report ----------------------------------------------------------------------------------------

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def colour_present(img: np.ndarray, hex_colour: str, tol: float = 0.02) -> int:
    rgb = np.array([int(hex_colour[i:i + 2], 16) / 255 for i in (1, 3, 5)])
    return int((np.abs(img[..., :3] - rgb).max(axis=-1) < tol).sum())


async def test_report_draws_the_range(db_dsn: str, tmp_path: Path) -> None:
    await insert(db_dsn, 60)
    out_png = tmp_path / "chart.png"
    rc, out, err = await ingestor("report", "--dsn", db_dsn, "--symbol", "BTCUSDT", "--from", "2026-11-20",
                                  "--to", "2026-11-20T01:40:00Z", "--out", str(out_png))
    assert rc == 0, err
    assert out.strip() == (f"wrote {out_png}: 100 60 s bars of futures BTCUSDT, 2026-11-20 00:00:00 to "
                           "2026-11-20 01:39:00 UTC")
    assert out_png.read_bytes()[:8] == PNG_SIGNATURE
    img = mpimg.imread(out_png)
    assert img.shape == (1200, 1400, 4)
    colours = np.unique((img[..., :3] * 255).astype(np.uint8).reshape(-1, 3), axis=0)
    assert len(colours) > 500
    # The signal triangles, drawn opaque in the chart's green and red.
    assert colour_present(img, "#15803d") > 30 and colour_present(img, "#b91c1c") > 30


async def test_report_refuses_empty_and_oversized_ranges(db_dsn: str, tmp_path: Path) -> None:
    await insert(db_dsn, 60)
    await insert(db_dsn, 300)
    out_png = tmp_path / "chart.png"
    base = ("report", "--dsn", db_dsn, "--symbol", "BTCUSDT", "--out", str(out_png))
    rc, out, err = await ingestor(*base, "--from", "2020-01-01", "--to", "2020-01-02")
    assert rc == 1 and out == ""
    assert ("no 60 s bars of futures BTCUSDT between 2020-01-01 00:00:00 and 2020-01-02 00:00:00 UTC; "
            "stored: 60 s bars from 2026-11-20 00:00:00 to 2026-11-20 01:49:00 UTC") in err
    rc, _, err = await ingestor(*base, "--from", "2026-11-20", "--to", "2026-11-21", "--max-bars", "50")
    assert rc == 1 and "more than 50 60 s bars" in err and "--bar (stored: 300 s)" in err
    rc, _, err = await ingestor(*base, "--from", "2026-11-20", "--to", "2026-11-21", "--max-bars", "50",
                                "--bar", "300")
    assert rc == 0, err  # 22 bars of 300 s
    rc, _, err = await ingestor(*base, "--from", "yesterday")
    assert rc == 2 and "Unix seconds or milliseconds" in err
    rc, _, err = await ingestor(*base, "--from", "2026-11-21", "--to", "2026-11-20")
    assert rc == 2 and "must be before --to" in err
    rc, _, err = await ingestor(*base[:-1], str(tmp_path / "chart.xyz"), "--from", "2026-11-20")
    assert rc == 1 and ".png" in err
    assert not (tmp_path / "chart.xyz").exists()
