"""The simulator's WebSocket endpoints over real sockets: paths, requests, limits, faults.

Expected behaviour is Binance's documented one (see the docstrings of
``ingestor.sim.ws_server`` and ``ingestor.binance.streams``).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson
import pytest
from picows import WSCloseCode, WSFrame, WSInvalidStatusError, WSMsgType, WSTransport

from ingestor.binance.streams import DEFAULT_LIMITS, MarketLimits
from ingestor.sim.faults import parse_faults
from ingestor.sim.server import SimConfig, Simulator

from .conftest import Client, connect
from .conftest import get_json as get
from .conftest import post_json as post

T = 5.0  # bound for any single await


def _limits(**kw: Any) -> dict[str, MarketLimits]:
    """Both markets' default limits with ``kw`` overridden."""
    out = {}
    for market, lim in DEFAULT_LIMITS.items():
        fields = {f: getattr(lim, f) for f in lim.__slots__}
        fields.update(kw)
        out[market] = MarketLimits(**fields)
    return out


# Many requests per test: lift the incoming-message limit where it is not under test.
RELAXED = SimConfig(n_symbols=3, limits=_limits(max_incoming_per_s=1000))


class Probe(Client):
    """A client that also counts pongs and may answer pings itself."""

    def __init__(self, answer_pings: bool = False) -> None:
        super().__init__()
        self.pongs = 0
        self.answer_pings = answer_pings

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type == WSMsgType.PONG:
            self.pongs += 1
        elif frame.msg_type == WSMsgType.PING and self.answer_pings:
            transport.send_pong(frame.get_payload_as_bytes())
        super().on_ws_frame(transport, frame)


async def stats(sim: Simulator) -> dict[str, Any]:
    status, body, _ = await get(sim.urls["admin"] + "/stats")
    assert status == 200
    return body  # type: ignore[no-any-return]


async def collect(client: Client, seconds: float) -> list[Any]:
    """Every frame (parsed) that arrives within ``seconds``."""
    return [orjson.loads(raw) for raw in await collect_raw(client, seconds)]


async def collect_raw(client: Client, seconds: float) -> list[bytes]:
    out = []
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        try:
            out.append(await client.recv_raw(left))
        except TimeoutError:
            break
    return out


async def drain(client: Client, quiet: float = 0.3) -> list[Any]:
    """Frames until none arrives for ``quiet`` seconds (bounded overall)."""
    out = []
    end = time.monotonic() + T
    while time.monotonic() < end:
        try:
            out.append(await client.recv(quiet))
        except TimeoutError:
            return out
    raise AssertionError("the stream never went quiet")


async def request(client: Client, req_id: Any, method: str, params: list[Any] | None = None) -> Any:
    msg: dict[str, Any] = {"method": method, "id": req_id}
    if params is not None:
        msg["params"] = params
    client.send_json(msg)
    return await client.reply(req_id)


async def until(client: Client, pred: Any, timeout: float = T) -> Any:
    """The first frame matching ``pred``."""
    end = time.monotonic() + timeout
    while True:
        msg = await client.recv(max(0.01, end - time.monotonic()))
        if pred(msg):
            return msg


def is_data(msg: Any) -> bool:
    return not (isinstance(msg, dict) and "id" in msg and ("result" in msg or "error" in msg))


def event_of(msg: Any) -> Any:
    return msg["data"] if isinstance(msg, dict) and "stream" in msg else msg


# ---- 1. raw and combined connections, properties ----------------------------------------


async def test_raw_frames_are_bare_events(sim: Simulator) -> None:
    client = await connect(sim.urls["spot_ws"] + "/ws/btcusdt@aggTrade/btcusdt@depth@100ms")
    msgs = [await client.recv() for _ in range(10)]
    kinds = {m["e"] for m in msgs}
    assert kinds <= {"aggTrade", "depthUpdate"}
    assert all("stream" not in m and "data" not in m and m["s"] == "BTCUSDT" for m in msgs)


