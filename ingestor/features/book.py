"""The feature worker's order book: a dict per side, read as sorted numpy arrays.

What the feature worker does with a book: it applies every diff and reads the book only
at bar ends (the levels 4.5 and 4.6 use), at drift checks and when a consumer asks for
the best levels. So ``NumpyBook`` makes the update as cheap as Python allows and pays
for order only when order is asked for:

- each side is a ``dict`` price -> quantity (floats). ``apply`` runs one loop per side:
  two ``float()`` parses and one dict store or pop per level, nothing else (no array is
  made per diff, no numpy call: at 20-70 levels a diff, numpy's fixed cost per call and
  its string parse cost more than the whole loop);
- ``bids()``/``asks()`` sort the dict into float64 arrays when read, cached until the
  next ``apply`` (one sort per bar end, not one per diff);
- ``top(n)`` gives the best ``n`` levels of both sides without sorting the book: the
  first call starts keeping the best levels of each side in a short sorted list (the
  levels from the best price to a bound, so a level beyond the bound costs ``apply`` one
  comparison); a level added or removed inside the bound is put in or taken out by
  bisection; the list is refilled from the dict when it runs short and trimmed when it
  grows long. A book that is never asked for ``top`` never pays for it.

Syncing follows Binance's rules through ``ingestor.binance.depth_sync.DepthSync`` with
``book_factory=NumpyBook`` (see ``new_sync``), so Spot (``U``/``u``) and USD-M (``pu``)
stay in one place.

Prices are float64, and that is exact here: Binance sends prices as decimal strings with
at most 8 decimal places and far fewer than 15 significant digits (a price of 10**7 with
8 decimals would need 16; real tick sizes grow with the price). Any decimal with at most
15 significant digits survives the round trip through a double (``DBL_DIG`` = 15), and
string-to-double conversion is correctly rounded, hence deterministic and monotone: the
same string always gives the same double, two different prices give two different
doubles, and their order is kept. So equality (dict keys, drift checks) and ordering
compare exactly as the decimals do; ``"0.10"`` and ``"0.1000"`` are even the same level,
as they are on the exchange. Quantities are float64 too: they are only stored, compared
with 0 (``"0.00000000"`` parses to exactly 0.0) and compared for equality with another
parse of the exchange's string. Within one diff the levels apply in order, so a price
given twice (Binance does not do that) takes the quantity given last.

A level that does not parse raises (ValueError, TypeError) out of ``apply`` with the
levels before it applied: the book is then *broken* (``broken``), its reads say so
(``bids()``/``asks()`` raise, the engine takes its state as unknown) and it must be
rebuilt from a snapshot, which the diff stream's next event asks for anyway (the
sequence did not move past the diff that failed, so the next one shows a gap).
"""

from __future__ import annotations

import math
from bisect import bisect_left, insort
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from ingestor.binance.depth_sync import DepthSync
from ingestor.binance.streams import Market

F64 = npt.NDArray[np.float64]
Levels = Sequence[Sequence[str]]  # Binance's [["price", "qty"], ...]
_EMPTY = np.empty(0, dtype=np.float64)
_EMPTY.flags.writeable = False
_INF = math.inf
TOP_KEEP = 64  # levels per side ``top`` keeps in order (at least; more when asked for more)


def parse_levels(levels: Levels) -> tuple[F64, F64]:
    """Binance level list -> (prices, quantities) as float64 arrays, in one numpy call."""
    if not levels:
        return _EMPTY, _EMPTY
    arr = np.array(levels, dtype=np.float64)
    return arr[:, 0], arr[:, 1]


def level_prices(changed: tuple[Levels, Levels]) -> list[Any]:
    """The prices (as Binance spelt them) of a diff's levels, both sides: ``NumpyBook.changed``
    in the form worth keeping (one list of strings, not the diff's small lists)."""
    bids, asks = changed
    return [lv[0] for side in (bids, asks) for lv in side]


def changed_prices(diffs: Iterable[list[Any]]) -> F64:
    """The prices of ``level_prices`` lists, as one float64 array."""
    return np.array([float(p) for prices in diffs for p in prices], dtype=np.float64)


_BROKEN = "the book's last diff failed half way: rebuild it from a snapshot"


class BrokenBook(ValueError):
    """A read of a book whose last ``apply`` failed half way: rebuild it from a snapshot."""


def _readonly(a: F64) -> F64:
    a.flags.writeable = False
    return a


