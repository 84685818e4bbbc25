"""The market model on its own: determinism, consistency of trades with the book."""

from __future__ import annotations

import orjson

from ingestor.sim.model import MarketModel, ModelParams
from ingestor.sim.universe import build_universe

START = 1_700_000_000_000


def _run(market: str, seed: int, seconds: int = 20) -> list[tuple[str, bytes]]:
    model = MarketModel(market, build_universe(None, 4), seed,  # type: ignore[arg-type]
                        ModelParams(rate=300, cascade_every_s=2, panic_every_s=5), START)
    out: list[tuple[str, bytes]] = []
    model.wants = lambda name: True
    model.emit = lambda name, payload, seq: out.append((name, payload))
    model.advance_to(START + seconds * 1000)
    return out


def test_same_seed_same_sequence_and_different_seed_differs() -> None:
    for market in ("spot", "futures"):
        a, b, c = _run(market, 11), _run(market, 11), _run(market, 12)
        assert len(a) > 1000
        assert a == b
        assert a != c


def test_trades_are_consecutive_and_walk_the_book() -> None:
    events = _run("futures", 5, 30)
    trades = [orjson.loads(p) for n, p in events if n == "btcusdt@aggTrade"]
    assert len(trades) > 200
    for x, y in zip(trades, trades[1:], strict=False):
        assert y["a"] == x["a"] + 1
        assert y["f"] == x["l"] + 1
    # A taker that sells hits bids: consecutive prints of one sell order never go up.
    buys = [t for t in trades if not t["m"]]
    sells = [t for t in trades if t["m"]]
    assert buys and sells
    kinds = {n.split("@", 1)[1] if not n.startswith("!") else n for n, _p in events}
    assert {"aggTrade", "depth", "depth@100ms", "depth@500ms", "markPrice", "markPrice@1s",
            "forceOrder", "!forceOrder@arr", "!markPrice@arr", "!markPrice@arr@1s"} <= kinds


def test_force_orders_at_most_one_per_symbol_per_second() -> None:
    events = _run("futures", 9, 60)
    seen: set[tuple[str, int]] = set()
    count = 0
    for name, payload in events:
        if name == "!forceOrder@arr":
            ev = orjson.loads(payload)
            key = (ev["o"]["s"], ev["E"] // 1000)
            assert key not in seen
            seen.add(key)
            count += 1
    assert count > 5


def test_book_never_crosses_and_keeps_its_depth() -> None:
    model = MarketModel("spot", build_universe(None, 3), 2, ModelParams(rate=2000), START)
    for second in range(1, 31):
        model.advance_to(START + second * 1000)
        for book in model.books.values():
            assert max(book.bids) == book.best_bid < book.best_ask == min(book.asks)
            assert 1000 <= len(book.bids) <= 1.25 * 1500 + 50