async def test_combined_frames_are_envelopes(sim: Simulator) -> None:
    url = sim.urls["spot_ws"] + "/stream?streams=btcusdt@aggTrade/ethusdt@depth@100ms"
    client = await connect(url)
    seen: dict[str, Any] = {}
    end = time.monotonic() + T
    while len(seen) < 2 and time.monotonic() < end:
        msg = await client.recv()
        assert set(msg) == {"stream", "data"}
        seen[msg["stream"]] = msg["data"]
    assert set(seen) == {"btcusdt@aggTrade", "ethusdt@depth@100ms"}
    assert seen["btcusdt@aggTrade"]["e"] == "aggTrade"
    assert seen["btcusdt@aggTrade"]["s"] == "BTCUSDT"
    assert seen["ethusdt@depth@100ms"]["e"] == "depthUpdate"
    assert seen["ethusdt@depth@100ms"]["s"] == "ETHUSDT"
    assert await request(client, 1, "GET_PROPERTY", ["combined"]) == {"result": True, "id": 1}


@pytest.mark.parametrize("sim", [RELAXED], indirect=True)
@pytest.mark.parametrize(("market", "path"), [("spot", "/ws/btcusdt@aggTrade"),
                                              ("futures", "/market/ws/btcusdt@aggTrade")])
async def test_set_property_combined_switches_to_envelopes(sim: Simulator, market: str,
                                                           path: str) -> None:
    client = await connect(sim.urls[f"{market}_ws"] + path)
    first = await client.recv()
    assert first["e"] == "aggTrade" and "stream" not in first
    assert await request(client, 1, "GET_PROPERTY", ["combined"]) == {"result": False, "id": 1}
    client.send_json({"method": "SET_PROPERTY", "params": ["combined", True], "id": 2})
    # Frames before the reply are raw; every frame after it is an envelope.
    while True:
        msg = await client.recv()
        if not is_data(msg):
            assert msg == {"result": None, "id": 2}
            break
        assert "stream" not in msg
    after = [await client.recv() for _ in range(3)]
    assert all(m["stream"] == "btcusdt@aggTrade" and m["data"]["e"] == "aggTrade" for m in after)
    assert await request(client, 3, "GET_PROPERTY", ["combined"]) == {"result": True, "id": 3}
    # And back.
    assert await request(client, 4, "SET_PROPERTY", ["combined", False]) == {"result": None, "id": 4}
    msg = await client.recv()
    assert "stream" not in msg and msg["e"] == "aggTrade"


# ---- 2. SUBSCRIBE / LIST_SUBSCRIPTIONS / UNSUBSCRIBE ---------------------------------------


@pytest.mark.parametrize("sim", [RELAXED], indirect=True)
async def test_subscribe_list_unsubscribe(sim: Simulator) -> None:
    client = await connect(sim.urls["spot_ws"] + "/ws")
    assert await collect(client, 0.3) == []  # nothing subscribed, nothing sent
    assert await request(client, 1, "LIST_SUBSCRIPTIONS") == {"result": [], "id": 1}
    streams = ["btcusdt@aggTrade", "btcusdt@depth@100ms"]
    assert await request(client, 2, "SUBSCRIBE", streams) == {"result": None, "id": 2}
    kinds: set[str] = set()
    end = time.monotonic() + T
    while kinds != {"aggTrade", "depthUpdate"} and time.monotonic() < end:
        kinds.add((await client.recv())["e"])
    assert kinds == {"aggTrade", "depthUpdate"}
    listed = await request(client, 3, "LIST_SUBSCRIPTIONS")
    assert sorted(listed["result"]) == sorted(streams)

    client.send_json({"method": "UNSUBSCRIBE", "params": ["btcusdt@aggTrade"], "id": 4})
    while is_data(msg := await client.recv()):
        pass  # in flight before the reply
    assert msg == {"result": None, "id": 4}
    after = await collect(client, 1.0)
    assert after, "the depth stream stopped too"
    assert {m["e"] for m in after} == {"depthUpdate"}
    assert await request(client, 5, "LIST_SUBSCRIPTIONS") == {"result": ["btcusdt@depth@100ms"],
                                                             "id": 5}
    # Subscribing to an already subscribed stream is harmless; unsubscribing an unknown one too.
    assert await request(client, 6, "SUBSCRIBE", ["btcusdt@depth@100ms"]) == {"result": None, "id": 6}
    assert await request(client, 7, "UNSUBSCRIBE", ["ethusdt@aggTrade"]) == {"result": None, "id": 7}
    assert await request(client, 8, "LIST_SUBSCRIPTIONS") == {"result": ["btcusdt@depth@100ms"],
                                                             "id": 8}


