"""``ingestor features show``: the latest bars of one symbol, as a table a trader reads or as JSON.

The table keeps the columns that are looked at bar by bar (price, flow, the indicators, the
nearest walls, liquidations, the signal); ``--json`` gives every column of the stored rows.
NULL (an indicator that is undefined for that bar: short history, book not synced, no wall)
shows as ``-``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import asyncpg
import orjson

from ingestor.features import query

Row = Any  # an asyncpg.Record or a dict: anything indexable by column name

MISSING = "-"
# Columns whose values lie on the tick grid: they tell how many decimals the symbol's prices have.
_PRICE_COLUMNS = ("open", "high", "low", "close", "buy_wall_price", "sell_wall_price")
_MAX_DECIMALS = 8


def _finite(values: Iterable[Any]) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(v)]


def price_decimals(recs: Sequence[Row]) -> int:
    """The decimals the prices have: ``96123.4`` -> 1. Rounded at 8 places first, so that float
    noise (``0.30000000000000004``) does not count as precision."""
    best = 0
    for v in _finite(r[c] for r in recs for c in _PRICE_COLUMNS):
        frac = f"{v:.{_MAX_DECIMALS}f}".rstrip("0").partition(".")[2]
        best = max(best, len(frac))
    return best


def scale_decimals(values: Iterable[Any]) -> int:
    """Decimals that give the largest value about four significant digits: 12,345 / 123.4 / 1.234."""
    big = max((abs(v) for v in _finite(values)), default=0.0)
    if big == 0.0:
        return 0
    return min(6, max(0, 3 - math.floor(math.log10(big))))


def _num(fmt: str) -> Callable[[Any], str]:
    def cell(v: Any) -> str:
        if v is None or not math.isfinite(v):
            return MISSING
        text = format(v, fmt)
        # "+0.00" and "-0.00" say a direction that a value this small does not have.
        return text[1:] if text[0] in "+-" and not text.strip("+-0.,") else text
    return cell


def _wall(price: Any, dist: Any, pd: int) -> str:
    if price is None:
        return MISSING
    return f"{price:,.{pd}f} ({dist:.2f}%)" if dist is not None else f"{price:,.{pd}f}"


_SIGNALS = {1: "LONG", -1: "SHORT"}


def columns(recs: Sequence[Row]) -> list[tuple[str, bool, Callable[[Row], str]]]:
    """``(header, right_aligned, cell)`` per column; decimals chosen from the rows shown."""
    pd = price_decimals(recs)
    qd = scale_decimals(r["volume"] for r in recs)
    ld = scale_decimals(r["liq_notional"] for r in recs)
    price, qty, signed = _num(f",.{pd}f"), _num(f",.{qd}f"), _num(f"+,.{qd}f")

    # Stops carry a buffer in basis points, so they fall between ticks: one more decimal keeps
    # a short's stop from printing as the wall price it was placed beyond.
    level = _num(f",.{pd + 1}f")

    def on_signal(col: str) -> Callable[[Row], str]:
        return lambda r: level(r[col]) if r["signal"] else ""

    return [
        ("time (UTC)", False, lambda r: query.fmt_time(r["bar_time"])),
        ("close", True, lambda r: price(r["close"])),
        ("volume", True, lambda r: qty(r["volume"])),
        ("delta", True, lambda r: signed(r["delta"])),
        ("cvd", True, lambda r: signed(r["cvd"])),
        ("panic", True, lambda r: _num("+.2f")(r["panic_index"])),
        ("absorb", True, lambda r: _num("+.2f")(r["absorption"])),
        ("obi", True, lambda r: _num("+.3f")(r["obi"])),
        ("buy wall (dist)", True, lambda r: _wall(r["buy_wall_price"], r["dist_to_buy_wall"], pd)),
        ("sell wall (dist)", True, lambda r: _wall(r["sell_wall_price"], r["dist_to_sell_wall"], pd)),
        ("liq", True, lambda r: _num(f",.{ld}f")(r["liq_notional"])),
        ("fp imb", True, lambda r: _num("+.2f")(r["fp_imbalance"])),
        ("signal", False, lambda r: _SIGNALS.get(r["signal"], "") if r["signal"] is not None else MISSING),
        ("stop", True, on_signal("stop_price")),
        ("take profit", True, on_signal("take_profit")),
    ]


def format_table(recs: Sequence[Row]) -> str:
    """The rows as an aligned text table, one line per bar, in the order given."""
    cols = columns(recs)
    cells = [[h for h, _, _ in cols]] + [[cell(r) for _, _, cell in cols] for r in recs]
    widths = [max(len(line[i]) for line in cells) for i in range(len(cols))]
    lines = []
    for line in cells:
        parts = [c.rjust(w) if right else c.ljust(w) for c, w, (_, right, _) in zip(line, widths, cols, strict=True)]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


def to_json(recs: Sequence[Row]) -> str:
    """Every stored column of each row; times as ISO 8601 UTC (``...Z``), NULL as null."""
    return orjson.dumps([dict(r) for r in recs], option=orjson.OPT_UTC_Z).decode()


async def show(dsn: str, market: str, symbol: str, last: int, bar_seconds: int | None, as_json: bool) -> str:
    """The text to print: the latest ``last`` bars of ``(market, symbol)``, oldest first.

    Raises :class:`~ingestor.features.query.NoFeatures` when nothing is stored for them.
    """
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        sizes = await query.bar_sizes(conn, market, symbol)
        bar = query.choose_bar_seconds(sizes, market, symbol, bar_seconds)
        recs = await query.latest(conn, market, symbol, bar, last)
    finally:
        await conn.close()
    if not recs:  # deleted since the inventory was read
        raise query.NoFeatures(f"no {bar} s bars for {market} {symbol} any more")
    if as_json:
        return to_json(recs)
    head = (f"{market} {symbol}, {bar} s bars: the last {len(recs)}, "
            f"{query.fmt_time(recs[0]['bar_time'])} to {query.fmt_time(recs[-1]['bar_time'])} UTC")
    return head + "\n\n" + format_table(recs)
