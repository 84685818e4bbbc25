"""Stream names, routing, fault specs and the book-sync procedure, as tables (no I/O)."""

from __future__ import annotations

import pytest

from ingestor.binance.depth_sync import DepthGap, DepthSync
from ingestor.binance.streams import (
    StreamNameError,
    delivers_on,
    parse_stream,
    split_ws_path,
)
from ingestor.sim.encode import fixed
from ingestor.sim.faults import Fault, FaultSpecError, parse_faults


@pytest.mark.parametrize(
    ("name", "market", "kind", "symbol", "speed", "route"),
    [
        ("btcusdt@aggTrade", "spot", "aggTrade", "BTCUSDT", None, "spot"),
        ("btcusdt@depth", "spot", "depth", "BTCUSDT", 1000, "spot"),
        ("btcusdt@depth@100ms", "spot", "depth", "BTCUSDT", 100, "spot"),
        ("btcusdt@depth", "futures", "depth", "BTCUSDT", 250, "public"),
        ("btcusdt@depth@500ms", "futures", "depth", "BTCUSDT", 500, "public"),
        ("btcusdt@depth@100ms", "futures", "depth", "BTCUSDT", 100, "public"),
        ("btcusdt@aggTrade", "futures", "aggTrade", "BTCUSDT", None, "market"),
        ("btcusdt@markPrice", "futures", "markPrice", "BTCUSDT", 3000, "market"),
        ("btcusdt@markPrice@1s", "futures", "markPrice", "BTCUSDT", 1000, "market"),
        ("!markPrice@arr", "futures", "markPrice", None, 3000, "market"),
        ("!markPrice@arr@1s", "futures", "markPrice", None, 1000, "market"),
        ("btcusdt@forceOrder", "futures", "forceOrder", "BTCUSDT", 1000, "market"),
        ("!forceOrder@arr", "futures", "forceOrder", None, 1000, "market"),
    ],
)
def test_parse_stream(name: str, market: str, kind: str, symbol: str | None, speed: int | None,
                      route: str) -> None:
    spec = parse_stream(name, market)  # type: ignore[arg-type]
    assert (spec.kind, spec.symbol, spec.speed_ms, spec.route) == (kind, symbol, speed, route)


@pytest.mark.parametrize(
    ("name", "market"),
    [
        ("btcusdt@depth@500ms", "spot"),  # spot has 1000 ms and 100 ms only
        ("btcusdt@depth@250ms", "futures"),  # 250 ms is the unsuffixed default
        ("btcusdt@markPrice", "spot"),
        ("!forceOrder@arr", "spot"),
        ("BTCUSDT@aggTrade", "spot"),  # symbols are lower case
        ("btcusdt@aggTrade@1s", "futures"),
        ("btcusdt", "futures"),
        ("@aggTrade", "futures"),
        ("btcusdt@kline", "futures"),
        ("!markPrice@arr@3s", "futures"),
    ],
)
def test_parse_stream_rejects(name: str, market: str) -> None:
    with pytest.raises(StreamNameError):
        parse_stream(name, market)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("path", "market", "expected"),
    [
        ("/ws/btcusdt@aggTrade", "spot", ("spot", "ws", "btcusdt@aggTrade")),
        ("/stream?streams=a/b", "spot", ("spot", "stream", "streams=a/b")),
        ("/public/ws/btcusdt@depth", "futures", ("public", "ws", "btcusdt@depth")),
        ("/market/stream?streams=a", "futures", ("market", "stream", "streams=a")),
        ("/ws/btcusdt@depth", "futures", ("legacy", "ws", "btcusdt@depth")),
        ("/stream?streams=x", "futures", ("legacy", "stream", "streams=x")),
        ("/ws", "spot", ("spot", "ws", "")),
        ("/private/ws/x", "futures", None),
        ("/api/v3/depth", "spot", None),
    ],
)
def test_split_ws_path(path: str, market: str, expected: tuple[str, str, str] | None) -> None:
    assert split_ws_path(path, market) == expected  # type: ignore[arg-type]


