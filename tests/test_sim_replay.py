"""Replay: a file's messages arrive in order, byte for byte, and a client syncs a real
book with no gap from every real capture replayed through the simulator."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import orjson
import pytest

from ingestor.binance.depth_sync import DepthSync
from ingestor.sim.captures import read_capture
from ingestor.sim.encode import envelope
from ingestor.sim.replay import derive_stream, event_market
from ingestor.sim.server import SimConfig, Simulator

from .conftest import CAPTURE_SETS, REALDATA, connect, get_json


def _path(market: str, stream: str) -> str:
    kind = stream.split("@")[1]
    if market == "spot":
        return "/stream?streams="
    return "/public/stream?streams=" if kind in ("depth", "bookTicker") else "/market/stream?streams="


@pytest.mark.realdata
@pytest.mark.parametrize(("market", "files"), CAPTURE_SETS, ids=[f[0][:40] for _m, f in CAPTURE_SETS])
async def test_real_capture_replays_and_syncs_books(market: str, files: list[str]) -> None:
    paths = [REALDATA / f for f in files]
    if not all(p.exists() for p in paths):
        pytest.skip("shared/realdata is not beside the checkout")
    caps = [read_capture(p) for p in paths]
    snapshots = [s for c in caps for s in c.snapshots]
    frames = [f for c in caps for f in c.frames]
    symbols = sorted({s.symbol for s in snapshots})
    assert symbols
    wanted = sorted({f.stream for f in frames if f.stream and f.stream.split("@")[0].upper() in symbols
                     and f.stream.split("@")[1] in ("depth", "bookTicker")})
    expected = [envelope(f.stream, f.data) for f in sorted(frames, key=lambda f: f.recv_ns)
                if f.stream in wanted]
    config = SimConfig(replay=tuple(map(str, paths)), speed=0)
    async with Simulator(config) as sim:
        clients = {}
        for route in {_path(market, s) for s in wanted}:
            names = [s for s in wanted if _path(market, s) == route]
            clients[route] = (await connect(sim.urls[f"{market}_ws"] + route + "/".join(names)), names)
        received: list[bytes] = []
        for client, names in clients.values():
            n = sum(1 for f in frames if f.stream in names)
            received += [await client.recv_raw(timeout=30) for _ in range(n)]
        # Every frame of the subscribed streams, byte for byte, in file order per route.
        if len(clients) == 1:
            assert received == expected
        else:
            assert sorted(received) == sorted(expected)
        rest = sim.urls[f"{market}_rest"] + ("/api/v3/depth" if market == "spot" else "/fapi/v1/depth")
        for symbol in symbols:
            status, snap, _h = await get_json(rest, symbol=symbol, limit=1000)
            assert status == 200
            _sync_and_check(market, symbol, snap, [orjson.loads(r) for r in received])


def _sync_and_check(market: str, symbol: str, snap: dict, msgs: list[dict]) -> None:
    low = symbol.lower()
    sync = DepthSync(market)  # type: ignore[arg-type]
    tickers = {m["data"]["u"]: m["data"] for m in msgs if m["stream"] == f"{low}@bookTicker"}
    at_u: dict[int, tuple[float, float]] = {}
    for m in msgs:
        if m["stream"].startswith(f"{low}@depth"):
            sync.on_event(m["data"])  # raises DepthGap on any gap
    # Buffered everything first, as a client does while the snapshot is in flight.
    assert sync.on_snapshot(snap), "snapshot older than the first diff"
    # Re-run event by event to check the book after each applied diff.
    sync = DepthSync(market)  # type: ignore[arg-type]
    assert sync.on_snapshot(snap)
    applied = 0
    for m in msgs:
        if not m["stream"].startswith(f"{low}@depth"):
            continue
        if sync.on_event(m["data"]):
            applied += 1
            book = sync.book
            assert book is not None and not book.crossed(), f"{symbol} crossed at u={book.last_update_id}"
            if book.last_update_id in tickers:
                bb, ba = book.best_bid(), book.best_ask()
                assert bb is not None and ba is not None
                at_u[book.last_update_id] = (float(bb[0]), float(ba[0]))
    assert applied > 0, f"{symbol}: no diff applied after the snapshot"
    for u, (bid, ask) in at_u.items():
        t = tickers[u]
        assert (bid, ask) == (float(t["b"]), float(t["a"])), f"{symbol} u={u}"
    if tickers:
        assert at_u, f"{symbol}: no bookTicker coincided with a diff"


async def test_jsonl_replay_in_order_at_recorded_pace(tmp_path: Path) -> None:
    t0 = 1_700_000_000_000
    events = [{"e": "aggTrade", "E": t0 + i * 100, "s": "BTCUSDT", "a": i, "p": "1.0", "q": "2.0",
               "f": i, "l": i, "T": t0 + i * 100, "m": False} for i in range(6)]
    lines = [orjson.dumps(e) for e in events[:3]]
    lines += [orjson.dumps({"stream": "btcusdt@aggTrade", "data": e}) for e in events[3:]]
    f = tmp_path / "trades.jsonl"
    f.write_bytes(b"\n".join(lines) + b"\n")
    for speed, span in ((1.0, 0.5), (5.0, 0.1)):
        async with Simulator(SimConfig(replay=(str(f),), speed=speed)) as sim:
            c = await connect(sim.urls["futures_ws"] + "/market/ws/btcusdt@aggTrade")
            got = [await c.recv_raw()]
            t = time.monotonic()
            got += [await c.recv_raw() for _ in range(5)]
            elapsed = time.monotonic() - t
            assert [orjson.loads(g) for g in got] == events
            assert got[0] == lines[0]  # bare events are sent as the file's own bytes
            # Recorded span 500 ms divided by the speed; generous upper bound (noisy CI).
            assert span * 0.8 <= elapsed <= span + 1.5
            played = (await get_json(sim.urls["admin"] + "/stats"))[1]["replay"]
            assert played["finished"] and played["played"] == 6


def test_bare_event_streams_and_markets() -> None:
    assert derive_stream({"e": "depthUpdate", "s": "BTCUSDT"}) == "btcusdt@depth"
    assert derive_stream({"e": "forceOrder", "o": {}}) == "!forceOrder@arr"
    assert derive_stream([{"e": "markPriceUpdate"}]) == "!markPrice@arr"
    assert derive_stream({"u": 1, "s": "ETHUSDT", "b": "1", "a": "2"}) == "ethusdt@bookTicker"
    assert event_market({"e": "depthUpdate", "pu": 1}) == "futures"
    assert event_market({"e": "depthUpdate"}) == "spot"
    assert event_market({"e": "aggTrade", "M": True}) == "spot"


@pytest.mark.realdata
async def test_force_order_log_replays_to_all_market_stream() -> None:
    path = REALDATA / "dannyspk_arbitra-backend__tools-ccxt_out-binance_force_orders_ws.log"
    if not path.exists():
        pytest.skip("shared/realdata is not beside the checkout")
    cap = read_capture(path)
    async with Simulator(SimConfig(replay=(str(path),), speed=0)) as sim:
        c = await connect(sim.urls["futures_ws"] + "/market/ws/!forceOrder@arr")
        got = [await c.recv_raw() for _ in range(len(cap.frames))]
        assert got == [f.data for f in cap.frames]
        with pytest.raises(asyncio.TimeoutError):
            await c.recv_raw(timeout=0.3)