class NumpyBook:
    """One (market, symbol) order book; see the module docstring."""

    __slots__ = ("last_update_id", "_b", "_a", "_sorted", "_top", "bid_floor", "ask_ceiling", "changed",
                 "broken")

    def __init__(self, last_update_id: int = 0) -> None:
        self.last_update_id = last_update_id
        self._b: dict[float, float] = {}  # bid price -> quantity
        self._a: dict[float, float] = {}  # ask price -> quantity
        self._sorted: tuple[F64, F64, F64, F64] | None = None  # bids()/asks() until the next apply
        self._top: _Top | None = None  # the best levels in order, once ``top`` was called
        # The price range this book knows completely: set by the first apply, which is the
        # snapshot (DepthSync applies it to a fresh book). Diffs carry every change, so
        # bids at or above the snapshot's lowest bid (asks at or below its highest ask)
        # stay exact; deeper levels the snapshot's limit left out were never seen. An
        # empty snapshot side says the whole side is empty: it is known entirely.
        self.bid_floor: float | None = None
        self.ask_ceiling: float | None = None
        # The level lists of the last diff applied, (bids, asks), as given: what a drift
        # check must leave out when the snapshot falls inside that diff. Empty after the
        # snapshot. An owner that keeps the last few should keep their ``level_prices``:
        # thousands of small lists kept alive cost every garbage collection a walk through them.
        self.changed: tuple[Levels, Levels] = ((), ())
        self.broken = False

    def apply(self, bids: Levels, asks: Levels) -> None:
        """Apply Binance level lists (absolute quantities; qty 0 deletes the level)."""
        if not bids and not asks:
            if self.bid_floor is None:  # an empty snapshot: both sides known, and empty
                self.bid_floor, self.ask_ceiling = -_INF, _INF
            return
        self._sorted = None
        try:
            if self.bid_floor is None:
                self._first(bids, asks)
                return
            top = self._top
            if top is None:
                b, a = self._b, self._a
                pop = b.pop
                for ps, qs in bids:
                    q = float(qs)
                    if q:
                        b[float(ps)] = q
                    else:
                        pop(float(ps), None)
                pop = a.pop
                for ps, qs in asks:
                    q = float(qs)
                    if q:
                        a[float(ps)] = q
                    else:
                        pop(float(ps), None)
            else:
                top.apply(self._b, self._a, bids, asks)
        except BaseException:  # a level that does not parse: see the module docstring
            self.broken = True
            raise
        self.changed = (bids, asks)

    def _first(self, bids: Levels, asks: Levels) -> None:
        """The snapshot: also the range it covers (``bid_floor``, ``ask_ceiling``)."""
        lo, hi = _INF, -_INF
        b, a = self._b, self._a
        for ps, qs in bids:
            p, q = float(ps), float(qs)
            if p < lo:
                lo = p
            if q:
                b[p] = q
            else:
                b.pop(p, None)
        for ps, qs in asks:
            p, q = float(ps), float(qs)
            if p > hi:
                hi = p
            if q:
                a[p] = q
            else:
                a.pop(p, None)
        self.bid_floor = lo if bids else -_INF
        self.ask_ceiling = hi if asks else _INF
        self.changed = ((), ())
        self._top = None  # a top() before the snapshot kept nothing

    # -- reads --------------------------------------------------------------------------------

    def _sides(self) -> tuple[F64, F64, F64, F64]:
        """Both sides sorted, best first: (bid prices, bid qtys, ask prices, ask qtys)."""
        s = self._sorted
        if s is None:
            if self.broken:
                raise BrokenBook(_BROKEN)
            b, a = self._b, self._a
            bp = np.fromiter(b, np.float64, len(b))
            bq = np.fromiter(b.values(), np.float64, len(b))
            ap = np.fromiter(a, np.float64, len(a))
            aq = np.fromiter(a.values(), np.float64, len(a))
            ob = np.argsort(bp)[::-1]  # prices are distinct keys: any sort gives one order
            oa = np.argsort(ap)
            s = self._sorted = (_readonly(bp[ob]), _readonly(bq[ob]), _readonly(ap[oa]), _readonly(aq[oa]))
        return s

    def bids(self) -> tuple[F64, F64]:
        """(prices, quantities), best (highest) first: read-only arrays of the book as it is
        now (a later ``apply`` makes new ones on the next read and leaves these as they are).
        Raises ``BrokenBook`` when the last ``apply`` failed."""
        s = self._sides()
        return s[0], s[1]

    def asks(self) -> tuple[F64, F64]:
        """(prices, quantities), best (lowest) first: read-only arrays, as ``bids``."""
        s = self._sides()
        return s[2], s[3]

    def top(self, n: int) -> tuple[tuple[list[float], list[float]], tuple[list[float], list[float]]]:
        """The best ``n`` levels of each side, best first: ((bid prices, bid qtys), (ask
        prices, ask qtys)) as lists, without sorting the book (see the module docstring).
        Raises ``BrokenBook`` when the last ``apply`` failed."""
        if self.broken:
            raise BrokenBook(_BROKEN)
        top = self._top
        if top is None:
            top = self._top = _Top(self._b, self._a, max(TOP_KEEP, 2 * n))
        return top.read(self._b, self._a, n)

    def best_bid(self) -> float | None:
        if self.broken:
            raise BrokenBook(_BROKEN)
        if not self._b:
            return None
        if self._top is not None:
            return self._top.read(self._b, self._a, 1)[0][0][0]
        return float(self._sorted[0][0]) if self._sorted is not None else max(self._b)

    def best_ask(self) -> float | None:
        if self.broken:
            raise BrokenBook(_BROKEN)
        if not self._a:
            return None
        if self._top is not None:
            return self._top.read(self._b, self._a, 1)[1][0][0]
        return float(self._sorted[2][0]) if self._sorted is not None else min(self._a)

    def mid(self) -> float | None:
        b, a = self.best_bid(), self.best_ask()
        return None if b is None or a is None else (b + a) / 2.0

    def crossed(self) -> bool:
        b, a = self.best_bid(), self.best_ask()
        return b is not None and a is not None and b >= a

    def depth(self) -> tuple[int, int]:
        """Number of (bid, ask) levels."""
        return len(self._b), len(self._a)

    def side_ascending(self, bid: bool) -> tuple[F64, F64]:
        """One side in ascending price order (read-only views)."""
        p, q = self.bids() if bid else self.asks()
        return (p[::-1], q[::-1]) if bid else (p, q)

    def __repr__(self) -> str:
        nb, na = self.depth()
        best = "broken" if self.broken else f"{self.best_bid()}/{self.best_ask()}"
        return f"NumpyBook(u={self.last_update_id}, bids={nb}, asks={na}, best={best})"


