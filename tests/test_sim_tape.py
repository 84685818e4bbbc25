"""The tape mode of the simulator (ingestor/sim/tape.py): the model's recording played on the
wall clock keeps every protocol rule a client relies on."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import orjson
import pytest

from ingestor.binance.depth_sync import DepthSync
from ingestor.sim.model import ModelParams
from ingestor.sim.server import SimConfig, Simulator
from ingestor.sim.tape import digits, load_or_record, record, tape_streams
from ingestor.sim.universe import build_universe

from .conftest import connect, get_json, post_json

PARAMS = ModelParams(rate=1500, panic_every_s=1e6, cascade_every_s=2.0)


def _config(tmp_path: Path, **kw: object) -> SimConfig:
    return SimConfig(n_symbols=3, seed=7, model=PARAMS, tape_seconds=6.0, tape_cache=str(tmp_path), **kw)  # type: ignore[arg-type]


def test_digits_renders_thirteen_ascii_digits() -> None:
    assert digits(np.array([1_796_396_131_602, 1_000_000_000_000])).tobytes() == b"17963961316021000000000000"


def test_a_recording_finds_every_event_time_but_the_funding_time() -> None:
    specs = build_universe(None, 3)
    tape = record("futures", specs, 7, PARAMS, 3.0, tape_streams("futures", specs, "500ms"))
    fields = [tape.blob[o - 4 : o - 1] for o in tape.toff.tolist()]
    assert set(fields) == {b'"E"', b'"T"'}
    n_mark = sum(tape.names[s] == "!markPrice@arr@1s" for s in tape.sid.tolist())
    assert n_mark == 3
    # An aggTrade and a diff carry E and T; a mark price array one E per symbol, never its T.
    trades = sum(tape.names[s].endswith("@aggTrade") for s in tape.sid.tolist())
    diffs = sum("@depth" in tape.names[s] for s in tape.sid.tolist())
    forced = sum(tape.names[s] == "!forceOrder@arr" for s in tape.sid.tolist())
    assert len(tape.toff) == 2 * (trades + diffs + forced) + 3 * n_mark


async def test_played_tape_keeps_ids_chains_and_wall_clock_times(tmp_path: Path) -> None:
    async with Simulator(_config(tmp_path)) as sim:
        spot = await connect(sim.urls["spot_ws"] + "/stream?streams=btcusdt@aggTrade/btcusdt@depth@100ms")
        fut = await connect(sim.urls["futures_ws"] + "/public/ws/btcusdt@depth@500ms")
        last_a = last_u = last_fu = None
        lags = []
        for _ in range(300):
            msg = await spot.recv()
            ev = msg["data"]
            lags.append(time.time() * 1000 - ev["E"])
            if ev["e"] == "aggTrade":
                assert last_a is None or ev["a"] == last_a + 1
                assert ev["T"] <= ev["E"]
                last_a = ev["a"]
            else:
                assert last_u is None or ev["U"] == last_u + 1
                last_u = ev["u"]
        for _ in range(4):
            ev = await fut.recv()
            assert last_fu is None or ev["pu"] == last_fu
            last_fu = ev["u"]
            assert abs(time.time() * 1000 - ev["E"]) < 2000
        assert last_u is not None and last_a is not None
        # Times were moved onto the wall clock: each message is sent when its time comes.
        assert -50 < min(lags) and max(lags) < 2000
        stats = (await get_json(sim.urls["admin"] + "/stats"))[1]
        tape = stats["markets"]["spot"]["tape"]
        assert tape["started"] and tape["played"] > 300 and tape["speed"] == 1.0


@pytest.mark.parametrize("market", ["spot", "futures"])
async def test_a_book_synced_from_the_tape_equals_the_tape_book(tmp_path: Path, market: str) -> None:
    stream = "btcusdt@depth@100ms" if market == "spot" else "btcusdt@depth@500ms"
    path = f"/stream?streams={stream}" if market == "spot" else f"/public/stream?streams={stream}"
    async with Simulator(_config(tmp_path)) as sim:
        client = await connect(sim.urls[f"{market}_ws"] + path)
        sync = DepthSync(market)  # type: ignore[arg-type]
        first = await client.recv()
        sync.on_event(first["data"])
        rest = sim.urls[f"{market}_rest"] + ("/api/v3/depth" if market == "spot" else "/fapi/v1/depth")
        status, snap, _h = await get_json(rest, symbol="BTCUSDT", limit=1000)
        assert status == 200
        assert sync.on_snapshot(snap)
        deadline = asyncio.get_running_loop().time() + 2.5
        while asyncio.get_running_loop().time() < deadline:
            sync.on_event((await client.recv())["data"])
        await post_json(sim.urls["admin"] + "/pause")
        _, own, _h = await get_json(sim.urls["admin"] + "/book", market=market, symbol="BTCUSDT")
        while sync.book is not None and sync.book.last_update_id < own["lastUpdateId"]:
            sync.on_event((await client.recv())["data"])
        book = sync.book
        assert book is not None and sync.applied >= 3
        assert book.last_update_id == own["lastUpdateId"]
        lo = min(float(p) for p, _q in snap["bids"])
        hi = max(float(p) for p, _q in snap["asks"])
        assert {p: q for p, q in book.bids.items() if float(p) >= lo} == \
            {p: q for p, q in own["bids"] if float(p) >= lo}
        assert {p: q for p, q in book.asks.items() if float(p) <= hi} == \
            {p: q for p, q in own["asks"] if float(p) <= hi}


async def test_tape_rate_sets_the_speed_and_rest_trades_follow_the_stream(tmp_path: Path) -> None:
    async with Simulator(_config(tmp_path, tape_rate=3000.0)) as sim:
        client = await connect(sim.urls["futures_ws"] + "/market/ws/ethusdt@aggTrade")
        trades = [await client.recv() for _ in range(20)]
        _, stats, _h = await get_json(sim.urls["admin"] + "/stats")
        rates = [stats["markets"][m]["tape"]["recorded_rate"] for m in ("spot", "futures")]
        speed = stats["markets"]["futures"]["tape"]["speed"]
        assert speed == pytest.approx(3000.0 / sum(rates), rel=1e-3)
        status, rest, _h = await get_json(sim.urls["futures_rest"] + "/fapi/v1/aggTrades", symbol="ETHUSDT",
                                          fromId=trades[0]["a"], limit=20)
        assert status == 200
        assert [{k: t[k] for k in ("a", "p", "q", "f", "l", "T", "m")} for t in trades] == rest


def test_the_cache_gives_back_the_same_recording(tmp_path: Path) -> None:
    specs = build_universe(None, 2)
    speeds = {"spot": "100ms", "futures": "500ms"}
    first = load_or_record(("spot",), specs, 3, PARAMS, 2.0, speeds, tmp_path)["spot"]  # type: ignore[arg-type]
    assert len(list(tmp_path.glob("tape-spot-*.npz"))) == 1
    again = load_or_record(("spot",), specs, 3, PARAMS, 2.0, speeds, tmp_path)["spot"]  # type: ignore[arg-type]
    assert again.blob == first.blob and again.names == first.names and again.books == first.books
    assert np.array_equal(again.toff, first.toff) and np.array_equal(again.seq, first.seq)
    other = load_or_record(("spot",), specs, 4, PARAMS, 2.0, speeds, tmp_path)["spot"]  # type: ignore[arg-type]
    assert other.blob != first.blob


def test_cli_records_a_tape_into_the_cache_and_says_how_big(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "ingestor.cli", "simulate", "--n-symbols", "2", "--rate", "500",
           "--tape-seconds", "2", "--tape-cache", str(tmp_path), "--tape-record-only"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True)
    sizes = orjson.loads(out.stdout)
    assert set(sizes) == {"spot", "futures"} and all(v["messages"] > 0 for v in sizes.values())
    assert len(list(tmp_path.glob("tape-*.npz"))) == 2
    bad = subprocess.run(cmd[:-3] + ["--tape-record-only"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--tape-cache" in bad.stderr
