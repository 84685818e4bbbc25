"""The simulated symbol universe: names, precisions, starting prices, activity shares."""

from __future__ import annotations

from dataclasses import dataclass

# (base asset, starting price, price decimals, quantity decimals), most active first.
# Precisions are close to the real USD-M contracts so payloads look like the real ones.
_KNOWN: tuple[tuple[str, str, int, int], ...] = (
    ("BTC", "65000.0", 1, 3),
    ("ETH", "3200.00", 2, 3),
    ("SOL", "150.00", 2, 2),
    ("BNB", "580.00", 2, 2),
    ("XRP", "0.5200", 4, 1),
    ("DOGE", "0.12000", 5, 0),
    ("ADA", "0.4500", 4, 0),
    ("AVAX", "35.000", 3, 1),
    ("LINK", "14.000", 3, 2),
    ("DOT", "7.000", 3, 1),
)


@dataclass(frozen=True, slots=True)
class SymbolSpec:
    """One tradable symbol. Prices are integers of ``10**-price_dp`` (ticks),
    quantities integers of ``10**-qty_dp`` (lots)."""

    symbol: str
    base: str
    quote: str
    price_dp: int
    qty_dp: int
    start_ticks: int
    weight: float  # share of the market's trade activity; sums to 1 over the universe

    @property
    def lower(self) -> str:
        return self.symbol.lower()


def _ticks(price: str, dp: int) -> int:
    whole, _, frac = price.partition(".")
    return int(whole) * 10**dp + int((frac + "0" * dp)[:dp] or 0)


def build_universe(symbols: tuple[str, ...] | None, n_symbols: int) -> tuple[SymbolSpec, ...]:
    """Symbols by name (quote USDT) or the first ``n_symbols`` of a fixed list.

    Activity follows a Zipf law (1/rank) so a "top N by volume" selection is
    meaningful and stable.
    """
    known = {f"{b}USDT": (b, p, pdp, qdp) for b, p, pdp, qdp in _KNOWN}
    if symbols:
        names = list(symbols)
    else:
        names = [f"{b}USDT" for b, *_ in _KNOWN][:n_symbols]
        names += [f"SIM{i:03d}USDT" for i in range(n_symbols - len(names))]
    raw = []
    for rank, name in enumerate(names):
        if not name.isalnum() or name != name.upper() or not name.endswith("USDT"):
            raise ValueError(f"symbol {name!r}: use upper-case names ending in USDT")
        base, price, pdp, qdp = known.get(name, (name[:-4], f"{10 + rank % 90}.000", 3, 1))
        raw.append((name, base, pdp, qdp, _ticks(price, pdp), 1.0 / (rank + 1)))
    total = sum(r[-1] for r in raw)
    return tuple(
        SymbolSpec(name, base, "USDT", pdp, qdp, ticks, w / total)
        for name, base, pdp, qdp, ticks, w in raw
    )