class _Top:
    """The best levels of both sides in order, for ``NumpyBook.top``.

    Bids: ``bids`` holds, ascending, every bid price ``>= bid_bound`` (the best is last, so
    the levels that change most sit at the end of the list, where inserting and deleting
    moves least). Asks: ``asks`` holds, ascending, every ask price ``<= ask_bound`` (the
    best first). A bound of -inf / inf: the list holds the whole side."""

    __slots__ = ("keep", "bids", "bid_bound", "asks", "ask_bound")

    def __init__(self, b: dict[float, float], a: dict[float, float], keep: int) -> None:
        self.keep = keep
        self._fill_bids(b)
        self._fill_asks(a)

    def _fill_bids(self, b: dict[float, float]) -> None:
        keys = sorted(b)
        k = self.keep
        self.bids = keys[-k:]
        self.bid_bound = keys[-k] if len(keys) > k else -_INF

    def _fill_asks(self, a: dict[float, float]) -> None:
        keys = sorted(a)
        k = self.keep
        self.asks = keys[:k]
        self.ask_bound = keys[k - 1] if len(keys) > k else _INF

    def apply(self, b: dict[float, float], a: dict[float, float], bids: Levels, asks: Levels) -> None:
        lst, bound, pop = self.bids, self.bid_bound, b.pop
        for ps, qs in bids:
            q, p = float(qs), float(ps)
            if p >= bound:  # inside the kept range: a level that comes or goes moves the list
                if q:
                    if p not in b:
                        insort(lst, p)
                    b[p] = q
                elif pop(p, None) is not None:
                    del lst[bisect_left(lst, p)]
            elif q:
                b[p] = q
            else:
                pop(p, None)
        lst, bound, pop = self.asks, self.ask_bound, a.pop
        for ps, qs in asks:
            q, p = float(qs), float(ps)
            if p <= bound:
                if q:
                    if p not in a:
                        insort(lst, p)
                    a[p] = q
                elif pop(p, None) is not None:
                    del lst[bisect_left(lst, p)]
            elif q:
                a[p] = q
            else:
                pop(p, None)
        k = self.keep
        if len(self.bids) > 4 * k:  # grown long (the price fell through it): keep the best k
            del self.bids[:-k]
            self.bid_bound = self.bids[0]
        if len(self.asks) > 4 * k:
            del self.asks[k:]
            self.ask_bound = self.asks[-1]

    def read(self, b: dict[float, float], a: dict[float, float], n: int) -> tuple[tuple[list[float], list[float]],
                                                                                  tuple[list[float], list[float]]]:
        if n > self.keep:
            self.keep = 2 * n
            self._fill_bids(b)
            self._fill_asks(a)
        if len(self.bids) < n and self.bid_bound != -_INF:  # run short: refill from the dict
            self._fill_bids(b)
        if len(self.asks) < n and self.ask_bound != _INF:
            self._fill_asks(a)
        bp = self.bids[:-n - 1:-1] if n else []
        ap = self.asks[:n]
        return (bp, [b[p] for p in bp]), (ap, [a[p] for p in ap])