# ---- 3. error replies ---------------------------------------------------------------------


def _err(msg: Any) -> tuple[int, str]:
    assert set(msg) == {"error", "id"}, msg
    return msg["error"]["code"], msg["error"]["msg"]


@pytest.mark.parametrize("sim", [RELAXED], indirect=True)
@pytest.mark.parametrize(("market", "path"), [("spot", "/ws"), ("futures", "/public/ws")])
async def test_error_replies(sim: Simulator, market: str, path: str) -> None:
    client = await connect(sim.urls[f"{market}_ws"] + path)
    assert client.transport is not None
    client.transport.send(WSMsgType.TEXT, b'{"method": "SUBSCRIBE", ')
    code, text = _err(await client.reply(None))
    assert code == 3 and text.startswith("Invalid JSON")

    # Futures ids are unsigned; spot takes any signed 64-bit integer.
    bad_id = -1 if market == "futures" else 2**63
    client.transport.send(WSMsgType.TEXT, b'{"method":"LIST_SUBSCRIPTIONS","id":%d}' % bad_id)
    code, text = _err(await client.reply(None))
    assert (code, text) == (2, "Invalid request: request ID must be an unsigned integer")

    client.send_json({"method": "LIST_SUBSCRIPTIONS", "id": True})
    assert _err(await client.reply(None))[0] == 2

    code, text = _err(await request(client, 1, "SUBSCRIBED", ["btcusdt@aggTrade"]))
    assert code == 2 and "unknown variant" in text and "`SUBSCRIBED`" in text

    code, text = _err(await request(client, 2, "SET_PROPERTY", ["colour", True]))
    assert code == 0 and text == "Unknown property"
    assert _err(await request(client, 3, "GET_PROPERTY", ["colour"]))[0] == 0

    code, text = _err(await request(client, 4, "SET_PROPERTY", ["combined", "true"]))
    assert code == 1 and "Boolean" in text
    assert _err(await request(client, 5, "SET_PROPERTY", ["combined", 1]))[0] == 1
    assert await request(client, 6, "GET_PROPERTY", ["combined"]) == {"result": False, "id": 6}

    for i, bad in enumerate(["btcusdt@nonsense", "BTCUSDT@aggTrade", "btcusdt", "btcusdt@depth@1ms"]):
        assert _err(await request(client, 10 + i, "SUBSCRIBE", [bad]))[0] == 2, bad
    # One bad name rejects the whole request.
    assert _err(await request(client, 20, "SUBSCRIBE", ["btcusdt@aggTrade", "x@y"]))[0] == 2
    assert await request(client, 21, "LIST_SUBSCRIPTIONS") == {"result": [], "id": 21}
    assert await collect(client, 0.3) == []
    assert not client.closed.is_set()


@pytest.mark.parametrize("sim", [RELAXED], indirect=True)
async def test_request_ids_futures_vs_spot(sim: Simulator) -> None:
    fut = await connect(sim.urls["futures_ws"] + "/public/ws")
    fut.send_json({"method": "LIST_SUBSCRIPTIONS", "id": "abc123"})
    code, text = _err(await fut.reply(None))
    assert (code, text) == (2, "Invalid request: request ID must be an unsigned integer")
    assert await request(fut, 7, "LIST_SUBSCRIPTIONS") == {"result": [], "id": 7}

    spot = await connect(sim.urls["spot_ws"] + "/ws")
    assert await request(spot, "abc123", "LIST_SUBSCRIPTIONS") == {"result": [], "id": "abc123"}
    assert await request(spot, -5, "LIST_SUBSCRIPTIONS") == {"result": [], "id": -5}
    assert await request(spot, "abc-123", "SUBSCRIBE", ["btcusdt@aggTrade"]) == \
        {"result": None, "id": "abc-123"}
    spot.send_json({"method": "LIST_SUBSCRIPTIONS", "id": "not alnum!"})
    assert _err(await spot.reply(None))[0] == 2
    spot.send_json({"method": "LIST_SUBSCRIPTIONS", "id": "x" * 37})
    assert _err(await spot.reply(None))[0] == 2


