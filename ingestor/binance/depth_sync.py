"""Binance's documented procedure for keeping a local order book, per market.

Spot ("How to manage a local order book correctly"): buffer diff events, fetch a
snapshot; if its ``lastUpdateId`` is below the first buffered ``U``, fetch again; drop
buffered events with ``u <= lastUpdateId``; then an event with ``u`` below the local
update id is ignored, one with ``U > local + 1`` means a gap (start over), anything
else is applied and ``local = u``.

USD-M: drop events with ``u < lastUpdateId``; the first applied event must have
``U <= lastUpdateId <= u``; after that every event's ``pu`` must equal the previous
event's ``u`` (USD-M ids are venue-wide, so ``U`` is not ``prev u + 1``). One case the
documented rule leaves out is taken too: a first event whose ``pu`` *is* the snapshot's
``lastUpdateId`` follows it exactly (the snapshot was taken between two events), so it
is applied instead of throwing away a snapshot that costs 20 of a minute's weight.

This is pure state: the caller does the I/O (subscribe first, then the snapshot). The
default book here keeps the exchange's decimal strings as keys, which is exact and enough
for validation; the feature worker passes ``book_factory`` to build its own numeric book
(``ingestor.features.book.NumpyBook``) under the same rules. After a ``DepthGap``,
``reset()`` and start over: buffer diffs, fetch a new snapshot.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar, overload

from ingestor.binance.streams import Market


class DepthGap(Exception):
    """The diff stream skipped updates: the book must be rebuilt from a new snapshot.

    ``first_missing``..``last_missing`` are the update ids that never arrived (on USD-M,
    where ids are venue-wide, the range they lie in)."""

    def __init__(self, message: str, first_missing: int, last_missing: int) -> None:
        super().__init__(message)
        self.first_missing = first_missing
        self.last_missing = last_missing


@dataclass
class LocalBook:
    last_update_id: int
    bids: dict[str, str] = field(default_factory=dict)
    asks: dict[str, str] = field(default_factory=dict)

    def apply(self, bids: list[list[str]], asks: list[list[str]]) -> None:
        for side, levels in ((self.bids, bids), (self.asks, asks)):
            for price, qty in levels:
                if _is_zero(qty):
                    side.pop(price, None)
                else:
                    side[price] = qty

    def best_bid(self) -> tuple[str, str] | None:
        if not self.bids:
            return None
        p = max(self.bids, key=float)
        return p, self.bids[p]

    def best_ask(self) -> tuple[str, str] | None:
        if not self.asks:
            return None
        p = min(self.asks, key=float)
        return p, self.asks[p]

    def crossed(self) -> bool:
        b, a = self.best_bid(), self.best_ask()
        return b is not None and a is not None and float(b[0]) >= float(a[0])


def _is_zero(qty: str) -> bool:
    return not qty.strip("0.")


class SyncedBook(Protocol):
    """What DepthSync needs of a book: its update id and applying Binance level lists."""

    last_update_id: int

    def apply(self, bids: list[list[str]], asks: list[list[str]]) -> None: ...


B = TypeVar("B", bound=SyncedBook)


class DepthSync(Generic[B]):
    """One symbol's book sync. Feed every diff event; give it the snapshot when it
    arrives; ``book`` is valid once ``synced``. ``book_factory(lastUpdateId)`` makes the
    empty book the snapshot is applied to (default: ``LocalBook``). ``before_apply(ev)``,
    if given, sees each event just before it changes the book (buffered ones included,
    when the snapshot arrives): the feature engine reads the book there."""

    @overload
    def __init__(self: DepthSync[LocalBook], market: Market) -> None: ...

    @overload
    def __init__(self, market: Market, book_factory: Callable[[int], B],
                 before_apply: Callable[[dict[str, Any]], None] | None = None) -> None: ...

    def __init__(self, market: Market, book_factory: Callable[[int], Any] = LocalBook,
                 before_apply: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.market = market
        self.book_factory = book_factory
        self.before_apply = before_apply
        self.pending: list[dict[str, Any]] = []
        self.book: B | None = None
        self.prev_u: int | None = None
        self.applied = 0

    def reset(self) -> None:
        """Forget the book and the buffer (after a DepthGap): buffer again, then resync."""
        self.pending, self.book, self.prev_u = [], None, None

    @property
    def synced(self) -> bool:
        return self.book is not None

    def on_snapshot(self, snapshot: dict[str, Any]) -> bool:
        """Install a REST snapshot. False: it is older than the first buffered event (the
        changes between them are on no event), so fetch another one: Spot's rule, and on
        USD-M the first event to apply must start at or before ``lastUpdateId``."""
        lid = int(snapshot["lastUpdateId"])
        if self.pending and lid < self.pending[0]["U"] - (1 if self.market == "spot" else 0) \
                and not (self.market == "futures" and self.pending[0].get("pu") == lid):
            return False
        book: B = self.book_factory(lid)
        book.apply(snapshot["bids"], snapshot["asks"])
        self.book, self.prev_u = book, None
        pending, self.pending = self.pending, []
        for ev in pending:
            self.on_event(ev)
        return True

    def on_event(self, ev: dict[str, Any]) -> bool:
        """Apply or buffer one diff event; True if it changed the book. Raises DepthGap."""
        book = self.book
        if book is None:
            self.pending.append(ev)
            return False
        U, u = ev["U"], ev["u"]  # noqa: N806
        if self.market == "spot":
            if u <= book.last_update_id:
                return False
            if U > book.last_update_id + 1:
                raise DepthGap(f"{ev.get('s')}: U={U} after local update id {book.last_update_id}",
                               book.last_update_id + 1, U - 1)
        elif self.prev_u is None:
            if u < book.last_update_id:
                return False
            if U > book.last_update_id and ev["pu"] != book.last_update_id:
                raise DepthGap(f"{ev.get('s')}: first event U={U} > lastUpdateId "
                               f"{book.last_update_id}", book.last_update_id + 1, U - 1)
        elif ev["pu"] != self.prev_u:
            raise DepthGap(f"{ev.get('s')}: pu={ev['pu']} != previous u={self.prev_u}",
                           self.prev_u + 1, max(ev["pu"], self.prev_u + 1))
        if self.before_apply is not None:
            self.before_apply(ev)
        # Apply first: a diff with a bad level raises before the sequence moves, so the
        # next diff reveals the hole (a gap, then a resync) instead of the book missing it.
        book.apply(ev["b"], ev["a"])
        self.prev_u = u
        book.last_update_id = u
        self.applied += 1
        return True