def new_sync(market: Market, before_apply: Callable[[dict[str, Any]], None] | None = None) -> DepthSync[NumpyBook]:
    """Binance's sync procedure for ``market`` building a ``NumpyBook``."""
    return DepthSync(market, NumpyBook, before_apply)


def _cut(p: F64, q: F64, lo: float, hi: float) -> tuple[F64, F64]:
    """The levels of an ascending side with ``lo <= price <= hi``."""
    i, j = int(np.searchsorted(p, lo, side="left")), int(np.searchsorted(p, hi, side="right"))
    return p[i:j], q[i:j]


def _side_mismatches(bp: F64, bq: F64, sp: F64, sq: F64, changed: F64 | None) -> int:
    if changed is not None and changed.size:
        kb, ks = ~np.isin(bp, changed), ~np.isin(sp, changed)
        bp, bq, sp, sq = bp[kb], bq[kb], sp[ks], sq[ks]
    common, ib, is_ = np.intersect1d(bp, sp, assume_unique=True, return_indices=True)
    n = common.shape[0]
    return int(bp.shape[0] - n + sp.shape[0] - n + np.count_nonzero(bq[ib] != sq[is_]))


def drift(book: NumpyBook, snapshot: dict[str, Any], limit: int | None = None, changed: F64 | None = None) -> int:
    """Levels where ``book`` and a REST depth ``snapshot`` disagree (0: no drift).

    Exact when the snapshot's ``lastUpdateId`` is the ``u`` of the last diff applied to
    the book (FEATURES.md, "no drift"). A snapshot usually falls inside a diff instead
    (``U <= lastUpdateId < u``), or the book has moved on since: then ``changed`` holds
    the prices of every level that the diffs applied after the snapshot (the one spanning
    it included) touched. Those levels are left out; every other level has not changed
    since the snapshot and must equal it. Without ``changed``, a snapshot at any other
    update id raises ValueError.

    Levels are compared over the price range the snapshot covers: bids at or above its
    lowest bid, asks at or below its highest ask, since its depth limit leaves deeper
    levels out. When ``limit`` (the request's) is given and a side holds fewer levels
    than that, the snapshot holds that whole side; an empty snapshot side likewise
    covers the whole side. The range is also cut to what the book knows
    (``bid_floor``/``ask_ceiling``, from the snapshot it was built from): once the price
    has moved, a later snapshot reaches levels deeper than the first one did, which no
    diff has touched since, so the book never saw them and that is not drift. A level
    counts once when it is missing on either side or its quantity differs.
    """
    lid = int(snapshot["lastUpdateId"])
    if changed is None and lid != book.last_update_id:
        raise ValueError(f"snapshot lastUpdateId {lid} != book update id {book.last_update_id}")
    total = 0
    for is_bid in (True, False):
        bp, bq = book.side_ascending(is_bid)
        sp, sq = parse_levels(snapshot["bids" if is_bid else "asks"])
        order = np.argsort(sp)
        sp, sq = sp[order], sq[order]
        whole = sp.shape[0] == 0 or (limit is not None and sp.shape[0] < limit)
        if is_bid:
            known = -np.inf if book.bid_floor is None else book.bid_floor
            lo, hi = max(known, -np.inf if whole else float(sp[0])), np.inf
        else:
            known = np.inf if book.ask_ceiling is None else book.ask_ceiling
            lo, hi = -np.inf, min(known, np.inf if whole else float(sp[-1]))
        total += _side_mismatches(*_cut(bp, bq, lo, hi), *_cut(sp, sq, lo, hi), changed)
    return total