@pytest.mark.parametrize("sim", [RELAXED], indirect=True)
async def test_streams_the_market_does_not_have(sim: Simulator) -> None:
    spot = await connect(sim.urls["spot_ws"] + "/ws")
    for i, name in enumerate(["btcusdt@markPrice", "btcusdt@depth@500ms", "!markPrice@arr",
                              "btcusdt@forceOrder", "!forceOrder@arr"]):
        assert _err(await request(spot, i + 1, "SUBSCRIBE", [name]))[0] == 2, name
    assert await request(spot, 99, "LIST_SUBSCRIPTIONS") == {"result": [], "id": 99}
    fut = await connect(sim.urls["futures_ws"] + "/market/ws")
    for i, name in enumerate(["btcusdt@depth@1000ms", "!markPrice@arr@3s", "btcusdt@markPrice@2s"]):
        assert _err(await request(fut, i + 1, "SUBSCRIBE", [name]))[0] == 2, name
    # What futures does have.
    ok = ["btcusdt@markPrice", "btcusdt@markPrice@1s", "!markPrice@arr", "btcusdt@forceOrder",
          "!forceOrder@arr"]
    assert await request(fut, 50, "SUBSCRIBE", ok) == {"result": None, "id": 50}


# ---- 4. USD-M routing ---------------------------------------------------------------------


async def test_futures_public_delivers_depth(sim: Simulator) -> None:
    client = await connect(sim.urls["futures_ws"] + "/public/ws/btcusdt@depth@100ms")
    msg = await client.recv()
    assert msg["e"] == "depthUpdate" and msg["s"] == "BTCUSDT" and "pu" in msg


async def test_futures_market_delivers_trades_and_mark_prices(sim: Simulator) -> None:
    client = await connect(sim.urls["futures_ws"]
                           + "/market/stream?streams=btcusdt@aggTrade/!markPrice@arr@1s")
    seen: dict[str, Any] = {}
    end = time.monotonic() + T
    while len(seen) < 2 and time.monotonic() < end:
        msg = await client.recv()
        seen[msg["stream"]] = msg["data"]
    assert seen["btcusdt@aggTrade"]["e"] == "aggTrade"
    arr = seen["!markPrice@arr@1s"]
    assert isinstance(arr, list) and arr
    assert {x["e"] for x in arr} == {"markPriceUpdate"}
    assert {x["s"] for x in arr} == {"BTCUSDT", "ETHUSDT", "SOLUSDT"}


@pytest.mark.parametrize("sim", [RELAXED], indirect=True)
async def test_futures_legacy_path_delivers_only_public_streams(sim: Simulator) -> None:
    client = await connect(sim.urls["futures_ws"] + "/ws")
    streams = ["btcusdt@aggTrade", "btcusdt@depth@100ms", "!markPrice@arr@1s"]
    assert await request(client, 1, "SUBSCRIBE", streams) == {"result": None, "id": 1}
    listed = await request(client, 2, "LIST_SUBSCRIPTIONS")
    assert sorted(listed["result"]) == sorted(streams)
    msgs = await collect(client, 1.6)
    assert msgs, "the depth stream does not deliver on the legacy path"
    assert all(isinstance(m, dict) and m["e"] == "depthUpdate" for m in msgs), msgs[:3]

    # The same on a legacy combined URL.
    comb = await connect(sim.urls["futures_ws"] + "/stream?streams=btcusdt@aggTrade/ethusdt@depth@100ms")
    msgs = await collect(comb, 1.0)
    assert msgs
    assert {m["stream"] for m in msgs} == {"ethusdt@depth@100ms"}


@pytest.mark.parametrize("sim", [RELAXED], indirect=True)
async def test_futures_wrong_route_never_delivers(sim: Simulator) -> None:
    market = await connect(sim.urls["futures_ws"] + "/market/ws/btcusdt@depth@100ms")
    public = await connect(sim.urls["futures_ws"] + "/public/ws/btcusdt@aggTrade")
    control = await connect(sim.urls["futures_ws"] + "/market/ws/btcusdt@aggTrade")
    assert (await control.recv())["e"] == "aggTrade"
    assert await collect(market, 1.0) == []
    assert await collect(public, 0.1) == []
    assert await request(market, 1, "LIST_SUBSCRIPTIONS") == {"result": ["btcusdt@depth@100ms"],
                                                             "id": 1}


