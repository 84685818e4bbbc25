"""The feature worker's order book: both sides in sorted numpy arrays.

``NumpyBook`` applies a whole Binance diff (``[["price", "qty"], ...]`` per side) with
array operations: one ``np.array(bids + asks, dtype=float64)`` parse for both sides, one
``searchsorted`` against the current levels, then one bulk quantity update, one bulk
delete (``qty == 0``) and one bulk insert. No Python object is made per level. Syncing
follows Binance's rules through ``ingestor.binance.depth_sync.DepthSync`` with
``book_factory=NumpyBook`` (see ``new_sync``), so Spot (``U``/``u``) and USD-M (``pu``)
stay in one place.

Prices are float64, and that is exact here: Binance sends prices as decimal strings with
at most 8 decimal places and far fewer than 15 significant digits (a price of 10**7 with
8 decimals would need 16; real tick sizes grow with the price). Any decimal with at most
15 significant digits survives the round trip through a double (``DBL_DIG`` = 15), and
string-to-double conversion is correctly rounded, hence deterministic and monotone: the
same string always gives the same double, two different prices give two different
doubles, and their order is kept. So equality (``searchsorted`` hits, drift checks) and
ordering compare exactly as the decimals do; ``"0.10"`` and ``"0.1000"`` are even the
same level, as they are on the exchange. Quantities are float64 too: they are only stored,
compared with 0 (``"0.00000000"`` parses to exactly 0.0) and compared for equality with
another parse of the exchange's string. Negating a double (the bid keys below) is exact.

Storage: one ascending key array for both sides, bids as negative prices, so the best
bid, the deeper bids, the best ask and the deeper asks follow in that order; the
quantities beside them; the absolute prices as a third array so each side is a slice.
``bids()``/``asks()`` return read-only views, best first, without copying; they show the
book as it is until the next ``apply`` (which may update quantities in place).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt

from ingestor.binance.depth_sync import DepthSync
from ingestor.binance.streams import Market

F64 = npt.NDArray[np.float64]
_EMPTY = np.empty(0, dtype=np.float64)


def parse_levels(levels: list[list[str]] | list[tuple[str, str]]) -> tuple[F64, F64]:
    """Binance level list -> (prices, quantities) as float64 arrays, in one numpy call."""
    if not levels:
        return _EMPTY, _EMPTY
    arr = np.array(levels, dtype=np.float64)
    return arr[:, 0], arr[:, 1]


def _readonly(a: F64) -> F64:
    v = a.view()
    v.flags.writeable = False
    return v


def _merge(k: F64, q: F64, keys: F64, qtys: F64) -> tuple[F64, F64]:
    """Apply diff levels (``keys`` strictly ascending) to an ascending book (``k``, ``q``):
    update found levels in place, drop those set to 0, insert new ones; vectorised."""
    n = keys.shape[0]
    idx = k.searchsorted(keys)
    # take(clip): a key above every level looks at the last one, which is smaller.
    found = k.take(idx, mode="clip") == keys if k.shape[0] else np.zeros(n, dtype=bool)
    zero = qtys == 0.0
    if np.count_nonzero(found):
        # Updates and deletions in place (a deletion writes 0), then drop the zeros.
        q[idx[found]] = qtys[found]
        if np.count_nonzero(zero & found):
            keep = q != 0.0
            k, q = k[keep], q[keep]
    ins = ~(found | zero)
    m = int(np.count_nonzero(ins))
    if m:
        new_k, new_q = (keys, qtys) if m == n else (keys[ins], qtys[ins])
        # The new levels' final slots; the old levels fill the rest, in order.
        slots = k.searchsorted(new_k) + np.arange(m)
        size = k.shape[0] + m
        old = np.ones(size, dtype=bool)
        old[slots] = False
        out_k, out_q = np.empty(size), np.empty(size)
        out_k[slots], out_q[slots] = new_k, new_q
        out_k[old], out_q[old] = k, q
        k, q = out_k, out_q
    return k, q


class NumpyBook:
    """One (market, symbol) order book; see the module docstring (Binance prices are
    positive, which the signed keys rely on). A diff is one parse, one search, one merge."""

    __slots__ = ("last_update_id", "_k", "_q", "_px", "_nb", "bid_floor", "ask_ceiling", "changed")

    def __init__(self, last_update_id: int = 0) -> None:
        self.last_update_id = last_update_id
        self._k: F64 = _EMPTY
        self._q: F64 = _EMPTY
        self._px: F64 | None = _EMPTY  # absolute prices, made when a side is read (None: stale)
        self._nb = 0  # number of bid levels: they are the first _nb entries
        # The price range this book knows completely: set by the first apply, which is the
        # snapshot (DepthSync applies it to a fresh book). Diffs carry every change, so
        # bids at or above the snapshot's lowest bid (asks at or below its highest ask)
        # stay exact; deeper levels the snapshot's limit left out were never seen. An
        # empty snapshot side says the whole side is empty: it is known entirely.
        self.bid_floor: float | None = None
        self.ask_ceiling: float | None = None
        # The levels the last diff touched, as signed keys (bids negative): what a drift check
        # must leave out when the snapshot falls inside that diff. Empty after the snapshot.
        self.changed: F64 = _EMPTY

    def apply(self, bids: list[list[str]], asks: list[list[str]]) -> None:
        """Apply Binance level lists (absolute quantities; qty 0 deletes the level)."""
        nb = len(bids)
        if nb + len(asks) == 0:
            if self.bid_floor is None:  # an empty snapshot: both sides known, and empty
                self.bid_floor, self.ask_ceiling = -np.inf, np.inf
            return
        arr = np.array(bids + asks, dtype=np.float64)  # both sides in one parse
        keys, qtys = arr[:, 0], arr[:, 1]
        first = self.bid_floor is None
        if first:
            self.bid_floor = float(keys[:nb].min()) if nb else -np.inf
            self.ask_ceiling = float(keys[nb:].max()) if nb < keys.shape[0] else np.inf
        keys[:nb] *= -1.0
        # Binance lists bids best (highest) first and asks best (lowest) first, so the keys
        # are usually ascending already; otherwise sort, and a price given twice (Binance
        # does not do that) takes the quantity given last.
        n = keys.shape[0]
        if n > 1 and not (keys[1:] > keys[:-1]).all():
            order = np.argsort(keys, kind="stable")
            keys, qtys = keys[order], qtys[order]
            dup = keys[1:] == keys[:-1]
            if dup.any():
                keep = np.ones(n, dtype=bool)
                keep[:-1] = ~dup
                keys, qtys = keys[keep], qtys[keep]
        self.changed = _EMPTY if first else keys
        k, q = _merge(self._k, self._q, keys, qtys)
        if k is not self._k:  # levels came or went: refresh prices and the split
            self._k, self._px = k, None  # the prices are derived when read: most diffs are never read
            self._nb = int(k.searchsorted(0.0))
        self._q = q

    def _prices(self) -> F64:
        px = self._px
        if px is None:
            px = self._px = np.abs(self._k)
        return px

    def bids(self) -> tuple[F64, F64]:
        """(prices, quantities), best (highest) first: read-only views."""
        nb = self._nb
        return _readonly(self._prices()[:nb]), _readonly(self._q[:nb])

    def asks(self) -> tuple[F64, F64]:
        """(prices, quantities), best (lowest) first: read-only views."""
        nb = self._nb
        return _readonly(self._prices()[nb:]), _readonly(self._q[nb:])

    def best_bid(self) -> float | None:
        return -float(self._k[0]) if self._nb else None

    def best_ask(self) -> float | None:
        return float(self._k[self._nb]) if self._k.shape[0] > self._nb else None

    def mid(self) -> float | None:
        b, a = self.best_bid(), self.best_ask()
        return None if b is None or a is None else (b + a) / 2.0

    def crossed(self) -> bool:
        b, a = self.best_bid(), self.best_ask()
        return b is not None and a is not None and b >= a

    def depth(self) -> tuple[int, int]:
        """Number of (bid, ask) levels."""
        return self._nb, self._k.shape[0] - self._nb

    def side_ascending(self, bid: bool) -> tuple[F64, F64]:
        """One side in ascending price order (read-only views)."""
        p, q = self.bids() if bid else self.asks()
        return (p[::-1], q[::-1]) if bid else (p, q)

    def __repr__(self) -> str:
        nb, na = self.depth()
        return (f"NumpyBook(u={self.last_update_id}, bids={nb}, asks={na}, "
                f"best={self.best_bid()}/{self.best_ask()})")


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
