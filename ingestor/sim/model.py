"""The simulated market: per-symbol order books, trades, diffs, mark prices, liquidations.

Everything is integer: prices in ticks (``10**-price_dp``), quantities in lots
(``10**-qty_dp``). The model advances in fixed 10 ms steps of *model* time, so the
message sequence depends only on the seed and the start time, never on how fast the
host runs (a late loop runs several steps at once).

Consistency the tests rely on:
- every book change gets an update id; a diff event for stream speed S carries the
  absolute quantity of every level changed since that stream's previous event
  (``U`` = first id, ``u`` = last id, USD-M ``pu`` = previous event's ``u``), so
  snapshot + diffs rebuilds exactly this book;
- trades consume book levels: a taker walks the book, one aggTrade per price level,
  consecutive ``a`` ids, ``m`` true when the taker sold;
- liquidations are taker orders too (they move the price), and the forceOrder stream
  pushes at most the latest one per symbol per second, as Binance documents.
"""

from __future__ import annotations

import random
from bisect import bisect_right
from collections.abc import Callable
from dataclasses import dataclass
from operator import itemgetter

from ingestor.binance.streams import DEPTH_SPEEDS, Market
from ingestor.sim import encode
from ingestor.sim.universe import SymbolSpec

STEP_MS = 10
FUNDING_INTERVAL_MS = 8 * 3600 * 1000

Emit = Callable[[str, bytes, int], None]  # (stream name, payload, sequence id)
Wants = Callable[[str], bool]


@dataclass(frozen=True, slots=True)
class ModelParams:
    """Activity knobs. ``rate`` is calm-regime aggTrade messages per second across the
    market; panic regimes multiply it."""

    rate: float = 200.0
    book_levels: int = 1500
    changes_per_trade: float = 3.0
    panic_every_s: float = 120.0
    panic_duration_s: float = 20.0
    panic_rate_mult: float = 4.0
    cascade_every_s: float = 60.0
    trade_history: int = 50_000


class Book:
    """One symbol's state. Plain dicts of tick -> lots: the simulator needs exact,
    inspectable state more than speed here."""

    __slots__ = (
        "spec", "bids", "asks", "best_bid", "best_ask", "uid", "log", "last_u",
        "agg_id", "trade_id", "trades", "last_change_ms", "liq", "liq_queue",
        "oi_lots", "basis", "funding", "n_agg", "n_depth", "n_mark", "n_force", "volume_lots",
    )

    def __init__(self, spec: SymbolSpec, market: Market, levels: int, rng: random.Random) -> None:
        self.spec = spec
        mid = spec.start_ticks
        self.bids: dict[int, int] = {mid - 1 - i: _rand_qty(rng, spec, i) for i in range(levels)}
        self.asks: dict[int, int] = {mid + 1 + i: _rand_qty(rng, spec, i) for i in range(levels)}
        self.best_bid = mid - 1
        self.best_ask = mid + 1
        self.uid = rng.randrange(10**6, 10**9)
        self.log: list[tuple[int, int, int, int]] = []  # (uid, side 0=bid 1=ask, tick, lots)
        self.last_u = {speed: self.uid for speed in DEPTH_SPEEDS[market].values()}
        self.agg_id = rng.randrange(10**5, 10**8)
        self.trade_id = self.agg_id * 3
        self.trades: list[tuple[int, int, int, int, int, int, bool]] = []
        self.last_change_ms = 0
        self.liq: tuple[str, int, int, int, int] | None = None  # side, lots, limit, avg, T
        self.liq_queue: list[tuple[int, str, int]] = []  # (due ms, side, lots)
        self.oi_lots = _lots(spec, 5_000_000 * spec.weight * 10 + 50_000)
        self.basis = 0.0
        self.funding = 0.0001
        self.volume_lots = 0
        low = spec.lower
        self.n_agg = f"{low}@aggTrade"
        self.n_depth = {speed: f"{low}@depth" + (f"@{sfx}" if sfx else "")
                        for sfx, speed in DEPTH_SPEEDS[market].items()}
        self.n_mark = {1000: f"{low}@markPrice@1s", 3000: f"{low}@markPrice"}
        self.n_force = f"{low}@forceOrder"

    def set_level(self, side: int, tick: int, lots: int, uid: int, now: int) -> None:
        book = self.asks if side else self.bids
        if lots:
            book[tick] = lots
        else:
            book.pop(tick, None)
        self.log.append((uid, side, tick, lots))
        self.last_change_ms = now

    def top(self, side: int, n: int) -> list[tuple[int, int]]:
        book = self.asks if side else self.bids
        keys = sorted(book, reverse=not side)[:n]
        return [(k, book[k]) for k in keys]