# ---- 5. limits ----------------------------------------------------------------------------


LIMITED = SimConfig(n_symbols=3, limits=_limits(max_streams=2, max_incoming_per_s=1000))


@pytest.mark.parametrize("sim", [LIMITED], indirect=True)
@pytest.mark.parametrize(("market", "path"), [
    ("spot", "/ws/btcusdt@bogus"),
    ("spot", "/stream?streams=btcusdt@aggTrade/btcusdt@markPrice"),
    ("spot", "/ws/btcusdt@aggTrade/ethusdt@aggTrade/solusdt@aggTrade"),
    ("futures", "/public/ws/btcusdt@depth@1ms"),
    ("futures", "/market/stream?streams=btcusdt@aggTrade/ethusdt@aggTrade/solusdt@aggTrade"),
])
async def test_bad_connection_url_refused_with_400(sim: Simulator, market: str, path: str) -> None:
    with pytest.raises(WSInvalidStatusError) as info:
        await connect(sim.urls[f"{market}_ws"] + path)
    assert info.value.response is not None
    assert info.value.response.status == 400
    assert orjson.loads(info.value.raw_body or b"{}")["code"] == -1100
    assert (await stats(sim))["markets"][market]["ws"]["connections"] == 0


@pytest.mark.parametrize("sim", [LIMITED], indirect=True)
async def test_subscribe_beyond_max_streams(sim: Simulator) -> None:
    client = await connect(sim.urls["spot_ws"] + "/ws/btcusdt@aggTrade")
    reply = await request(client, 1, "SUBSCRIBE", ["ethusdt@aggTrade", "solusdt@aggTrade"])
    code, text = _err(reply)
    assert code == 2 and "too many streams" in text
    assert await request(client, 2, "LIST_SUBSCRIPTIONS") == {"result": ["btcusdt@aggTrade"], "id": 2}
    assert await request(client, 3, "SUBSCRIBE", ["ethusdt@aggTrade"]) == {"result": None, "id": 3}
    assert _err(await request(client, 4, "SUBSCRIBE", ["solusdt@aggTrade"]))[0] == 2
    listed = await request(client, 5, "LIST_SUBSCRIPTIONS")
    assert sorted(listed["result"]) == ["btcusdt@aggTrade", "ethusdt@aggTrade"]
    msgs = await collect(client, 0.5)
    assert msgs and {m["s"] for m in msgs if is_data(m)} <= {"BTCUSDT", "ETHUSDT"}


RATE = SimConfig(n_symbols=3, limits=_limits(max_incoming_per_s=5))


@pytest.mark.parametrize("sim", [RATE], indirect=True)
@pytest.mark.parametrize("market", ["spot", "futures"])
async def test_too_many_incoming_messages_closes_with_1008(sim: Simulator, market: str) -> None:
    client = await connect(sim.urls[f"{market}_ws"] + ("/ws" if market == "spot" else "/public/ws"))
    for i in range(5):
        assert await request(client, i, "LIST_SUBSCRIPTIONS") == {"result": [], "id": i}
    before = (await stats(sim))["markets"][market]["ws"]["rate_limited_total"]
    assert before == 0
    client.send_json({"method": "LIST_SUBSCRIPTIONS", "id": 5})
    await asyncio.wait_for(client.closed.wait(), T)
    assert client.close_code == WSCloseCode.POLICY_VIOLATION
    ws = (await stats(sim))["markets"][market]["ws"]
    assert ws["rate_limited_total"] == 1
    assert ws["connections"] == 0


@pytest.mark.parametrize("sim", [RATE], indirect=True)
async def test_burst_over_the_limit_is_one_rate_limited_close(sim: Simulator) -> None:
    client = await connect(sim.urls["spot_ws"] + "/ws")
    for i in range(20):
        client.send_json({"method": "LIST_SUBSCRIPTIONS", "id": i})
    await asyncio.wait_for(client.closed.wait(), T)
    assert client.close_code == WSCloseCode.POLICY_VIOLATION
    replies = []
    while not client.frames.empty():
        replies.append(orjson.loads(client.frames.get_nowait()))
    assert replies == [{"result": [], "id": i} for i in range(5)]  # the 6th is over the limit
    ws = (await stats(sim))["markets"]["spot"]["ws"]
    assert ws["rate_limited_total"] == 1  # one connection, counted once
    assert ws["closed_total"] == 1


