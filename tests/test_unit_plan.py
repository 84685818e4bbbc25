"""Unit tests of ``ingestor.binance.plan`` and ``ingestor.binance.universe``: symbol choice,
stream loads, dealing to shards, packing into connections."""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

import pytest

from ingestor.binance.plan import (
    ALL_MARKET_STREAMS,
    STREAMS_PER_CONNECTION,
    Connection,
    StreamLoad,
    deal,
    pack,
    plan,
    stream_loads,
)
from ingestor.binance.streams import Market
from ingestor.binance.universe import Universe, UniverseError, choose_symbols, trading_symbols

SUFFIX: dict[Market, str] = {"spot": "@depth@100ms", "futures": "@depth@500ms"}


def universe(spot: tuple[str, ...] = (), futures: tuple[str, ...] = (),
             trades: dict[tuple[Market, str], float] | None = None) -> Universe:
    return Universe({"spot": spot, "futures": futures}, trades or {})


def load_of(loads: list[StreamLoad]) -> dict[tuple[str, str], float]:
    return {(x.market, x.name): x.msgs_per_s for x in loads}


# -- trading_symbols / choose_symbols -----------------------------------------------

def test_trading_symbols_keeps_only_trading() -> None:
    info = {"symbols": [
        {"symbol": "BTCUSDT", "status": "TRADING"},
        {"symbol": "LUNAUSDT", "status": "BREAK"},
        {"symbol": "ETHUSDT", "status": "TRADING"},
        {"symbol": "OLDUSDT", "status": "SETTLING"},
        {"symbol": "NOSTATUS"},
    ]}
    assert trading_symbols(info) == ["BTCUSDT", "ETHUSDT"]
    assert trading_symbols({}) == []


TRADING: dict[Market, list[str]] = {
    "spot": ["BTCUSDT", "ETHUSDT", "BNBUSDT", "SPOTONLY"],
    "futures": ["BTCUSDT", "ETHUSDT", "SOLUSDT", "FUTONLY"],
}
TICKERS: dict[Market, list[dict[str, Any]]] = {
    "spot": [
        {"symbol": "BTCUSDT", "quoteVolume": "900.5", "count": 86400},
        {"symbol": "ETHUSDT", "quoteVolume": "500", "count": 43200},
        {"symbol": "BNBUSDT", "quoteVolume": "700", "count": 8640},
        {"symbol": "SPOTONLY", "quoteVolume": "1", "count": 10},
        {"symbol": "DELISTED", "quoteVolume": "99999", "count": 99999},
    ],
    "futures": [
        {"symbol": "BTCUSDT", "quoteVolume": "100", "count": 864000},
        {"symbol": "ETHUSDT", "quoteVolume": "300", "count": 1000},
        {"symbol": "SOLUSDT", "quoteVolume": "200", "count": 2000},
        {"symbol": "FUTONLY", "quoteVolume": "not a number", "count": 5},
        {"quoteVolume": "1"},  # no symbol: skipped
    ],
}


def test_all_trading_symbols_by_default() -> None:
    u = choose_symbols(["spot", "futures"], TRADING, TICKERS)
    assert u.symbols == {"spot": ("BTCUSDT", "ETHUSDT", "BNBUSDT", "SPOTONLY"),
                         "futures": ("BTCUSDT", "ETHUSDT", "SOLUSDT", "FUTONLY")}
    assert u.count() == 8
    # Loads only for chosen symbols (DELISTED is not TRADING); FUTONLY's count is good even
    # though its volume is not; the row without a symbol is skipped.
    assert u.trades_per_day == {
        ("spot", "BTCUSDT"): 86400.0, ("spot", "ETHUSDT"): 43200.0, ("spot", "BNBUSDT"): 8640.0,
        ("spot", "SPOTONLY"): 10.0,
        ("futures", "BTCUSDT"): 864000.0, ("futures", "ETHUSDT"): 1000.0, ("futures", "SOLUSDT"): 2000.0,
        ("futures", "FUTONLY"): 5.0,
    }


def test_only_the_requested_markets() -> None:
    u = choose_symbols(["futures"], TRADING, TICKERS)
    assert u.symbols == {"futures": ("BTCUSDT", "ETHUSDT", "SOLUSDT", "FUTONLY")}
    assert all(m == "futures" for m, _ in u.trades_per_day)


def test_explicit_list_is_case_insensitive_and_keeps_its_order() -> None:
    u = choose_symbols(["spot", "futures"], TRADING, TICKERS, symbols=["ethusdt", "BtcUsdt"])
    assert u.symbols == {"spot": ("ETHUSDT", "BTCUSDT"), "futures": ("ETHUSDT", "BTCUSDT")}
    assert set(u.trades_per_day) == {("spot", "ETHUSDT"), ("spot", "BTCUSDT"),
                                     ("futures", "ETHUSDT"), ("futures", "BTCUSDT")}