def _lots(spec: SymbolSpec, notional_usd: float) -> int:
    price = spec.start_ticks / 10**spec.price_dp
    return max(1, int(notional_usd / price * 10**spec.qty_dp))


def _rand_qty(rng: random.Random, spec: SymbolSpec, depth: int) -> int:
    # Thicker a little away from the touch, as real books are.
    return _lots(spec, rng.lognormvariate(7.5, 1.0) * (1 + min(depth, 50) / 25))


class MarketModel:
    """All symbols of one market, advanced step by step."""

    def __init__(
        self, market: Market, symbols: tuple[SymbolSpec, ...], seed: int, params: ModelParams,
        start_ms: int,
    ) -> None:
        self.market = market
        self.params = params
        self.rng = random.Random(f"{seed}:{market}")
        self.books = {s.symbol: Book(s, market, params.book_levels, self.rng) for s in symbols}
        self.t = start_ms - start_ms % 1000
        for book in self.books.values():
            book.last_change_ms = self.t  # USD-M snapshots carry T from the start
        self.panic_until = 0
        self.panic_side = "SELL"
        self.futures = market == "futures"
        self.emit: Emit = lambda name, payload, seq: None
        self.wants: Wants = lambda name: False

    @property
    def panic(self) -> bool:
        return self.t < self.panic_until

    # ---- formatting -------------------------------------------------------------

    def px(self, spec: SymbolSpec, ticks: int) -> str:
        return encode.fixed(ticks * 10 ** (8 - spec.price_dp), 8) if not self.futures \
            else encode.fixed(ticks, spec.price_dp)

    def qty(self, spec: SymbolSpec, lots: int) -> str:
        return encode.fixed(lots * 10 ** (8 - spec.qty_dp), 8) if not self.futures \
            else encode.fixed(lots, spec.qty_dp)

    # ---- stepping ---------------------------------------------------------------

    def advance_to(self, now_ms: int) -> int:
        """Run every whole step up to ``now_ms``; returns the number of steps run."""
        n = 0
        while self.t + STEP_MS <= now_ms:
            self.step()
            n += 1
        return n

    def step(self) -> None:
        self.t += STEP_MS
        t = self.t
        rng = self.rng
        p = self.params
        dt = STEP_MS / 1000.0
        if not self.panic and rng.random() < dt / p.panic_every_s:
            self.panic_until = t + int(p.panic_duration_s * 1000)
            self.panic_side = rng.choice(("SELL", "BUY"))
        mult = p.panic_rate_mult if self.panic else 1.0
        for book in self.books.values():
            lam = p.rate * book.spec.weight * dt * mult
            n = int(lam) + (rng.random() < lam - int(lam))
            for _ in range(n):
                self._taker(book, t, *self._order(book, mult))
            changes = lam * p.changes_per_trade + 0.05
            n_changes = int(changes) + (rng.random() < changes - int(changes))
            for _ in range(n_changes):
                self._maker(book, t)
            if self.futures:
                self._liquidations(book, t, dt)
            if t % 1000 == 0:
                self._keep_depth(book, t)
        for speed in DEPTH_SPEEDS[self.market].values():
            if t % speed == 0:
                for book in self.books.values():
                    self._emit_depth(book, speed, t)
        if t % 1000 == 0:
            for book in self.books.values():
                book.log.clear()  # every speed divides 1000 ms: all have emitted
            if self.futures:
                self._emit_force_orders(t)
                self._emit_mark_prices(t, 1000)
                if t % 3000 == 0:
                    self._emit_mark_prices(t, 3000)

    def _order(self, book: Book, mult: float) -> tuple[bool, int]:
        rng = self.rng
        bias = 0.0
        if self.panic:
            bias = 0.15 if self.panic_side == "BUY" else -0.15
        buy = rng.random() < 0.5 + bias
        lots = _lots(book.spec, rng.lognormvariate(5.0, 1.2) * (2.0 if mult > 1 else 1.0))
        return buy, lots

    def _next_uid(self, book: Book) -> int:
        # USD-M update ids are shared across the venue, so a symbol's ids jump; spot's
        # are per symbol and consecutive.
        book.uid += 1 + (self.rng.randrange(4) if self.futures else 0)
        return book.uid

    def _taker(self, book: Book, t: int, buy: bool, lots: int) -> tuple[int, int]:
        """Walk the book; returns (filled lots, worst tick)."""
        side = 1 if buy else 0  # the side being consumed: asks for a buy
        levels = book.asks if buy else book.bids
        filled = 0
        notional = 0
        tick = book.best_ask if buy else book.best_bid
        s = book.spec
        while lots > 0 and levels:
            avail = levels.get(tick)
            if avail is None:
                tick = self._next_best(book, side)
                continue
            fill = min(avail, lots)
            lots -= fill
            filled += fill
            notional += fill * tick
            book.set_level(side, tick, avail - fill, self._next_uid(book), t)
            book.agg_id += 1
            n_fills = 1 + self.rng.randrange(3)
            first = book.trade_id + 1
            book.trade_id += n_fills
            rec = (book.agg_id, tick, fill, first, book.trade_id, t - 1, not buy)
            self._record_trade(book, rec)
            if self.wants(book.n_agg):
                f = encode.agg_trade_futures if self.futures else encode.agg_trade_spot
                self.emit(book.n_agg, f(t, s.symbol, rec[0], self.px(s, tick), self.qty(s, fill),
                                        first, book.trade_id, t - 1, not buy), rec[0])
            if avail == fill:
                tick = self._next_best(book, side)
        return filled, (notional // filled if filled else tick)

    def _record_trade(self, book: Book, rec: tuple[int, int, int, int, int, int, bool]) -> None:
        book.trades.append(rec)
        book.volume_lots += rec[2]
        if len(book.trades) > self.params.trade_history:
            del book.trades[: len(book.trades) // 2]

    def _next_best(self, book: Book, side: int) -> int:
        """Move the touch past an emptied level (the far end is refilled once a second)."""
        levels = book.asks if side else book.bids
        step = 1 if side else -1
        tick = book.best_ask if side else book.best_bid
        while levels and tick not in levels:
            tick += step
        if side:
            book.best_ask = tick
        else:
            book.best_bid = tick
        return tick

    def _keep_depth(self, book: Book, t: int) -> None:
        """Hold each side near ``book_levels``: refill the far end, trim what drifted away."""
        n = self.params.book_levels
        for side in (0, 1):
            levels = book.asks if side else book.bids
            step = 1 if side else -1
            if len(levels) < n:
                far = (max(levels) if side else min(levels)) if levels else \
                    (book.best_ask if side else book.best_bid)
                for i in range(1, n - len(levels) + 1):
                    book.set_level(side, far + i * step, _rand_qty(self.rng, book.spec, 50),
                                   self._next_uid(book), t)
                self._next_best(book, side)
            elif len(levels) > n * 1.25:
                far_ticks = sorted(levels, reverse=not side)[n:]
                for tick in far_ticks:
                    book.set_level(side, tick, 0, self._next_uid(book), t)

    def _maker(self, book: Book, t: int) -> None:
        rng = self.rng
        side = rng.randrange(2)
        spread = book.best_ask - book.best_bid
        if spread > 1 and rng.random() < 0.5:
            # Someone improves the touch.
            tick = book.best_ask - 1 if side else book.best_bid + 1
            book.set_level(side, tick, _rand_qty(rng, book.spec, 0), self._next_uid(book), t)
            if side:
                book.best_ask = tick
            else:
                book.best_bid = tick
            return
        off = int(rng.expovariate(0.15))
        tick = book.best_ask + off if side else book.best_bid - off
        levels = book.asks if side else book.bids
        if rng.random() < 0.25 and tick in levels and len(levels) > 10:
            book.set_level(side, tick, 0, self._next_uid(book), t)
            if tick == (book.best_ask if side else book.best_bid):
                self._next_best(book, side)
        else:
            book.set_level(side, tick, _rand_qty(rng, book.spec, off), self._next_uid(book), t)

    def _liquidations(self, book: Book, t: int, dt: float) -> None:
        rng = self.rng
        rate = 1.0 / self.params.cascade_every_s * (5.0 if self.panic else 1.0)
        if not book.liq_queue and rng.random() < rate * dt * (0.3 + book.spec.weight):
            side = self.panic_side if self.panic else rng.choice(("SELL", "BUY"))
            due = t
            for _ in range(rng.randrange(3, 16)):
                due += rng.randrange(50, 600)
                book.liq_queue.append((due, side, _lots(book.spec, rng.lognormvariate(8.5, 1.0))))
        while book.liq_queue and book.liq_queue[0][0] <= t:
            _, side, lots = book.liq_queue.pop(0)
            filled, avg = self._taker(book, t, side == "BUY", lots)
            if filled:
                # The order's limit is the bankruptcy price, beyond the average fill.
                limit = avg + max(1, avg // 200) * (1 if side == "BUY" else -1)
                book.liq = (side, filled, limit, avg, t - 1)
                book.oi_lots = max(1, book.oi_lots - filled)

    def _emit_depth(self, book: Book, speed: int, t: int) -> None:
        last_u = book.last_u[speed]
        if book.uid == last_u:
            return  # nothing changed: Binance pushes no empty diff
        name = book.n_depth[speed]
        if self.wants(name):
            start = bisect_right(book.log, last_u, key=itemgetter(0))
            seg = book.log[start:]
            bids: dict[int, int] = {}
            asks: dict[int, int] = {}
            for _, side, tick, lots in seg:
                (asks if side else bids)[tick] = lots
            s = book.spec
            b = [(self.px(s, k), self.qty(s, bids[k])) for k in sorted(bids, reverse=True)]
            a = [(self.px(s, k), self.qty(s, asks[k])) for k in sorted(asks)]
            if self.futures:
                payload = encode.depth_update_futures(t, book.last_change_ms, s.symbol, seg[0][0],
                                                      book.uid, last_u, b, a)
            else:
                payload = encode.depth_update_spot(t, s.symbol, seg[0][0], book.uid, b, a)
            self.emit(name, payload, book.uid)
        book.last_u[speed] = book.uid

    def _emit_force_orders(self, t: int) -> None:
        for book in self.books.values():
            if book.liq is None:
                continue
            side, lots, limit, avg, trade_t = book.liq
            book.liq = None
            s = book.spec
            payload = encode.force_order(t, s.symbol, side, self.qty(s, lots), self.px(s, limit),
                                         self.px(s, avg), trade_t)
            for name in (book.n_force, "!forceOrder@arr"):
                if self.wants(name):
                    self.emit(name, payload, t)

    def mark_fields(self, book: Book) -> tuple[str, str, str, str, int]:
        """(mark, index, estimated settle, funding rate, next funding time)."""
        s = book.spec
        mid8 = (book.best_bid + book.best_ask) * 10 ** (8 - s.price_dp) // 2
        index8 = int(mid8 * (1 - book.basis / 2))
        mark8 = int(mid8 * (1 + book.basis / 2))
        nxt = (self.t // FUNDING_INTERVAL_MS + 1) * FUNDING_INTERVAL_MS
        return (encode.fixed(mark8, 8), encode.fixed(index8, 8), encode.fixed(index8, 8),
                encode.fixed(round(book.funding * 10**8), 8), nxt)

    def _emit_mark_prices(self, t: int, speed: int) -> None:
        arr_name = "!markPrice@arr@1s" if speed == 1000 else "!markPrice@arr"
        want_arr = self.wants(arr_name)
        items = []
        for book in self.books.values():
            if speed == 1000:  # the basis and funding drift once a second
                book.basis = max(-0.002, min(0.002, book.basis + self.rng.gauss(0, 0.0001)))
                book.funding = max(-0.0075, min(0.0075, book.funding + self.rng.gauss(0, 2e-6)))
            name = book.n_mark[speed]
            if want_arr or self.wants(name):
                p, i, est, r, nxt = self.mark_fields(book)
                item = encode.mark_price(t, book.spec.symbol, p, i, est, r, nxt)
                items.append(item)
                if self.wants(name):
                    self.emit(name, item.encode(), t)
        if want_arr and items:
            self.emit(arr_name, encode.mark_price_array(items), t)

    # ---- REST views ---------------------------------------------------------------

    def depth_snapshot(self, symbol: str, limit: int) -> bytes:
        book = self.books[symbol]
        s = book.spec
        bids = [(self.px(s, k), self.qty(s, v)) for k, v in book.top(0, limit)]
        asks = [(self.px(s, k), self.qty(s, v)) for k, v in book.top(1, limit)]
        if self.futures:
            return encode.rest_depth(book.uid, bids, asks, self.t, book.last_change_ms)
        return encode.rest_depth(book.uid, bids, asks)

    def agg_trades(
        self, symbol: str, from_id: int | None, start: int | None, end: int | None, limit: int
    ) -> bytes:
        book = self.books[symbol]
        trades = book.trades
        if from_id is not None:
            i = max(0, from_id - trades[0][0]) if trades else 0
            sel = trades[i : i + limit]
            if end is not None:
                sel = [x for x in sel if x[5] <= end]
        elif start is not None:
            i = bisect_right(trades, start - 1, key=itemgetter(5))
            sel = [x for x in trades[i : i + limit] if end is None or x[5] <= end]
        elif end is not None:
            j = bisect_right(trades, end, key=itemgetter(5))
            sel = trades[max(0, j - limit) : j]
        else:
            sel = trades[-limit:]
        s = book.spec
        f = encode.rest_agg_trade_futures if self.futures else encode.rest_agg_trade_spot
        return ("[" + ",".join(f(a, self.px(s, p), self.qty(s, q), fi, li, tt, m)
                               for a, p, q, fi, li, tt, m in sel) + "]").encode()

    def open_interest(self, symbol: str) -> bytes:
        book = self.books[symbol]
        return (f'{{"openInterest":"{encode.fixed(book.oi_lots, book.spec.qty_dp)}",'
                f'"symbol":"{symbol}","time":{self.t}}}').encode()

    def quote_volume_24h(self, symbol: str) -> float:
        """A stable 24 h quote volume: the activity share scaled, plus what traded here."""
        book = self.books[symbol]
        s = book.spec
        price = (book.best_bid + book.best_ask) / 2 / 10**s.price_dp
        return s.weight * 5e9 + book.volume_lots / 10**s.qty_dp * price

    def mid(self, symbol: str) -> float:
        b = self.books[symbol]
        return (b.best_bid + b.best_ask) / 2 / 10**b.spec.price_dp