@pytest.mark.parametrize("sim", [RATE], indirect=True)
async def test_pings_count_towards_incoming_limit(sim: Simulator) -> None:
    client = await connect(sim.urls["spot_ws"] + "/ws")
    assert client.transport is not None
    for _ in range(6):
        client.transport.send_ping(b"x")
    await asyncio.wait_for(client.closed.wait(), T)
    assert client.close_code == WSCloseCode.POLICY_VIOLATION


@pytest.mark.parametrize("sim", [RATE], indirect=True)
async def test_paced_requests_stay_under_the_limit(sim: Simulator) -> None:
    client = await connect(sim.urls["spot_ws"] + "/ws")
    for i in range(9):
        assert await request(client, i, "LIST_SUBSCRIPTIONS") == {"result": [], "id": i}
        await asyncio.sleep(0.25)  # 4 per second
    assert not client.closed.is_set()


PINGS = SimConfig(n_symbols=3, limits=_limits(ping_interval_s=0.3, pong_timeout_s=1.0))


@pytest.mark.parametrize("sim", [PINGS], indirect=True)
@pytest.mark.parametrize(("market", "path"), [("spot", "/ws"), ("futures", "/market/ws")])
async def test_server_pings_and_pong_timeout(sim: Simulator, market: str, path: str) -> None:
    url = sim.urls[f"{market}_ws"] + path
    silent = await connect(url, Client, enable_auto_pong=False)
    answering = await connect(url, lambda: Probe(answer_pings=True), enable_auto_pong=False)
    start = time.monotonic()
    await asyncio.wait_for(silent.closed.wait(), T)
    took = time.monotonic() - start
    assert 0.9 <= took <= 2.5, took
    assert silent.pings >= 1
    assert silent.close_code is None  # cut off, no close frame
    await asyncio.sleep(0.8)
    assert not answering.closed.is_set()
    assert answering.pings >= 4  # ~every 0.3-0.5 s over ~2 s
    ws = (await stats(sim))["markets"][market]["ws"]
    assert ws["pong_timeout_total"] == 1
    assert ws["connections"] == 1


LIFETIME = SimConfig(n_symbols=3, limits=_limits(max_lifetime_s=1.5))


@pytest.mark.parametrize("sim", [LIFETIME], indirect=True)
async def test_max_lifetime_closes_connection(sim: Simulator) -> None:
    start = time.monotonic()
    client = await connect(sim.urls["futures_ws"] + "/market/ws/btcusdt@aggTrade")
    await asyncio.wait_for(client.closed.wait(), T)
    took = time.monotonic() - start
    assert 1.4 <= took <= 2.5, took
    assert client.close_code == WSCloseCode.GOING_AWAY
    ws = (await stats(sim))["markets"]["futures"]["ws"]
    assert ws["lifetime_closed_total"] == 1 and ws["connections"] == 0


# ---- 6. faults ----------------------------------------------------------------------------


async def test_drop_fault_disconnects_matching_clients(sim: Simulator) -> None:
    fut = await connect(sim.urls["futures_ws"] + "/market/ws/btcusdt@aggTrade")
    spot = await connect(sim.urls["spot_ws"] + "/ws/btcusdt@aggTrade")
    await fut.recv()
    reply = await post(sim.urls["admin"] + "/faults", {"kind": "drop", "market": "futures"})
    assert reply == {"applied": 1, "targets": [1]}
    await asyncio.wait_for(fut.closed.wait(), T)
    assert fut.close_code is None  # abrupt: no close frame
    await asyncio.sleep(0.2)
    later = await collect(spot, 0.3)  # still connected, data still flowing
    assert later and {m["e"] for m in later} == {"aggTrade"}
    assert not spot.closed.is_set()


async def test_drop_fault_by_symbol(sim: Simulator) -> None:
    btc = await connect(sim.urls["spot_ws"] + "/ws/btcusdt@aggTrade")
    eth = await connect(sim.urls["spot_ws"] + "/ws/ethusdt@depth@100ms")
    reply = await post(sim.urls["admin"] + "/faults", {"kind": "drop", "symbol": "ETHUSDT"})
    assert reply["targets"] == [1]
    await asyncio.wait_for(eth.closed.wait(), T)
    await asyncio.sleep(0.2)
    assert not btc.closed.is_set()


