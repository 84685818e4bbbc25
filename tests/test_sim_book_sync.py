"""A book synced from REST + diffs by Binance's procedure equals the simulator's own book."""

from __future__ import annotations

import asyncio

import orjson
import pytest

from ingestor.binance.depth_sync import DepthSync
from ingestor.sim.model import ModelParams
from ingestor.sim.server import SimConfig, Simulator

from .conftest import connect, get_json, post_json

CASES = [
    ("spot", "/stream?streams=btcusdt@depth@100ms/ethusdt@depth", {"btcusdt@depth@100ms"}),
    ("futures", "/public/stream?streams=btcusdt@depth@100ms/ethusdt@depth@500ms",
     {"btcusdt@depth@100ms"}),
    ("futures", "/public/stream?streams=btcusdt@depth", {"btcusdt@depth"}),
]


@pytest.mark.parametrize(("market", "path", "_"), CASES)
async def test_synced_book_equals_simulator_book(market: str, path: str, _: set[str]) -> None:
    config = SimConfig(n_symbols=3, seed=7, model=ModelParams(rate=1500))
    async with Simulator(config) as sim:
        client = await connect(sim.urls[f"{market}_ws"] + path)
        stream = path.split("=")[1].split("/")[0]
        sync = DepthSync(market)  # type: ignore[arg-type]
        rest = sim.urls[f"{market}_rest"] + ("/api/v3/depth" if market == "spot" else "/fapi/v1/depth")
        # Subscribe first, let diffs buffer, then take the snapshot: the documented order.
        first = await client.recv()
        if first["stream"] == stream:
            sync.on_event(first["data"])
        status, snap, _h = await get_json(rest, symbol="BTCUSDT", limit=1000)
        assert status == 200
        assert sync.on_snapshot(snap)
        deadline = asyncio.get_running_loop().time() + 4
        while asyncio.get_running_loop().time() < deadline:
            msg = await client.recv()
            if msg["stream"] == stream:
                sync.on_event(msg["data"])
        await post_json(sim.urls["admin"] + "/pause")
        _, own, _h = await get_json(sim.urls["admin"] + "/book", market=market, symbol="BTCUSDT")
        # Drain what was sent before the pause.
        while sync.book is not None and sync.book.last_update_id < own["lastUpdateId"]:
            msg = await client.recv()
            if msg["stream"] == stream:
                sync.on_event(msg["data"])
        book = sync.book
        assert book is not None
        assert book.last_update_id == own["lastUpdateId"]
        assert sync.applied >= 10
        # The snapshot holds 1000 levels a side; compare the levels both can see: every
        # level at or inside the snapshot's depth must match exactly.
        own_bids = dict((p, q) for p, q in own["bids"])
        own_asks = dict((p, q) for p, q in own["asks"])
        lo = min(map(float, (p for p, _q in snap["bids"])))
        hi = max(map(float, (p for p, _q in snap["asks"])))
        assert {p: q for p, q in book.bids.items() if float(p) >= lo} == \
            {p: q for p, q in own_bids.items() if float(p) >= lo}
        assert {p: q for p, q in book.asks.items() if float(p) <= hi} == \
            {p: q for p, q in own_asks.items() if float(p) <= hi}
        assert not book.crossed()


async def test_diff_events_chain_without_gaps(sim: Simulator) -> None:
    """Spot: U = previous u + 1. Futures: pu = previous u, and U jumps (venue-wide ids)."""
    spot = await connect(sim.urls["spot_ws"] + "/ws/btcusdt@depth@100ms")
    fut = await connect(sim.urls["futures_ws"] + "/public/ws/btcusdt@depth@100ms")
    s_events = [await spot.recv() for _ in range(15)]
    f_events = [await fut.recv() for _ in range(15)]
    for a, b in zip(s_events, s_events[1:], strict=False):
        assert b["U"] == a["u"] + 1
    jumps = 0
    for a, b in zip(f_events, f_events[1:], strict=False):
        assert b["pu"] == a["u"]
        jumps += b["U"] != a["u"] + 1
    assert jumps > 0
    assert all(e["E"] % 100 == 0 for e in s_events + f_events)
    assert orjson.dumps(s_events[0])  # parsed fine
