"""The REST client against the simulator's REST endpoints: Retry-After is honoured (no
request during the block, so never a 418), 5xx are retried, the weight header is read."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import orjson
import pytest

from ingestor.binance.rest_client import RestClient, RestError, RestStopped
from ingestor.sim.server import SimConfig, Simulator

from .conftest import post_json
from .pipeline import wait_until


def client(session: aiohttp.ClientSession, sim: Simulator) -> RestClient:
    return RestClient(session, {"spot": sim.urls["spot_rest"], "futures": sim.urls["futures_rest"]})


@pytest.mark.parametrize("sim", [SimConfig(n_symbols=1)], indirect=True)
async def test_429_blocks_the_market_for_retry_after_then_succeeds(sim: Simulator) -> None:
    await post_json(sim.urls["admin"] + "/faults", {"kind": "rest_429", "market": "futures", "duration": 2})
    async with aiohttp.ClientSession() as session:
        c = client(session, sim)
        started = time.monotonic()
        body = orjson.loads(await c.get("futures", "openInterest", {"symbol": "BTCUSDT"}))
        elapsed = time.monotonic() - started
    assert body["symbol"] == "BTCUSDT"
    assert elapsed >= 2.0
    assert c.requests == {("futures", "openInterest", 429): 1, ("futures", "openInterest", 200): 1}
    rest = sim.markets["futures"].rest
    assert rest.requests == {"/fapi/v1/openInterest": 2}  # nothing sent during the block
    assert not rest.budget.counts.get(418)


@pytest.mark.parametrize("sim", [SimConfig(n_symbols=1)], indirect=True)
async def test_5xx_is_retried_and_4xx_is_an_error(sim: Simulator) -> None:
    await post_json(sim.urls["admin"] + "/faults", {"kind": "rest_5xx", "market": "spot", "count": 2})
    async with aiohttp.ClientSession() as session:
        c = client(session, sim)
        depth = orjson.loads(await c.get("spot", "depth", {"symbol": "BTCUSDT", "limit": 5}, weight=5))
        assert len(depth["bids"]) == 5
        assert c.requests[("spot", "depth", 503)] == 2
        assert c.budgets["spot"].used >= 5  # from X-MBX-USED-WEIGHT-1M
        with pytest.raises(RestError) as err:
            await c.get("spot", "depth", {"symbol": "NOPE"}, weight=5)
    assert err.value.status == 400


@pytest.mark.parametrize("sim", [SimConfig(n_symbols=1)], indirect=True)
async def test_every_wait_ends_on_stop(sim: Simulator) -> None:
    """Retry-After of an hour, and a reply that does not come: both end when told to stop
    (issue 16 item 11), so the REST worker never outlives the supervisor's stop deadline."""
    await post_json(sim.urls["admin"] + "/faults", {"kind": "rest_429", "market": "futures", "duration": 3600})
    await post_json(sim.urls["admin"] + "/faults", {"kind": "rest_slow", "market": "spot", "delay": 15_000})
    stopping = asyncio.Event()
    async with aiohttp.ClientSession() as session:
        c = RestClient(session, {"spot": sim.urls["spot_rest"], "futures": sim.urls["futures_rest"]},
                       stopping=stopping)
        blocked = asyncio.ensure_future(c.get("futures", "openInterest", {"symbol": "BTCUSDT"}))
        slow = asyncio.ensure_future(c.get("spot", "depth", {"symbol": "BTCUSDT", "limit": 5}))

        async def both_waiting() -> bool:
            rest = sim.markets
            return (rest["futures"].rest.requests.get("/fapi/v1/openInterest") == 1
                    and rest["spot"].rest.requests.get("/api/v3/depth") == 1)

        await wait_until(both_waiting, 10, "a 429 and a slow reply")
        assert not blocked.done() and not slow.done()
        stopping.set()
        for task in (blocked, slow):  # well before the slow reply (15 s) would come
            with pytest.raises(RestStopped):
                await asyncio.wait_for(task, 10)
        # Nothing more is sent once stopping.
        with pytest.raises(RestStopped):
            await c.get("spot", "ping")
    assert sim.markets["spot"].rest.requests == {"/api/v3/depth": 1}