async def test_stall_fault_stops_data_and_pongs(sim: Simulator) -> None:
    client = await connect(sim.urls["futures_ws"] + "/market/ws/btcusdt@aggTrade", Probe)
    assert client.transport is not None
    await client.recv()
    client.transport.send_ping(b"before")
    await asyncio.sleep(0.2)
    assert client.pongs == 1
    reply = await post(sim.urls["admin"] + "/faults",
                       {"kind": "stall", "market": "futures", "duration": 1.5})
    stalled_at = time.monotonic()
    assert reply["targets"] == [1]
    await drain(client, 0.1)  # in flight before the stall
    client.transport.send_ping(b"during")
    assert await collect(client, 0.7) == []
    assert client.pongs == 1
    assert not client.closed.is_set()
    msg = await client.recv(T)  # resumes once the duration is over
    assert msg["e"] == "aggTrade"
    assert time.monotonic() - stalled_at >= 1.4
    client.transport.send_ping(b"after")
    await asyncio.sleep(0.2)
    assert client.pongs == 2


@pytest.mark.parametrize("market", ["spot", "futures"])
async def test_gap_fault_breaks_the_depth_chain(sim: Simulator, market: str) -> None:
    path = "/ws/btcusdt@depth@100ms" if market == "spot" else "/public/ws/btcusdt@depth@100ms"
    client = await connect(sim.urls[f"{market}_ws"] + path)
    events = [await client.recv() for _ in range(3)]
    reply = await post(sim.urls["admin"] + "/faults",
                       {"kind": "gap", "market": market, "symbol": "BTCUSDT"})
    assert reply["targets"] == [1]
    events += [await client.recv() for _ in range(8)]
    breaks = []
    for a, b in zip(events, events[1:], strict=False):
        if market == "spot":
            assert b["U"] >= a["u"] + 1
            ok = b["U"] == a["u"] + 1
        else:
            ok = b["pu"] == a["u"]
        if not ok:
            breaks.append(b)
    assert len(breaks) == 1
    st = await stats(sim)
    assert st["markets"][market]["skipped"] == {"btcusdt@depth@100ms": 1}


@pytest.mark.parametrize("market", ["spot", "futures"])
async def test_skip_trades_fault_rest_has_the_missing_trades(sim: Simulator, market: str) -> None:
    path = "/ws/btcusdt@aggTrade" if market == "spot" else "/market/ws/btcusdt@aggTrade"
    client = await connect(sim.urls[f"{market}_ws"] + path)
    stream = [await client.recv() for _ in range(3)]
    reply = await post(sim.urls["admin"] + "/faults",
                       {"kind": "skip_trades", "market": market, "symbol": "BTCUSDT", "count": 3})
    assert reply["targets"] == [1]
    gap = None
    end = time.monotonic() + T
    while gap is None and time.monotonic() < end:
        stream.append(await client.recv())
        a, b = stream[-2], stream[-1]
        assert b["a"] > a["a"]
        if b["a"] != a["a"] + 1:
            gap = (a, b)
    assert gap is not None
    before, after = gap
    missing = list(range(before["a"] + 1, after["a"]))
    assert len(missing) == 3
    stream += [await client.recv() for _ in range(2)]
    rest = sim.urls[f"{market}_rest"] + ("/api/v3/aggTrades" if market == "spot" else "/fapi/v1/aggTrades")
    status, trades, _ = await get(rest, symbol="BTCUSDT", fromId=missing[0], limit=3)
    assert status == 200
    assert [t["a"] for t in trades] == missing
    # A window around the gap: where the stream has the id, REST has the same fields/values.
    status, window, _ = await get(rest, symbol="BTCUSDT", fromId=stream[0]["a"], limit=len(stream) + 3)
    assert status == 200
    by_id = {t["a"]: t for t in window}
    assert set(missing) <= set(by_id)
    overlap = 0
    for ev in stream:
        rt = by_id.get(ev["a"])
        if rt is None:
            continue
        overlap += 1
        assert set(rt) == set(ev) - {"e", "E", "s"}, (rt, ev)
        assert {k: ev[k] for k in rt} == rt
    assert overlap == len(stream)
    # Trade ids continue across the gap: REST fills it exactly.
    chain = [before, *(by_id[i] for i in missing), after]
    for x, y in zip(chain, chain[1:], strict=False):
        assert y["f"] == x["l"] + 1
    assert (await stats(sim))["markets"][market]["skipped"] == {"btcusdt@aggTrade": 3}