def test_explicit_list_without_repeats() -> None:
    u = choose_symbols(["spot"], TRADING, TICKERS, symbols=["btcusdt", "BTCUSDT", "ethusdt"])
    assert u.symbols == {"spot": ("BTCUSDT", "ETHUSDT")}


def test_symbol_on_one_market_only_is_kept_there(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        u = choose_symbols(["spot", "futures"], TRADING, TICKERS, symbols=["spotonly", "futonly", "btcusdt"])
    assert u.symbols == {"spot": ("SPOTONLY", "BTCUSDT"), "futures": ("FUTONLY", "BTCUSDT")}
    assert "FUTONLY" in caplog.text and "SPOTONLY" in caplog.text


def test_unknown_symbol_error_names_it() -> None:
    with pytest.raises(UniverseError) as info:
        choose_symbols(["spot", "futures"], TRADING, TICKERS, symbols=["BTCUSDT", "nosuchusdt", "DELISTED"])
    msg = str(info.value)
    assert "NOSUCHUSDT" in msg and "DELISTED" in msg
    assert "BTCUSDT" not in msg


def test_symbol_of_an_unrequested_market_is_unknown() -> None:
    with pytest.raises(UniverseError, match="SPOTONLY"):
        choose_symbols(["futures"], TRADING, TICKERS, symbols=["SPOTONLY"])


def test_top_n_by_quote_volume_per_market() -> None:
    u = choose_symbols(["spot", "futures"], TRADING, TICKERS, top=2)
    # spot: BTC 900.5 > BNB 700 > ETH 500 > SPOTONLY 1 (DELISTED's 99999 does not count: not TRADING).
    # futures: ETH 300 > SOL 200 > BTC 100 > FUTONLY (bad volume row skipped: 0).
    assert u.symbols == {"spot": ("BTCUSDT", "BNBUSDT"), "futures": ("ETHUSDT", "SOLUSDT")}
    assert set(u.trades_per_day) == {("spot", "BTCUSDT"), ("spot", "BNBUSDT"),
                                     ("futures", "ETHUSDT"), ("futures", "SOLUSDT")}


def test_top_larger_than_the_market() -> None:
    u = choose_symbols(["futures"], TRADING, TICKERS, top=10)
    assert u.symbols == {"futures": ("ETHUSDT", "SOLUSDT", "BTCUSDT", "FUTONLY")}


def test_top_without_tickers_keeps_listing_order() -> None:
    u = choose_symbols(["spot"], TRADING, {}, top=3)
    assert u.symbols == {"spot": ("BTCUSDT", "ETHUSDT", "BNBUSDT")}
    assert u.trades_per_day == {}


def test_empty_result_is_an_error() -> None:
    with pytest.raises(UniverseError, match="no symbols"):
        choose_symbols(["spot", "futures"], {"spot": [], "futures": []}, {})
    with pytest.raises(UniverseError, match="no symbols"):
        choose_symbols([], TRADING, TICKERS)


# -- stream loads ---------------------------------------------------------------------

def test_stream_loads() -> None:
    u = universe(spot=("BTCUSDT",), futures=("BTCUSDT", "ETHUSDT"),
                 trades={("spot", "BTCUSDT"): 864000.0, ("futures", "BTCUSDT"): 172800.0,
                         ("futures", "ETHUSDT"): 100.0})
    loads = stream_loads(u, SUFFIX)
    assert load_of(loads) == {
        ("spot", "btcusdt@aggTrade"): 10.0,  # 864000 trades / 86400 s
        ("spot", "btcusdt@depth@100ms"): 10.0,  # one event per 100 ms
        ("futures", "btcusdt@aggTrade"): 2.0,
        ("futures", "btcusdt@depth@500ms"): 2.0,
        ("futures", "ethusdt@aggTrade"): 0.1,  # floor: 100 / 86400 < 0.1
        ("futures", "ethusdt@depth@500ms"): 2.0,
        ("futures", "!markPrice@arr@1s"): 1.0,
        ("futures", "!forceOrder@arr"): 0.5,
    }
    assert len(loads) == 8  # no duplicates


@pytest.mark.parametrize(("market", "suffix", "per_s"), [
    ("spot", "@depth", 1.0), ("spot", "@depth@100ms", 10.0),
    ("futures", "@depth", 4.0), ("futures", "@depth@500ms", 2.0), ("futures", "@depth@100ms", 10.0),
])
def test_depth_load_follows_its_speed(market: Market, suffix: str, per_s: float) -> None:
    u = Universe({market: ("XRPUSDT",)}, {})
    assert load_of(stream_loads(u, {market: suffix}))[(market, "xrpusdt" + suffix)] == per_s


def test_no_all_market_streams_without_symbols() -> None:
    loads = stream_loads(universe(spot=("BTCUSDT",)), SUFFIX)
    assert {x.name for x in loads} == {"btcusdt@aggTrade", "btcusdt@depth@100ms"}
    assert ALL_MARKET_STREAMS["spot"] == ()


# -- deal -----------------------------------------------------------------------------

def spread(shards: list[list[StreamLoad]]) -> float:
    totals = [sum(x.msgs_per_s for x in s) for s in shards]
    return max(totals) - min(totals)


def test_deal_by_hand() -> None:
    loads = [StreamLoad("spot", n, w) for n, w in (("a", 5.0), ("b", 4.0), ("c", 3.0), ("d", 3.0), ("e", 1.0))]
    shards = deal(loads, 2)
    # a 5 -> shard 0 (tie: lower); b 4 -> 1; c 3 -> 1 (4 < 5); d 3 -> 0 (5 < 7); e 1 -> 1 (7 < 8). 8 / 8.
    assert [[x.name for x in s] for s in shards] == [["a", "d"], ["b", "c", "e"]]
    assert spread(shards) == 0.0


def test_deal_ties_go_to_the_lower_shard_and_by_name() -> None:
    loads = [StreamLoad("spot", n, 1.0) for n in ("z", "y", "x", "w")]
    shards = deal(loads, 3)
    assert [[x.name for x in s] for s in shards] == [["w", "z"], ["x"], ["y"]]


def test_deal_balances_within_the_largest_stream() -> None:
    weights = [37.0, 1.0, 0.1, 12.5, 8.0, 8.0, 3.3, 21.0, 0.5, 0.5, 2.0, 9.9, 14.0, 0.1, 6.0, 5.5, 4.4]
    loads = [StreamLoad("futures" if i % 2 else "spot", f"s{i}@aggTrade", w) for i, w in enumerate(weights)]
    for n in (1, 2, 3, 4, 5, 8):
        shards = deal(loads, n)
        assert spread(shards) <= max(weights)
        assert sum(len(s) for s in shards) == len(loads)


def test_deal_every_stream_to_exactly_one_shard() -> None:
    u = universe(spot=tuple(f"S{i}USDT" for i in range(30)), futures=tuple(f"F{i}USDT" for i in range(40)),
                 trades={("spot", f"S{i}USDT"): 1000.0 * i for i in range(30)})
    loads = stream_loads(u, SUFFIX)
    shards = deal(loads, 4)
    dealt = Counter((x.market, x.name) for s in shards for x in s)
    assert dealt == Counter((x.market, x.name) for x in loads)
    assert set(dealt.values()) == {1}
    assert spread(shards) <= max(x.msgs_per_s for x in loads)


def test_deal_is_deterministic_whatever_the_input_order() -> None:
    loads = [StreamLoad("spot", f"s{i}@aggTrade", float(i % 4)) for i in range(20)]
    first = deal(loads, 3)
    assert deal(list(reversed(loads)), 3) == first
    assert deal(loads[7:] + loads[:7], 3) == first


def test_deal_more_shards_than_streams() -> None:
    loads = [StreamLoad("spot", "a", 2.0), StreamLoad("spot", "b", 1.0)]
    shards = deal(loads, 4)
    assert [[x.name for x in s] for s in shards] == [["a"], ["b"], [], []]


# -- pack and Connection.url ------------------------------------------------------------

def test_pack_separates_futures_routes_and_keeps_spot_plain() -> None:
    items = [
        StreamLoad("futures", "ethusdt@aggTrade", 1), StreamLoad("futures", "btcusdt@depth@500ms", 1),
        StreamLoad("futures", "!markPrice@arr@1s", 1), StreamLoad("futures", "!forceOrder@arr", 1),
        StreamLoad("futures", "btcusdt@aggTrade", 1), StreamLoad("futures", "ethusdt@depth@500ms", 1),
        StreamLoad("spot", "btcusdt@depth@100ms", 1), StreamLoad("spot", "btcusdt@aggTrade", 1),
    ]
    assert pack(items) == [
        Connection("futures", "market",
                   ("!forceOrder@arr", "!markPrice@arr@1s", "btcusdt@aggTrade", "ethusdt@aggTrade")),
        Connection("futures", "public", ("btcusdt@depth@500ms", "ethusdt@depth@500ms")),
        Connection("spot", "spot", ("btcusdt@aggTrade", "btcusdt@depth@100ms")),
    ]


def test_pack_respects_the_per_connection_limit() -> None:
    items = [StreamLoad("futures", f"s{i:03d}usdt@depth", 1.0) for i in range(7)]
    conns = pack(items, limit=3)
    assert [len(c.streams) for c in conns] == [3, 3, 1]
    assert {c.route for c in conns} == {"public"}
    assert [s for c in conns for s in c.streams] == sorted(x.name for x in items)


def test_pack_caps_at_the_market_limit() -> None:
    # USD-M allows 200 streams per connection: a larger limit is not used.
    items = [StreamLoad("futures", f"s{i:03d}usdt@aggTrade", 1.0) for i in range(450)]
    assert [len(c.streams) for c in pack(items, limit=1000)] == [200, 200, 50]
    spot = [StreamLoad("spot", f"s{i:04d}usdt@aggTrade", 1.0) for i in range(1100)]
    assert [len(c.streams) for c in pack(spot, limit=5000)] == [1024, 76]
    assert [len(c.streams) for c in pack(spot)] == [STREAMS_PER_CONNECTION] * 5 + [100]


def test_pack_nothing() -> None:
    assert pack([]) == []


@pytest.mark.parametrize(("conn", "base", "url"), [
    (Connection("futures", "public", ("btcusdt@depth@500ms",)), "wss://fstream.binance.com",
     "wss://fstream.binance.com/public/stream?streams=btcusdt@depth@500ms"),
    (Connection("futures", "market", ("btcusdt@aggTrade", "!markPrice@arr@1s")), "wss://fstream.binance.com/",
     "wss://fstream.binance.com/market/stream?streams=btcusdt@aggTrade/!markPrice@arr@1s"),
    (Connection("futures", "legacy", ("btcusdt@depth",)), "ws://127.0.0.1:9000",
     "ws://127.0.0.1:9000/stream?streams=btcusdt@depth"),
    (Connection("spot", "spot", ("btcusdt@aggTrade", "btcusdt@depth@100ms")), "wss://stream.binance.com:9443",
     "wss://stream.binance.com:9443/stream?streams=btcusdt@aggTrade/btcusdt@depth@100ms"),
])
def test_connection_url(conn: Connection, base: str, url: str) -> None:
    assert conn.url(base) == url


# -- plan -----------------------------------------------------------------------------

def test_plan_end_to_end_one_shard() -> None:
    u = universe(spot=("BTCUSDT",), futures=("ETHUSDT",))
    [shard] = plan(u, {"spot": "@depth", "futures": "@depth@500ms"}, 1)
    urls = [c.url("wss://fstream.binance.com" if c.market == "futures" else "wss://stream.binance.com:9443")
            for c in shard]
    assert urls == [
        "wss://fstream.binance.com/market/stream?streams=!forceOrder@arr/!markPrice@arr@1s/ethusdt@aggTrade",
        "wss://fstream.binance.com/public/stream?streams=ethusdt@depth@500ms",
        "wss://stream.binance.com:9443/stream?streams=btcusdt@aggTrade/btcusdt@depth",
    ]


def test_plan_end_to_end_several_shards() -> None:
    syms = tuple(f"S{i:02d}USDT" for i in range(12))
    u = universe(spot=syms, futures=syms, trades={("futures", s): 86400.0 * (i + 1) for i, s in enumerate(syms)})
    shards = plan(u, {"spot": "@depth@100ms", "futures": "@depth"}, 3, limit=5)
    streams = [(c.market, s) for conns in shards for c in conns for s in c.streams]
    # 12 spot x 2 + 12 futures x 2 + 2 all-market arrays, each exactly once.
    assert len(streams) == len(set(streams)) == 50
    assert ("futures", "s00usdt@depth") in streams and ("spot", "s00usdt@depth@100ms") in streams
    for conns in shards:
        for c in conns:
            assert 1 <= len(c.streams) <= 5
            for s in c.streams:
                kind = "depth" if "@depth" in s else "other"
                if c.market == "spot":
                    assert c.route == "spot"
                else:
                    assert c.route == ("public" if kind == "depth" else "market")


def test_plan_more_shards_than_streams() -> None:
    shards = plan(universe(spot=("BTCUSDT",)), SUFFIX, 4)
    assert shards == [[Connection("spot", "spot", ("btcusdt@depth@100ms",))],
                      [Connection("spot", "spot", ("btcusdt@aggTrade",))], [], []]