def test_legacy_futures_paths_deliver_public_streams_only() -> None:
    depth = parse_stream("btcusdt@depth", "futures")
    trades = parse_stream("btcusdt@aggTrade", "futures")
    assert delivers_on(depth, "legacy") and not delivers_on(trades, "legacy")
    assert delivers_on(depth, "public") and not delivers_on(depth, "market")
    assert delivers_on(trades, "market") and not delivers_on(trades, "public")
    assert delivers_on(parse_stream("btcusdt@aggTrade", "spot"), "spot")


@pytest.mark.parametrize(
    ("n", "dp", "text"),
    [(12345, 2, "123.45"), (5, 3, "0.005"), (0, 8, "0.00000000"), (7, 0, "7"), (-15, 1, "-1.5"),
     (650000, 1, "65000.0")],
)
def test_fixed(n: int, dp: int, text: str) -> None:
    assert fixed(n, dp) == text


def test_parse_faults() -> None:
    faults = parse_faults("drop@5s/30s:market=futures, gap@250ms:symbol=btcusdt:count=2,"
                          "rest_slow@1m:delay=2000:count=3,stall@2s:duration=1.5")
    assert faults == (
        Fault("drop", 5.0, 30.0, "futures"),
        Fault("gap", 0.25, None, None, "BTCUSDT", 2),
        Fault("rest_slow", 60.0, count=3, delay=2000),
        Fault("stall", 2.0, duration=1.5),
    )
    assert parse_faults("") == ()


@pytest.mark.parametrize("spec", ["explode@1s", "drop", "drop@xs", "drop@1s:market=options",
                                  "drop@1s:count=0", "drop@1s:colour=red", "drop@1s:count",
                                  "drop@1s/0s"])
def test_parse_faults_rejects(spec: str) -> None:
    with pytest.raises(FaultSpecError):
        parse_faults(spec)


def test_fault_from_dict_rejects_unknown_keys() -> None:
    with pytest.raises(FaultSpecError, match="colour"):
        Fault.from_dict({"kind": "drop", "colour": "red"})
    assert Fault.from_dict({"kind": "gap", "count": 3}).count == 3


def _ev(U: int, u: int, pu: int | None = None, b: list[list[str]] | None = None) -> dict:  # noqa: N803
    ev = {"s": "X", "U": U, "u": u, "b": b or [], "a": []}
    if pu is not None:
        ev["pu"] = pu
    return ev


def test_spot_sync_drops_stale_applies_in_order_and_detects_gaps() -> None:
    sync = DepthSync("spot")
    sync.on_event(_ev(95, 100, b=[["1.0", "5"]]))
    sync.on_event(_ev(101, 105, b=[["1.0", "7"]]))
    sync.on_event(_ev(106, 110, b=[["2.0", "1"]]))
    assert sync.on_snapshot({"lastUpdateId": 103, "bids": [["1.0", "3"]], "asks": []})
    assert sync.book is not None
    assert sync.book.bids == {"1.0": "7", "2.0": "1"}  # 95-100 dropped as stale
    assert sync.book.last_update_id == 110
    assert not sync.on_event(_ev(100, 108))  # old: ignored
    with pytest.raises(DepthGap):
        sync.on_event(_ev(112, 115))  # 111 missing
    older = DepthSync("spot")
    older.on_event(_ev(200, 210))
    assert not older.on_snapshot({"lastUpdateId": 150, "bids": [], "asks": []})  # fetch again


def test_futures_sync_uses_pu() -> None:
    sync = DepthSync("futures")
    sync.on_event(_ev(90, 99, 80))
    sync.on_event(_ev(103, 120, 99, b=[["1.0", "2"]]))
    sync.on_event(_ev(125, 130, 120, b=[["1.0", "0"], ["0.9", "4"]]))
    assert sync.on_snapshot({"lastUpdateId": 110, "bids": [["1.0", "1"]], "asks": []})
    assert sync.book is not None and sync.book.bids == {"0.9": "4"}
    assert sync.applied == 2
    with pytest.raises(DepthGap):
        sync.on_event(_ev(140, 150, 135))  # pu should be 130
    # A snapshot older than everything buffered cannot be bridged: fetch another one.
    late = DepthSync("futures")
    late.on_event(_ev(300, 310, 290))
    assert not late.on_snapshot({"lastUpdateId": 250, "bids": [], "asks": []})
    assert not late.synced