@pytest.mark.parametrize("sim", [RELAXED], indirect=True)
@pytest.mark.parametrize("combined", [False, True])
async def test_bad_frame_faults(sim: Simulator, combined: bool) -> None:
    path = "/stream?streams=btcusdt@aggTrade" if combined else "/ws/btcusdt@aggTrade"
    client = await connect(sim.urls["spot_ws"] + path)
    await client.recv_raw()
    for i, kind in enumerate(["malformed", "non_json", "unknown_event"]):
        reply = await post(sim.urls["admin"] + "/faults", {"kind": kind, "market": "spot"})
        assert reply["targets"] == [1]
        frames = await collect_raw(client, 0.3)
        odd = []
        for raw in frames:
            try:
                msg = orjson.loads(raw)
            except orjson.JSONDecodeError:
                odd.append(raw)
                continue
            if event_of(msg)["e"] != "aggTrade":
                odd.append(raw)
            else:
                assert ("stream" in msg) == combined
        assert len(odd) == 1, (kind, odd)
        bad = odd[0]
        if kind == "malformed":
            assert bad.startswith(b'{"e":"aggTrade"')
        elif kind == "non_json":
            assert not bad.lstrip().startswith((b"{", b"["))
        else:
            msg = orjson.loads(bad)
            assert ("stream" in msg) == combined
            assert event_of(msg)["e"] == "mysteryEvent"
        # Still working: requests answered, data flowing.
        assert await request(client, i, "LIST_SUBSCRIPTIONS") == {"result": ["btcusdt@aggTrade"], "id": i}
        assert event_of(await until(client, is_data))["e"] == "aggTrade"
    assert not client.closed.is_set()


# ---- 7. admin /stats ------------------------------------------------------------------------


@pytest.mark.parametrize("market", ["spot", "futures"])
async def test_stats_match_what_the_client_received(market: str) -> None:
    async with Simulator(SimConfig(n_symbols=3, markets=(market,))) as sim:  # type: ignore[arg-type]
        if market == "spot":
            clients = [await connect(sim.urls["spot_ws"]
                                     + "/stream?streams=btcusdt@aggTrade/ethusdt@depth@100ms")]
        else:
            clients = [await connect(sim.urls["futures_ws"] + "/market/stream?streams=btcusdt@aggTrade"),
                       await connect(sim.urls["futures_ws"] + "/public/stream?streams=ethusdt@depth@100ms")]
        await asyncio.sleep(1.2)
        await post(sim.urls["admin"] + "/pause")
        counts: dict[str, int] = {}
        last: dict[str, int] = {}
        for client in clients:
            for msg in await drain(client):
                name, ev = msg["stream"], msg["data"]
                counts[name] = counts.get(name, 0) + 1
                last[name] = ev["a"] if ev["e"] == "aggTrade" else ev["u"]
        assert set(counts) == {"btcusdt@aggTrade", "ethusdt@depth@100ms"}
        streams = (await stats(sim))["markets"][market]["streams"]
        assert streams == {n: {"sent": counts[n], "last_id": last[n]} for n in counts}
        assert (await stats(sim))["paused"] is True


# ---- 8. scheduled faults --------------------------------------------------------------------


async def test_scheduled_drop() -> None:
    config = SimConfig(n_symbols=3, faults=parse_faults("drop@0.5s:market=spot"))
    async with Simulator(config) as sim:
        spot = await connect(sim.urls["spot_ws"] + "/ws/btcusdt@aggTrade")
        fut = await connect(sim.urls["futures_ws"] + "/market/ws/btcusdt@aggTrade")
        await asyncio.wait_for(spot.closed.wait(), T)
        at = time.monotonic() - sim.started_at
        assert 0.45 <= at <= 1.5, at
        assert spot.close_code is None
        await asyncio.sleep(0.3)
        assert not fut.closed.is_set()
        later = await collect(fut, 0.3)
        assert later and {m["e"] for m in later} == {"aggTrade"}
